//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the agent's threads are
//! alive) and `/readyz` (start-up finished: checkpoints loaded, pipeline running).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// What `/healthz` and `/readyz` report.
#[derive(Default)]
pub struct Health {
    /// Start-up is complete.
    pub ready: AtomicBool,
    /// A component died; the agent is unhealthy until restarted.
    pub failed: AtomicBool,
}

/// Binds `addr`; the returned listener's local address is the one to scrape.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>, mut shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint accept failed");
                    continue;
                }
            },
            _ = shutdown.recv() => return,
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, metrics.clone(), health.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn respond(req: Request<Incoming>, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Response<Full<Bytes>>, Infallible> {
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
        "/metrics" => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        "/healthz" if health.failed.load(Ordering::Acquire) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "failed\n".into()),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if health.ready.load(Ordering::Acquire) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found; try /metrics, /healthz or /readyz\n".into()),
    })
}
