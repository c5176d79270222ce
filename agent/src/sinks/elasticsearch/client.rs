//! The HTTP side of `_bulk`: one reqwest client (rustls; a private CA from `ca_file`), basic or
//! API-key auth, gzip bodies, and failover across endpoints.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::StatusCode;

use super::bulk::{self, Item};
use crate::config::{redact_url, Compression, ElasticsearchConfig};
use crate::packed::{Packer, INLINE_WORK};

/// How a `_bulk` request ended.
#[derive(Debug)]
pub enum Reply {
    /// Elasticsearch answered 200 with this body.
    Done(Vec<u8>),
    /// 413: the body is too large; send it in smaller parts.
    TooLarge,
}

/// A request that failed as a whole; it is sent again after a backoff.
#[derive(Debug, thiserror::Error)]
#[error("{endpoint}: {reason}")]
pub struct Failure {
    /// The endpoint tried.
    pub endpoint: String,
    /// What went wrong (status and reply, or the connection error).
    pub reason: String,
}

/// Sends `_bulk` requests; clones share the connection pool and the endpoint in use.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoints: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    path: String,
    gzip: bool,
    auth: Arc<Auth>,
}

impl Client {
    /// Builds the client; reads `password_file` and `ca_file` now, so a bad path fails start-up.
    pub fn new(config: &ElasticsearchConfig) -> anyhow::Result<Client> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            // A body sent from its batches' pieces cannot be sent again by a redirect (and a
            // redirected POST may turn into a GET): the 3xx is shown as an error to fix.
            .redirect(reqwest::redirect::Policy::none());
        if !config.ca_file.is_empty() {
            let pem = std::fs::read(&config.ca_file).map_err(|e| anyhow::anyhow!("sinks.elasticsearch.ca_file {}: {e}", config.ca_file))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("sinks.elasticsearch.ca_file {}: {e}", config.ca_file))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Client {
            http: builder.build()?,
            endpoints: Arc::new(config.endpoints.iter().map(|e| e.trim_end_matches('/').to_string()).collect()),
            current: Arc::new(AtomicUsize::new(0)),
            // With a stream per namespace every item names its stream (`_index`).
            path: match super::stream::DataStreams::per_namespace(&config.data_stream) {
                true => "/_bulk?filter_path=errors,items.*.error,items.*.status".to_string(),
                false => format!("/{}/_bulk?filter_path=errors,items.*.error,items.*.status", config.data_stream),
            },
            gzip: config.compression == Compression::Gzip,
            auth: Arc::new(Auth::from_config(config)?),
        })
    }

    /// Sends `items` to the current endpoint; on failure the next call tries the next one.
    pub async fn bulk(&self, items: &[Item]) -> Result<(Reply, Duration), Failure> {
        let current = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        let endpoint = &self.endpoints[current];
        let failure = |reason: String| Failure { endpoint: redact_url(endpoint), reason };
        let mut request = self.auth.apply(self.http.post(format!("{endpoint}{}", self.path)));
        // A body of whole batches already compressed is their pieces, shared: put together
        // here. One that compresses or inflates more than a little does it off the async threads.
        let gzip = self.gzip;
        let body = if bulk::body_work(items, gzip) <= INLINE_WORK {
            Packer::with(|packer| bulk::body(items, gzip, packer))
        } else {
            let owned = items.to_vec();
            tokio::task::spawn_blocking(move || Packer::with(|packer| bulk::body(&owned, gzip, packer)))
                .await
                .map_err(|e| failure(e.to_string()))?
        };
        if self.gzip {
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        let started = Instant::now();
        let result = async {
            let response =
                request.body(reqwest::Body::wrap(body.http_body())).send().await.map_err(|e| failure(error_chain(&e.without_url())))?;
            let status = response.status();
            let location = response.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok()).map(redact_url);
            let bytes = response.bytes().await.map_err(|e| failure(error_chain(&e.without_url())))?;
            let text = || String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
            match status {
                StatusCode::OK => Ok(Reply::Done(bytes.to_vec())),
                StatusCode::PAYLOAD_TOO_LARGE => Ok(Reply::TooLarge),
                other if other.is_redirection() => {
                    let to = location.as_deref().unwrap_or("nowhere");
                    Err(failure(format!("{other}: redirected to {to}; set the endpoint to where it redirects")))
                }
                other => Err(failure(format!("{other}: {}", text()))),
            }
        }
        .await;
        if result.is_err() {
            // Move on from this endpoint, unless a concurrent request already did.
            let _ = self.current.compare_exchange(current, (current + 1) % self.endpoints.len(), Ordering::Relaxed, Ordering::Relaxed);
        }
        result.map(|reply| (reply, started.elapsed()))
    }
}

/// How requests authenticate.
enum Auth {
    None,
    Basic { username: String, password: String },
    ApiKey(HeaderValue),
}

impl Auth {
    fn from_config(config: &ElasticsearchConfig) -> anyhow::Result<Auth> {
        if !config.api_key.is_empty() {
            let mut value = HeaderValue::from_str(&format!("ApiKey {}", config.api_key))?;
            value.set_sensitive(true);
            return Ok(Auth::ApiKey(value));
        }
        if config.username.is_empty() {
            return Ok(Auth::None);
        }
        let password = if config.password_file.is_empty() {
            config.password.clone()
        } else {
            std::fs::read_to_string(&config.password_file)
                .map_err(|e| anyhow::anyhow!("sinks.elasticsearch.password_file {}: {e}", config.password_file))?
                .trim_end_matches(['\n', '\r'])
                .to_string()
        };
        Ok(Auth::Basic { username: config.username.clone(), password })
    }

    fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::None => request,
            Auth::Basic { username, password } => request.basic_auth(username, Some(password)),
            Auth::ApiKey(value) => request.header(AUTHORIZATION, value.clone()),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_endpoint_urls_are_redacted() {
        assert_eq!(redact_url("http://elastic:pw@es:9200"), "http://elastic:redacted@es:9200/");
        assert!(!redact_url("https://u:p%40ss@es:9200/x?y=1").contains("ss@"));
        assert!(!redact_url("http://elastic:p#ss@es:9200").contains("ss"), "{}", redact_url("http://elastic:p#ss@es:9200"));
        assert_eq!(redact_url("http://TOKEN123@es:9200"), "http://redacted:redacted@es:9200/", "a token as the user");
        assert_eq!(redact_url("http://es:9200/a@b"), "http://es:9200/a@b", "an @ in the path is not user info");
        assert_eq!(redact_url("http://es:9200"), "http://es:9200");
    }

    #[test]
    fn password_file_is_read_and_a_missing_one_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let mut config = ElasticsearchConfig { username: "elastic".into(), ..Default::default() };
        config.password_file = dir.path().join("pw").display().to_string();
        match Auth::from_config(&config).unwrap() {
            Auth::Basic { username, password } => assert_eq!((username.as_str(), password.as_str()), ("elastic", "s3cret")),
            _ => panic!("basic auth expected"),
        }
        config.password_file = "/nonexistent/pw".into();
        assert!(Auth::from_config(&config).err().unwrap().to_string().contains("sinks.elasticsearch.password_file"));
    }
}
