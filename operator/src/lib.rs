//! hvx operator.
#![forbid(unsafe_code)]
