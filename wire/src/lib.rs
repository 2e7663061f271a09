//! The one contract between `hvctl`, the hypervisor core and the service tasks:
//! message types and byte-stream framing.
//!
//! Not yet filled: the message set, the frame format (with its byte diagram) and the
//! test vectors arrive with the control-channel work (issue 4). Until then this crate
//! deliberately defines nothing, so nothing can depend on a format that does not exist.
#![no_std]
#![forbid(unsafe_code)]
