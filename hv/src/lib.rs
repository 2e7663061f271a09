//! The hypervisor core.
#![no_std]
