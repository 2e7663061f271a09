//! The service side of the core: the task runtime that hosts the monitoring and
//! migration services ([`tasks`]), the control server on virtio-vsock and a serial
//! line ([`control`], [`serial_control`]),
//! local migration within one hypervisor ([`local_migration`]), and the staging of
//! uploaded kernels and initrds ([`upload`]).

pub mod control;
pub mod local_migration;
pub mod serial_control;
pub mod tasks;
pub mod upload;
