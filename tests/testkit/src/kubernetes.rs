//! A fake Kubernetes API server speaking the list/watch protocol for pods and namespaces:
//! lists carry a `resourceVersion`; `?watch=true&resourceVersion=N` streams (chunked, one JSON
//! event per line) every change after N as ADDED, MODIFIED, DELETED and BOOKMARK events; a
//! version older than the compaction point gets a 410 Gone `ERROR` event, as etcd compaction
//! causes; open watches can be dropped. `fieldSelector=spec.nodeName=<node>` is honoured, and
//! every request is recorded so tests can check what the agent asked for. Lists can be made
//! slow, as an API server under load or a control plane still starting makes them, and the
//! server can be made to refuse connections (nothing listening on its port) or to answer every
//! request with an error status, as during a control plane outage or upgrade.
//!
//! Also core/v1 Events (list and watch at `/api/v1/events`, paginated with `limit` and
//! `continue` as the API server does), a pod read by name, and `coordination.k8s.io/v1`
//! Leases with the API server's optimistic concurrency: a GET of a missing Lease is a 404
//! with a `Status` body, a create of an existing name is 409 AlreadyExists, an update without
//! the current `resourceVersion` is 409 Conflict (without one at all, 422), and `renewTime`
//! / `acquireTime` must be MicroTimes with exactly six fractional digits. Each client is told
//! apart by its bearer token ([`FakeApiServer::kubeconfig_for`]), so one client's connection
//! can be cut (its requests hang, its watches end) while the others' work.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::http::Server;

/// What a watch receives.
struct Watcher {
    kind: &'static str,
    /// The client's token.
    client: String,
    node: Option<String>,
    /// Asked for BOOKMARK events (`allowWatchBookmarks=true`).
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (kind, namespace/name) → object.
    objects: BTreeMap<(&'static str, String), Value>,
    /// Every change: (resourceVersion, kind, event type, object).
    history: Vec<(u64, &'static str, &'static str, Value)>,
    /// Watches from before this version get 410 Gone.
    compacted: u64,
    watchers: Vec<Watcher>,
    requests: Vec<String>,
    /// The bearer token of each of `requests`.
    request_tokens: Vec<String>,
    /// When each of `requests` arrived.
    request_times: Vec<std::time::Instant>,
    /// Every request is answered with this status (a `Status` object) while set.
    fail_with: Option<u16>,
    /// Lists are answered this long after they arrive.
    list_delay: std::time::Duration,
    /// Lists of these kinds are answered this long after they arrive instead.
    kind_list_delay: std::collections::BTreeMap<&'static str, std::time::Duration>,
    lists_answered: usize,
    /// Tokens whose requests hang, as across a network partition.
    cut: std::collections::BTreeSet<String>,
}

/// A running fake API server.
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Dropped after the watches are closed (see `Drop`); `None` while connections are refused.
    server: Mutex<Option<Server>>,
}

fn kind_of(object: &Value) -> &'static str {
    match object["kind"].as_str() {
        Some("Namespace") => "Namespace",
        Some("Event") => "Event",
        Some("Lease") => "Lease",
        _ => "Pod",
    }
}

fn key_of(object: &Value) -> String {
    format!("{}/{}", object["metadata"]["namespace"].as_str().unwrap_or(""), object["metadata"]["name"].as_str().unwrap())
}

fn node_of(object: &Value) -> Option<&str> {
    object["spec"]["nodeName"].as_str()
}

impl FakeApiServer {
    /// Starts on a free loopback port.
    pub fn start() -> FakeApiServer {
        let state = Arc::new(Mutex::new(State { rv: 1000, ..State::default() }));
        let server = serve(0, state.clone());
        FakeApiServer { addr: server.addr, state, server: Mutex::new(Some(server)) }
    }

    /// Stops listening: open connections (watches included) are cut and new ones refused,
    /// as when the API server or the network to it is down.
    pub fn refuse_connections(&self) {
        self.state.lock().unwrap().watchers.clear();
        drop(self.server.lock().unwrap().take());
    }

    /// Listens again on the same port after [`FakeApiServer::refuse_connections`].
    pub fn accept_connections(&self) {
        let mut server = self.server.lock().unwrap();
        if server.is_none() {
            *server = Some(serve(self.addr.port(), self.state.clone()));
        }
    }

    /// Answers every request with `status` (a `Status` object, as the API server's own
    /// errors) while `Some`, closing the open watches; `None` serves again.
    pub fn fail_requests(&self, status: Option<u16>) {
        let mut st = self.state.lock().unwrap();
        st.fail_with = status;
        if status.is_some() {
            st.watchers.clear();
        }
    }

    /// When each request (see [`FakeApiServer::requests`]) arrived.
    pub fn request_times(&self) -> Vec<std::time::Instant> {
        self.state.lock().unwrap().request_times.clone()
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_for("")
    }

    /// A kubeconfig of its own for `client`: its requests can be cut alone
    /// ([`FakeApiServer::cut_client`]).
    pub fn kubeconfig_for(&self, client: &str) -> String {
        let token = if client.is_empty() { "test-token".to_string() } else { format!("test-token-{client}") };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\ncurrent-context: fake\nusers:\n- name: test\n  user:\n    token: {token}\n",
            self.addr
        )
    }

    /// Creates or replaces an object (a Pod or a Namespace), notifying watches.
    pub fn apply(&self, mut object: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = kind_of(&object);
        let event = if st.objects.insert((kind, key_of(&object)), object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        publish(&mut st, rv, kind, event, object);
    }

    /// Changes an object without telling anyone: its event is lost, as when a watch
    /// connection breaks mid-stream. Only a relist will show it.
    pub fn apply_unannounced(&self, mut object: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert((kind_of(&object), key_of(&object)), object);
    }

    /// Deletes an object, notifying watches.
    pub fn delete(&self, kind: &'static str, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        let Some(mut object) = st.objects.remove(&(kind, format!("{namespace}/{name}"))) else { return };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        publish(&mut st, rv, kind, "DELETED", object);
    }

    /// Deletes an object without telling anyone: its DELETED event is lost, as when a
    /// watch connection breaks mid-stream. Only a relist will show it.
    pub fn delete_unannounced(&self, kind: &'static str, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        if st.objects.remove(&(kind, format!("{namespace}/{name}"))).is_some() {
            st.rv += 1;
        }
    }

    /// Sends a BOOKMARK with the current resourceVersion to every watch that asked for them.
    pub fn bookmark(&self) {
        let mut st = self.state.lock().unwrap();
        let rv = st.rv;
        st.watchers.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let line = json!({"type": "BOOKMARK", "object": {"kind": w.kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}});
            w.tx.send(Bytes::from(format!("{line}\n"))).is_ok()
        });
    }

    /// Forgets history up to now, as etcd compaction does: watches resuming from an older
    /// version get 410 Gone and must list again.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Closes every open watch connection.
    pub fn drop_watches(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    /// Answers every list (not watches) `delay` after it arrives, with the objects as they
    /// are then: the API is slow, the agent starts before it has pod metadata.
    pub fn delay_lists(&self, delay: std::time::Duration) {
        self.state.lock().unwrap().list_delay = delay;
    }

    /// Answers lists of `kind` (`"Namespace"`) `delay` after they arrive, other kinds as
    /// [`FakeApiServer::delay_lists`] says: one watch lists before another.
    pub fn delay_lists_of(&self, kind: &'static str, delay: std::time::Duration) {
        self.state.lock().unwrap().kind_list_delay.insert(kind, delay);
    }

    /// Lists answered so far (pod and namespace lists, not watches).
    pub fn lists_answered(&self) -> usize {
        self.state.lock().unwrap().lists_answered
    }

    /// Cuts `client` off (see [`FakeApiServer::kubeconfig_for`]): its requests hang until
    /// [`FakeApiServer::restore_client`], its open watches end, as across a network partition;
    /// the other clients are served.
    pub fn cut_client(&self, client: &str) {
        let token = format!("test-token-{client}");
        let mut st = self.state.lock().unwrap();
        st.watchers.retain(|w| w.client != token);
        st.cut.insert(token);
    }

    /// Serves `client` again.
    pub fn restore_client(&self, client: &str) {
        self.state.lock().unwrap().cut.remove(&format!("test-token-{client}"));
    }

    /// The object `kind` `namespace/name` as stored (a Lease, to look at its holder).
    pub fn object(&self, kind: &'static str, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(&(kind, format!("{namespace}/{name}"))).cloned()
    }

    /// Every request line received (`GET /api/v1/pods?...`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The request lines `client` sent (see [`FakeApiServer::kubeconfig_for`]), with when each
    /// arrived.
    pub fn requests_from(&self, client: &str) -> Vec<(std::time::Instant, String)> {
        let token = format!("test-token-{client}");
        let st = self.state.lock().unwrap();
        st.requests
            .iter()
            .zip(&st.request_tokens)
            .zip(&st.request_times)
            .filter(|((_, t), _)| **t == token)
            .map(|((r, _), at)| (*at, r.clone()))
            .collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // End the watch streams so their connections finish before the server stops.
        self.state.lock().unwrap().watchers.clear();
    }
}

fn serve(port: u16, state: Arc<Mutex<State>>) -> Server {
    Server::start(port, None, move |req| handle(req, state.clone()))
}

fn publish(st: &mut State, rv: u64, kind: &'static str, event: &'static str, object: Value) {
    st.history.push((rv, kind, event, object.clone()));
    let line = Bytes::from(format!("{}\n", json!({"type": event, "object": object})));
    st.watchers.retain(|w| {
        if w.kind != kind || w.node.as_deref().is_some_and(|n| node_of(&object) != Some(n)) {
            return !w.tx.is_closed();
        }
        w.tx.send(line.clone()).is_ok()
    });
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
            match (bytes[i], hex) {
                (b'%', Some(byte)) => {
                    out.push(byte);
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                (b, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    req.uri().query().unwrap_or("").split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), decode(v))).collect()
}

async fn handle(req: Request<Incoming>, state: Arc<Mutex<State>>) -> Result<Response<Body>, Infallible> {
    let token = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let fail_with = {
        let mut st = state.lock().unwrap();
        st.requests.push(format!("{} {}", req.method(), req.uri()));
        st.request_tokens.push(token.unwrap_or("").to_string());
        st.request_times.push(std::time::Instant::now());
        st.fail_with
    };
    if let Some(code) = fail_with {
        return Ok(reply(code, status(code, "InternalError", "an error on the server has prevented the request from succeeding")));
    }
    let Some(client) = token.filter(|t| *t == "test-token" || t.starts_with("test-token-")).map(str::to_string) else {
        return Ok(reply(401, status(401, "Unauthorized", "Unauthorized")));
    };
    while state.lock().unwrap().cut.contains(&client) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let path = req.uri().path().to_string();
    let not_found = || reply(404, status(404, "NotFound", &format!("the server could not find the requested resource ({path})")));
    if let Some(rest) = path.strip_prefix("/apis/coordination.k8s.io/v1/namespaces/") {
        return Ok(leases(req, rest, &state).await);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ["api", "v1", "namespaces", namespace, "pods", name] = segments.as_slice() {
        if req.method() != hyper::Method::GET {
            return Ok(reply(405, status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")));
        }
        let found = state.lock().unwrap().objects.get(&("Pod", format!("{namespace}/{name}"))).cloned();
        return Ok(match found {
            Some(pod) => reply(200, pod),
            None => reply(404, status(404, "NotFound", &format!("pods \"{name}\" not found"))),
        });
    }
    let kind = match path.as_str() {
        "/api/v1/pods" => "Pod",
        "/api/v1/namespaces" => "Namespace",
        "/api/v1/events" => "Event",
        _ => return Ok(not_found()),
    };
    if req.method() != hyper::Method::GET {
        return Ok(reply(405, status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")));
    }
    let q = query(&req);
    let node = match q.get("fieldSelector").map(String::as_str) {
        None | Some("") => None,
        Some(selector) => match selector.strip_prefix("spec.nodeName=") {
            Some(node) if kind == "Pod" => Some(node.to_string()),
            _ => return Ok(reply(400, status(400, "BadRequest", &format!("field label not supported: {selector}")))),
        },
    };
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let delay = {
        let st = state.lock().unwrap();
        st.kind_list_delay.get(kind).copied().unwrap_or(st.list_delay)
    };
    if !watch && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut st = state.lock().unwrap();
    if watch {
        let (tx, rx) = mpsc::unbounded_channel();
        if from != 0 && from < st.compacted {
            let gone = status(410, "Expired", &format!("too old resource version: {from} ({})", st.compacted));
            let _ = tx.send(Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": gone}))));
            drop(tx);
        } else {
            for (rv, k, event, object) in &st.history {
                if *rv > from && *k == kind && node.as_deref().is_none_or(|n| node_of(object) == Some(n)) {
                    let _ = tx.send(Bytes::from(format!("{}\n", json!({"type": event, "object": object}))));
                }
            }
            let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
            st.watchers.push(Watcher { kind, client, node, bookmarks, tx });
        }
        // The server ends a watch after its timeoutSeconds, as the API server does (which
        // spreads it by up to 2x; exactly is enough here).
        let timeout = q.get("timeoutSeconds").and_then(|t| t.parse().ok()).map(std::time::Duration::from_secs);
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let stream = futures_util::stream::unfold(rx, move |mut rx| async move {
            let next = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten(),
                None => rx.recv().await,
            };
            next.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let body = StreamBody::new(stream).boxed();
        return Ok(Response::builder().status(200).header("content-type", "application/json").body(body).unwrap());
    }
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((k, _), o)| *k == kind && node.as_deref().is_none_or(|n| node_of(o) == Some(n)))
        .map(|(_, o)| o.clone())
        .collect();
    // Pages as the API server cuts them: `limit` items, a `continue` token for the rest; the
    // pages of one list share the first page's resourceVersion.
    let (start, list_rv) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match token.split_once(':').and_then(|(rv, i)| Some((rv.parse::<u64>().ok()?, i.parse::<usize>().ok()?))) {
            Some((rv, _)) if rv < st.compacted => {
                return Ok(reply(
                    410,
                    status(410, "Expired", "The provided continue parameter is too old to display a consistent list result."),
                ))
            }
            Some((rv, i)) => (i, rv),
            None => return Ok(reply(400, status(400, "BadRequest", &format!("continue key is not valid: {token}")))),
        },
        None => (0, st.rv),
    };
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let end = start.saturating_add(limit).min(items.len());
    let page: Vec<Value> = items.get(start..end).unwrap_or_default().to_vec();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if end < items.len() {
        metadata["continue"] = json!(format!("{list_rv}:{end}"));
        metadata["remainingItemCount"] = json!(items.len() - end);
    }
    st.lists_answered += 1;
    Ok(reply(200, json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": metadata, "items": page})))
}

/// `coordination.k8s.io/v1` Leases: `rest` is `<namespace>/leases[/<name>]`.
async fn leases(req: Request<Incoming>, rest: &str, state: &Mutex<State>) -> Response<Body> {
    let parts: Vec<&str> = rest.split('/').collect();
    let (namespace, name) = match parts.as_slice() {
        [ns, "leases"] => (ns.to_string(), None),
        [ns, "leases", name] => (ns.to_string(), Some(name.to_string())),
        _ => return reply(404, status(404, "NotFound", "the server could not find the requested resource")),
    };
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(400, status(400, "BadRequest", "cannot read the body")),
    };
    let parse = || -> Result<Value, (u16, Value)> {
        let lease: Value = serde_json::from_slice(&body).map_err(|e| (400, status(400, "BadRequest", &format!("not a Lease: {e}"))))?;
        if lease["kind"] != "Lease" || lease["apiVersion"] != "coordination.k8s.io/v1" {
            return Err((400, status(400, "BadRequest", "the body is not a coordination.k8s.io/v1 Lease")));
        }
        if lease["metadata"]["namespace"].as_str().is_some_and(|ns| ns != namespace) {
            return Err((400, status(400, "BadRequest", "the namespace of the object does not match the namespace on the request")));
        }
        for field in ["acquireTime", "renewTime"] {
            if let Some(time) = lease["spec"].get(field).filter(|t| !t.is_null()) {
                let digits = time.as_str().and_then(|t| t.strip_suffix('Z')).and_then(|t| t.split_once('.')).map(|(_, f)| f);
                if !digits.is_some_and(|f| f.len() == 6 && f.bytes().all(|b| b.is_ascii_digit())) {
                    return Err((
                        400,
                        status(400, "BadRequest", &format!("spec.{field}: {time} is not a MicroTime (six fractional digits)")),
                    ));
                }
            }
        }
        Ok(lease)
    };
    let conflict = |name: &str, reason: &str, message: String| {
        let mut body = status(409, reason, &message);
        body["details"] = json!({"name": name, "group": "coordination.k8s.io", "kind": "leases"});
        reply(409, body)
    };
    let mut st = state.lock().unwrap();
    match (method, name) {
        (hyper::Method::GET, Some(name)) => match st.objects.get(&("Lease", format!("{namespace}/{name}"))) {
            Some(lease) => reply(200, lease.clone()),
            None => reply(404, status(404, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found"))),
        },
        (hyper::Method::POST, None) => {
            let mut lease = match parse() {
                Ok(l) => l,
                Err((code, body)) => return reply(code, body),
            };
            let Some(name) = lease["metadata"]["name"].as_str().map(str::to_string) else {
                return reply(422, status(422, "Invalid", "metadata.name: Required value: name or generateName is required"));
            };
            if lease["metadata"].get("resourceVersion").is_some_and(|v| !v.is_null()) {
                return reply(500, status(500, "InternalError", "resourceVersion should not be set on objects to be created"));
            }
            let key = ("Lease", format!("{namespace}/{name}"));
            if st.objects.contains_key(&key) {
                return conflict(&name, "AlreadyExists", format!("leases.coordination.k8s.io \"{name}\" already exists"));
            }
            st.rv += 1;
            lease["metadata"]["namespace"] = json!(namespace);
            lease["metadata"]["uid"] = json!(format!("lease-{name}"));
            lease["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.insert(key, lease.clone());
            reply(201, lease)
        }
        (hyper::Method::PUT, Some(name)) => {
            let mut lease = match parse() {
                Ok(l) => l,
                Err((code, body)) => return reply(code, body),
            };
            if lease["metadata"]["name"].as_str() != Some(name.as_str()) {
                return reply(400, status(400, "BadRequest", "the name of the object does not match the name on the URL"));
            }
            let key = ("Lease", format!("{namespace}/{name}"));
            let Some(current) = st.objects.get(&key).cloned() else {
                return reply(404, status(404, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found")));
            };
            let Some(version) = lease["metadata"]["resourceVersion"].as_str().map(str::to_string) else {
                return reply(422, status(422, "Invalid", "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"));
            };
            if current["metadata"]["resourceVersion"].as_str() != Some(version.as_str()) {
                return conflict(
                    &name,
                    "Conflict",
                    format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                );
            }
            st.rv += 1;
            lease["metadata"]["namespace"] = json!(namespace);
            lease["metadata"]["uid"] = current["metadata"]["uid"].clone();
            lease["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.insert(key, lease.clone());
            reply(200, lease)
        }
        _ => reply(405, status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")),
    }
}

/// A core/v1 Event about `object` (`[kind, namespace, name, uid]`), saying `what`
/// (`[reason, type, message]`), as the kubelet or a controller writes it: `lastTimestamp` its last occurrence, `count` how many so far.
pub fn event(namespace: &str, name: &str, uid: &str, object: [&str; 4], what: [&str; 3], count: i32) -> Value {
    let [kind, object_namespace, object_name, object_uid] = object;
    let [reason, type_, message] = what;
    let mut involved = json!({"kind": kind, "name": object_name, "uid": object_uid, "apiVersion": "v1"});
    if !object_namespace.is_empty() {
        involved["namespace"] = json!(object_namespace);
    }
    json!({
        "kind": "Event", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "involvedObject": involved,
        "reason": reason, "message": message, "type": type_, "count": count,
        "firstTimestamp": "2025-12-04T12:00:00Z", "lastTimestamp": format!("2025-12-04T12:{:02}:00Z", count.clamp(0, 59)),
        "source": {"component": "kubelet", "host": "node-a"}
    })
}

/// A pod on `node` as the API server returns it, with one running container per name.
pub fn pod(namespace: &str, name: &str, uid: &str, node: &str, labels: Value, containers: &[&str]) -> Value {
    let id = "ab".repeat(32);
    let containers: Vec<(&str, &str)> = containers.iter().map(|c| (*c, id.as_str())).collect();
    pod_with_ids(namespace, name, uid, node, labels, &containers)
}

/// A pod on `node` with running containers given as (name, containerd id).
pub fn pod_with_ids(namespace: &str, name: &str, uid: &str, node: &str, labels: Value, containers: &[(&str, &str)]) -> Value {
    let specs: Vec<Value> = containers.iter().map(|(c, _)| json!({"name": c, "image": format!("registry.example/{c}:1.0")})).collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(c, id)| json!({"name": c, "image": format!("registry.example/{c}:1.0"), "imageID": "", "ready": true, "restartCount": 0, "containerID": format!("containerd://{id}")}))
        .collect();
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "containers": specs},
        "status": {"phase": "Running", "podIP": "10.42.0.17", "containerStatuses": statuses}
    })
}

/// A namespace with labels and annotations.
pub fn namespace(name: &str, labels: Value, annotations: Value) -> Value {
    json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels, "annotations": annotations}})
}

/// One HAMi device of a container: GPU UUID, memory MiB, cores percent.
pub type HamiDevice<'a> = (&'a str, u32, u32);

/// HAMi's encoding of a pod's NVIDIA devices, one entry per container (init containers first,
/// from HAMi v2.9), as its scheduler writes `hami.io/vgpu-devices-allocated`:
/// `EncodePodSingleDevice` appends each container's `EncodeContainerDevices` and then `;`
/// (`res = res + EncodeContainerDevices(ctrdevs)` / `res = res + OnePodMultiContainerSplitSymbol`),
/// and `EncodeContainerDevices` writes each device as
/// `fmt.Fprintf(&builder, "%s,%s,%d,%d%s", val.UUID, val.Type, val.Usedmem, val.Usedcores, OneContainerMultiDeviceSplitSymbol)`
/// with `OneContainerMultiDeviceSplitSymbol = ":"` and `OnePodMultiContainerSplitSymbol = ";"`
/// (`pkg/device/devices.go`, v2.7-v2.10; `pkg/util/util.go` in v2.4-v2.6, same format, but
/// v2.4 and v2.5 write `,,0,0:` for a container without a GPU after one with a GPU).
pub fn hami_devices(containers: &[&[HamiDevice]]) -> String {
    containers
        .iter()
        .map(|devices| devices.iter().map(|(uuid, mib, cores)| format!("{uuid},NVIDIA,{mib},{cores}:")).collect::<String>() + ";")
        .collect()
}

/// `pod` as HAMi leaves it once its device plugin has allocated it (v2.9 on): the scheduler's
/// annotations (`hami.io/vgpu-node`, `hami.io/vgpu-time`, the devices in both
/// `hami.io/vgpu-devices-to-allocate` and `hami.io/vgpu-devices-allocated`), then the device
/// plugin's `patchErasedAnnotation`, which rewrites `-to-allocate` with every container's
/// entry emptied (`podSingleDev[i] = device.ContainerDevices{}`), and `hami.io/bind-phase:
/// success`. `init_containers` are added to the spec ahead of the containers.
pub fn with_hami(mut pod: Value, init_containers: &[&str], allocated: &str) -> Value {
    let entries = allocated.matches(';').count();
    let node = pod["spec"]["nodeName"].clone();
    let annotations = json!({
        "hami.io/vgpu-node": node,
        "hami.io/vgpu-time": "1764849600",
        "hami.io/bind-time": "1764849600",
        "hami.io/bind-phase": "success",
        "hami.io/vgpu-devices-to-allocate": ";".repeat(entries),
        "hami.io/vgpu-devices-allocated": allocated,
    });
    pod["metadata"]["annotations"] = annotations;
    if !init_containers.is_empty() {
        let init: Vec<Value> = init_containers.iter().map(|c| json!({"name": c, "image": format!("registry.example/{c}:1.0")})).collect();
        pod["spec"]["initContainers"] = Value::Array(init);
    }
    pod
}
