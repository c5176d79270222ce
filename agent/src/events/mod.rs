//! The cluster's Kubernetes Events into the log sinks, from one agent of the cluster at a
//! time: the agents elect one through a Lease (`lease.rs`); while it leads, it lists and
//! watches every Event and hands each version to the pipeline as a record.

pub mod lease;
