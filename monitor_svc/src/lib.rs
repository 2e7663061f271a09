//! Monitoring service task: RMID allocation, CMT/MBM sampling, generic per-domain
//! events and stats.
//!
//! It talks to the core only through `wire` messages and never touches hardware
//! itself. Not yet filled: its work arrives with the monitoring issue (issue 6); until
//! then it defines nothing rather than pretend to answer.
#![no_std]
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
