//! The encoder stage: pod metadata, counts and ECS documents for each chunk.
//!
//! It never waits for the pod store: the tailer holds a container back until its pod is
//! known (or a bound passed), and whatever the store answers later re-renders the
//! container's template.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use super::counts::{AppLabels, CountFamilies, Counts};
use crate::config::{Compression, LogsConfig};
use crate::identity::path::{self, ContainerRef};
use crate::kube::meta::PodMeta;
use crate::kube::store::PodStore;
use crate::logs::ack::{AckMsg, Registrations};
use crate::logs::budget::ReadBudget;
use crate::logs::chunk::{Chunk, Occurrences};
use crate::logs::derived::{Derived, PodLabels};
use crate::logs::enrich::Enricher;
use crate::logs::fingerprint::Format;
use crate::logs::level;
use crate::logs::structured::{Extractor, Structured};
use crate::otlp::logs::{Layout, ResourceTemplate};
use crate::packed::{Packer, KEPT_BUFFER};
use crate::sinks::ecs::{self, Documents, Template};
use crate::sinks::elasticsearch::bulk;
use crate::sinks::elasticsearch::stream::DataStreams;
use crate::sinks::{Batch, Formats};

/// How long a container's template is kept without records.
const TEMPLATE_IDLE: Duration = Duration::from_secs(600);

/// The encoder and the state it keeps per container.
pub struct Encoder {
    enricher: Enricher,
    pods: Option<Arc<PodStore>>,
    /// Where pod directories are, to tell gone pods.
    pods_dir: PathBuf,
    /// How often series are checked for pods that are gone (the rescan period).
    sweep_every: Duration,
    /// What the sinks read.
    formats: Formats,
    counts: Counts,
    derived: Derived,
    /// Fields found in records' text (JSON, trace context), and the chunk's, reused.
    extractor: Extractor,
    structured: Structured,
    /// Where logfmt's `level=` occurs in the chunk, for level detection.
    level_keys: Occurrences,
    /// The Elasticsearch data stream of each namespace, when there is one per namespace.
    streams: DataStreams,
    /// A chunk's documents, and what its OTLP records are worked out and written with,
    /// reused.
    docs: Documents,
    layout: Layout,
    packer: Packer,
    templates: HashMap<ContainerRef, CachedTemplate>,
    /// Batch numbers, shared with the node-log sources.
    seq: Arc<AtomicU64>,
    last_prune: Instant,
    last_sweep: Instant,
}

struct CachedTemplate {
    /// The pod metadata the template was rendered from; a new one re-renders it.
    pod: Option<Arc<PodMeta>>,
    template: Template,
    resource: ResourceTemplate,
    /// The container's data stream, when not the sink's one stream.
    index: Option<Arc<str>>,
    app: AppLabels,
    excluded: bool,
    /// The log-metric rules of the container's application, and the labels they add.
    rules: Vec<usize>,
    pod_labels: PodLabels,
    used: Instant,
}

impl Encoder {
    /// An encoder counting into `counts` and `derived`, starting at `now`.
    pub fn new(
        enricher: Enricher,
        pods: Option<Arc<PodStore>>,
        logs: &LogsConfig,
        formats: Formats,
        counts: CountFamilies,
        derived: Derived,
        now: Instant,
    ) -> Encoder {
        Encoder {
            enricher,
            pods,
            pods_dir: logs.pods_dir.clone(),
            sweep_every: logs.rescan_interval,
            formats,
            counts: Counts::new(counts),
            derived,
            extractor: Extractor::new(logs.json),
            structured: Structured::default(),
            level_keys: Occurrences::default(),
            streams: DataStreams::default(),
            docs: Documents::default(),
            layout: Layout::default(),
            packer: Packer::new(),
            templates: HashMap::new(),
            seq: Arc::new(AtomicU64::new(0)),
            last_prune: now,
            last_sweep: now,
        }
    }

    /// Sends each namespace's records to its own data stream (`{namespace}` in
    /// `sinks.elasticsearch.data_stream`).
    pub fn set_data_streams(&mut self, streams: DataStreams) {
        self.streams = streams;
        self.templates.clear();
    }

    /// The batch numbering, for other producers of batches (the node-log sources).
    pub fn sequence(&self) -> Arc<AtomicU64> {
        self.seq.clone()
    }

    /// Encodes chunks until the tailer is done, registering each with the committer before
    /// handing it to every sink (in `registered`, or through `acks` when no sink gets it, so
    /// the committer wakes for it); `budget` is told once each chunk's batch is with them.
    /// While chunks wait, up to [`HELD_BATCHES`] batches are held and handed over together,
    /// at once when they hold more than [`HELD_BYTES`].
    pub fn run(
        &mut self,
        mut chunks: mpsc::Receiver<Chunk>,
        sinks: Vec<mpsc::Sender<Arc<Batch>>>,
        acks: mpsc::Sender<AckMsg>,
        registered: Registrations,
        budget: Arc<ReadBudget>,
    ) {
        let mut held = Vec::with_capacity(HELD_BATCHES);
        loop {
            // The next chunk at once while chunks are waiting; before waiting for one, what is
            // held goes to the sinks.
            let chunk = match chunks.try_recv() {
                Ok(chunk) => chunk,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    if !hand_over(&mut held, &sinks, &budget) {
                        return;
                    }
                    match chunks.blocking_recv() {
                        Some(chunk) => chunk,
                        None => break,
                    }
                }
            };
            let batch = Arc::new(self.encode(&chunk, Instant::now()));
            let targets = if batch.records == 0 { 0 } else { sinks.len() as u32 };
            let register = AckMsg::Register {
                seq: batch.seq,
                file: batch.file,
                path: chunk.source.path.clone(),
                offset: chunk.commit_offset,
                read_bytes: chunk.read_bytes,
                sinks: targets,
                at: Instant::now(),
            };
            // The committer is gone only at shutdown.
            if acks.is_closed() {
                return;
            }
            if targets > 0 {
                registered.push(register);
            } else if acks.blocking_send(register).is_err() {
                return;
            }
            // A batch for no sink is held too, so that held batches go after at most
            // [`HELD_BATCHES`] chunks whatever they hold.
            held.push(batch);
            let full = held.len() >= HELD_BATCHES || held.iter().map(|b| b.held_bytes()).sum::<usize>() > HELD_BYTES;
            if full && !hand_over(&mut held, &sinks, &budget) {
                return;
            }
        }
        hand_over(&mut held, &sinks, &budget);
    }

    /// The batch of one chunk, encoded at `now`.
    pub fn encode(&mut self, chunk: &Chunk, now: Instant) -> Batch {
        if now.saturating_duration_since(self.last_prune) > TEMPLATE_IDLE {
            self.templates.retain(|_, t| now.saturating_duration_since(t.used) < TEMPLATE_IDLE);
            self.last_prune = now;
        }
        if now.saturating_duration_since(self.last_sweep) > self.sweep_every {
            self.sweep(now);
        }
        let info = &chunk.source.container;
        let pod = self.pods.as_ref().and_then(|store| store.get(&info.reference.pod_uid));
        let stale = self.templates.get(&info.reference).is_none_or(|t| !same_pod(&t.pod, &pod));
        if stale {
            let cached = self.render(chunk, pod, now);
            self.templates.insert(info.reference.clone(), cached);
        }
        let cached = self.templates.get_mut(&info.reference).expect("inserted above");
        cached.used = now;
        let (docs, packer) = (&mut self.docs, &mut self.packer);
        docs.clear();
        let records = if cached.excluded { 0 } else { chunk.records.len() };
        let (mut bulk_lines, mut otlp_records) = (None, None);
        if !cached.excluded {
            self.extractor.extract(chunk, &mut self.structured);
            let structured = &self.structured;
            let mut fields = structured.in_order();
            let levels = level::detect_all(chunk, &mut self.level_keys, |i| fields.of(i).and_then(|f| f.level));
            match self.formats.bulk {
                // For Elasticsearch alone, rendered straight as `_bulk` lines into their piece,
                // a little at a time.
                Some(compression) if !self.formats.ecs => {
                    let (file, index) = (chunk.source.id, cached.index.as_deref());
                    let mut piece = packer.piece(compression == Compression::Gzip);
                    let action = |offset, out: &mut Vec<u8>| bulk::action(file, index, offset, out);
                    ecs::encode_chunk(chunk, &cached.template, &levels, structured, docs, action, Some(&mut piece));
                    bulk_lines = Some(piece.finish(std::mem::take(&mut docs.ends)));
                    docs.clear();
                }
                _ if self.formats.documents() => {
                    ecs::encode_chunk(chunk, &cached.template, &levels, structured, docs, |_, _| {}, None);
                }
                _ => {}
            }
            if let Some(compression) = self.formats.otlp.filter(|_| records > 0) {
                // Likewise written straight into its piece.
                let mut piece = packer.piece(compression == Compression::Gzip);
                let now = std::time::SystemTime::now();
                let resource = &cached.resource;
                crate::otlp::logs::encode_chunk(chunk, resource, &levels, structured, now, &mut self.layout, &mut piece);
                otlp_records = Some(piece.finish(Vec::new()));
            }
            self.counts.count(&cached.app, &info.reference, chunk, &levels, now);
            if !cached.rules.is_empty() {
                for record in &chunk.records {
                    self.derived.observe(&cached.rules, &cached.pod_labels, chunk.message(record));
                }
            }
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut batch = Batch::new(seq, chunk.source.id, records, cached.index.clone()).read_from(chunk.read_bytes);
        if let Some(lines) = bulk_lines {
            batch = batch.with_bulk(lines);
        }
        if let Some(records) = otlp_records {
            batch = batch.with_otlp(records);
        }
        let batch = batch.packed(docs, &[], self.formats, packer);
        // A chunk of huge lines does not leave its buffers behind.
        if docs.bytes.capacity() > KEPT_BUFFER {
            *docs = Documents::default();
        }
        batch
    }

    fn render(&self, chunk: &Chunk, pod: Option<Arc<PodMeta>>, now: Instant) -> CachedTemplate {
        let info = &chunk.source.container;
        let meta = self.enricher.metadata(info, chunk.source.format == Format::Docker, pod.as_deref());
        let excluded = pod.as_ref().is_some_and(|p| p.excludes(&info.reference.container))
            || self.pods.as_ref().is_some_and(|s| s.namespace_excluded(&info.reference.namespace));
        if excluded {
            tracing::info!(namespace = %meta.namespace, pod = %meta.pod, container = %meta.container, "logs excluded by annotation");
        }
        let pod_labels = PodLabels {
            namespace: meta.namespace.clone(),
            pod: meta.pod.clone(),
            uid: meta.pod_uid.clone(),
            app: meta.app.clone(),
            user: meta.user.clone(),
        };
        CachedTemplate {
            pod,
            template: Template::new(&meta),
            resource: ResourceTemplate::new(&meta),
            // From the log path, so the same with or without the API.
            index: self.streams.of(&info.reference.namespace),
            rules: self.derived.rules_for(&meta.app),
            app: AppLabels { namespace: meta.namespace, app: meta.app },
            pod_labels,
            excluded,
            used: now,
        }
    }

    /// Removes the series of pods that are gone: log-derived series at once, per-application
    /// counts once the application has had no pod for a while.
    pub fn sweep(&mut self, now: Instant) {
        let (pods, pods_dir) = (&self.pods, &self.pods_dir);
        // Known to the store (deleted ones while their files are on disk), or, without it or
        // before it knows the pod, a log directory on disk.
        let alive = |r: &ContainerRef| {
            pods.as_ref().is_some_and(|store| store.get(&r.pod_uid).is_some())
                || path::pod_dir(pods_dir, &r.namespace, &r.pod, &r.pod_uid).exists()
        };
        if !self.derived.is_empty() {
            // Asked of every pod with series, not only those with a cached template: a job that
            // logs its loss every 15 minutes keeps its gauge between lines.
            self.derived.retain_pods(|namespace, pod, uid| {
                pods.as_ref().is_some_and(|store| store.get(uid).is_some()) || path::pod_dir(pods_dir, namespace, pod, uid).exists()
            });
        }
        self.counts.sweep(now, alive);
        self.last_sweep = now;
    }
}

/// Batches held while more chunks wait to be encoded, then handed to the sinks one after
/// another: a sink's task is woken for the first of them, not for each.
const HELD_BATCHES: usize = 4;

/// Held batches that hold more than this are handed over at once: compressed batches are a
/// few tens of KiB, and holding larger ones (plain documents for stdout, uncompressed `_bulk`
/// lines) kept more memory in circulation than the allocator keeps warm (pages faulted in
/// anew), costing more than the wake-ups it saves.
const HELD_BYTES: usize = 256 * 1024;

/// Hands the `held` batches to every sink in order (those with records: the others go to
/// none), telling `budget` of each once it is with them (they may send what they gathered);
/// false when a sink is gone.
fn hand_over(held: &mut Vec<Arc<Batch>>, sinks: &[mpsc::Sender<Arc<Batch>>], budget: &ReadBudget) -> bool {
    for batch in held.drain(..) {
        if batch.records > 0 && sinks.iter().any(|sink| sink.blocking_send(batch.clone()).is_err()) {
            tracing::error!("a sink is gone; stopping the encoder");
            return false;
        }
        budget.chunk_encoded();
    }
    true
}

fn same_pod(a: &Option<Arc<PodMeta>>, b: &Option<Arc<PodMeta>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::logs::chunk::{Flags, Record, StreamKind};
    use crate::logs::derived::DerivedFamilies;
    use crate::logs::source::{ContainerInfo, FileId, Source};
    use crate::pipeline::counts::APP_SERIES_IDLE;

    fn chunk(pods_dir: &Path, namespace: &str, pod: &str, message: &str) -> Chunk {
        let reference = ContainerRef {
            namespace: namespace.into(),
            pod: pod.into(),
            pod_uid: format!("uid-{pod}"),
            container: "main".into(),
            restart: 0,
        };
        let dir = path::pod_dir(pods_dir, namespace, pod, &reference.pod_uid);
        let source = Source {
            id: FileId::new(&reference, 1),
            path: dir.join("main/0.log"),
            container: Arc::new(ContainerInfo { reference, container_id: None, runtime: None }),
            format: Format::Cri,
        };
        let mut chunk = Chunk::new(Arc::new(source));
        let timestamp = chunk.push_bytes(b"2026-11-22T03:16:40.123456789Z");
        let message = chunk.push_bytes(message.as_bytes());
        chunk.records.push(Record { timestamp, message, stream: StreamKind::Stdout, offset: 0, flags: Flags::default() });
        chunk
    }

    fn encoder(pods_dir: &Path, pods: Option<Arc<PodStore>>, now: Instant) -> (Encoder, CountFamilies) {
        let logs = LogsConfig { pods_dir: pods_dir.to_path_buf(), ..LogsConfig::default() };
        let families = CountFamilies::default();
        let enricher = Enricher::new("node-1".into(), String::new());
        let formats = Formats { ecs: true, bulk: None, otlp: Some(crate::config::Compression::Gzip) };
        (Encoder::new(enricher, pods, &logs, formats, families.clone(), Derived::new(&[], DerivedFamilies::default()), now), families)
    }

    fn exposition(families: &CountFamilies) -> String {
        let mut registry = Registry::with_prefix("nodelens");
        registry.register("log_records", "", families.records.clone());
        registry.register("log_bytes", "", families.bytes.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    fn series_of(text: &str, app: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#') && l.contains(&format!("app=\"{app}\""))).count()
    }

    fn service_name(batch: &Batch) -> String {
        let doc: serde_json::Value = serde_json::from_slice(batch.docs.doc(0)).unwrap();
        doc["service"]["name"].as_str().unwrap().to_string()
    }

    #[test]
    fn the_encoder_tells_the_read_budget_each_chunk_once_its_batch_is_with_every_sink() {
        let pods_dir = tempfile::tempdir().unwrap();
        let (mut encoder, _) = encoder(pods_dir.path(), None, Instant::now());
        let budget = Arc::new(ReadBudget::new(1 << 20));
        let (chunk_tx, chunk_rx) = mpsc::channel(8);
        let (acks_tx, mut acks_rx) = mpsc::channel(8);
        let registered = Registrations::default();
        let sinks: Vec<_> = (0..2).map(|_| mpsc::channel(8)).collect();
        let (txs, mut rxs): (Vec<_>, Vec<_>) = sinks.into_iter().unzip();
        for (i, pod) in ["a-0", "b-0", "c-0"].into_iter().enumerate() {
            let mut chunk = chunk(pods_dir.path(), "ml", pod, "step 1");
            chunk.read_bytes = 100 + i as u64;
            budget.chunk_read();
            chunk_tx.blocking_send(chunk).unwrap();
        }
        drop(chunk_tx);
        assert_eq!(budget.encoding(), 3);
        let run = std::thread::spawn({
            let budget = budget.clone();
            let registered = registered.clone();
            move || encoder.run(chunk_rx, txs, acks_tx, registered, budget)
        });
        run.join().unwrap();
        assert_eq!(budget.encoding(), 0, "every chunk's batch is with the sinks");
        for rx in &mut rxs {
            let read: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok()).map(|b| b.read_bytes).collect();
            assert_eq!(read, [100, 101, 102], "each batch carries its chunk's bytes read");
        }
        let reads: Vec<u64> = registered
            .take_all()
            .iter()
            .map(|r| match r {
                AckMsg::Register { read_bytes, sinks: 2, .. } => *read_bytes,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(reads, [100, 101, 102], "each chunk registered for both sinks, without waking the committer");
        assert!(acks_rx.try_recv().is_err(), "nothing sent through the channel");
    }

    /// An encoder on a thread of its own with one sink: its chunk queue (holding 16), the
    /// committer's channel and queue, the sink's queue, the read budget.
    struct Running {
        /// Taken by [`Running::finish`], closing the queue.
        chunks: Option<mpsc::Sender<Chunk>>,
        acks: mpsc::Receiver<AckMsg>,
        registered: Registrations,
        sink: mpsc::Receiver<Arc<Batch>>,
        budget: Arc<ReadBudget>,
        thread: Option<std::thread::JoinHandle<()>>,
        runtime: tokio::runtime::Runtime,
    }

    impl Running {
        /// Starts an encoder with `waiting` already queued, its sink's queue holding
        /// `sink_queue`.
        fn start(pods_dir: &Path, waiting: Vec<Chunk>, sink_queue: usize) -> Running {
            let (mut encoder, _) = encoder(pods_dir, None, Instant::now());
            let budget = Arc::new(ReadBudget::new(1 << 30));
            let (chunks, chunk_rx) = mpsc::channel(16);
            let (acks_tx, acks) = mpsc::channel(16);
            let (sink_tx, sink) = mpsc::channel(sink_queue);
            let registered = Registrations::default();
            for chunk in waiting {
                budget.chunk_read();
                chunks.blocking_send(chunk).unwrap();
            }
            let thread = std::thread::spawn({
                let (budget, registered) = (budget.clone(), registered.clone());
                move || encoder.run(chunk_rx, vec![sink_tx], acks_tx, registered, budget)
            });
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            Running { chunks: Some(chunks), acks, registered, sink, budget, thread: Some(thread), runtime }
        }

        /// Reads `chunk` (as the tailer tells the budget) and queues it.
        fn send(&self, chunk: Chunk) {
            self.budget.chunk_read();
            self.chunks.as_ref().expect("not finished").blocking_send(chunk).unwrap();
        }

        /// Chunks in the queue, not yet taken by the encoder.
        fn queued(&self) -> usize {
            let chunks = self.chunks.as_ref().expect("not finished");
            chunks.max_capacity() - chunks.capacity()
        }

        /// The `read_bytes` of the next batch the sink gets, within 10 s (`what`: the batch
        /// that was due).
        fn next_batch(&mut self, what: &str) -> u64 {
            let sink = &mut self.sink;
            let batch = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), sink.recv()).await });
            batch.unwrap_or_else(|_| panic!("{what}: not handed over in 10 s")).unwrap().read_bytes
        }

        /// Closes the chunk queue and waits for the encoder to end; the `read_bytes` of the
        /// batches the sink has not taken yet.
        fn finish(&mut self) -> Vec<u64> {
            self.chunks = None;
            self.thread.take().expect("not finished").join().unwrap();
            std::iter::from_fn(|| self.sink.try_recv().ok()).map(|b| b.read_bytes).collect()
        }
    }

    /// A chunk of `read_bytes` for pod `pod`, its one record saying `message`.
    fn read_chunk(pods_dir: &Path, pod: &str, message: &str, read_bytes: u64) -> Chunk {
        let mut chunk = chunk(pods_dir, "ml", pod, message);
        chunk.read_bytes = read_bytes;
        chunk
    }

    /// Batches are held only while more chunks wait: with none waiting, a chunk's batch goes
    /// to the sinks before the encoder waits for the next.
    #[test]
    fn a_batch_goes_to_the_sinks_before_the_encoder_waits_for_more_chunks() {
        let pods_dir = tempfile::tempdir().unwrap();
        let mut running = Running::start(pods_dir.path(), Vec::new(), 8);
        for (i, pod) in ["a-0", "b-0"].into_iter().enumerate() {
            running.send(read_chunk(pods_dir.path(), pod, "step 1", 100 + i as u64));
            assert_eq!(running.next_batch("handed over while the chunk queue stays open"), 100 + i as u64);
        }
        assert_eq!(running.finish(), Vec::<u64>::new());
        assert_eq!(running.budget.encoding(), 0);
    }

    /// With chunks waiting, their batches go to the sinks in order while the chunk queue stays
    /// open (held at most four chunks), a chunk no sink gets among them, and every chunk is
    /// told to the budget.
    #[test]
    fn waiting_chunks_batches_go_to_the_sinks_in_order() {
        let pods_dir = tempfile::tempdir().unwrap();
        let waiting = (0..9u64)
            .map(|i| {
                let mut chunk = read_chunk(pods_dir.path(), &format!("p-{i}"), "step 1", 100 + i);
                if i == 2 {
                    chunk.records.clear();
                }
                chunk
            })
            .collect();
        let mut running = Running::start(pods_dir.path(), waiting, 16);
        // The first four chunks (three batches for the sink) are handed over without the
        // chunk queue closing.
        let mut got: Vec<u64> = (0..3).map(|_| running.next_batch("the first four chunks' batches")).collect();
        assert_eq!(got, [100, 101, 103]);
        got.extend(running.finish());
        assert_eq!(got, [100, 101, 103, 104, 105, 106, 107, 108], "every batch with records, in order");
        assert_eq!(running.budget.encoding(), 0, "every chunk told, the one no sink got included");
        assert_eq!(running.registered.queued().len(), 8);
        assert!(matches!(running.acks.try_recv(), Ok(AckMsg::Register { sinks: 0, read_bytes: 102, .. })));
    }

    /// Batches holding more than [`HELD_BYTES`] go to the sinks at once, while chunks still
    /// wait: with a sink that takes nothing (its queue of one full), the encoder stops at its
    /// second batch, where holding would have had it encode four chunks first.
    #[test]
    fn large_batches_are_not_held_while_chunks_wait() {
        let pods_dir = tempfile::tempdir().unwrap();
        let large = "x".repeat(HELD_BYTES + 1);
        let waiting = (0..5).map(|i| read_chunk(pods_dir.path(), &format!("p-{i}"), &large, 100 + i)).collect();
        let mut running = Running::start(pods_dir.path(), waiting, 1);
        // Once it has taken the second chunk it can take no more while the sink takes nothing
        // (with batches held, it would go on to the fourth).
        let deadline = Instant::now() + Duration::from_secs(20);
        while running.queued() > 3 {
            assert!(Instant::now() < deadline, "the encoder took {} chunks in 20 s", 5 - running.queued());
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(running.queued(), 3, "two chunks taken, the second's batch waiting for the sink");
        let received: Vec<u64> = (0..5).map(|i| running.next_batch(&format!("batch {i}"))).collect();
        assert_eq!(received, [100, 101, 102, 103, 104]);
        assert_eq!(running.finish(), Vec::<u64>::new());
    }

    /// A chunk is registered before its batch goes to any sink (with the sink gone, the chunk
    /// it could not take is registered all the same), and a chunk no sink gets is registered
    /// through the channel, which wakes the committer to commit it.
    #[test]
    fn a_chunk_is_registered_before_any_sink_has_it_and_one_no_sink_gets_through_the_channel() {
        let pods_dir = tempfile::tempdir().unwrap();
        let run = |chunk: Chunk, sink_open: bool| {
            let (mut encoder, _) = encoder(pods_dir.path(), None, Instant::now());
            let budget = Arc::new(ReadBudget::new(1 << 20));
            let (chunk_tx, chunk_rx) = mpsc::channel(8);
            let (acks_tx, mut acks_rx) = mpsc::channel(8);
            let (sink_tx, mut sink_rx) = mpsc::channel(8);
            if !sink_open {
                sink_rx.close();
            }
            budget.chunk_read();
            chunk_tx.blocking_send(chunk).unwrap();
            drop(chunk_tx);
            let registered = Registrations::default();
            encoder.run(chunk_rx, vec![sink_tx], acks_tx, registered.clone(), budget);
            let sent: Vec<u32> = std::iter::from_fn(|| acks_rx.try_recv().ok())
                .map(|m| match m {
                    AckMsg::Register { sinks, .. } => sinks,
                    other => panic!("{other:?}"),
                })
                .collect();
            (registered.queued().len(), sent, std::iter::from_fn(|| sink_rx.try_recv().ok()).count())
        };
        let lines = chunk(pods_dir.path(), "ml", "a-0", "step 1");
        assert_eq!(run(lines, false), (1, vec![], 0), "registered, then refused by the sink that is gone");
        let mut empty = chunk(pods_dir.path(), "ml", "a-0", "step 1");
        empty.records.clear();
        assert_eq!(run(empty, true), (0, vec![0], 0), "registered through the channel, for no sink");
    }

    #[test]
    fn bulk_lines_rendered_straight_for_elasticsearch_alone_are_the_lines_made_from_documents() {
        let pods_dir = tempfile::tempdir().unwrap();
        let line = chunk(pods_dir.path(), "ml", "trainer-0", "epoch 1 \"done\"");
        // Enough records for their documents to go into their piece in several parts.
        let mut many = chunk(pods_dir.path(), "ml", "trainer-0", "epoch 1 \"done\"");
        let first = many.records[0].clone();
        for i in 1..3000u64 {
            let message = many.push_bytes(format!("step {i} loss {:.6}", 1.0 / i as f64).as_bytes());
            many.records.push(Record { message, offset: i * 100, ..first.clone() });
        }
        let lines = |formats: Formats, chunk: &Chunk| {
            let logs = LogsConfig { pods_dir: pods_dir.path().to_path_buf(), ..LogsConfig::default() };
            let enricher = Enricher::new("node-1".into(), String::new());
            let derived = Derived::new(&[], crate::logs::derived::DerivedFamilies::default());
            let mut encoder = Encoder::new(enricher, None, &logs, formats, CountFamilies::default(), derived, Instant::now());
            encoder.set_data_streams(DataStreams::new("logs-{namespace}"));
            let batch = encoder.encode(chunk, Instant::now());
            let held = encoder.docs.bytes.capacity();
            (batch.bulk.plain().into_owned(), batch.bulk.ends().to_vec(), batch.docs.len(), held)
        };
        let gzip = Some(crate::config::Compression::Gzip);
        let (alone, alone_ends, printed, held) = lines(Formats { bulk: gzip, ..Formats::default() }, &many);
        let (with_stdout, ends, _, _) = lines(Formats { ecs: true, bulk: gzip, otlp: None }, &many);
        assert_eq!(alone_ends.len(), 3000);
        assert_eq!((String::from_utf8(alone.clone()).unwrap(), alone_ends), (String::from_utf8(with_stdout).unwrap(), ends));
        assert_eq!(printed, 0, "no plain documents kept without stdout");
        assert!(alone.len() > 8 * crate::packed::SPILL_BYTES, "{} bytes: rendered in several parts", alone.len());
        assert!(held <= 2 * crate::packed::SPILL_BYTES, "{held} bytes held plain for {} of lines", alone.len());
        let (alone, _, _, _) = lines(Formats { bulk: gzip, ..Formats::default() }, &line);
        let text = String::from_utf8(alone).unwrap();
        let mut parts = text.lines();
        let action: serde_json::Value = serde_json::from_str(parts.next().unwrap()).unwrap();
        assert_eq!(action["create"]["_index"], "logs-ml");
        assert_eq!(action["create"]["_id"], format!("{:032x}", line.source.id.record_id(0)));
        let doc: serde_json::Value = serde_json::from_str(parts.next().unwrap()).unwrap();
        assert_eq!(doc["message"], "epoch 1 \"done\"");
    }

    #[test]
    fn each_namespace_gets_its_own_data_stream_named_from_the_path() {
        let pods_dir = tempfile::tempdir().unwrap();
        let (mut encoder, _) = encoder(pods_dir.path(), None, Instant::now());
        let a = chunk(pods_dir.path(), "team-a", "web-0", "x");
        let b = chunk(pods_dir.path(), "ml", "trainer-0", "y");
        assert_eq!(encoder.encode(&a, Instant::now()).index, None, "one stream unless asked");
        encoder.set_data_streams(DataStreams::new("logs-kubernetes.container_logs-{namespace}"));
        assert_eq!(encoder.encode(&a, Instant::now()).index.as_deref(), Some("logs-kubernetes.container_logs-team_a"));
        assert_eq!(encoder.encode(&b, Instant::now()).index.as_deref(), Some("logs-kubernetes.container_logs-ml"));
    }

    #[test]
    fn a_batch_holds_its_chunk_as_one_framed_otlp_resource_logs() {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
        use prost::Message;
        let pods_dir = tempfile::tempdir().unwrap();
        let (mut encoder, _) = encoder(pods_dir.path(), None, Instant::now());
        let chunk = chunk(pods_dir.path(), "ml", "trainer-0", "step=1");
        let batch = encoder.encode(&chunk, Instant::now());
        // Two batches' pieces back to back are a request of two ResourceLogs.
        let plain = batch.otlp.plain().into_owned();
        let request = ExportLogsServiceRequest::decode([plain.as_slice(), plain.as_slice()].concat().as_slice()).unwrap();
        assert_eq!(request.resource_logs.len(), 2);
        let records = &request.resource_logs[0].scope_logs[0].log_records;
        assert_eq!(records.len(), chunk.records.len());
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        assert_eq!(records[0].body.as_ref().and_then(|b| b.value.clone()), Some(Value::StringValue("step=1".into())));
    }

    #[test]
    fn path_only_apps_lose_generated_suffixes_and_their_series_leave_after_the_pod() {
        let pods_dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut encoder, families) = encoder(pods_dir.path(), None, t0);
        let job = chunk(pods_dir.path(), "ml", "nightly-29100480-x2k4p", "done");
        let web = chunk(pods_dir.path(), "ml", "web-7d9f8b6c5d-x2k4p", "GET /");
        for c in [&job, &web] {
            std::fs::create_dir_all(c.source.path.parent().unwrap()).unwrap();
        }
        assert_eq!(service_name(&encoder.encode(&job, t0)), "nightly");
        assert_eq!(service_name(&encoder.encode(&web, t0)), "web");
        let text = exposition(&families);
        assert_eq!((series_of(&text, "nightly"), series_of(&text, "web")), (2, 2), "{text}");

        std::fs::remove_dir_all(path::pod_dir(pods_dir.path(), "ml", "nightly-29100480-x2k4p", "uid-nightly-29100480-x2k4p")).unwrap();
        encoder.sweep(t0 + Duration::from_secs(10));
        assert_eq!(series_of(&exposition(&families), "nightly"), 2, "kept a while");
        encoder.sweep(t0 + Duration::from_secs(20) + APP_SERIES_IDLE);
        let text = exposition(&families);
        assert_eq!((series_of(&text, "nightly"), series_of(&text, "web")), (0, 2), "{text}");
    }

    #[test]
    fn an_unknown_pod_does_not_hold_up_the_encoder_and_is_enriched_once_known() {
        let pods_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PodStore::new(vec![crate::identity::resolve::Key::Label("app".into())], Vec::new(), Default::default()));
        let (mut encoder, _) = encoder(pods_dir.path(), Some(store.clone()), Instant::now());
        let line = chunk(pods_dir.path(), "ml", "trainer-0", "epoch 1");
        // `encode` never waits for the store: an unknown pod is encoded from its path.
        assert_eq!(service_name(&encoder.encode(&line, Instant::now())), "trainer", "path metadata, at once");
        store.apply(PodMeta {
            namespace: "ml".into(),
            name: "trainer-0".into(),
            uid: "uid-trainer-0".into(),
            ip: None,
            labels: BTreeMap::from([("app".to_string(), "resnet".to_string())]),
            annotations: BTreeMap::new(),
            workload: None,
            containers: Vec::new(),
            app: String::new(),
            user: String::new(),
            hami: None,
            evicted: false,
        });
        assert_eq!(service_name(&encoder.encode(&line, Instant::now())), "resnet", "re-rendered from the store");
    }
}
