//! nodelens: a Kubernetes node agent for AI workloads.
//!
//! Three jobs, three parts of the tree: `logs` (tail, decode, checkpoint), enriched from
//! `kube` (pod metadata), feeding `sinks`
//! (ECS documents to stdout or Elasticsearch) through `pipeline`; metrics in `metrics`, served
//! by `server`; `config` and `agent` tie them together.

pub mod agent;
pub mod certs;
pub mod config;
pub mod gpu;
pub mod host;
pub mod identity;
pub mod kube;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod node_logs;
pub mod otlp;
pub mod periodic;
pub mod pipeline;
pub mod process;
pub mod server;
pub mod shutdown;
pub mod sinks;
pub mod tasks;
