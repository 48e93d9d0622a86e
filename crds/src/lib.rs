//! hvx.dev/v1alpha1 API types.
#![forbid(unsafe_code)]
