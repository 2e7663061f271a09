//! Migration service task: log-dirty rounds, stream records, convergence policy,
//! send and receive.
//!
//! It talks to the core only through `wire` messages. Not yet filled: its work arrives
//! with the migration issue (issue 8); until then it defines nothing rather than
//! pretend to answer.
#![no_std]
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
