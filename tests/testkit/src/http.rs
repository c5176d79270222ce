//! The HTTP(S) server under the test doubles: hyper on a current-thread runtime of its own
//! thread, so synchronous tests can run it beside the agent.

use std::future::Future;
use std::net::SocketAddr;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running server; stops when dropped.
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `handler` on loopback `port` (0: any), over TLS when `tls` is given.
    pub fn start<F, Fut, B, E>(port: u16, tls: Option<tokio_rustls::TlsAcceptor>, handler: F) -> Server
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        E: Into<BoxError>,
    {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind a loopback port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => accepted.unwrap().0,
                        _ = &mut stop_rx => return,
                    };
                    let (handler, tls) = (handler.clone(), tls.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(handler);
                        let http = hyper::server::conn::http1::Builder::new();
                        let _ = match tls {
                            Some(acceptor) => match acceptor.accept(stream).await {
                                Ok(tls_stream) => http.serve_connection(TokioIo::new(tls_stream), service).await,
                                Err(_) => return,
                            },
                            None => http.serve_connection(TokioIo::new(stream), service).await,
                        };
                    });
                }
            });
        });
        Server { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Stops accepting and waits for the server thread.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A service's error that loses the reply on purpose: hyper closes the connection unanswered,
/// as when a proxy or the network drops it after the server acted on the request.
#[derive(Debug)]
pub struct LostReply;

impl std::fmt::Display for LostReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reply lost on purpose")
    }
}

impl std::error::Error for LostReply {}
