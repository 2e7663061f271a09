//! CPUID featuresets, dependency-checked policies and cross-host levelling.
#![no_std]
#![forbid(unsafe_code)]
