//! The election of the agent that ships the cluster's Events: a `coordination.k8s.io/v1`
//! Lease in the agent's namespace, held by one agent's pod name at a time.
//!
//! kube-runtime 5 has no leader election, so this is the protocol client-go's leader election
//! speaks, small:
//!
//! - The holder writes `renewTime` every [`RENEW_INTERVAL`], with the resourceVersion it last
//!   read (optimistic concurrency: a 409 means another agent wrote the Lease since; the holder
//!   reads it again and carries on only if it is still the holder).
//! - Another agent takes the Lease over when its holder is empty (released) or when the Lease
//!   has not changed for `leaseDurationSeconds` ([`LEASE_DURATION`]) by the taker's own
//!   monotonic clock since it first saw that version. Clocks of different nodes are never
//!   compared, so a skewed node neither steals a live Lease nor waits on a dead one.
//! - The holder stops leading when no renewal has succeeded for [`RENEW_DEADLINE`], shorter
//!   than the Lease's duration: cut off from the API server, it stops shipping before anyone
//!   else may take over, so two agents never ship at once.
//! - A clean shutdown releases the Lease (empty holder), and the next agent takes it at its
//!   next look, within [`RETRY_INTERVAL`].

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use tokio::time::Instant;

/// `leaseDurationSeconds` of the Lease.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// How long the holder keeps leading without a successful renewal. Less than
/// [`LEASE_DURATION`] minus one renewal's request time, so it stops before anyone takes over.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the other agents look at the Lease (and when it is due to expire: a Lease seen
/// unchanged for its duration is taken over however long this is).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(8);
/// The longest one request to the API server may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// How soon a holder tries again after a failed renewal.
const RENEW_RETRY: Duration = Duration::from_secs(1);

/// Why a request about the Lease failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// 409: the Lease was written since it was read (Conflict), or created by another agent
    /// first (AlreadyExists).
    #[error("conflict: the Lease changed since it was read")]
    Conflict,
    /// Anything else: the API unreachable, refused, timed out.
    #[error("{0}")]
    Other(String),
}

/// The three requests the election makes, on the one Lease it is about.
pub trait LeaseApi: Send + Sync {
    /// The Lease, `None` when it does not exist (404). Not `consistent`: as the API server's
    /// watch cache has it (`resourceVersion=0`, no etcd read), possibly a moment old, which the
    /// write that follows finds out (409).
    fn get(&self, consistent: bool) -> impl Future<Output = Result<Option<Lease>, LeaseError>> + Send;
    /// Creates it; [`LeaseError::Conflict`] when it exists.
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease, LeaseError>> + Send;
    /// Replaces it; [`LeaseError::Conflict`] when its resourceVersion is not `lease`'s.
    fn replace(&self, lease: &Lease) -> impl Future<Output = Result<Lease, LeaseError>> + Send;
}

/// The Lease through the API server.
pub struct KubeLeases {
    api: kube::Api<Lease>,
    name: String,
}

impl KubeLeases {
    /// The Lease `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> KubeLeases {
        KubeLeases { api: kube::Api::namespaced(client, namespace), name: name.to_string() }
    }
}

fn lease_error(e: kube::Error) -> LeaseError {
    match e {
        kube::Error::Api(status) if status.code == 409 => LeaseError::Conflict,
        e => LeaseError::Other(e.to_string()),
    }
}

impl LeaseApi for KubeLeases {
    async fn get(&self, consistent: bool) -> Result<Option<Lease>, LeaseError> {
        if consistent {
            return self.api.get_opt(&self.name).await.map_err(lease_error);
        }
        match self.api.get_with(&self.name, &kube::api::GetParams::any()).await {
            Ok(lease) => Ok(Some(lease)),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(e) => Err(lease_error(e)),
        }
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let mut lease = lease.clone();
        lease.metadata.name = Some(self.name.clone());
        self.api.create(&Default::default(), &lease).await.map_err(lease_error)
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.api.replace(&self.name, &Default::default(), lease).await.map_err(lease_error)
    }
}

/// What one attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The Lease is this agent's (taken or renewed).
    Leading,
    /// Another agent holds it.
    Following,
    /// The request failed; nothing is known.
    Failed,
}

/// One agent's side of the election. [`Elector::attempt`] is called at the instants it
/// returns; [`Elector::leading`] says whether the agent leads at an instant.
pub struct Elector<A> {
    api: A,
    holder: String,
    /// When the last successful renewal started, while this agent holds the Lease.
    renewed: Option<Instant>,
    /// The Lease as this agent last wrote it (renewals need no read first).
    written: Option<Lease>,
    /// Another holder's Lease: its resourceVersion, and when this agent first saw it.
    observed: Option<(String, Instant)>,
}

impl<A: LeaseApi> Elector<A> {
    /// An agent named `holder` (its pod name) in the election held through `api`.
    pub fn new(api: A, holder: String) -> Elector<A> {
        Elector { api, holder, renewed: None, written: None, observed: None }
    }

    /// Whether this agent leads at `now`: it holds the Lease and renewed it less than
    /// [`RENEW_DEADLINE`] before.
    pub fn leading(&self, now: Instant) -> bool {
        self.renewed.is_some_and(|at| now < at + RENEW_DEADLINE)
    }

    /// When leading ends unless a renewal succeeds first.
    pub fn deadline(&self) -> Option<Instant> {
        self.renewed.map(|at| at + RENEW_DEADLINE)
    }

    /// Takes or renews the Lease if it can; returns what happened and when to try next.
    /// Each request is bounded by [`REQUEST_TIMEOUT`].
    pub async fn attempt(&mut self) -> (Outcome, Instant) {
        let now = Instant::now();
        let outcome = match self.try_lead(now).await {
            Ok(true) => {
                self.renewed = Some(now);
                Outcome::Leading
            }
            Ok(false) => {
                self.renewed = None;
                self.written = None;
                Outcome::Following
            }
            Err(e) => {
                self.written = None;
                tracing::warn!(error = %e, leading = self.leading(Instant::now()), "cannot read or write the Events Lease");
                Outcome::Failed
            }
        };
        let next = match outcome {
            Outcome::Leading => now + RENEW_INTERVAL,
            Outcome::Failed if self.renewed.is_some() => Instant::now() + RENEW_RETRY,
            _ => {
                // Spread the fleet's reads; look again when the holder's time runs out, but
                // never sooner than a second from now.
                let now = Instant::now();
                let poll = now + RETRY_INTERVAL.mul_f64(0.8 + fastrand::f64() * 0.2);
                match &self.observed {
                    Some((_, seen)) if outcome == Outcome::Following => poll.min(*seen + LEASE_DURATION).max(now + RENEW_RETRY),
                    _ => poll,
                }
            }
        };
        (outcome, next)
    }

    /// Stops leading now (the renewal deadline passed while a request was under way).
    pub fn step_down(&mut self) {
        self.renewed = None;
        self.written = None;
    }

    /// Gives the Lease up, if held: an empty holder lets the next agent take it at once.
    pub async fn release(&mut self) {
        if self.renewed.take().is_none() {
            return;
        }
        let Some(mut lease) = self.written.take() else { return };
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(micro_now());
        match tokio::time::timeout(REQUEST_TIMEOUT, self.api.replace(&lease)).await {
            Ok(Ok(_)) => tracing::info!("released the Events Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the Events Lease; another agent takes it when it expires"),
            Err(_) => tracing::warn!("releasing the Events Lease timed out; another agent takes it when it expires"),
        }
    }

    /// One round: true when this agent holds the Lease afterwards.
    async fn try_lead(&mut self, now: Instant) -> Result<bool, LeaseError> {
        // The holder renews what it wrote last; a 409 sends it to read the Lease again.
        if let Some(written) = self.written.take().filter(|_| self.leading(now)) {
            match self.request(self.api.replace(&renewed(written, false))).await {
                Ok(lease) => {
                    self.written = Some(lease);
                    return Ok(true);
                }
                Err(LeaseError::Conflict) => {}
                Err(e) => return Err(e),
            }
        }
        // An agent that held the Lease until now reads it as it is; the others, every few
        // seconds each, from the API server's cache.
        let consistent = self.renewed.is_some();
        let current = match self.request(self.api.get(consistent)).await? {
            None => {
                let lease = Lease { metadata: ObjectMeta::default(), spec: Some(LeaseSpec::default()) };
                return match self.request(self.api.create(&renewed(self.taken(lease), true))).await {
                    Ok(lease) => {
                        tracing::info!(holder = %self.holder, "created the Events Lease: this agent ships the cluster's Events");
                        self.written = Some(lease);
                        Ok(true)
                    }
                    // Another agent created it first.
                    Err(LeaseError::Conflict) => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Some(lease) => lease,
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        let version = current.metadata.resource_version.clone().unwrap_or_default();
        let (write, fresh) = if holder == self.holder {
            // Ours: a renewal whose answer was lost, or this agent restarted in the same pod.
            (current, false)
        } else {
            let duration = spec.lease_duration_seconds.map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(1) as u64));
            let seen = match &self.observed {
                Some((v, at)) if *v == version => *at,
                _ => {
                    self.observed = Some((version, now));
                    now
                }
            };
            if !holder.is_empty() && now < seen + duration {
                return Ok(false);
            }
            tracing::info!(previous = %holder, holder = %self.holder, "taking over the Events Lease");
            (self.taken(current), true)
        };
        match self.request(self.api.replace(&renewed(write, fresh))).await {
            Ok(lease) => {
                self.observed = None;
                self.written = Some(lease);
                Ok(true)
            }
            // Another agent was faster, or what this one read was stale: it looks again later,
            // and a Lease seen from then on has its full duration to change.
            Err(LeaseError::Conflict) => {
                self.observed = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// `lease` with this agent as its new holder.
    fn taken(&self, mut lease: Lease) -> Lease {
        let spec = lease.spec.get_or_insert_with(Default::default);
        let previous = spec.holder_identity.replace(self.holder.clone());
        if previous.is_some_and(|p| !p.is_empty()) {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_transitions.get_or_insert(0);
        lease
    }

    async fn request<T>(&self, request: impl Future<Output = Result<T, LeaseError>>) -> Result<T, LeaseError> {
        tokio::time::timeout(REQUEST_TIMEOUT, request).await.unwrap_or_else(|_| Err(LeaseError::Other("request timed out".into())))
    }
}

/// `lease` renewed now (and acquired now when `acquired`), for [`LEASE_DURATION`].
fn renewed(mut lease: Lease, acquired: bool) -> Lease {
    let spec = lease.spec.get_or_insert_with(Default::default);
    let now = micro_now();
    if acquired || spec.acquire_time.is_none() {
        spec.acquire_time = Some(now.clone());
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
    lease
}

/// The wall-clock time as a MicroTime (written with exactly six fractional digits, as the API
/// server requires), for people reading the Lease: the election itself never compares clocks.
fn micro_now() -> MicroTime {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let micros = i64::try_from(now.as_micros()).unwrap_or(i64::MAX);
    MicroTime(k8s_openapi::jiff::Timestamp::from_microsecond(micros).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH))
}

/// Runs the election until `stop` resolves, publishing whether this agent leads on
/// `leading` and in `gauge` (`nodelens_events_leader`) after every attempt and at each renewal
/// deadline. Leaves the Lease held: the caller stops shipping, then calls
/// [`Elector::release`].
pub async fn campaign<A: LeaseApi>(
    elector: &mut Elector<A>,
    leading: &tokio::sync::watch::Sender<bool>,
    gauge: &prometheus_client::metrics::gauge::Gauge,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let far = || Instant::now() + Duration::from_secs(3600);
    let mut next = Instant::now();
    loop {
        let deadline = elector.deadline();
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep_until(next) => {
                // A renewal still under way at the deadline is abandoned: leading ends on time.
                let attempt = {
                    let attempt = elector.attempt();
                    tokio::pin!(attempt);
                    tokio::select! {
                        done = &mut attempt => Some(done),
                        _ = tokio::time::sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => None,
                        _ = &mut stop => return,
                    }
                };
                next = match attempt {
                    Some((_, next)) => next,
                    None => {
                        elector.step_down();
                        Instant::now() + RENEW_RETRY
                    }
                };
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some_and(|d| d < next) => elector.step_down(),
        }
        let now = elector.leading(Instant::now());
        if now != *leading.borrow() {
            if now {
                tracing::info!("this agent leads: it ships the cluster's Events");
            } else {
                tracing::info!("this agent no longer leads: another one ships the cluster's Events");
            }
        }
        leading.send_replace(now);
        gauge.set(i64::from(now));
    }
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
