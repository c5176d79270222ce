//! The node's own logs: the systemd journal (kubelet, container runtime) and the kernel ring,
//! shipped like container logs: same sinks, same acknowledgements, positions in the same
//! checkpoint store, a deterministic document id per entry. A GPU XID in the kernel ring is
//! attributed to the container whose process raised it.
//!
//! Each source is a thread that reads, encodes ECS documents and OTLP records as the sinks
//! ask, and hands batches to every sink; the committer advances its position once every one
//! has acknowledged.

pub mod journald;
pub mod kernel;
pub mod kmsg;
pub mod otlp;
pub mod record;
pub mod xid;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;

use self::record::NodeRecord;
use crate::config::{Config, Switch};
use crate::kube::Names;
use crate::logs::ack::AckMsg;
use crate::logs::checkpoint::{Checkpoints, NodePosition};
use crate::logs::source::FileId;
use crate::packed::Packer;
use crate::sinks::ecs::Documents;
use crate::sinks::{Batch, Formats};

/// Labels of `nodelens_container_gpu_xid_errors_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XidLabels {
    /// GPU index (empty: NVML names no GPU at the bus id).
    pub gpu: String,
    /// GPU UUID (empty: not known from the bus id).
    pub uuid: String,
    /// Namespace of the container whose process raised the XID.
    pub namespace: String,
    /// Its pod.
    pub pod: String,
    /// Its container.
    pub container: String,
    /// Its application.
    pub app: String,
    /// Its user.
    pub user: String,
    /// The XID number.
    pub xid: String,
}

/// Labels of `nodelens_log_lost_records_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LostLabels {
    /// `kernel`: records the ring overwrote before they were read.
    pub source: &'static str,
}

/// Labels of `nodelens_node_log_records_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeRecordLabels {
    /// `kernel` or `journald`.
    pub source: &'static str,
    /// The syslog level's name: `emerg`, `alert`, `crit`, `err`, `warning`, `notice`, `info`,
    /// `debug`, or `none` for an entry without a priority.
    pub level: &'static str,
}

impl NodeRecordLabels {
    /// The labels of a record of `source` at syslog `priority`.
    pub fn new(source: &'static str, priority: Option<u8>) -> NodeRecordLabels {
        const NAMES: [&str; 8] = ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"];
        NodeRecordLabels { source, level: priority.map_or("none", |p| NAMES[usize::from(p.min(7))]) }
    }
}

/// The node-log sources' metric handles.
#[derive(Clone, Default)]
pub struct NodeLogMetrics {
    /// `nodelens_node_log_records_total`: records read, by source and syslog level.
    pub records: Family<NodeRecordLabels, Counter>,
    /// `nodelens_container_gpu_xid_errors_total`.
    pub xid_errors: Family<XidLabels, Counter>,
    /// `nodelens_log_lost_records_total`.
    pub lost: Family<LostLabels, Counter>,
}

/// Where a source's batches go: every sink, and the committer.
pub struct Feed {
    /// The encodings the sinks read.
    pub formats: Formats,
    /// Batch numbers, shared with the container-log encoder: the committer's order.
    pub seq: Arc<AtomicU64>,
    /// The sinks' inputs.
    pub sinks: Vec<mpsc::Sender<Arc<Batch>>>,
    /// The committer.
    pub acks: mpsc::Sender<AckMsg>,
    /// The Elasticsearch data stream (`sinks.elasticsearch.node_data_stream`).
    pub index: Arc<str>,
    /// `host.name` and `kubernetes.node.name`.
    pub node: String,
    /// `orchestrator.cluster.name` (omitted when empty).
    pub cluster: String,
}

impl Feed {
    /// Encodes `records` (of the source `source`) and hands them to every sink; `position`
    /// is committed once all have acknowledged. Blocks while the sinks are full. False when
    /// the pipeline is gone.
    pub fn send(&self, source: FileId, records: &[NodeRecord], position: NodePosition) -> bool {
        let mut docs = Documents::default();
        if self.formats.documents() {
            for record in records {
                record.encode(&self.node, &self.cluster, &mut docs.bytes);
                docs.ends.push(docs.bytes.len() as u32);
                docs.offsets.push(record.id);
            }
        }
        let mut otlp = Vec::new();
        if self.formats.otlp_records() && !records.is_empty() {
            let observed = crate::otlp::unix_nanos(std::time::SystemTime::now());
            self::otlp::encode(records, source, &self.node, &self.cluster, observed, &mut otlp);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let sinks = if records.is_empty() { 0 } else { self.sinks.len() as u32 };
        let index = Some(self.index.clone());
        let batch =
            Arc::new(Packer::with(|packer| Batch::new(seq, source, records.len(), index).packed(&mut docs, &otlp, self.formats, packer)));
        if self.acks.blocking_send(AckMsg::RegisterNode { seq, position, sinks }).is_err() {
            return false;
        }
        sinks == 0 || self.sinks.iter().all(|sink| sink.blocking_send(batch.clone()).is_ok())
    }
}

/// The running node-log sources.
pub struct NodeLogs {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What a source thread needs.
pub struct Context {
    /// The agent's settings.
    pub config: Config,
    /// Positions.
    pub checkpoints: Arc<Checkpoints>,
    /// Pod and container names for XID attribution.
    pub names: Names,
    /// Metric handles.
    pub metrics: NodeLogMetrics,
    /// The GPUs by PCI address, as NVML names them (empty without NVML).
    pub gpus: crate::host::pci::GpuBusIds,
    /// Set to stop.
    pub stop: Arc<AtomicBool>,
}

impl NodeLogs {
    /// Starts the sources the config turns on, each feeding `feed()`. A source that cannot
    /// start (no journal, an unreadable device) is logged and left off when `auto`, and when
    /// forced on is logged as an error while everything else runs.
    pub fn start(context: Context, feed: impl Fn() -> Feed) -> anyhow::Result<NodeLogs> {
        let mut threads = Vec::new();
        let stop = context.stop.clone();
        let context = Arc::new(context);
        let node_logs = &context.config.node_logs;
        if node_logs.kernel.enabled != Switch::Off {
            match kernel::open(&context) {
                Ok(source) => {
                    let (context, feed) = (context.clone(), feed());
                    threads.push(std::thread::Builder::new().name("kernel-log".into()).spawn(move || source.run(&context, &feed))?);
                }
                Err(e) => report(node_logs.kernel.enabled, "kernel log", &e),
            }
        }
        if node_logs.journald.enabled != Switch::Off {
            match journald::open(&context.config.node_logs.journald) {
                Ok(source) => {
                    let (context, feed) = (context.clone(), feed());
                    threads.push(std::thread::Builder::new().name("journal".into()).spawn(move || source.run(&context, &feed))?);
                }
                Err(e) => report(node_logs.journald.enabled, "journal", &e),
            }
        }
        Ok(NodeLogs { stop, threads })
    }

    /// Asks every source to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Waits for the sources to end (after [`NodeLogs::stop`]).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn report(switch: Switch, what: &str, error: &anyhow::Error) {
    let denied = error.chain().filter_map(|e| e.downcast_ref::<std::io::Error>()).any(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
    if switch == Switch::On {
        tracing::error!(error = %format!("{error:#}"), "{what} cannot be read; it is not shipped (everything else runs)");
    } else if denied {
        // Mounted but refused (no CAP_SYSLOG, or a device cgroup that denies /dev/kmsg): the
        // install meant it to be read.
        tracing::warn!(error = %format!("{error:#}"), "{what} cannot be read; it is not shipped (everything else runs)");
    } else {
        tracing::info!(reason = %format!("{error:#}"), "{what} not found; not shipped");
    }
}

/// Sleeps `total` in short steps, returning early (false) once `stop` is set.
fn pause(stop: &AtomicBool, total: std::time::Duration) -> bool {
    let step = std::time::Duration::from_millis(100);
    let mut left = total;
    while !left.is_zero() {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(left.min(step));
        left = left.saturating_sub(step);
    }
    !stop.load(Ordering::Acquire)
}
