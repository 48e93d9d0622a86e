//! hvx node agent.
#![forbid(unsafe_code)]
