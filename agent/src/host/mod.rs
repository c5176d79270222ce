//! What the agent reads about the host's processes through `host.proc_root`: which
//! container a process belongs to, and container `/dev/shm` sizes.

pub mod pci;
pub mod shm;
pub mod shm_metrics;
