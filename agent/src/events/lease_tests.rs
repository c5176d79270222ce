use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::*;

/// One Lease as the API server keeps it: resourceVersion bumped on every write, a write
/// with another resourceVersion refused with 409, a create of an existing Lease too.
#[derive(Default)]
struct Server {
    lease: Mutex<Option<Lease>>,
    /// While set, what reads from the cache (not consistent) return: a watch cache lagging.
    cached: Mutex<Option<Lease>>,
    version: Mutex<u64>,
    writes: Mutex<Vec<(Instant, Lease)>>,
}

impl Server {
    fn store(&self, lease: &Lease) -> Lease {
        let mut version = self.version.lock().unwrap();
        *version += 1;
        let mut stored = lease.clone();
        stored.metadata.resource_version = Some(version.to_string());
        *self.lease.lock().unwrap() = Some(stored.clone());
        self.writes.lock().unwrap().push((Instant::now(), stored.clone()));
        stored
    }

    fn holder(&self) -> Option<String> {
        self.lease.lock().unwrap().as_ref()?.spec.as_ref()?.holder_identity.clone()
    }
}

/// One agent's connection to the [`Server`]; `cut` makes every request hang, as a network
/// partition does.
#[derive(Clone)]
struct Client {
    server: Arc<Server>,
    cut: Arc<AtomicBool>,
}

impl Client {
    async fn reachable(&self) {
        if self.cut.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
    }
}

impl LeaseApi for Client {
    async fn get(&self, consistent: bool) -> Result<Option<Lease>, LeaseError> {
        self.reachable().await;
        let cached = self.server.cached.lock().unwrap().clone();
        Ok(cached.filter(|_| !consistent).or_else(|| self.server.lease.lock().unwrap().clone()))
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.reachable().await;
        if self.server.lease.lock().unwrap().is_some() {
            return Err(LeaseError::Conflict);
        }
        assert!(lease.metadata.resource_version.is_none(), "a create carries no resourceVersion");
        Ok(self.server.store(lease))
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.reachable().await;
        let current = self.server.lease.lock().unwrap().as_ref().and_then(|l| l.metadata.resource_version.clone());
        if current.is_none() || lease.metadata.resource_version != current {
            return Err(LeaseError::Conflict);
        }
        Ok(self.server.store(lease))
    }
}

/// An agent running [`campaign`] in a task.
struct Agent {
    leading: watch::Receiver<bool>,
    gauge: Gauge,
    client: Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Elector<Client>>,
}

fn agent(server: &Arc<Server>, name: &str) -> Agent {
    let client = Client { server: server.clone(), cut: Arc::default() };
    let (tx, leading) = watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gauge = Gauge::default();
    let mut elector = Elector::new(client.clone(), name.to_string());
    let g = gauge.clone();
    let task = tokio::spawn(async move {
        campaign(&mut elector, &tx, &g, async {
            let _ = stopped.await;
        })
        .await;
        elector
    });
    Agent { leading, gauge, client, stop: Some(stop), task }
}

impl Agent {
    /// Stops campaigning; the elector, to release or drop.
    async fn stop(mut self) -> Elector<Client> {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap()
    }
}

/// Waits (in paused time) until `agent` leads or follows as `want`; the instant it did.
async fn until(agent: &mut Agent, want: bool) -> Instant {
    agent.leading.wait_for(|l| *l == want).await.unwrap();
    Instant::now()
}

fn renewals(server: &Server) -> Vec<Instant> {
    server.writes.lock().unwrap().iter().map(|(at, _)| *at).collect()
}

#[tokio::test(start_paused = true)]
async fn one_agent_creates_the_lease_and_renews_it_every_five_seconds_with_microsecond_times() {
    let server = Arc::new(Server::default());
    let start = Instant::now();
    let mut a = agent(&server, "nodelens-a");
    assert_eq!(until(&mut a, true).await, start, "a missing Lease is created at once");
    assert_eq!(a.gauge.get(), 1);
    tokio::time::sleep(Duration::from_secs(21)).await;
    let offsets: Vec<u64> = renewals(&server).iter().map(|at| (*at - start).as_secs()).collect();
    assert_eq!(offsets, [0, 5, 10, 15, 20]);
    let versions: Vec<String> = server.writes.lock().unwrap().iter().map(|(_, l)| l.metadata.resource_version.clone().unwrap()).collect();
    assert_eq!(versions, ["1", "2", "3", "4", "5"], "each renewal wrote the version it read");

    let lease = serde_json::to_value(server.lease.lock().unwrap().clone().unwrap()).unwrap();
    let spec = &lease["spec"];
    assert_eq!(spec["holderIdentity"], "nodelens-a");
    assert_eq!(spec["leaseDurationSeconds"], 15);
    assert_eq!(spec["leaseTransitions"], 0);
    for time in ["renewTime", "acquireTime"] {
        let text = spec[time].as_str().unwrap();
        let fraction = text.split_once('.').map(|(_, f)| f.trim_end_matches('Z')).unwrap_or("");
        assert!(fraction.len() == 6 && fraction.bytes().all(|b| b.is_ascii_digit()), "{time}: {text}");
    }
    let first = server.writes.lock().unwrap()[0].1.spec.clone().unwrap();
    assert_eq!(first.acquire_time, server.lease.lock().unwrap().clone().unwrap().spec.unwrap().acquire_time, "acquired once");
    drop(a.stop().await);
}

#[tokio::test(start_paused = true)]
async fn a_follower_takes_over_a_silent_lease_within_twenty_seconds_of_its_last_renewal_and_never_overlaps() {
    let server = Arc::new(Server::default());
    let mut a = agent(&server, "nodelens-a");
    until(&mut a, true).await;
    let mut b = agent(&server, "nodelens-b");
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(!*b.leading.borrow() && b.gauge.get() == 0, "b follows while a renews");
    assert_eq!(server.holder().as_deref(), Some("nodelens-a"));

    // a dies (SIGKILL): it neither renews nor releases.
    a.task.abort();
    let last = *renewals(&server).last().unwrap();
    let took = until(&mut b, true).await;
    assert_eq!(server.holder().as_deref(), Some("nodelens-b"));
    let after = took - last;
    assert!(after >= LEASE_DURATION && after <= LEASE_DURATION + RETRY_INTERVAL, "taken over {after:?} after the last renewal");
    let spec = server.lease.lock().unwrap().clone().unwrap().spec.unwrap();
    assert_eq!(spec.lease_transitions, Some(1));
    drop(b.stop().await);
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_the_next_look_not_after_the_lease_duration() {
    let server = Arc::new(Server::default());
    let mut a = agent(&server, "nodelens-a");
    until(&mut a, true).await;
    let mut b = agent(&server, "nodelens-b");
    tokio::time::sleep(Duration::from_secs(7)).await;

    let mut elector = a.stop().await;
    let released = Instant::now();
    elector.release().await;
    assert_eq!(server.holder(), None, "released: no holder");
    let took = until(&mut b, true).await;
    assert!(took - released <= RETRY_INTERVAL, "taken {:?} after the release", took - released);
    drop(b.stop().await);
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_leader_stops_leading_before_anyone_may_take_over() {
    let server = Arc::new(Server::default());
    let mut a = agent(&server, "nodelens-a");
    until(&mut a, true).await;
    let mut b = agent(&server, "nodelens-b");
    tokio::time::sleep(Duration::from_secs(6)).await;

    // a's requests hang from now on; its process lives.
    a.client.cut.store(true, Ordering::Release);
    let last = *renewals(&server).last().unwrap();
    let stopped = until(&mut a, false).await;
    assert_eq!(stopped - last, RENEW_DEADLINE, "a stops exactly at its renewal deadline");
    assert_eq!(a.gauge.get(), 0);
    assert!(!*b.leading.borrow());
    let took = until(&mut b, true).await;
    assert!(took - last >= LEASE_DURATION, "b waited for the Lease to expire");
    assert!(took - stopped >= LEASE_DURATION - RENEW_DEADLINE, "no overlap: a stopped {:?} before b started", took - stopped);

    // Back on the network, a finds b holding the Lease and follows.
    a.client.cut.store(false, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!*a.leading.borrow() && *b.leading.borrow());
    assert_eq!(server.holder().as_deref(), Some("nodelens-b"));
    a.task.abort();
    drop(b.stop().await);
}

#[tokio::test(start_paused = true)]
async fn a_conflicting_renewal_reads_the_lease_again_and_adopts_it_only_if_still_the_holder() {
    let server = Arc::new(Server::default());
    let client = Client { server: server.clone(), cut: Arc::default() };
    let mut elector = Elector::new(client.clone(), "nodelens-a".into());
    assert_eq!(elector.attempt().await.0, Outcome::Leading);

    // Our own write whose answer was lost: the version moved, the holder is still us.
    let ours = server.lease.lock().unwrap().clone().unwrap();
    server.store(&ours);
    tokio::time::sleep(RENEW_INTERVAL).await;
    assert_eq!(elector.attempt().await.0, Outcome::Leading);
    assert_eq!(server.holder().as_deref(), Some("nodelens-a"));

    // Another agent wrote itself in: a 409, then a follower that stops leading at once.
    let mut theirs = server.lease.lock().unwrap().clone().unwrap();
    theirs.spec.as_mut().unwrap().holder_identity = Some("nodelens-c".into());
    server.store(&theirs);
    tokio::time::sleep(RENEW_INTERVAL).await;
    assert_eq!(elector.attempt().await.0, Outcome::Following);
    assert!(!elector.leading(Instant::now()));
    assert_eq!(server.holder().as_deref(), Some("nodelens-c"));
}

#[tokio::test(start_paused = true)]
async fn a_follower_reading_a_stale_cache_cannot_take_a_live_lease() {
    let server = Arc::new(Server::default());
    let mut a = agent(&server, "nodelens-a");
    until(&mut a, true).await;
    // The cache followers read stops at the Lease's first version: to them it never changes.
    *server.cached.lock().unwrap() = server.lease.lock().unwrap().clone();
    let b = agent(&server, "nodelens-b");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(*a.leading.borrow(), "the holder kept renewing and leading");
    assert!(!*b.leading.borrow(), "the takeover with a stale version got a 409");
    assert_eq!(server.holder().as_deref(), Some("nodelens-a"));
    drop(b.stop().await);
    drop(a.stop().await);
}

#[tokio::test(start_paused = true)]
async fn agents_starting_together_elect_exactly_one() {
    let server = Arc::new(Server::default());
    let mut agents: Vec<Agent> = (0..3).map(|i| agent(&server, &format!("nodelens-{i}"))).collect();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let leaders: Vec<usize> = agents.iter().enumerate().filter(|(_, a)| *a.leading.borrow()).map(|(i, _)| i).collect();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    assert_eq!(server.holder(), Some(format!("nodelens-{}", leaders[0])));
    assert_eq!(agents.iter().map(|a| a.gauge.get()).sum::<i64>(), 1);
    for a in agents.drain(..) {
        drop(a.stop().await);
    }
}

/// Against the Kubernetes API double over HTTP (real time): the requests [`KubeLeases`]
/// makes are the ones the API server takes, and its answers map to the election's outcomes.
#[tokio::test]
async fn the_election_speaks_the_lease_api_of_the_api_server() {
    use nodelens_testkit::kubernetes::FakeApiServer;

    let api = FakeApiServer::start();
    let client = |name: &str| {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&api.kubeconfig_for(name)).unwrap();
        async move {
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
            kube::Client::try_from(config).unwrap()
        }
    };
    let leases = |c: kube::Client| KubeLeases::new(c, "monitoring", "nodelens-events");
    let (ca, cb) = (client("a").await, client("b").await);
    assert!(leases(ca.clone()).get(true).await.unwrap().is_none(), "a missing Lease is a 404, read as none");
    assert!(leases(ca.clone()).get(false).await.unwrap().is_none(), "from the cache too");

    let mut a = Elector::new(leases(ca.clone()), "nodelens-a".into());
    let mut b = Elector::new(leases(cb.clone()), "nodelens-b".into());
    assert_eq!(a.attempt().await.0, Outcome::Leading);
    assert_eq!(b.attempt().await.0, Outcome::Following);
    let stored = api.object("Lease", "monitoring", "nodelens-events").unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "nodelens-a");
    assert_eq!(stored["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(a.attempt().await.0, Outcome::Leading, "a renewal with the version written last");

    let current = leases(cb.clone()).get(false).await.unwrap().unwrap();
    let mut again = current.clone();
    again.metadata.resource_version = None;
    assert!(matches!(leases(cb.clone()).create(&again).await, Err(LeaseError::Conflict)), "AlreadyExists");
    let mut stale = current.clone();
    stale.metadata.resource_version = Some("1".into());
    assert!(matches!(leases(cb.clone()).replace(&stale).await, Err(LeaseError::Conflict)), "a stale resourceVersion");

    a.release().await;
    let released = api.object("Lease", "monitoring", "nodelens-events").unwrap();
    assert!(released["spec"]["holderIdentity"].is_null(), "{released}");
    assert_eq!(b.attempt().await.0, Outcome::Leading, "a released Lease is taken at once");
    assert_eq!(api.object("Lease", "monitoring", "nodelens-events").unwrap()["spec"]["leaseTransitions"], 0);
}
