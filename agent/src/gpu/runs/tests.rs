use std::collections::BTreeMap;

use super::*;
use crate::gpu::export::ContainerRow;
use crate::gpu::reading::GpuId;
use crate::kube::meta::{ContainerMeta, PodMeta};

const GPU: &str = "GPU-11111111-2222-3333-4444-555555555555";
const T0: f64 = 1_764_800_000.0;

fn pod(name: &str, id: &str, exit: Option<Exit>) -> PodMeta {
    PodMeta {
        namespace: "ml".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        ip: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        workload: None,
        containers: vec![ContainerMeta {
            name: "main".into(),
            image: "trainer:1".into(),
            id: Some(id.into()),
            last_id: None,
            runtime: Some("containerd".into()),
            restart_count: 0,
            started: Some(T0 as i64),
            exit: exit.map(Box::new),
            last_exit: None,
        }],
        app: name.trim_end_matches("-0").into(),
        user: "alice".into(),
        hami: None,
        evicted: false,
    }
}

fn reading(energy: f64, throttle: u64) -> Reading {
    let mut gpu = GpuReading::new(GpuId { index: 0, uuid: GPU.into(), model: "NVIDIA H100".into(), mig: None, minor: Some(0) }, true);
    gpu.energy_joules = Some(energy);
    gpu.throttle_reasons = Some(throttle);
    Reading { gpus: vec![gpu], ..Reading::default() }
}

fn row(pod: &str, utilization: f64, memory: f64) -> ContainerRow {
    ContainerRow {
        labels: vec![
            ("gpu", "0".into()),
            ("uuid", GPU.into()),
            ("namespace", "ml".into()),
            ("pod", pod.into()),
            ("container", "main".into()),
            ("app", pod.into()),
            ("user", "alice".into()),
        ],
        allocated: true,
        utilization: Some(utilization),
        memory_bytes: Some(memory),
        granted_memory_bytes: None,
        granted_cores_ratio: None,
    }
}

fn view(rows: Vec<ContainerRow>) -> GpuView {
    GpuView { containers: rows, pods_synced: true, ..GpuView::default() }
}

struct Node {
    dir: tempfile::TempDir,
    store: Arc<PodStore>,
    seconds: RunSeconds,
    dropped: Counter,
}

impl Node {
    fn new() -> Node {
        let store = Arc::new(PodStore::new(Vec::new(), Vec::new(), Default::default()));
        store.relist(vec![pod("a-0", "aaa", None), pod("b-0", "bbb", None)]);
        Node { dir: tempfile::tempdir().unwrap(), store, seconds: RunSeconds::default(), dropped: Counter::default() }
    }

    fn runs(&self) -> (Runs, Receiver<Delivery>) {
        let (tx, rx) = channel();
        let file = StateFile::new(self.dir.path());
        (
            Runs::new(
                file,
                self.store.clone(),
                PodGauges::default(),
                (self.seconds.clone(), self.dropped.clone()),
                Some(tx),
                Duration::from_secs(5),
            ),
            rx,
        )
    }

    fn runs_without_sink(&self) -> Runs {
        let file = StateFile::new(self.dir.path());
        Runs::new(
            file,
            self.store.clone(),
            PodGauges::default(),
            (self.seconds.clone(), self.dropped.clone()),
            None,
            Duration::from_secs(5),
        )
    }

    fn saved(&self) -> State {
        StateFile::new(self.dir.path()).load()
    }
}

/// Polls every 5 s from T0 + `from` to T0 + `to`, both time-sliced containers holding the GPU
/// (a 10 W GPU, throttled throughout).
fn poll(runs: &mut Runs, from: u32, to: u32) {
    for t in (from..=to).step_by(5) {
        let now = T0 + f64::from(t);
        runs.observe(&reading(10.0 * f64::from(t), 0x4), &view(vec![row("a-0", 0.3, 4e9), row("b-0", 0.5, 2e9)]), now);
    }
}

#[test]
fn a_container_oomkilled_on_a_time_sliced_gpu_gets_one_report_with_its_share() {
    let node = Node::new();
    let (mut runs, rx) = node.runs();
    poll(&mut runs, 0, 100);
    assert!(rx.try_recv().is_err(), "nothing ended");
    let mut exposition = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("gpu_run_seconds", "", node.seconds.clone());
    prometheus_client::encoding::text::encode(&mut exposition, &registry).unwrap();
    assert_eq!(exposition.matches("gpu_run_seconds_total{").count(), 10, "0 for every outcome of both: {exposition}");
    let exit = Exit { code: 137, reason: "OOMKilled".into(), started: Some(T0 as i64), finished: Some((T0 + 102.0) as i64) };
    node.store.apply(pod("a-0", "aaa", Some(exit)));
    poll(&mut runs, 105, 110);
    let delivery = rx.try_recv().expect("a report");
    assert!(rx.try_recv().is_err(), "one report");
    let r = &delivery.report;
    assert_eq!(
        (r.who.container_id.as_str(), r.exit_code, r.exit_reason.as_str(), r.outcome.as_str()),
        ("aaa", Some(137), "OOMKilled", "oomkilled")
    );
    assert!((r.gpu_seconds - 51.0).abs() < 1e-6, "half the GPU for 102 s: {r:?}");
    assert_eq!((r.gpus, r.sm_utilization_mean, r.memory_used_peak_bytes), (0.5, Some(0.3), Some(4e9)));
    assert!((r.energy_joules.unwrap() - 500.0).abs() < 1e-6, "half of 1,000 J: {r:?}");
    assert!((r.throttled_seconds - 100.0).abs() < 1e-6, "{r:?}");
    assert_eq!((r.started, r.ended, r.duration_seconds()), (Some(T0), T0 + 102.0, Some(102.0)));
    let labels = RunLabels { namespace: "ml".into(), app: r.who.app.clone(), user: r.who.user.clone(), outcome: "oomkilled" };
    assert_eq!(r.who.app, "a", "resolved by the store");
    assert!((node.seconds.get_or_create(&labels).get() - 51.0).abs() < 1e-6);

    // Not again while unacknowledged, nor once delivered, though the kubelet still lists it.
    poll(&mut runs, 115, 120);
    assert!(rx.try_recv().is_err());
    delivery.delivered.store(true, Ordering::Release);
    poll(&mut runs, 125, 130);
    assert!(rx.try_recv().is_err());
    assert!(runs.state().pending.is_empty() && runs.state().reported.contains(&"aaa".to_string()));
    assert_eq!(runs.state().running.keys().collect::<Vec<_>>(), ["bbb"], "b still runs");
}

/// The attribution task composes a view, then hands it to the runs: the store's first list
/// can land in between. A view composed before it named processes from the kubelet's
/// directories alone and showed the containers idle.
#[test]
fn a_view_composed_before_the_pod_stores_first_list_adds_nothing_to_a_run() {
    let node = Node::new();
    let (mut runs, _) = node.runs();
    let unnamed = GpuView { pods_synced: false, ..view(vec![row("a-0", 0.0, 0.0), row("b-0", 0.0, 0.0)]) };
    runs.observe(&reading(0.0, 0x4), &unnamed, T0);
    assert!(runs.state().running.is_empty(), "{:?}", runs.state().running);
    poll(&mut runs, 0, 50);
    runs.finish();
    // An agent restart: its first view was composed before its store's first list.
    let (mut runs, rx) = node.runs();
    runs.observe(&reading(550.0, 0x4), &unnamed, T0 + 55.0);
    assert_eq!(runs.state().running["aaa"].last_seen, T0 + 50.0, "not counted");
    poll(&mut runs, 60, 100);
    let exit = Exit { code: 0, reason: "Completed".into(), started: Some(T0 as i64), finished: Some((T0 + 100.0) as i64) };
    node.store.apply(pod("a-0", "aaa", Some(exit)));
    poll(&mut runs, 105, 105);
    let r = rx.try_recv().expect("a report").report;
    assert_eq!(r.sm_utilization_mean, Some(0.3), "{r:?}");
}

#[test]
fn polls_between_a_containers_exit_and_its_status_are_taken_back_from_its_means() {
    let node = Node::new();
    let (mut runs, rx) = node.runs();
    poll(&mut runs, 0, 100);
    // Its process ends at 102; the kubelet's status comes two polls later, which read it
    // still allocated, idle, throttled, its GPU spending energy.
    for t in [105u32, 110] {
        let now = T0 + f64::from(t);
        runs.observe(&reading(10.0 * f64::from(t), 0x4), &view(vec![row("a-0", 0.0, 0.0), row("b-0", 0.5, 2e9)]), now);
    }
    assert!(rx.try_recv().is_err(), "not ended yet");
    let exit = Exit { code: 1, reason: "Error".into(), started: Some(T0 as i64), finished: Some((T0 + 102.0) as i64) };
    node.store.apply(pod("a-0", "aaa", Some(exit)));
    poll(&mut runs, 115, 115);
    let r = rx.try_recv().expect("a report").report;
    assert_eq!(r.sm_utilization_mean, Some(0.3), "the idle polls after its end are not its: {r:?}");
    assert!((r.gpu_seconds - 51.0).abs() < 1e-6, "{r:?}");
    assert!((r.energy_joules.unwrap() - 500.0).abs() < 1e-6, "{r:?}");
    assert!((r.throttled_seconds - 100.0).abs() < 1e-6, "{r:?}");
}

#[test]
fn an_agent_restart_continues_the_totals_and_sends_an_unacknowledged_report_again() {
    let node = Node::new();
    let (mut runs, _rx) = node.runs();
    poll(&mut runs, 0, 50);
    runs.finish();
    drop(runs);
    // Down for 30 s; then b's pod is deleted without an end in its status.
    let (mut runs, rx) = node.runs();
    assert_eq!(runs.state().running["aaa"].last_seen, T0 + 50.0, "continued");
    assert!(runs.state().running["aaa"].xids_at.is_empty(), "the previous agent's XID counts are no baseline");
    poll(&mut runs, 80, 100);
    node.store.delete("uid-b-0");
    poll(&mut runs, 105, 105);
    let r = rx.try_recv().expect("b's report").report;
    assert_eq!((r.who.pod.as_str(), r.exit_reason.as_str(), r.outcome.as_str(), r.exit_code), ("b-0", "unknown", "unknown", None));
    assert!((r.gpu_seconds - 52.5).abs() < 1e-6, "105 s at half, the 30 s away included: {r:?}");
    assert!((r.energy_joules.unwrap() - 500.0).abs() < 1e-6, "the energy counter across the restart, to its last poll: {r:?}");
    runs.finish();
    drop(runs);
    // Not acknowledged before the restart: sent again (same document id), once.
    let (mut runs, rx) = node.runs();
    poll(&mut runs, 110, 115);
    let again = rx.try_recv().expect("sent again").report;
    assert_eq!(again, r);
    assert!(rx.try_recv().is_err());
    assert!(!runs.state().running.contains_key("bbb"), "not a new run");
}

#[test]
fn mig_slices_count_their_compute_share() {
    assert!((mig_fraction("1g.10gb", "NVIDIA A100") - 1.0 / 7.0).abs() < 1e-9);
    assert!((mig_fraction("1c.3g.40gb", "NVIDIA H100") - 1.0 / 7.0).abs() < 1e-9, "the compute instance's slice");
    assert!((mig_fraction("2c.3g.40gb", "NVIDIA H100") - 2.0 / 7.0).abs() < 1e-9);
    assert!((mig_fraction("2g.12gb", "NVIDIA A30") - 0.5).abs() < 1e-9);
    assert_eq!(mig_fraction("7g.80gb", "NVIDIA H100"), 1.0);
}

fn oom(finished: f64) -> Exit {
    Exit { code: 137, reason: "OOMKilled".into(), started: Some(T0 as i64), finished: Some(finished as i64) }
}

#[test]
fn a_pipeline_that_stopped_keeps_reports_pending_for_the_next_start() {
    let node = Node::new();
    let (mut runs, rx) = node.runs();
    poll(&mut runs, 0, 20);
    node.store.apply(pod("a-0", "aaa", Some(oom(T0 + 22.0))));
    poll(&mut runs, 25, 25);
    let inflight = rx.try_recv().expect("handed over");
    // The pipeline stops before acknowledging it, and b ends after that.
    drop(rx);
    node.store.apply(pod("b-0", "bbb", Some(oom(T0 + 27.0))));
    poll(&mut runs, 30, 35);
    runs.finish();
    assert!(!inflight.delivered.load(Ordering::Acquire));
    let saved = node.saved();
    let pending: Vec<&str> = saved.pending.iter().map(|r| r.who.container_id.as_str()).collect();
    assert_eq!(pending, ["aaa", "bbb"], "both still pending: {saved:?}");
    assert!(saved.reported.is_empty(), "nothing marked as sent: {saved:?}");
}

#[test]
fn without_a_log_pipeline_a_report_is_done_once_counted_and_the_state_left_alone() {
    let node = Node::new();
    let mut runs = node.runs_without_sink();
    poll(&mut runs, 0, 20);
    node.store.apply(pod("a-0", "aaa", Some(oom(T0 + 22.0))));
    node.store.apply(pod("b-0", "bbb", Some(oom(T0 + 22.0))));
    poll(&mut runs, 25, 25);
    let saved = node.saved();
    assert!(saved.pending.is_empty() && saved.running.is_empty(), "{saved:?}");
    assert_eq!(saved.reported, ["aaa", "bbb"]);
    // Nothing changes any more: the state file is not written again.
    std::fs::remove_file(node.dir.path().join("gpu-runs.json")).unwrap();
    poll(&mut runs, 30, 60);
    assert!(!node.dir.path().join("gpu-runs.json").exists(), "written although nothing changed");
}

#[test]
fn a_container_in_crash_loop_back_off_ends_at_its_last_termination() {
    let node = Node::new();
    let (mut runs, rx) = node.runs();
    poll(&mut runs, 0, 50);
    // Waiting to be restarted: no state.terminated, lastState.terminated names the same id.
    let mut crashed = pod("a-0", "aaa", None);
    crashed.containers[0].last_id = Some("aaa".into());
    crashed.containers[0].last_exit =
        Some(Box::new(Exit { code: 1, reason: "Error".into(), started: Some(T0 as i64), finished: Some((T0 + 52.0) as i64) }));
    node.store.apply(crashed);
    poll(&mut runs, 55, 55);
    let r = rx.try_recv().expect("reported at the next poll").report;
    assert_eq!((r.who.container_id.as_str(), r.exit_code, r.exit_reason.as_str(), r.outcome.as_str()), ("aaa", Some(1), "Error", "failed"));
    assert_eq!(r.ended, T0 + 52.0);
    assert!((r.gpu_seconds - 26.0).abs() < 1e-6, "half the GPU for 52 s, not the back-off: {r:?}");
    poll(&mut runs, 60, 120);
    assert!(rx.try_recv().is_err() && !runs.state().running.contains_key("aaa"), "not a new run");
}

#[test]
fn a_pod_gone_while_the_agent_was_down_is_not_charged_the_downtime() {
    let node = Node::new();
    let (mut runs, _rx) = node.runs();
    poll(&mut runs, 0, 50);
    runs.finish();
    drop(runs);
    // b's pod goes while the agent is down for 950 s; a keeps running.
    node.store.delete("uid-b-0");
    let (mut runs, rx) = node.runs();
    poll(&mut runs, 1000, 1000);
    let r = rx.try_recv().expect("b's report").report;
    assert_eq!((r.who.pod.as_str(), r.outcome.as_str()), ("b-0", "unknown"));
    assert_eq!(r.ended, T0 + 55.0, "a poll after it was last seen");
    assert!((r.gpu_seconds - 27.5).abs() < 1e-6, "{r:?}");
    assert!((runs.state().running["aaa"].gpu_seconds - 500.0).abs() < 1e-6, "a still held it throughout");
}

#[test]
fn a_time_sliced_mig_instance_is_divided_among_its_sharers() {
    const MIG: &str = "MIG-99999999-2222-3333-4444-555555555555";
    let node = Node::new();
    let (mut runs, _rx) = node.runs();
    let parent = GpuReading::new(GpuId { index: 0, uuid: GPU.into(), model: "NVIDIA H100".into(), mig: None, minor: Some(0) }, true);
    let mig = crate::gpu::reading::MigId { profile: "3g.40gb".into(), gpu_instance: 1, parent_uuid: GPU.into(), placement: None };
    let instance = GpuReading::new(GpuId { index: 0, uuid: MIG.into(), model: "NVIDIA H100".into(), mig: Some(mig), minor: None }, true);
    let reading = Reading { gpus: vec![parent, instance], ..Reading::default() };
    let on_mig = |pod: &str| {
        let mut r = row(pod, 0.3, 1e9);
        r.labels.iter_mut().filter(|(k, _)| *k == "uuid").for_each(|(_, v)| *v = MIG.into());
        r
    };
    for t in (0..=70).step_by(5) {
        runs.observe(&reading, &view(vec![on_mig("a-0"), on_mig("b-0")]), T0 + f64::from(t));
    }
    let run = &runs.state().running["aaa"];
    assert!((run.gpus - 1.5 / 7.0).abs() < 1e-9, "3/7 halved: {run:?}");
    assert!((run.gpu_seconds - 70.0 * 1.5 / 7.0).abs() < 1e-6, "{run:?}");
}

#[test]
fn pending_reports_are_bounded_and_the_oldest_dropped_and_counted() {
    let node = Node::new();
    let (mut runs, rx) = node.runs();
    poll(&mut runs, 0, 0);
    // A sink that never acknowledges, and a backlog at the bound.
    let template = rx.try_recv().err().map(|_| crate::gpu::runs::report::tests::report()).unwrap();
    for i in 0..state::MAX_PENDING {
        let mut r = template.clone();
        r.who.container_id = format!("old-{i}");
        runs.state.pending.push(r);
    }
    runs.state.reindex();
    node.store.apply(pod("a-0", "aaa", Some(oom(T0 + 2.0))));
    poll(&mut runs, 5, 5);
    let pending = &runs.state().pending;
    assert_eq!(pending.len(), state::MAX_PENDING, "bounded");
    assert_eq!(pending.last().unwrap().who.container_id, "aaa", "the newest kept");
    assert!(!runs.state().is_done("old-0") && runs.state().is_done("old-1") && runs.state().is_done("aaa"));
    assert_eq!(node.dropped.get(), 1);
}

#[test]
fn the_counter_forgets_a_user_idle_for_a_day() {
    let node = Node::new();
    let (mut runs, _rx) = node.runs();
    let series = |seconds: &RunSeconds| {
        let mut exposition = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("gpu_run_seconds", "", seconds.clone());
        prometheus_client::encoding::text::encode(&mut exposition, &registry).unwrap();
        (exposition.matches("app=\"a\"").count(), exposition.matches("app=\"b\"").count())
    };
    poll(&mut runs, 0, 20);
    node.store.apply(pod("a-0", "aaa", Some(oom(T0 + 22.0))));
    poll(&mut runs, 25, 25);
    assert_eq!(series(&node.seconds), (5, 5));
    // b keeps running; a day after a's last increment its series go, b's stay.
    let b_only = view(vec![row("b-0", 0.5, 2e9)]);
    runs.observe(&reading(0.0, 0), &b_only, T0 + 25.0 + 86_399.0);
    assert_eq!(series(&node.seconds), (5, 5), "not yet");
    runs.observe(&reading(0.0, 0), &b_only, T0 + 25.0 + 86_400.0);
    assert_eq!(series(&node.seconds), (0, 5));
}

#[test]
fn a_mean_whose_every_poll_is_taken_back_is_empty_not_a_residue() {
    // Taken back in reverse, these leave 8.9e-16 s and -8.9e-16 behind: a mean of -1.
    let polls = [(0.79, 5.398), (0.24, 5.149), (0.53, 5.75)];
    let mut mean = state::Mean::default();
    let added: Vec<state::Mean> = polls
        .iter()
        .map(|&(v, s)| {
            let mut m = state::Mean::default();
            m.add(v, s);
            mean.add_all(&m);
            m
        })
        .collect();
    for m in added.iter().rev() {
        mean.take_back(m);
    }
    assert_eq!(mean.get(), None, "{mean:?}");
}
