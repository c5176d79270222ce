//! A fake Kubernetes API server speaking the list/watch protocol for pods and namespaces:
//! lists carry a `resourceVersion`; `?watch=true&resourceVersion=N` streams (chunked, one JSON
//! event per line) every change after N as ADDED, MODIFIED, DELETED and BOOKMARK events; a
//! version older than the compaction point gets a 410 Gone `ERROR` event, as etcd compaction
//! causes; open watches can be dropped. `fieldSelector=spec.nodeName=<node>` is honoured, and
//! every request is recorded so tests can check what the agent asked for. Lists can be made
//! slow, as an API server under load or a control plane still starting makes them, and the
//! server can be made to refuse connections (nothing listening on its port) or to answer every
//! request with an error status, as during a control plane outage or upgrade.

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
    /// When each of `requests` arrived.
    request_times: Vec<std::time::Instant>,
    /// Every request is answered with this status (a `Status` object) while set.
    fail_with: Option<u16>,
    /// Lists are answered this long after they arrive.
    list_delay: std::time::Duration,
    lists_answered: usize,
}

/// A running fake API server.
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Dropped after the watches are closed (see `Drop`); `None` while connections are refused.
    server: Mutex<Option<Server>>,
}

fn kind_of(object: &Value) -> &'static str {
    if object["kind"] == "Namespace" {
        "Namespace"
    } else {
        "Pod"
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
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\ncurrent-context: fake\nusers:\n- name: test\n  user:\n    token: test-token\n",
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

    /// Lists answered so far (pod and namespace lists, not watches).
    pub fn lists_answered(&self) -> usize {
        self.state.lock().unwrap().lists_answered
    }

    /// Every request line received (`GET /api/v1/pods?...`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
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
    let decode = |s: &str| s.replace("%3D", "=").replace("%3d", "=").replace("%2F", "/").replace("%2C", ",");
    req.uri().query().unwrap_or("").split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), decode(v))).collect()
}

async fn handle(req: Request<Incoming>, state: Arc<Mutex<State>>) -> Result<Response<Body>, Infallible> {
    let fail_with = {
        let mut st = state.lock().unwrap();
        st.requests.push(format!("{} {}", req.method(), req.uri()));
        st.request_times.push(std::time::Instant::now());
        st.fail_with
    };
    if let Some(code) = fail_with {
        return Ok(reply(code, status(code, "InternalError", "an error on the server has prevented the request from succeeding")));
    }
    if req.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer test-token") {
        return Ok(reply(401, status(401, "Unauthorized", "Unauthorized")));
    }
    let path = req.uri().path().to_string();
    let kind = match path.as_str() {
        "/api/v1/pods" => "Pod",
        "/api/v1/namespaces" => "Namespace",
        _ => return Ok(reply(404, status(404, "NotFound", &format!("the server could not find the requested resource ({path})")))),
    };
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
    let delay = state.lock().unwrap().list_delay;
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
            st.watchers.push(Watcher { kind, node, bookmarks, tx });
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
    st.lists_answered += 1;
    Ok(reply(
        200,
        json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
    ))
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
