//! nodelens: a Kubernetes node agent for AI workloads.
//!
//! The modules, bottom up (each imports only those above it in this list; the
//! `module_graph` test enforces that there is no cycle):
//!
//! - `shutdown`, `periodic`: the stop signal and periodic checks off the runtime.
//! - `identity`: who a container is (log paths, cgroups, app and user, metric labels).
//! - `config`: the YAML schema by section, validated once into typed `Settings`.
//! - `metrics`: the registry; a leaf that registers the handles each part hands it.
//! - Sources: `kube` (pod metadata, HAMi grants), `events` (the cluster's Kubernetes Events,
//!   from the agent elected through a Lease), `logs` (container log files to chunks,
//!   acknowledgements, checkpoints), `host` (PCI bus ids, `/dev/shm`), `gpu` (NVML,
//!   allocations, attribution, export), `certs`, `process`, `memory`.
//! - Wire formats and sinks: `packed` (request bodies held compressed: gzip pieces made
//!   once per batch and joined into one member per request), `otlp` (transport, log and metric encoding, metrics push),
//!   `sinks` (ECS, Elasticsearch, OTLP, stdout), `node_logs` (journal and kernel ring).
//! - `pipeline`: tailer → encoder → sinks → committer.
//! - `server` (`/metrics`, `/healthz`, `/readyz`) and `agent` (start-up, shutdown, every
//!   part's metric handles in `agent::Metrics`).
//! - `test_numbers` (tests only): the randomized tests' numbers, imported by none of the above.

pub mod agent;
pub mod certs;
pub mod config;
pub mod events;
pub mod gpu;
pub mod host;
pub mod identity;
pub mod kube;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod node_logs;
pub mod otlp;
pub mod packed;
pub mod periodic;
pub mod pipeline;
pub mod process;
pub mod server;
pub mod shutdown;
pub mod sinks;
pub mod tasks;
#[cfg(test)]
mod test_numbers;
