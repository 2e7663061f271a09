//! The service side of the core: the task runtime that hosts the monitoring and
//! migration services ([`tasks`]), the control server on virtio-vsock ([`control`]),
//! and local migration within one hypervisor ([`local_migration`]).

pub mod control;
pub mod local_migration;
pub mod tasks;
