//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the agent's threads are
//! alive) and `/readyz` (start-up finished: checkpoints loaded, pipeline running).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::Exposition;
use crate::shutdown::Shutdown;

/// What `/healthz` and `/readyz` report.
#[derive(Default)]
pub struct Health {
    /// Start-up is complete.
    pub ready: AtomicBool,
    /// Why the agent is unhealthy (a part died); empty while healthy. Unhealthy until restarted.
    failures: Mutex<Vec<String>>,
    /// What start-up is waiting for, while it waits.
    waiting: Mutex<Option<String>>,
}

impl Health {
    /// A part died: `/healthz` fails from now on, naming `reason`.
    pub fn fail(&self, reason: impl Into<String>) {
        self.failures.lock().unwrap().push(reason.into());
    }

    /// Why the agent is unhealthy, if it is.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Start-up waits for `what` (`None`: no longer), said by `/readyz` while not ready.
    pub fn wait_for(&self, what: Option<String>) {
        *self.waiting.lock().unwrap() = what;
    }

    /// `/healthz`: status and body.
    pub(crate) fn healthz(&self) -> (StatusCode, String) {
        let failures = self.failures.lock().unwrap();
        if failures.is_empty() {
            (StatusCode::OK, "ok\n".into())
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, failures.iter().map(|f| format!("failed: {f}\n")).collect())
        }
    }

    /// `/readyz`: status and body.
    pub(crate) fn readyz(&self) -> (StatusCode, String) {
        if self.ready.load(Ordering::Acquire) {
            return (StatusCode::OK, "ready\n".into());
        }
        match &*self.waiting.lock().unwrap() {
            Some(what) => (StatusCode::SERVICE_UNAVAILABLE, format!("starting: waiting for {what}\n")),
            None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
        }
    }
}

/// Binds `addr`; the returned listener's local address is the one to scrape.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// What one client may hold of the endpoint. Every namespace's apps and users are in
/// `/metrics`, and a node agent is reachable from every pod unless a NetworkPolicy says
/// otherwise: a slow or hostile client must not wedge it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to send a request's headers, counted from the connection's start or the end of
    /// the previous response (so it is also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// Longest life of one connection, slow readers of a response included.
    pub connection_lifetime: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Connections one client address may hold, so a single client cannot take every slot
    /// (and the kubelet's probes with them).
    pub max_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(60),
            max_connections: 1024,
            max_per_client: 8,
        }
    }
}

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Exposition>, health: Arc<Health>, limits: Limits, mut shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_client = Arc::new(Mutex::new(HashMap::new()));
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint accept failed");
                    // Out of descriptors: let connections finish before accepting more.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.recv() => return,
        };
        let Some(client_slot) = ClientSlot::take(&per_client, peer.ip(), limits.max_per_client) else {
            tracing::debug!(%peer, max = limits.max_per_client, "metrics client at its connection limit; closing");
            drop(stream);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if refused % 1000 == 0 {
                tracing::warn!(%peer, max = limits.max_connections, refused = refused + 1, "metrics endpoint at its connection limit; closing new connections");
            }
            refused += 1;
            drop(stream);
            continue;
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, metrics.clone(), health.clone()));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_lifetime, connection).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended with an error"),
                Err(_) => tracing::debug!(%peer, "metrics connection outlived its limit; closed"),
                Ok(Ok(())) => {}
            }
            drop((slot, client_slot));
        });
    }
}

/// One of a client address's connections; released on drop.
struct ClientSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl ClientSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut map = counts.lock().unwrap();
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot { counts: counts.clone(), ip })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn respond(req: Request<Incoming>, metrics: Arc<Exposition>, health: Arc<Health>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into()));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            // Encoding every tenant's series is CPU work: off the runtime's threads, which also
            // run the sinks and the committer.
            let body = tokio::task::spawn_blocking(move || metrics.encode()).await.unwrap_or_default();
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
        }
        "/healthz" => {
            let (status, body) = health.healthz();
            reply(status, "text/plain", body)
        }
        "/readyz" => {
            let (status, body) = health.readyz();
            reply(status, "text/plain", body)
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found; try /metrics, /healthz or /readyz\n".into()),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn get_metrics(addr: SocketAddr) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        Ok(body)
    }

    /// Serves on a fresh loopback port with `limits`; the sender keeps it running.
    async fn start(limits: Limits) -> (SocketAddr, tokio::sync::broadcast::Sender<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _) = tokio::sync::broadcast::channel(1);
        tokio::spawn(serve(
            listener,
            Arc::new(crate::metrics::Registrar::new("n").finish()),
            Arc::new(Health::default()),
            limits,
            Shutdown::new(tx.subscribe()),
        ));
        (addr, tx)
    }

    #[tokio::test]
    async fn idle_and_half_sent_connections_are_closed_and_metrics_keep_answering() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            connection_lifetime: Duration::from_secs(5),
            max_connections: 400,
            max_per_client: 400,
        };
        let (addr, _running) = start(limits).await;

        // 300 silent clients and 50 that send half a request, then stall.
        let mut slow = Vec::new();
        for i in 0..350 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if i % 7 == 0 {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost:").await.unwrap();
            }
            slow.push(s);
        }
        // Answered while they are held (a wedged endpoint would answer only once they are
        // closed, and then the slow clients below would not all be closed yet). The guard is
        // for a hang, not a speed threshold: a busy machine does not fail it.
        let body = tokio::time::timeout(Duration::from_secs(30), get_metrics(addr)).await.expect("answered").unwrap();
        assert!(body.contains("nodelens_build_info"), "{body}");

        // Past the header timeout every slow client is hung up on.
        let mut closed = 0;
        for s in &mut slow {
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                Ok(Ok(_)) | Ok(Err(_)) => closed += 1,
                Err(_) => {}
            }
        }
        assert_eq!(closed, slow.len(), "every idle or half-sent connection is closed");
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_at_once() {
        let limits = Limits {
            header_timeout: Duration::from_secs(30),
            connection_lifetime: Duration::from_secs(30),
            max_connections: 10,
            max_per_client: 10,
        };
        let (addr, _running) = start(limits).await;
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await.expect("closed, not left hanging");
        assert_eq!(n.unwrap_or(0), 0, "the 11th connection is closed without an answer");
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get_metrics(addr).await.unwrap().contains("nodelens_build_info"), "slots come back");
    }

    #[tokio::test]
    async fn one_client_cannot_take_every_slot() {
        let limits = Limits {
            header_timeout: Duration::from_secs(30),
            connection_lifetime: Duration::from_secs(30),
            max_connections: 100,
            max_per_client: 5,
        };
        let (addr, _running) = start(limits).await;
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The same address is refused; another one (the kubelet's probe) is still served.
        let mut sixth = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), sixth.read(&mut buf)).await.expect("closed at once");
        assert_eq!(n.unwrap_or(0), 0);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut probe = socket.connect(addr).await.unwrap();
        probe.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut reply = String::new();
        probe.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get_metrics(addr).await.unwrap().contains("nodelens_build_info"), "its slots come back");
    }
}
