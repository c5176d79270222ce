//! OTLP/gRPC: tonic serving the generated `LogsService` and `MetricsService` on one port, gzip
//! accepted, refusals as gRPC statuses with a `google.rpc.RetryInfo` detail when the client is
//! told when to retry.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{self, LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{self, MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use prost::Message;
use tonic::codec::CompressionEncoding;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::metadata::MetadataMap;

use super::{accept, admit, grpc_code, logs_reply, metrics_reply, rpc, Export, Outcome, Partial, Refusal, Seen, Signal, State};

impl Refusal {
    fn grpc_status(&self) -> tonic::Status {
        let code = grpc_code(self.status);
        let Some(seconds) = self.retry_after else {
            return tonic::Status::new(code, &self.message);
        };
        let retry = rpc::RetryInfo { retry_delay: Some(rpc::Duration { seconds: seconds as i64, nanos: 0 }) };
        let details = rpc::Status {
            code: code.into(),
            message: self.message.clone(),
            details: vec![rpc::Any { type_url: rpc::RETRY_INFO_TYPE.to_string(), value: retry.encode_to_vec() }],
        };
        tonic::Status::with_details(code, &self.message, details.encode_to_vec().into())
    }
}

fn method_path(signal: Signal) -> String {
    let service = match signal {
        Signal::Logs => logs_service_server::SERVICE_NAME,
        Signal::Metrics => metrics_service_server::SERVICE_NAME,
    };
    format!("/{service}/Export")
}

/// The gRPC services, over the state OTLP/HTTP shares.
#[derive(Clone)]
struct Receiver {
    state: Arc<Mutex<State>>,
}

impl Receiver {
    async fn receive(&self, signal: Signal, metadata: MetadataMap, export: Export) -> Result<Option<Partial>, tonic::Status> {
        let text = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let records = export.records();
        let admitted = admit(&self.state.lock().unwrap(), text);
        let outcome = match admitted {
            Ok(()) => accept(&self.state, export).await,
            Err(refusal) => Outcome::Refused(refusal),
        };
        let result = match outcome {
            Outcome::Stored(partial) => Ok(partial),
            Outcome::Refused(refusal) => Err(refusal.grpc_status()),
            Outcome::Lost => Err(tonic::Status::unavailable("reply lost on purpose")),
        };
        self.state.lock().unwrap().seen.push(Seen {
            transport: "grpc",
            signal: signal.name(),
            path: method_path(signal),
            content_type: text("content-type"),
            content_encoding: text("grpc-encoding"),
            authorization: text("authorization"),
            records,
            status: result.as_ref().map_or_else(|s| s.code().into(), |_| 0),
        });
        result
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let (metadata, _, request) = request.into_parts();
        let partial = self.receive(Signal::Logs, metadata, Export::Logs(request)).await?;
        Ok(tonic::Response::new(logs_reply(partial)))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let (metadata, _, request) = request.into_parts();
        let partial = self.receive(Signal::Metrics, metadata, Export::Metrics(request)).await?;
        Ok(tonic::Response::new(metrics_reply(partial)))
    }
}

/// Both services on one port, routed by the service name in the gRPC path: tonic's own router
/// needs its `router` feature, and axum with it.
#[derive(Clone)]
struct Services {
    logs: LogsServiceServer<Receiver>,
    metrics: MetricsServiceServer<Receiver>,
}

impl Service<http::Request<tonic::body::Body>> for Services {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let service = req.uri().path().trim_start_matches('/').split('/').next().unwrap_or("");
        if service == metrics_service_server::SERVICE_NAME {
            self.metrics.call(req)
        } else {
            // Also answers UNIMPLEMENTED for any other method.
            self.logs.call(req)
        }
    }
}

/// The gRPC server on a current-thread runtime of its own thread; stops when dropped.
pub(super) struct GrpcServer {
    /// The address it listens on.
    pub(super) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcServer {
    /// Serves both services on loopback `port` (0: any).
    pub(super) fn start(port: u16, state: Arc<Mutex<State>>) -> GrpcServer {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind a loopback port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver { state };
        let services = Services {
            logs: LogsServiceServer::new(receiver.clone()).accept_compressed(CompressionEncoding::Gzip),
            metrics: MetricsServiceServer::new(receiver).accept_compressed(CompressionEncoding::Gzip),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(tokio::net::TcpListener::from_std(listener).unwrap());
                // Not a graceful shutdown, which would wait on clients to hang up: the open
                // connections close when the runtime drops, as with a collector that stopped.
                tokio::select! {
                    _ = tonic::transport::Server::builder().serve_with_incoming(services, incoming) => {}
                    _ = stop_rx => {}
                }
            });
        });
        GrpcServer { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Stops serving and waits for the server thread.
    pub(super) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}
