//! The kernel ring source: reads `/dev/kmsg` from the oldest record it holds, skips what the
//! checkpoint says was shipped in this boot, counts what the ring overwrote before it was
//! read, and attributes GPU XIDs to containers.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::kmsg::{self, KernelRecord, KmsgReader, Read};
use super::record::{Attributed, GpuError, NodeRecord};
use super::{pause, xid, Context, Feed, LostLabels, NodeRecordLabels, XidLabels};
use crate::logs::checkpoint::{KernelPosition, NodePosition};
use crate::logs::source::FileId;

/// Records per batch, and message bytes (a batch is held until every sink has taken it).
const BATCH: usize = 512;
const BATCH_BYTES: usize = 2 * 1024 * 1024;
/// How often series of gone pods are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// An opened kernel ring.
pub struct KernelSource {
    reader: KmsgReader,
    proc_root: PathBuf,
    boot_id: String,
    /// Boot time, Unix microseconds.
    boot_us: u64,
    ticks_per_second: u64,
}

/// Opens `node_logs.kernel.path` and reads the boot's identity from `host.proc_root`.
pub fn open(context: &Context) -> anyhow::Result<KernelSource> {
    let config = &context.config;
    let path = &config.node_logs.kernel.path;
    let reader = KmsgReader::open(path, config.logs.max_line_bytes).with_context(|| format!("node_logs.kernel.path {}", path.display()))?;
    let proc_root = config.host.proc_root.clone();
    let btime = kmsg::boot_time(&proc_root).with_context(|| format!("boot time from {}/stat", proc_root.display()))?;
    // Without a boot id (an old kernel), the boot time tells boots apart as well.
    let boot_id = kmsg::boot_id(&proc_root).unwrap_or_else(|_| format!("btime-{btime}"));
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(KernelSource { reader, proc_root, boot_id, boot_us: btime * 1_000_000, ticks_per_second: ticks.max(1) as u64 })
}

impl KernelSource {
    /// Reads until `context.stop` is set.
    pub fn run(mut self, context: &Context, feed: &Feed) {
        let source = FileId { container: xxhash_rust::xxh3::xxh3_64(format!("kernel/{}", self.boot_id).as_bytes()), fingerprint: 0 };
        let shipped = context.checkpoints.node_positions().kernel;
        // Records up to `skip` were shipped in this boot. A gap after the expected sequence
        // number is records the ring overwrote: after the checkpoint of this boot, from 0
        // in a new boot the agent did not see start, and on a first start from the oldest
        // record held (what came before the agent is not counted as lost).
        let (skip, mut expected) = match &shipped {
            Some(p) if p.boot_id == self.boot_id => (Some(p.seq), Some(p.seq + 1)),
            Some(_) => (None, Some(0)),
            None => (None, None),
        };
        tracing::info!(boot_id = %self.boot_id, after = ?skip, "reading the kernel ring");
        let mut attribution = Attribution::new();
        let (mut read, mut records) = (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH));
        let mut last_error: Option<String> = None;
        while !context.stop.load(Ordering::Acquire) {
            read.clear();
            match self.reader.read(&mut read, BATCH, BATCH_BYTES) {
                Ok(Read::End) => {
                    attribution.sweep(context);
                    self.reader.wait(Duration::from_millis(250));
                    continue;
                }
                Ok(Read::Overwritten) => continue,
                Ok(Read::Records) => last_error = None,
                Err(e) => {
                    if last_error.as_deref() != Some(&e.to_string()) {
                        tracing::error!(error = %e, "cannot read the kernel ring; retrying");
                        last_error = Some(e.to_string());
                    }
                    pause(&context.stop, Duration::from_secs(1));
                    continue;
                }
            }
            records.clear();
            let mut last = None;
            for record in read.drain(..) {
                if skip.is_some_and(|s| record.seq <= s) {
                    continue;
                }
                if let Some(e) = expected.filter(|e| record.seq > *e) {
                    context.metrics.lost.get_or_create(&LostLabels { source: "kernel" }).inc_by(record.seq - e);
                }
                expected = Some(record.seq + 1);
                last = Some(record.seq);
                records.push(self.record(record, &mut attribution, context));
            }
            let Some(seq) = last else { continue };
            let position = NodePosition::Kernel(KernelPosition { boot_id: self.boot_id.clone(), seq });
            if !feed.send(source, &records, position) {
                return;
            }
            attribution.sweep(context);
        }
    }

    fn record(&self, record: KernelRecord, attribution: &mut Attribution, context: &Context) -> NodeRecord {
        context.metrics.records.get_or_create(&NodeRecordLabels::new("kernel", Some(record.level))).inc();
        let gpu = xid::parse(&record.message).map(|xid| {
            let container =
                xid.pid.and_then(|pid| attribution.container(&self.proc_root, pid, record.usec, self.ticks_per_second, context));
            let named = context.gpus.get(&xid.pci_bus_id);
            let labels = XidLabels {
                gpu: named.as_ref().map(|g| g.index.to_string()).unwrap_or_default(),
                uuid: named.as_ref().map(|g| g.uuid.clone()).unwrap_or_default(),
                namespace: container.as_ref().map(|c| c.labels.namespace.clone()).unwrap_or_default(),
                pod: container.as_ref().map(|c| c.labels.pod.clone()).unwrap_or_default(),
                container: container.as_ref().map(|c| c.labels.container.clone()).unwrap_or_default(),
                app: container.as_ref().map(|c| c.labels.app.clone()).unwrap_or_default(),
                user: container.as_ref().map(|c| c.labels.user.clone()).unwrap_or_default(),
                xid: xid.xid.to_string(),
            };
            if let Some(c) = &container {
                attribution.series.insert(labels.clone(), c.pod_uid.clone());
            }
            context.metrics.xid_errors.get_or_create(&labels).inc();
            GpuError { xid: xid.xid, pci_bus_id: xid.pci_bus_id, uuid: named.map(|g| g.uuid), container }
        });
        NodeRecord {
            dataset: "node.kernel",
            timestamp_us: self.boot_us + record.usec,
            message: record.message,
            priority: Some(record.level),
            unit: None,
            pid: None,
            process_name: None,
            truncated: record.truncated,
            id: record.seq,
            gpu,
        }
    }
}

/// Finds containers of XID processes, and removes the series of pods that are gone.
struct Attribution {
    /// Pods whose metadata was waited for once already.
    waited: HashSet<String>,
    /// The pod UID of every attributed series.
    series: HashMap<XidLabels, String>,
    last_sweep: Instant,
}

impl Attribution {
    fn new() -> Attribution {
        Attribution { waited: HashSet::new(), series: HashMap::new(), last_sweep: Instant::now() }
    }

    fn container(&mut self, proc_root: &std::path::Path, pid: u32, usec: u64, ticks: u64, context: &Context) -> Option<Attributed> {
        let cgroup = xid::container_of(proc_root, pid, usec, ticks)?;
        // Records found in the ring at start wait for the pod store's first lists, as
        // container logs do, up to `kubernetes.metadata_wait` from the watches' start.
        if let Some(store) = context.names.pods.as_ref() {
            if !store.is_synced() && self.waited.insert(cgroup.pod_uid.clone()) {
                let deadline = Instant::now() + context.config.kubernetes.metadata_wait;
                while !store.is_synced()
                    && !store.waited_out()
                    && Instant::now() < deadline
                    && pause(&context.stop, Duration::from_millis(100))
                {}
            }
        }
        let labels = context.names.lookup().by_cgroup(&cgroup)?;
        Some(Attributed { labels, pod_uid: cgroup.pod_uid, container_id: cgroup.container_id })
    }

    fn sweep(&mut self, context: &Context) {
        if self.last_sweep.elapsed() < SWEEP_EVERY {
            return;
        }
        self.last_sweep = Instant::now();
        let names = &context.names;
        self.series.retain(|labels, uid| {
            let alive = names.pods.as_ref().is_some_and(|s| s.get(uid).is_some())
                || crate::identity::path::pod_dir(&names.pods_dir, &labels.namespace, &labels.pod, uid).exists();
            if !alive {
                context.metrics.xid_errors.remove(labels);
            }
            alive
        });
    }
}
