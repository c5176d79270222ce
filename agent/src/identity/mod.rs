//! Who a container is: from its log file's path (`path`), from a host process's cgroup
//! (`cgroup`), its application and user from pod metadata or, without it, from the pod's name
//! (`resolve`), and the one label set non-log metrics carry (`names`: [`ContainerLabels`],
//! looked up in the pod metadata or the kubelet's directories). Pure naming: no part of the
//! agent below it, so logs, GPU attribution, shm sizes and the kernel log share it.

pub mod cgroup;
pub mod names;
pub mod path;
pub mod resolve;

pub use names::ContainerLabels;
