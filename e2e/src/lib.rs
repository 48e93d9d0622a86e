//! End-to-end test support.
#![forbid(unsafe_code)]
