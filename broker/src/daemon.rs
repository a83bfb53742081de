//! `iron-token-broker`: the single writer of rotating refresh tokens (DESIGN.md decision 12,
//! REFERENCE.md §2.10 with its defect D6 fixed).
//!
//! Rotation protocol, per credential (`Broker::refresh_cycle`):
//! 1. take the store lease (one refresher across every broker sharing the store);
//! 2. re-read the record under the lease: if another broker already refreshed, adopt its
//!    access token and stop; if the record has `in_flight` set, its holder died between
//!    calling the IdP and storing the answer — the IdP may have rotated the token, so the
//!    credential is marked dead with reason `rotation_interrupted` (log, metric, state)
//!    instead of replaying a possibly rotated-out token;
//! 3. write the intent (`in_flight`) durably — an unwritable store stops here, before the
//!    IdP is called;
//! 4. call the token endpoint (5xx and network errors retried with backoff; an OAuth error
//!    code is terminal: dead with that code as reason);
//! 5. write the result (the new refresh token, a cleared intent, a dead mark) to the spill
//!    directory when one is configured (`store::SpillDir`), then to the store (retrying
//!    while holding the lease), before the access token is served; the spill file goes
//!    once the store has it. A failed refresh never overwrites the stored token.
//!
//! A record whose store write failed is held in memory with its lease (and stays in the
//! spill directory), and written before anything else; the IdP is not called for that
//! credential meanwhile. A broker that finds a spilled record at start writes it first. A
//! 2xx answer without a usable token is treated like a crash after the IdP call
//! (`rotation_interrupted`), never retried with the old token. SIGTERM waits for refreshes
//! in flight and writes held records before exit.
//!
//! HTTP API: `GET /v1/credentials/{id}/access_token` → `{access_token, expires_at,
//! expires_in[, stale]}` (`Cache-Control: no-store`; `stale` when a still-valid token is
//! served after a failed refresh, see `Broker::access_token`); `GET /healthz`;
//! `GET /metrics`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use iron_policy::{Pos, SourceKind, SourceRef};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::sync::atomic::AtomicU64;

use crate::store::{
    CredState, InFlight, Lease, Record, SpillDir, Spilled, Store, StoreConfig, StoreError, now_ms,
};
use crate::tokens::{MintError, TokenTransport, TransportError, TransportFuture};
use crate::{SecretValue, SourceResolver};

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// A secret reference in the broker config: `{ env = "VAR" }` or `{ file = "path" }`, with
/// optional `json_key` (as in the proxy policy).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// Environment variable.
    pub env: Option<String>,
    /// File (relative to the config file's directory).
    pub file: Option<PathBuf>,
    /// JSON field of the value.
    pub json_key: Option<String>,
}

impl SecretRef {
    fn to_source(&self, base: &Path, what: &str) -> Result<SourceRef, String> {
        let kind = match (&self.env, &self.file) {
            (Some(v), None) => SourceKind::Env(v.clone()),
            (None, Some(f)) => SourceKind::File(base.join(f)),
            _ => return Err(format!("{what}: give exactly one of `env` or `file`")),
        };
        Ok(SourceRef {
            kind,
            json_key: self.json_key.clone(),
            pos: Pos::default(),
        })
    }
}

/// `store = { file = "DIR" }` or `store = { postgres = { dsn = <secret reference> } }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum StoreSpec {
    /// A directory (relative to the config file).
    File(PathBuf),
    /// A Postgres database.
    Postgres {
        /// The DSN, as a secret reference.
        dsn: SecretRef,
    },
}

/// Listener TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// One `[[credentials]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// Id used in the API path and the store.
    pub id: String,
    /// The IdP's token endpoint (`https`).
    pub token_endpoint: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret (sent in the form body), as a secret reference.
    pub client_secret: Option<SecretRef>,
    /// Scopes sent with each refresh.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Extra headers sent to the token endpoint.
    #[serde(default)]
    pub token_endpoint_headers: HashMap<String, String>,
    /// Refresh this fraction of the lifetime before expiry (default 0.3).
    pub early_refresh_fraction: Option<f64>,
    /// …but at most this many seconds before (default 300).
    pub early_refresh_max_secs: Option<u64>,
    /// Longest time between two refreshes, in seconds (default 86 400, one day), however
    /// long the access token lives: a refresh token that goes unused past the IdP's idle
    /// expiry dies, and a long-lived access token would otherwise leave it unused
    /// (REFERENCE §3: the early-refresh rule capped by `max_refresh_interval`).
    pub max_refresh_interval_secs: Option<u64>,
    /// Lifetime assumed when the IdP sends no `expires_in` (default 300 s).
    pub default_lifetime_secs: Option<u64>,
}

/// The broker config file (`version = 1`, unknown keys rejected).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Must be 1.
    pub version: u32,
    /// API listen address (default `127.0.0.1:8181`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token callers must present; required off loopback.
    pub auth_token: Option<SecretRef>,
    /// Serve the API over TLS.
    pub tls: Option<TlsSpec>,
    /// Extra CA files trusted for token endpoints.
    #[serde(default)]
    pub upstream_ca: Vec<PathBuf>,
    /// A proxy (`http://HOST:PORT` for `CONNECT`, `socks5://` or `socks5h://` for SOCKS5)
    /// token-endpoint calls go through (a corporate egress proxy, REFERENCE D19), except to
    /// `no_proxy` hosts.
    pub upstream_proxy: Option<String>,
    /// Token-endpoint hosts dialed directly (host patterns).
    #[serde(default)]
    pub no_proxy: Vec<String>,
    /// `USER:PASSWORD` for `upstream_proxy`, as a secret reference (`Proxy-Authorization:
    /// Basic`, or SOCKS5 username/password).
    pub upstream_proxy_auth: Option<SecretRef>,
    /// `upstream_proxy` and `no_proxy`, parsed (set by [`Config::load`]).
    #[serde(skip)]
    pub proxy: Option<iron_policy::UpstreamProxy>,
    /// Where credential state lives.
    pub store: StoreSpec,
    /// A local directory (relative to the config file) where a record the store could not
    /// take is kept until it can (`store::SpillDir`): without it, a rotated refresh token
    /// that arrives while the store is down lives only in memory until the store is back.
    /// One broker per directory.
    pub spill_dir: Option<PathBuf>,
    /// Seconds one token-endpoint exchange may take, retries included (default 30).
    pub refresh_timeout_secs: Option<u64>,
    /// The credentials.
    #[serde(default)]
    pub credentials: Vec<CredentialSpec>,
    /// Directory of the config file (set by [`Config::load`]).
    #[serde(skip)]
    pub base: PathBuf,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8181))
}

impl Config {
    /// Reads and validates the config file.
    ///
    /// # Errors
    /// `FILE: message` (with line and column for TOML errors).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let mut cfg: Self =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        cfg.base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let err = |m: String| format!("{}: {m}", path.display());
        if cfg.version != 1 {
            return Err(err(format!("unsupported version {}", cfg.version)));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &cfg.credentials {
            if !seen.insert(c.id.clone()) {
                return Err(err(format!("credential `{}` is defined twice", c.id)));
            }
            if !c.token_endpoint.starts_with("https://") {
                return Err(err(format!(
                    "credential `{}`: token_endpoint must be https",
                    c.id
                )));
            }
            for (k, v) in &c.token_endpoint_headers {
                if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                    return Err(err(format!(
                        "credential `{}`: token_endpoint_headers: `{k}` is not a valid header name",
                        c.id
                    )));
                }
                if http::HeaderValue::from_str(v).is_err() {
                    // The value is a credential's: never shown.
                    return Err(err(format!(
                        "credential `{}`: token_endpoint_headers: the value of `{k}` is not a valid header value (control characters or non-ASCII)",
                        c.id
                    )));
                }
            }
            if c.default_lifetime_secs == Some(0) {
                return Err(err(format!(
                    "credential `{}`: default_lifetime_secs must be at least 1",
                    c.id
                )));
            }
            if c.max_refresh_interval_secs == Some(0) {
                return Err(err(format!(
                    "credential `{}`: max_refresh_interval_secs must be at least 1",
                    c.id
                )));
            }
            if let Some(f) = c.early_refresh_fraction
                && !(0.05..=0.9).contains(&f)
            {
                return Err(err(format!(
                    "credential `{}`: early_refresh_fraction must be within 0.05–0.9",
                    c.id
                )));
            }
        }
        if !cfg.listen.ip().is_loopback() && cfg.auth_token.is_none() {
            return Err(err(format!(
                "listen {} is not loopback: set auth_token",
                cfg.listen
            )));
        }
        cfg.upstream_ca = cfg.upstream_ca.iter().map(|p| cfg.base.join(p)).collect();
        if let Some(url) = &cfg.upstream_proxy {
            let mut proxy = iron_policy::UpstreamProxy::parse(url, &cfg.no_proxy)
                .map_err(|e| err(format!("upstream_proxy: {e}")))?;
            proxy.auth = cfg
                .upstream_proxy_auth
                .as_ref()
                .map(|r| r.to_source(&cfg.base, "upstream_proxy_auth"))
                .transpose()
                .map_err(err)?;
            cfg.proxy = Some(proxy);
        }
        if let Some(dir) = &cfg.spill_dir {
            let dir = cfg.base.join(dir);
            if let StoreSpec::File(store) = &cfg.store
                && cfg.base.join(store).components().eq(dir.components())
            {
                return Err(err(
                    "spill_dir must not be the file store's directory".to_string()
                ));
            }
            cfg.spill_dir = Some(dir);
        }
        Ok(cfg)
    }

    /// The store location with its secret reference resolved.
    ///
    /// # Errors
    /// A message when the DSN's source cannot be read.
    pub fn store_config(&self, sources: &SourceResolver) -> Result<StoreConfig, String> {
        match &self.store {
            StoreSpec::File(dir) => Ok(StoreConfig::File(self.base.join(dir))),
            StoreSpec::Postgres { dsn } => {
                let v = sources
                    .resolve(&dsn.to_source(&self.base, "store.postgres.dsn")?)
                    .map_err(|e| format!("store.postgres.dsn: {e}"))?;
                Ok(StoreConfig::Postgres {
                    dsn: String::from_utf8_lossy(v.expose()).into_owned(),
                    upstream_ca: self.upstream_ca.clone(),
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Token-endpoint transport
// ---------------------------------------------------------------------------------------

type HttpsConnector = hyper_rustls::HttpsConnector<Dial>;

/// The TCP dial under the token-endpoint TLS: directly, or through the config's
/// `upstream_proxy` ([`crate::upstream_proxy::ProxyDial`]: HTTP `CONNECT` or SOCKS5)
/// unless the host is in its `no_proxy`.
#[derive(Clone)]
struct Dial {
    direct: hyper_util::client::legacy::connect::HttpConnector,
    via: Option<crate::upstream_proxy::ProxyDial>,
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let host = dst
            .host()
            .and_then(iron_policy::normalize_host)
            .unwrap_or_default();
        if let Some(via) = &self.via
            && via.covers(&host)
        {
            let via = via.clone();
            let port = dst.port_u16().unwrap_or(443);
            return Box::pin(async move {
                let target = match host.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
                    _ => format!("{host}:{port}"),
                };
                via.connect(&target).await
            });
        }
        let mut direct = self.direct.clone();
        Box::pin(async move { direct.call(dst).await.map_err(Into::into) })
    }
}
type HttpsClient = hyper_util::client::legacy::Client<HandshakeDeadline, Full<Bytes>>;

/// The HTTPS connector with one deadline over TCP connect *and* TLS handshake. hyper-util's
/// connect timeout covers only TCP, so an endpoint that accepts and then never finishes the
/// handshake used to run into the whole exchange's deadline, which reads as "no answer after
/// the request was sent". A connector error is a connect error to the client: retryable,
/// since no request was written.
#[derive(Clone)]
struct HandshakeDeadline {
    inner: HttpsConnector,
    deadline: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for HandshakeDeadline {
    type Response = <HttpsConnector as tower_service::Service<http::Uri>>::Response;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let deadline = self.deadline;
        Box::pin(async move {
            match tokio::time::timeout(deadline, connecting).await {
                Ok(r) => r,
                Err(_) => Err("TCP connect and TLS handshake did not finish in time".into()),
            }
        })
    }
}

/// HTTPS-only client for token endpoints: web PKI roots plus `upstream_ca`.
struct Transport {
    client: HttpsClient,
    timeout: Duration,
}

impl Transport {
    fn new(
        upstream_ca: &[PathBuf],
        proxy: Option<&iron_policy::UpstreamProxy>,
        timeout: Duration,
        sources: Arc<SourceResolver>,
    ) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = crate::tls::client_config_all_hosts(upstream_ca, provider)?;
        let mut direct = hyper_util::client::legacy::connect::HttpConnector::new();
        direct.enforce_http(false);
        direct.set_connect_timeout(Some(timeout / 3));
        let via = proxy
            .map(|p| crate::upstream_proxy::ProxyDial::new(p, timeout / 3, sources))
            .transpose()?;
        let http = Dial { direct, via };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let https = HandshakeDeadline {
            inner: https,
            deadline: timeout / 3,
        };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                // `token_endpoint_headers` go out in Title-Case (`x-api-key` → `X-Api-Key`):
                // hyper 1 keeps no other casing for headers it did not parse itself.
                .http1_title_case_headers(true)
                .build(https);
        Ok(Self { client, timeout })
    }
}

impl TokenTransport for Transport {
    fn send(&self, req: http::Request<Vec<u8>>) -> TransportFuture {
        use http_body_util::BodyExt as _;
        let client = self.client.clone();
        let timeout = self.timeout;
        // One deadline for the whole exchange. Only a failure before the request could
        // reach the IdP (connect, TLS handshake) is an error the caller may retry with the
        // same refresh token. A request that may have been processed — no answer after it
        // was sent, or a success whose body was lost — is reported as an empty `200`, which
        // parses as an unusable answer: the rotation may have happened, and replaying the
        // old token could trigger reuse detection (the broker marks the credential
        // `rotation_interrupted` instead).
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let req = http::Request::from_parts(parts, Full::new(Bytes::from(body)));
            let lost = || {
                http::Response::builder()
                    .status(200)
                    .body(Vec::new())
                    .unwrap_or_default()
            };
            let exchange = async {
                let resp = match client.request(req).await {
                    Ok(r) => r,
                    Err(e) if e.is_connect() => {
                        return Err(TransportError(format!("token endpoint unreachable: {e}")));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "token endpoint request failed after it was sent");
                        return Ok(lost());
                    }
                };
                let (parts, body) = resp.into_parts();
                match http_body_util::Limited::new(body, crate::tokens::MAX_TOKEN_RESPONSE)
                    .collect()
                    .await
                {
                    Ok(b) => Ok(http::Response::from_parts(parts, b.to_bytes().to_vec())),
                    Err(_) if parts.status.is_success() => Ok(lost()),
                    // An error answer whose body broke off or is too large still has its
                    // status, and the status decides whether the old token may be sent
                    // again (a gateway's 502/504 may hide a rotation: never replayed).
                    Err(e) => {
                        tracing::warn!(status = parts.status.as_u16(), error = %e, "token endpoint error response unreadable or too large; going by its status");
                        Ok(http::Response::from_parts(parts, Vec::new()))
                    }
                }
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        "token endpoint did not answer in time after the request was sent"
                    );
                    Ok(lost())
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    credential: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredLabels {
    credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLabels {
    credential: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    endpoint: String,
    status: u16,
}

/// The broker's Prometheus series.
struct Metrics {
    registry: Registry,
    attempts: Family<AttemptLabels, Counter>,
    token_age: Family<CredLabels, Gauge<f64, AtomicU64>>,
    time_to_expiry: Family<CredLabels, Gauge<f64, AtomicU64>>,
    dead: Family<DeadLabels, Gauge>,
    /// The reason currently exported per dead credential.
    dead_reason: Mutex<HashMap<String, String>>,
    http: Family<HttpLabels, Counter>,
    stale_served: Family<CredLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "broker_refresh_attempts",
            "Refresh attempts by credential and result (ok, adopted, retryable, rejected, store_error, source_error, interrupted, fenced_dropped)",
            attempts.clone(),
        );
        let token_age = Family::<CredLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "broker_token_age_seconds",
            "Seconds since the access token was issued",
            token_age.clone(),
        );
        let time_to_expiry = Family::<CredLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "broker_token_time_to_expiry_seconds",
            "Seconds until the access token expires",
            time_to_expiry.clone(),
        );
        let dead = Family::<DeadLabels, Gauge>::default();
        registry.register(
            "broker_credential_dead",
            "1 when the credential needs a human (reason label says why)",
            dead.clone(),
        );
        let http = Family::<HttpLabels, Counter>::default();
        registry.register(
            "broker_http_requests",
            "API requests by endpoint and status",
            http.clone(),
        );
        let stale_served = Family::<CredLabels, Counter>::default();
        registry.register(
            "broker_stale_served",
            "Access tokens served inside their early-refresh window because the refresh failed (grace)",
            stale_served.clone(),
        );
        Self {
            registry,
            attempts,
            token_age,
            time_to_expiry,
            dead,
            dead_reason: Mutex::new(HashMap::new()),
            http,
            stale_served,
        }
    }

    fn attempt(&self, credential: &str, result: &str) {
        self.attempts
            .get_or_create(&AttemptLabels {
                credential: credential.to_string(),
                result: result.to_string(),
            })
            .inc();
    }
}

// ---------------------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------------------

/// Why a credential cannot serve now. Each maps to an API status and error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// Never bootstrapped (422 `credential_dead` with reason `not_bootstrapped`).
    #[error("credential has no refresh token yet: run `iron-token-broker credentials set`")]
    NotBootstrapped,
    /// Needs a human (422 `credential_dead`).
    #[error("credential is dead: {0}")]
    Dead(String),
    /// The store cannot be read or written (503 `store_unavailable`).
    #[error("{0}")]
    Store(String),
    /// The IdP failed in a retryable way (503 `idp_unavailable`).
    #[error("token endpoint unavailable: {0}")]
    Idp(String),
    /// Another broker holds the refresh lease past the wait (503 `refresh_in_progress`).
    #[error("another broker is refreshing this credential")]
    Busy,
    /// An input of the refresh (the client secret) cannot be read; nothing was sent to the
    /// IdP and the credential stays alive (503 `source_unavailable`).
    #[error("{0}")]
    Source(String),
}

/// An access token as [`Broker::access_token`] serves it.
pub struct Served {
    /// The access token.
    pub access: SecretValue,
    /// When it expires, Unix ms.
    pub expires_at_ms: u64,
    /// Served inside its early-refresh window because the refresh failed (grace).
    pub stale: bool,
}

impl Served {
    fn fresh(c: Cached) -> Self {
        Self {
            access: c.access,
            expires_at_ms: c.expires_at_ms,
            stale: false,
        }
    }
}

/// A servable access token.
#[derive(Clone)]
struct Cached {
    access: SecretValue,
    expires_at_ms: u64,
    lifetime_ms: u64,
    issued_at_ms: u64,
}

/// A record the store has not taken yet (module docs).
struct Held {
    /// The lease it was made under; `None` when it was read back from the spill directory
    /// at start (its lease died with the process that made it).
    lease: Option<Lease>,
    /// What must still be true of the stored record for it to apply: the refresh token the
    /// refresh started from, and the intent it settles.
    spilled: Spilled,
}

impl Held {
    fn rec(&self) -> &Record {
        &self.spilled.record
    }
}

/// One credential's runtime: cache, single-flight, and the rotation protocol.
pub struct Credential {
    spec: CredentialSpec,
    client_secret: Option<SourceRef>,
    cached: Mutex<Option<Cached>>,
    /// In-process single flight: one refresh cycle at a time.
    flight: tokio::sync::Mutex<()>,
    /// A refreshed record whose durable write failed: written before anything else, never
    /// replaced by another IdP call.
    unsaved: tokio::sync::Mutex<Option<Held>>,
    /// `started_at_ms` of an intent of ours whose write reported an error (a timeout may
    /// still have committed it): the IdP was not called for it, so finding it later is not
    /// an interrupted rotation.
    abandoned_intent: Mutex<Option<u64>>,
    /// The last on-demand cycle that failed: when it finished, and why. Callers that were
    /// already waiting for the single flight share that result instead of each running a
    /// cycle of their own against an IdP that is failing.
    last_failure: Mutex<Option<(tokio::time::Instant, ServeError)>>,
    /// Until when the token endpoint asked us not to call it (its `Retry-After` on a 429 or
    /// 503, RFC 9110 §10.2.3): refresh cycles, scheduled or on demand, wait until then.
    idp_wait_until: Mutex<Option<tokio::time::Instant>>,
}

impl Credential {
    /// How long the token endpoint's last `Retry-After` still asks us to wait (zero when
    /// it asked for nothing or the wait is over).
    fn idp_wait(&self) -> Duration {
        self.idp_wait_until
            .lock()
            .ok()
            .and_then(|w| *w)
            .map_or(Duration::ZERO, |until| {
                until.saturating_duration_since(tokio::time::Instant::now())
            })
    }

    fn early_ms(&self, lifetime_ms: u64) -> u64 {
        let f = self.spec.early_refresh_fraction.unwrap_or(0.3);
        let max = self
            .spec
            .early_refresh_max_secs
            .unwrap_or(300)
            .saturating_mul(1000);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let early = (lifetime_ms as f64 * f) as u64;
        early.min(max)
    }

    /// Longest time between two refreshes (ms): `max_refresh_interval_secs`, default a day.
    fn max_interval_ms(&self) -> u64 {
        self.spec
            .max_refresh_interval_secs
            .unwrap_or(86_400)
            .saturating_mul(1000)
    }

    /// A token is served while more than half of the early-refresh window remains.
    fn servable(&self, c: &Cached, now: u64) -> bool {
        c.expires_at_ms > now + self.early_ms(c.lifetime_ms) / 2
    }

    /// For a scheduled refresh, a token still inside the early window, or refreshed
    /// `max_refresh_interval_secs` ago or more, is not fresh enough: only a newer one (from
    /// another broker) is adopted instead of refreshing.
    fn fresh_enough(&self, c: &Cached, now: u64, scheduled: bool) -> bool {
        if scheduled {
            c.expires_at_ms > now + self.early_ms(c.lifetime_ms)
                && c.issued_at_ms.saturating_add(self.max_interval_ms()) > now
        } else {
            self.servable(c, now)
        }
    }

    fn cached(&self, now: u64) -> Option<Cached> {
        let g = self.cached.lock().ok()?;
        g.as_ref().filter(|c| self.servable(c, now)).cloned()
    }

    /// The cached token when a refresh failed with `e` and the token is still valid for at
    /// least [`GRACE_MIN_REMAINING_MS`]: the grace window of REFERENCE §5 d1 ("stale tokens
    /// served within a grace window while the IdP is down"). Served on transient failures
    /// (IdP, store, lease, client-secret source) and on `rotation_interrupted` — the access
    /// token minted before the interrupted rotation stays valid at the IdP until it expires,
    /// and serving it gives the operator until then to re-bootstrap. Not on any other dead
    /// reason: an OAuth refusal (`invalid_grant`...) means the IdP disowned the grant.
    fn grace(&self, e: &ServeError, now: u64) -> Option<Cached> {
        let eligible = match e {
            ServeError::Idp(_)
            | ServeError::Store(_)
            | ServeError::Busy
            | ServeError::Source(_) => true,
            ServeError::Dead(reason) => reason == "rotation_interrupted",
            ServeError::NotBootstrapped => false,
        };
        if !eligible {
            return None;
        }
        let g = self.cached.lock().ok()?;
        g.as_ref()
            .filter(|c| c.expires_at_ms > now.saturating_add(GRACE_MIN_REMAINING_MS))
            .cloned()
    }

    fn adopt(&self, rec: &Record) -> Option<Cached> {
        let access = rec.access_token.as_ref()?;
        let c = Cached {
            access: SecretValue::new(access.as_bytes().to_vec()),
            expires_at_ms: rec.expires_at_ms?,
            lifetime_ms: rec.lifetime_ms.max(1),
            issued_at_ms: rec.last_refresh_ms.unwrap_or_default(),
        };
        if let Ok(mut g) = self.cached.lock() {
            *g = Some(c.clone());
        }
        Some(c)
    }

    /// When the scheduler should refresh next (Unix ms), from the cached token: inside its
    /// early-refresh window (with jitter), and no later than `max_refresh_interval_secs`
    /// after it was issued.
    fn next_refresh_ms(&self) -> Option<u64> {
        let g = self.cached.lock().ok()?;
        let c = g.as_ref()?;
        let early = self.early_ms(c.lifetime_ms);
        let jitter =
            u64::try_from(crate::tokens::jitter(Duration::from_millis(early / 5 + 1)).as_millis())
                .unwrap_or(0);
        Some(
            (c.expires_at_ms.saturating_sub(early) + jitter)
                .min(c.issued_at_ms.saturating_add(self.max_interval_ms())),
        )
    }
}

/// A token inside its early-refresh window is served after a failed refresh (grace) only
/// while at least this long remains before it expires (ms): a caller needs time to use it.
const GRACE_MIN_REMAINING_MS: u64 = 5_000;

/// Shortest and longest access-token lifetime the broker plans with (ms). An IdP that says
/// `expires_in: 0` would otherwise have the scheduler refresh in a tight loop; one that
/// says years would overflow the arithmetic.
const LIFETIME_MS: (u64, u64) = (1_000, 7 * 86_400_000);

/// The token's lifetime in ms, clamped to [`LIFETIME_MS`].
fn clamp_lifetime_ms(lifetime: Duration) -> u64 {
    u64::try_from(lifetime.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(LIFETIME_MS.0, LIFETIME_MS.1)
}

/// The broker: config, store, credentials, metrics.
pub struct Broker {
    creds: HashMap<String, Arc<Credential>>,
    store: Store,
    transport: Arc<dyn TokenTransport>,
    sources: Arc<SourceResolver>,
    auth: Option<SecretValue>,
    owner: String,
    metrics: Metrics,
    refresh_timeout: Duration,
    /// Where held records are kept on disk (config `spill_dir`).
    spill: Option<SpillDir>,
    /// Set on SIGTERM: no new refresh cycle starts.
    stopping: std::sync::atomic::AtomicBool,
}

impl Broker {
    /// Opens the store and prepares every credential.
    ///
    /// # Errors
    /// A message naming the part of the config or store that failed.
    pub async fn new(cfg: &Config) -> Result<Arc<Self>, String> {
        let sources = Arc::new(SourceResolver::new(Arc::new(crate::ProcessEnv)));
        let auth = match &cfg.auth_token {
            Some(r) => Some(
                sources
                    .resolve(&r.to_source(&cfg.base, "auth_token")?)
                    .map_err(|e| format!("auth_token: {e}"))?,
            ),
            None => None,
        };
        let store = Store::open(&cfg.store_config(&sources)?)
            .await
            .map_err(|e| e.to_string())?;
        match store.durability().await {
            Ok(d) => tracing::info!(durability = %d, "credential store open"),
            Err(e) => {
                tracing::warn!(error = %e, "credential store open; its durability setting could not be read")
            }
        }
        let refresh_timeout = Duration::from_secs(cfg.refresh_timeout_secs.unwrap_or(30).max(1));
        let transport: Arc<dyn TokenTransport> = Arc::new(Transport::new(
            &cfg.upstream_ca,
            cfg.proxy.as_ref(),
            Duration::from_secs(15).min(refresh_timeout),
            sources.clone(),
        )?);
        let spill = match &cfg.spill_dir {
            Some(dir) => Some(SpillDir::open(dir).map_err(|e| e.to_string())?),
            None => {
                if matches!(cfg.store, StoreSpec::Postgres { .. }) {
                    tracing::warn!(
                        "no spill_dir: a rotated refresh token that arrives while the store is down is held in memory only, and lost if the broker is killed before the store is back"
                    );
                }
                None
            }
        };
        let mut creds = HashMap::new();
        for spec in &cfg.credentials {
            // A record an earlier run could not write: written before anything else.
            let held = match &spill {
                Some(dir) => dir
                    .load(&spec.id)
                    .map_err(|e| format!("spill_dir: {e}"))?
                    .map(|spilled| {
                        tracing::warn!(credential = %spec.id, "found a record an earlier run could not store; writing it before any refresh");
                        Held {
                            lease: None,
                            spilled,
                        }
                    }),
                None => None,
            };
            let client_secret = spec
                .client_secret
                .as_ref()
                .map(|s| {
                    s.to_source(
                        &cfg.base,
                        &format!("credential `{}` client_secret", spec.id),
                    )
                })
                .transpose()?;
            creds.insert(
                spec.id.clone(),
                Arc::new(Credential {
                    spec: spec.clone(),
                    client_secret,
                    cached: Mutex::new(None),
                    flight: tokio::sync::Mutex::new(()),
                    unsaved: tokio::sync::Mutex::new(held),
                    abandoned_intent: Mutex::new(None),
                    last_failure: Mutex::new(None),
                    idp_wait_until: Mutex::new(None),
                }),
            );
        }
        if let Some(dir) = &spill {
            for id in dir.ids().into_iter().filter(|id| !creds.contains_key(id)) {
                tracing::error!(credential = %id, "the spill directory holds a record for a credential this config does not define; left in place (add the credential back to have it written)");
            }
        }
        let owner = format!(
            "{}:{}:{:x}",
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "host".into()),
            std::process::id(),
            now_ms()
        );
        Ok(Arc::new(Self {
            creds,
            store,
            transport,
            sources,
            auth,
            owner,
            metrics: Metrics::new(),
            refresh_timeout,
            spill,
            stopping: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// A servable access token for `id`, refreshing (with the rotation protocol) when the
    /// cached one is too close to expiry. Waits at most `wait`. When that refresh fails and
    /// the cached token is still valid (see `Credential::grace`), the cached token is
    /// served instead, marked stale (`Served::stale`), and the failure is logged and counted
    /// (`broker_stale_served`).
    ///
    /// # Errors
    /// [`ServeError`] when the refresh fails and no token can be served; `None` for an
    /// unknown id.
    pub async fn access_token(
        self: &Arc<Self>,
        id: &str,
        wait: Duration,
    ) -> Option<Result<Served, ServeError>> {
        let cred = self.creds.get(id)?.clone();
        if let Some(c) = cred.cached(now_ms()) {
            return Some(Ok(Served::fresh(c)));
        }
        // The refresh runs detached: a caller that gives up does not cancel it mid-rotation.
        let this = self.clone();
        let c2 = cred.clone();
        let task = tokio::spawn(async move { this.ensure_fresh(&c2).await });
        let result = match tokio::time::timeout(wait, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ServeError::Store("refresh task failed".into())),
            Err(_) => Err(ServeError::Busy),
        };
        Some(match result {
            Ok(c) => Ok(Served::fresh(c)),
            Err(e) => match cred.grace(&e, now_ms()) {
                Some(c) => {
                    tracing::warn!(
                        credential = %id,
                        error = %e,
                        expires_in_s = c.expires_at_ms.saturating_sub(now_ms()) / 1000,
                        "refresh failed; serving the cached access token until it expires (grace)"
                    );
                    self.metrics
                        .stale_served
                        .get_or_create(&CredLabels {
                            credential: id.to_string(),
                        })
                        .inc();
                    Ok(Served {
                        access: c.access,
                        expires_at_ms: c.expires_at_ms,
                        stale: true,
                    })
                }
                None => Err(e),
            },
        })
    }

    /// Single-flight: returns the cached token if servable, else runs one refresh cycle.
    /// A caller that was waiting while a cycle failed gets that cycle's error.
    async fn ensure_fresh(&self, cred: &Credential) -> Result<Cached, ServeError> {
        let asked = tokio::time::Instant::now();
        let _flight = cred.flight.lock().await;
        if let Some(c) = cred.cached(now_ms()) {
            return Ok(c);
        }
        if let Ok(last) = cred.last_failure.lock()
            && let Some((at, e)) = last.as_ref()
            && *at >= asked
        {
            return Err(e.clone());
        }
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ServeError::Busy);
        }
        let r = self.cycle_until_done(cred, false).await;
        if let Ok(mut last) = cred.last_failure.lock() {
            *last = r
                .as_ref()
                .err()
                .map(|e| (tokio::time::Instant::now(), e.clone()));
        }
        r
    }

    /// Runs [`Broker::refresh_cycle`] until it is not `Busy` (another broker's refresh),
    /// for at most twice the refresh timeout.
    async fn cycle_until_done(
        &self,
        cred: &Credential,
        scheduled: bool,
    ) -> Result<Cached, ServeError> {
        let deadline = tokio::time::Instant::now() + self.refresh_timeout * 2;
        loop {
            match self.refresh_cycle(cred, scheduled).await {
                Err(ServeError::Busy) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(
                        Duration::from_millis(50)
                            + crate::tokens::jitter(Duration::from_millis(100)),
                    )
                    .await;
                }
                other => return other,
            }
        }
    }

    /// Sets `broker_credential_dead{credential, reason} = 1`, with `reason` one of a fixed
    /// set (an unknown IdP error code is counted as `other`), replacing an earlier reason.
    fn mark_dead_metric(&self, id: &str, reason: &str) {
        const KNOWN: [&str; 8] = [
            "invalid_grant",
            "invalid_client",
            "unauthorized_client",
            "unsupported_grant_type",
            "invalid_scope",
            "rotation_interrupted",
            "reuse_detected",
            "refresh_refused",
        ];
        let reason = if KNOWN.contains(&reason) {
            reason
        } else {
            "other"
        };
        let mut last = self
            .metrics
            .dead_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = last.insert(id.to_string(), reason.to_string())
            && old != reason
        {
            self.metrics.dead.remove(&DeadLabels {
                credential: id.to_string(),
                reason: old,
            });
        }
        self.metrics
            .dead
            .get_or_create(&DeadLabels {
                credential: id.to_string(),
                reason: reason.to_string(),
            })
            .set(1);
    }

    /// Removes the dead series of a credential found alive (revived or re-bootstrapped).
    fn clear_dead_metric(&self, id: &str) {
        let mut last = self
            .metrics
            .dead_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = last.remove(id) {
            self.metrics.dead.remove(&DeadLabels {
                credential: id.to_string(),
                reason: old,
            });
        }
    }

    /// Writes `rec` under `lease`, retrying a transient store error a few times (100 ms,
    /// doubling) while the lease is held. A lost lease is not retried.
    async fn write_retrying(
        &self,
        id: &str,
        lease: &Lease,
        rec: &Record,
    ) -> Result<(), StoreError> {
        let mut last = None;
        for attempt in 0..5u32 {
            match self.store.write(lease, rec).await {
                Ok(()) => return Ok(()),
                Err(e @ StoreError::Fenced(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(credential = %id, attempt, error = %e, "credential store write failed; retrying");
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Io("write failed".into())))
    }

    /// Writes the record held after an earlier failed write (module docs), before anything
    /// else may call the IdP. `Ok(Some)`: written, and its token is servable; `Ok(None)`:
    /// nothing pending, or written but its token is too old, or dropped because the store
    /// moved on; go on with a normal cycle. The spill file goes when the record is written
    /// or dropped.
    async fn flush_unsaved(&self, cred: &Credential) -> Result<Option<Cached>, ServeError> {
        let id = cred.spec.id.as_str();
        let store_err = |e: StoreError| ServeError::Store(e.to_string());
        let mut unsaved = cred.unsaved.lock().await;
        let Some(mut held) = unsaved.take() else {
            return Ok(None);
        };
        if let Some(lease) = held.lease.take() {
            let rec = held.rec().clone();
            match self.store.write(&lease, &rec).await {
                Ok(()) => {
                    self.store.release(lease).await;
                    self.unspill(id);
                    tracing::info!(credential = %id, "stored the held record after earlier write failures");
                    return self.after_flush(cred, rec);
                }
                // Our lease ran out and someone else (another broker, an admin write) took
                // the record: try again under a new lease, below.
                Err(StoreError::Fenced(_)) => {}
                Err(e) => {
                    tracing::error!(credential = %id, error = %e, "a record is still not durable; holding it");
                    held.lease = Some(lease);
                    *unsaved = Some(held);
                    self.metrics.attempt(id, "store_error");
                    return Err(store_err(e));
                }
            }
        }
        // The stored record is still the one the held record's refresh started from if it
        // holds the same refresh token (a broker that found the intent marks it dead with
        // rotation_interrupted, `revive` bumps the generation: neither changes the token).
        // Then a held *rotation* is the only valid token and wins over any state; a held
        // non-rotation (cleared intent, dead mark) is stale news if another refresh has
        // since started.
        // The broker that spilled it is gone (we hold its spill directory's lock) or is us
        // (holding the single flight, so no other lease of ours on this credential is
        // live): a lease of its still in the store is dead. Only for a holder on this host:
        // a lock on a network file system proves less.
        let taken = if owner_host(&held.spilled.holder) == owner_host(&self.owner) {
            self.store
                .acquire_from_dead(id, &self.owner, self.lease_ttl(), &held.spilled.holder)
                .await
        } else {
            self.store.acquire(id, &self.owner, self.lease_ttl()).await
        };
        let new = match taken {
            Ok(Some(new)) => new,
            Ok(None) => {
                *unsaved = Some(held);
                return Err(ServeError::Busy);
            }
            Err(e) => {
                *unsaved = Some(held);
                self.metrics.attempt(id, "store_error");
                return Err(store_err(e));
            }
        };
        let base = &held.spilled.base_sha256;
        let stored = crate::store::token_digest(&new.record.refresh_token);
        let held_token = crate::store::token_digest(&held.rec().refresh_token);
        let rotation = held_token != *base;
        if rotation && stored == held_token {
            // Already written (the process that held it died after the write, before it
            // removed the spill file).
            self.store.release(new).await;
            self.unspill(id);
            tracing::info!(credential = %id, "the held record was already stored");
            return Ok(None);
        }
        let same_token = stored == *base;
        let foreign_intent = new
            .record
            .in_flight
            .as_ref()
            .is_some_and(|f| Some(f) != held.spilled.settles.as_ref());
        // An admin write since the refresh began (`revive`, `set`) bumped the stored
        // generation, and must not be undone by a held non-rotation (stale news).
        let admin_since = new.record.generation != held.spilled.base_generation;
        if !same_token || (!rotation && (foreign_intent || admin_since)) {
            self.store.release(new).await;
            if rotation {
                // The store holds neither the token the refresh started from nor the one it
                // rotated to (a new bootstrap, or a store restored from an older backup):
                // the rotated token may still be the only valid one. Kept for a human.
                self.set_aside(id);
            } else {
                self.unspill(id);
            }
            tracing::error!(credential = %id, "the stored credential moved on (a new bootstrap, another rotation or another broker's refresh) while this broker held an unwritten record; dropping the held record");
            self.metrics.attempt(id, "fenced_dropped");
            return Ok(None);
        }
        let mut rec = held.spilled.record.clone();
        rec.generation = rec.generation.max(new.record.generation + 1);
        if let Err(e) = self.store.write(&new, &rec).await {
            // Held under our lease now: say so in the spill file, so that the next run may
            // take that lease over. (The checks above compare the stored generation with
            // the one the refresh began from, never with the record's own.)
            held.spilled.record = rec;
            held.spilled.holder.clone_from(&self.owner);
            self.spill_save(id, &held.spilled);
            held.lease = Some(new);
            *unsaved = Some(held);
            self.metrics.attempt(id, "store_error");
            return Err(store_err(e));
        }
        self.store.release(new).await;
        self.unspill(id);
        tracing::warn!(credential = %id, "stored the held record under a new lease (the first one ran out, or the record was held by an earlier run)");
        self.after_flush(cred, rec)
    }

    /// Writes `done`, the record that settles `intent` (made under `lease`), to the store
    /// ([`Broker::write_retrying`]); first to the spill directory when there is one, so a
    /// kill during the store's retries (up to two minutes) loses nothing. The spill file
    /// goes once the store has the record.
    ///
    /// # Errors
    /// The store's last error, with the record to hold.
    async fn settle(
        &self,
        id: &str,
        lease: &Lease,
        intent: &InFlight,
        done: &Record,
    ) -> Result<(), (StoreError, Spilled)> {
        let spilled = Spilled {
            base_sha256: crate::store::token_digest(&lease.record.refresh_token),
            base_generation: lease.record.generation,
            settles: Some(intent.clone()),
            holder: self.owner.clone(),
            record: done.clone(),
        };
        let on_disk = self.spill_save(id, &spilled);
        match self.write_retrying(id, lease, done).await {
            Ok(()) => {
                if on_disk {
                    self.unspill(id);
                }
                Ok(())
            }
            Err(e) => Err((e, spilled)),
        }
    }

    /// Holds `spilled` (made under `lease`, already in the spill directory when there is
    /// one) until the store takes it.
    async fn hold(&self, cred: &Credential, lease: Lease, spilled: Spilled) {
        if self.spill.as_ref().is_some_and(|d| d.holds(&cred.spec.id)) {
            tracing::warn!(credential = %cred.spec.id, "the held record stays in the spill directory until the store takes it");
        } else {
            tracing::warn!(credential = %cred.spec.id, "the held record is in memory only (no spill_dir, or its file could not be written) until the store takes it");
        }
        *cred.unsaved.lock().await = Some(Held {
            lease: Some(lease),
            spilled,
        });
    }

    /// Writes `spilled` to the spill directory; `true` when it is there.
    fn spill_save(&self, id: &str, spilled: &Spilled) -> bool {
        let Some(dir) = &self.spill else {
            return false;
        };
        match dir.save(spilled) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(credential = %id, error = %e, "cannot write the record to the spill directory; until the store takes it, it is in memory only");
                false
            }
        }
    }

    /// Renames `id`'s spill file aside (`ID.spill.dropped-MS`), logging where it went.
    fn set_aside(&self, id: &str) {
        if let Some(dir) = &self.spill {
            match dir.set_aside(id) {
                Ok(Some(path)) => {
                    tracing::error!(credential = %id, path = %path.display(), "the dropped record held a rotated refresh token, kept in this file (mode 0600) in case the store was rolled back");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(credential = %id, error = %e, "cannot set aside a dropped spill file");
                }
            }
        }
    }

    /// Removes `id`'s spill file, if any (its record was written or superseded).
    fn unspill(&self, id: &str) {
        if let Some(dir) = &self.spill
            && let Err(e) = dir.remove(id)
        {
            tracing::error!(credential = %id, error = %e, "cannot remove a spill file whose record is settled; it will be checked again at the next start");
        }
    }

    /// What a written held record means for the caller: dead, a servable token, or `None`
    /// (go on with a normal cycle).
    fn after_flush(&self, cred: &Credential, rec: Record) -> Result<Option<Cached>, ServeError> {
        if rec.state == CredState::Dead {
            return Err(ServeError::Dead(
                rec.dead_reason.unwrap_or_else(|| "dead".into()),
            ));
        }
        Ok(cred
            .adopt(&rec)
            .filter(|c| rec.in_flight.is_none() && cred.servable(c, now_ms())))
    }

    /// How long a refresh lease lasts: longer than the worst case of one cycle, so another
    /// broker never takes it over (and marks the credential `rotation_interrupted`) while
    /// this one still holds a rotated token to write: the intent write, the IdP calls within
    /// `refresh_timeout` plus one request's timeout, five store-write attempts and their
    /// pauses (3.1 s), each store call at its worst ([`crate::store::PG_CALL_WORST`]: a
    /// reconnect, the statement and its cancel), with one call to spare.
    fn lease_ttl(&self) -> Duration {
        lease_ttl_for(self.refresh_timeout)
    }

    /// One pass of the rotation protocol (module docs). `Busy` when another broker holds
    /// the lease.
    async fn refresh_cycle(
        &self,
        cred: &Credential,
        scheduled: bool,
    ) -> Result<Cached, ServeError> {
        let id = cred.spec.id.as_str();
        let store_err = |e: StoreError| ServeError::Store(e.to_string());
        // A record not yet durable goes first; the IdP is not called meanwhile.
        if let Some(c) = self.flush_unsaved(cred).await? {
            return Ok(c);
        }
        let now = now_ms();
        let rec = self.store.load(id).await.map_err(store_err)?;
        let Some(rec) = rec else {
            return Err(ServeError::NotBootstrapped);
        };
        if rec.state == CredState::Dead {
            let reason = rec.dead_reason.unwrap_or_else(|| "dead".into());
            self.mark_dead_metric(id, &reason);
            return Err(ServeError::Dead(reason));
        }
        self.clear_dead_metric(id);
        if rec.in_flight.is_none()
            && let Some(c) = cred.adopt(&rec)
            && cred.fresh_enough(&c, now, scheduled)
        {
            self.metrics.attempt(id, "adopted");
            return Ok(c);
        }
        // The IdP's Retry-After: held records were written, the store read (a token another
        // broker or `credentials set` stored is taken, a dead mark is reported), but no
        // lease is taken, no intent written and the IdP not called until it is over.
        let wait = cred.idp_wait();
        if !wait.is_zero() {
            return Err(ServeError::Idp(format!(
                "the token endpoint asked us to wait {} s more (Retry-After)",
                wait.as_secs().max(1)
            )));
        }
        let Some(lease) = self
            .store
            .acquire(id, &self.owner, self.lease_ttl())
            .await
            .map_err(store_err)?
        else {
            return Err(ServeError::Busy);
        };
        let (result, pending) = self.refresh_under_lease(cred, &lease, scheduled).await;
        if let Some(spilled) = pending {
            // Not in the store: keep the lease and the record; never call the IdP again
            // with an older token before this is written.
            self.hold(cred, lease, spilled).await;
            return Err(result.err().unwrap_or_else(|| {
                ServeError::Store("the rotated refresh token could not be stored yet".into())
            }));
        }
        self.store.release(lease).await;
        result?;
        cred.cached(0)
            .ok_or_else(|| ServeError::Store("no token after refresh".into()))
    }

    /// Steps 2–5 under the lease. The result is `Ok` when the cache holds a fresh token;
    /// the second value is a record that must be written before anything else (its write
    /// failed), with the intent it settles: the caller keeps it with the lease.
    async fn refresh_under_lease(
        &self,
        cred: &Credential,
        lease: &Lease,
        scheduled: bool,
    ) -> (Result<(), ServeError>, Option<Spilled>) {
        let id = cred.spec.id.as_str();
        let store_err = |e: StoreError| ServeError::Store(e.to_string());
        let mut rec = lease.record.clone();
        if rec.state == CredState::Dead {
            let reason = rec.dead_reason.unwrap_or_else(|| "dead".into());
            self.mark_dead_metric(id, &reason);
            return (Err(ServeError::Dead(reason)), None);
        }
        if rec.in_flight.is_none()
            && let Some(c) = cred.adopt(&rec)
            && cred.fresh_enough(&c, now_ms(), scheduled)
        {
            self.metrics.attempt(id, "adopted");
            return (Ok(()), None);
        }
        let abandoned = cred.abandoned_intent.lock().ok().and_then(|mut a| a.take());
        if let Some(f) = &rec.in_flight
            && f.owner == self.owner
            && Some(f.started_at_ms) == abandoned
        {
            tracing::info!(credential = %id, "clearing an intent of ours whose write was reported failed; the IdP was not called for it");
            rec.in_flight = None;
        }
        if let Some(f) = &rec.in_flight {
            tracing::error!(
                credential = %id,
                owner = %f.owner,
                started_at_ms = f.started_at_ms,
                "a refresh was interrupted after the IdP may have been called; the stored refresh token may be rotated out. Marking the credential dead (rotation_interrupted): re-bootstrap with `credentials set`, or `credentials revive` to retry the stored token"
            );
            rec.in_flight = None;
            rec.state = CredState::Dead;
            rec.dead_reason = Some("rotation_interrupted".into());
            rec.updated_at_ms = now_ms();
            if let Err(e) = self.store.write(lease, &rec).await {
                return (Err(store_err(e)), None);
            }
            self.metrics.attempt(id, "interrupted");
            self.mark_dead_metric(id, "rotation_interrupted");
            return (Err(ServeError::Dead("rotation_interrupted".into())), None);
        }
        // Inputs first: a client secret that cannot be read stops the refresh before any
        // intent is recorded, and the credential stays alive.
        let client_secret = match &cred.client_secret {
            Some(src) => match self.sources.resolve(src) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(credential = %id, error = %e, "cannot read client_secret; not refreshing");
                    self.metrics.attempt(id, "source_error");
                    return (Err(ServeError::Source(format!("client_secret: {e}"))), None);
                }
            },
            None => None,
        };
        // Intent, durable before the IdP is called.
        let started_at_ms = now_ms();
        let intent = InFlight {
            owner: self.owner.clone(),
            started_at_ms,
        };
        rec.in_flight = Some(intent.clone());
        rec.updated_at_ms = now_ms();
        if let Err(e) = self.store.write(lease, &rec).await {
            if let Ok(mut a) = cred.abandoned_intent.lock() {
                *a = Some(started_at_ms);
            }
            tracing::error!(credential = %id, error = %e, "cannot record the refresh intent; not calling the IdP");
            self.metrics.attempt(id, "store_error");
            return (Err(store_err(e)), None);
        }
        crate::store::crash_point("after_intent");
        let minted = self
            .call_idp(cred, &rec.refresh_token, client_secret.as_ref())
            .await;
        let mut done = rec.clone();
        done.in_flight = None;
        done.updated_at_ms = now_ms();
        match minted {
            Ok(tok) => {
                crate::store::crash_point("after_idp");
                let now = now_ms();
                let lifetime_ms = clamp_lifetime_ms(tok.lifetime);
                if let Some(rt) = &tok.refresh_token {
                    let rt = String::from_utf8_lossy(rt.expose()).into_owned();
                    if !rt.is_empty() {
                        done.refresh_token = rt;
                    }
                }
                done.access_token = Some(String::from_utf8_lossy(tok.value.expose()).into_owned());
                done.expires_at_ms = Some(now.saturating_add(lifetime_ms));
                done.lifetime_ms = lifetime_ms;
                done.last_refresh_ms = Some(now);
                done.generation += 1;
                // Durable before served.
                if let Err((e, held)) = self.settle(id, lease, &intent, &done).await {
                    tracing::error!(credential = %id, error = %e, "the refreshed record is not in the store yet; holding it and not serving it");
                    self.metrics.attempt(id, "store_error");
                    return (Err(store_err(e)), Some(held));
                }
                crate::store::crash_point("after_commit");
                self.metrics.attempt(id, "ok");
                cred.adopt(&done);
                tracing::info!(credential = %id, generation = done.generation, expires_in_ms = lifetime_ms, "refreshed");
                (Ok(()), None)
            }
            Err(MintError::RotatedWithoutAccess(rt)) => {
                // The IdP rotated the refresh token and sent no usable access token: the new
                // refresh token is the credential now. Kept durably (the old one would be
                // reuse); this call fails and the next refresh uses the new one.
                crate::store::crash_point("after_idp");
                let rt = String::from_utf8_lossy(rt.expose()).into_owned();
                done.refresh_token = rt;
                done.generation += 1;
                self.metrics.attempt(id, "retryable");
                tracing::warn!(credential = %id, "the token endpoint rotated the refresh token but sent no usable access token; keeping the new refresh token, will refresh again");
                let pending = self
                    .settle(id, lease, &intent, &done)
                    .await
                    .err()
                    .map(|(_, held)| held);
                (
                    Err(ServeError::Idp(
                        MintError::RotatedWithoutAccess(SecretValue::new(Vec::new())).to_string(),
                    )),
                    pending,
                )
            }
            Err(MintError::Malformed) => {
                // A success status with a body that is not a token response: the IdP may
                // have rotated the refresh token, so replaying the old one could trigger
                // reuse detection. Say so, as after a crash.
                tracing::error!(credential = %id, "the token endpoint's answer was lost or unusable after the request was sent; the refresh token may have been rotated. Marking the credential dead (rotation_interrupted) instead of replaying it");
                done.state = CredState::Dead;
                done.dead_reason = Some("rotation_interrupted".into());
                self.metrics.attempt(id, "interrupted");
                self.mark_dead_metric(id, "rotation_interrupted");
                let pending = self
                    .settle(id, lease, &intent, &done)
                    .await
                    .err()
                    .map(|(_, held)| held);
                (
                    Err(ServeError::Dead("rotation_interrupted".into())),
                    pending,
                )
            }
            // Only an OAuth error code from the IdP (RFC 6749 §5.2: `invalid_grant`, …) kills
            // the credential. Anything else that is not retried either — a 4xx without an
            // error code (a WAF's 403, a 404 during a deploy), a header the request could not
            // carry — never reached the IdP's decision on this refresh token: keep it.
            Err(e) if e.is_retryable() || !matches!(e, MintError::Rejected { .. }) => {
                // The exchange finished without a new token: clear the intent, keep the
                // token. If that write fails, the cleared record is held and written first.
                self.metrics.attempt(id, "retryable");
                tracing::warn!(credential = %id, error = %e, "refresh failed; will retry");
                let pending = self
                    .settle(id, lease, &intent, &done)
                    .await
                    .err()
                    .map(|(_, held)| held);
                (Err(ServeError::Idp(e.to_string())), pending)
            }
            Err(e) => {
                let reason = match &e {
                    MintError::Rejected { code } => code.clone(),
                    _ => "refresh_refused".to_string(),
                };
                done.state = CredState::Dead;
                done.dead_reason = Some(reason.clone());
                self.metrics.attempt(id, "rejected");
                self.mark_dead_metric(id, &reason);
                tracing::error!(credential = %id, reason = %reason, error = %e, "the IdP refused the refresh token; the credential is dead until re-bootstrapped");
                let pending = self
                    .settle(id, lease, &intent, &done)
                    .await
                    .err()
                    .map(|(_, held)| held);
                (Err(ServeError::Dead(reason)), pending)
            }
        }
    }

    /// The refresh_token grant (RFC 6749 §6) with retries on 5xx/network errors inside the
    /// refresh timeout. A 2xx with an unusable body is not retried (the token may have been
    /// rotated).
    async fn call_idp(
        &self,
        cred: &Credential,
        refresh_token: &str,
        client_secret: Option<&SecretValue>,
    ) -> Result<crate::tokens::Token, MintError> {
        let spec = &cred.spec;
        let mut form = vec![
            ("grant_type", "refresh_token".to_string()),
            ("refresh_token", refresh_token.to_string()),
            ("client_id", spec.client_id.clone()),
        ];
        if let Some(v) = client_secret {
            form.push((
                "client_secret",
                String::from_utf8_lossy(v.expose()).into_owned(),
            ));
        }
        if !spec.scopes.is_empty() {
            form.push(("scope", spec.scopes.join(" ")));
        }
        let headers: Vec<(String, SecretValue)> = spec
            .token_endpoint_headers
            .iter()
            .map(|(k, v)| (k.clone(), SecretValue::new(v.as_bytes().to_vec())))
            .collect();
        let deadline = tokio::time::Instant::now() + self.refresh_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            let r =
                crate::tokens::post_form(&*self.transport, &spec.token_endpoint, &form, &headers)
                    .await;
            let r = r.map(|mut t| {
                if !t.lifetime_given
                    && let Some(d) = spec.default_lifetime_secs
                {
                    t.lifetime = Duration::from_secs(d);
                }
                t
            });
            match r {
                // Never retried: the retry would send the rotated-out token.
                Err(e @ (MintError::Malformed | MintError::RotatedWithoutAccess(_))) => {
                    return Err(e);
                }
                // A gateway's 502/504 (or 520/524) is an answer lost after the request was
                // sent (`MintError::answer_may_be_lost`): it may hide a rotation, never
                // replayed. 500, 503 and 429 are retried.
                Err(e @ MintError::Status(_)) if e.answer_may_be_lost() => {
                    tracing::warn!(credential = %spec.id, error = %e, "token endpoint gateway error after the request was sent");
                    return Err(MintError::Malformed);
                }
                // The IdP's Retry-After, when longer, replaces our pause; when it reaches past
                // the refresh timeout, this cycle ends and no cycle calls before it is over.
                Err(e)
                    if e.is_retryable()
                        && tokio::time::Instant::now()
                            + delay.max(e.retry_after().unwrap_or_default())
                            < deadline =>
                {
                    tracing::debug!(credential = %spec.id, error = %e, "token endpoint failed; retrying");
                    let pause = delay.max(e.retry_after().unwrap_or_default());
                    tokio::time::sleep(pause + crate::tokens::jitter(delay / 2)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                other => {
                    if let Err(e) = &other
                        && let Some(wait) = e.retry_after()
                        && let Ok(mut until) = cred.idp_wait_until.lock()
                    {
                        tracing::warn!(credential = %spec.id, retry_after_s = wait.as_secs(), "the token endpoint asked for a pause (Retry-After); no refresh until it is over");
                        *until = Some(tokio::time::Instant::now() + wait);
                    }
                    return other;
                }
            }
        }
    }

    /// Before exit: stops new refresh cycles, waits (up to one lease time in all) for the
    /// ones in flight to finish, and writes records held in memory (retrying until then),
    /// so a SIGTERM never cuts a rotation between the IdP's answer and the store.
    async fn quiesce(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.lease_ttl();
        let mut held = Vec::new();
        for cred in self.creds.values() {
            match tokio::time::timeout_at(deadline, cred.flight.lock()).await {
                Ok(guard) => {
                    // A held record is retried until the deadline: it may be the only copy
                    // of a rotated refresh token.
                    loop {
                        let pending = cred.unsaved.lock().await.is_some();
                        if !pending {
                            break;
                        }
                        match self.flush_unsaved(cred).await {
                            Ok(_) | Err(ServeError::Dead(_)) => break,
                            Err(e) if tokio::time::Instant::now() >= deadline => {
                                if self.spill.is_some() {
                                    tracing::error!(credential = %cred.spec.id, error = %e, "stopping with a record the store has not taken; it stays in the spill directory for the next start");
                                } else {
                                    tracing::error!(credential = %cred.spec.id, error = %e, "stopping with a record that could not be written; it is lost (no spill_dir)");
                                }
                                break;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                        }
                    }
                    held.push(guard);
                }
                Err(_) => {
                    tracing::error!(credential = %cred.spec.id, "stopping while a refresh is still in flight");
                }
            }
        }
        // The process is exiting: the runtime's workers may still run a scheduler until it
        // stops, so the single-flight locks stay taken for good.
        std::mem::forget(held);
    }

    /// Background refresh ahead of expiry, with jitter; backs off on failure.
    async fn schedule(self: Arc<Self>, cred: Arc<Credential>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            // At least 200 ms between scheduled cycles, whatever the token's lifetime.
            let wait = match cred.next_refresh_ms() {
                Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
                None => Duration::ZERO,
            }
            .max(Duration::from_millis(200));
            tokio::time::sleep(wait).await;
            match self.ensure_fresh_scheduled(&cred).await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    if !matches!(e, ServeError::NotBootstrapped | ServeError::Dead(_)) {
                        tracing::warn!(credential = %cred.spec.id, error = %e, "scheduled refresh failed");
                    }
                    let pause = (backoff + crate::tokens::jitter(backoff / 2)).max(cred.idp_wait());
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    async fn ensure_fresh_scheduled(&self, cred: &Credential) -> Result<(), ServeError> {
        let _flight = cred.flight.lock().await;
        if cred.next_refresh_ms().is_some_and(|at| now_ms() < at) {
            return Ok(()); // an on-demand refresh got there first
        }
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ServeError::Busy);
        }
        self.cycle_until_done(cred, true).await.map(|_| ())
    }

    fn encode_metrics(&self) -> String {
        let now = now_ms();
        for (id, cred) in &self.creds {
            if let Ok(g) = cred.cached.lock()
                && let Some(c) = g.as_ref()
            {
                let l = CredLabels {
                    credential: id.clone(),
                };
                #[allow(clippy::cast_precision_loss)]
                {
                    self.metrics
                        .token_age
                        .get_or_create(&l)
                        .set(now.saturating_sub(c.issued_at_ms) as f64 / 1000.0);
                    self.metrics
                        .time_to_expiry
                        .get_or_create(&l)
                        .set((c.expires_at_ms as f64 - now as f64) / 1000.0);
                }
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry);
        out
    }

    async fn route(
        self: &Arc<Self>,
        req: &Request<Incoming>,
    ) -> (Response<Full<Bytes>>, &'static str) {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            return (text(StatusCode::OK, "ok\n"), "healthz");
        }
        if path == "/metrics" {
            return (text(StatusCode::OK, &self.encode_metrics()), "metrics");
        }
        let Some(id) = path
            .strip_prefix("/v1/credentials/")
            .and_then(|r| r.strip_suffix("/access_token"))
        else {
            return (
                json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
                "other",
            );
        };
        if let Some(expected) = &self.auth {
            let given = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .unwrap_or_default();
            if !crate::ct_eq(given, expected.expose()) {
                return (
                    json_error(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "missing or wrong bearer token",
                    ),
                    "access_token",
                );
            }
        }
        if req.method() != Method::GET {
            let mut r = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            );
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
            return (r, "access_token");
        }
        let Some(result) = self.access_token(id, self.refresh_timeout * 2).await else {
            return (
                json_error(
                    StatusCode::NOT_FOUND,
                    "unknown_credential",
                    &format!("no credential `{id}`"),
                ),
                "access_token",
            );
        };
        let resp = match result {
            Ok(served) => {
                let now = now_ms();
                #[allow(clippy::cast_precision_loss)]
                let mut body = serde_json::json!({
                    "access_token": String::from_utf8_lossy(served.access.expose()),
                    "expires_at": rfc3339_ms(served.expires_at_ms),
                    "expires_in": served.expires_at_ms.saturating_sub(now) as f64 / 1000.0,
                });
                if served.stale {
                    body["stale"] = serde_json::Value::Bool(true);
                }
                let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
                let h = r.headers_mut();
                h.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                h.insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
                r
            }
            Err(e) => {
                let (status, code, reason) = match &e {
                    ServeError::NotBootstrapped => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "credential_dead",
                        "not_bootstrapped".to_string(),
                    ),
                    ServeError::Dead(r) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "credential_dead",
                        r.clone(),
                    ),
                    ServeError::Store(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        String::new(),
                    ),
                    ServeError::Idp(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "idp_unavailable",
                        String::new(),
                    ),
                    ServeError::Busy => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "refresh_in_progress",
                        String::new(),
                    ),
                    ServeError::Source(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "source_unavailable",
                        String::new(),
                    ),
                };
                // Store and IdP details (SQL errors, endpoint messages) go to the log, not to
                // the caller.
                let message = match &e {
                    ServeError::Store(detail) => {
                        tracing::warn!(credential = %id, error = %detail, "cannot serve: credential store");
                        "the credential store is unavailable; see the broker log".to_string()
                    }
                    ServeError::Idp(detail) => {
                        tracing::warn!(credential = %id, error = %detail, "cannot serve: token endpoint");
                        "the token endpoint is unavailable; see the broker log".to_string()
                    }
                    ServeError::Source(detail) => {
                        tracing::warn!(credential = %id, error = %detail, "cannot serve: client_secret");
                        "a refresh input (client_secret) cannot be read; see the broker log"
                            .to_string()
                    }
                    other => other.to_string(),
                };
                let mut body = serde_json::json!({"error": code, "message": message});
                if !reason.is_empty() {
                    body["reason"] = serde_json::Value::String(reason);
                }
                let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
                *r.status_mut() = status;
                let h = r.headers_mut();
                h.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                h.insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    // The IdP's own Retry-After passed on while it runs, else 1 s.
                    let wait = match &e {
                        ServeError::Idp(_) => {
                            self.creds.get(id).map_or(Duration::ZERO, |c| c.idp_wait())
                        }
                        _ => Duration::ZERO,
                    };
                    h.insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from(crate::tokens::retry_after_secs(wait)),
                    );
                }
                r
            }
        };
        (resp, "access_token")
    }
}

/// `ms` (Unix milliseconds) as RFC 3339 UTC.
pub fn rfc3339_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"error": code, "message": message});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Runs the broker until SIGTERM/SIGINT: loads the config, opens the store, starts one
/// scheduler per credential and serves the API.
///
/// # Errors
/// Config, store, TLS or listen failures, with the cause.
pub async fn serve(config_path: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cfg = Config::load(config_path).map_err(anyhow::Error::msg)?;
    let broker = Broker::new(&cfg).await.map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let tls = match &cfg.tls {
        Some(t) => Some(
            tls_acceptor(&cfg.base.join(&t.cert), &cfg.base.join(&t.key))
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    tracing::info!(addr = %listener.local_addr()?, credentials = broker.creds.len(), tls = tls.is_some(), "iron-token-broker listening");
    for cred in broker.creds.values() {
        tokio::spawn(broker.clone().schedule(cred.clone()));
    }
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let broker = broker.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        serve_conn(broker, s).await;
                    }
                }
                None => serve_conn(broker, tcp).await,
            }
        });
    }
    tracing::info!("iron-token-broker stopping");
    broker.quiesce().await;
    Ok(())
}

async fn serve_conn<S>(broker: Arc<Broker>, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let broker = broker.clone();
        async move {
            let (resp, endpoint) = broker.route(&req).await;
            broker
                .metrics
                .http
                .get_or_create(&HttpLabels {
                    endpoint: endpoint.to_string(),
                    status: resp.status().as_u16(),
                })
                .inc();
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await;
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Opens the store of `config_path` for the admin commands (no daemon needed).
///
/// # Errors
/// Config or store failures.
pub async fn open_store(config_path: &Path) -> Result<(Config, Store), String> {
    let cfg = Config::load(config_path)?;
    let sources = SourceResolver::new(Arc::new(crate::ProcessEnv));
    let store = Store::open(&cfg.store_config(&sources)?)
        .await
        .map_err(|e| e.to_string())?;
    Ok((cfg, store))
}

/// The host part of a lease owner name (`host:pid:ms`).
fn owner_host(owner: &str) -> &str {
    owner
        .rsplit_once(':')
        .and_then(|(rest, _)| rest.rsplit_once(':'))
        .map_or(owner, |(host, _)| host)
}

/// [`Broker::lease_ttl`] for a `refresh_timeout`.
fn lease_ttl_for(refresh_timeout: Duration) -> Duration {
    refresh_timeout * 2 + crate::store::PG_CALL_WORST * 7 + Duration::from_secs(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cycle whose every store call hits its bounds (a 10 s reconnect, a 10 s statement,
    /// a 2 s cancel) — the intent write and five write attempts with their 3.1 s of pauses —
    /// after the IdP's whole budget still ends inside its lease.
    #[test]
    fn the_lease_outlasts_a_cycle_whose_store_calls_all_hit_their_bounds() {
        for refresh in [Duration::from_secs(5), Duration::from_secs(30)] {
            let worst = Duration::from_secs(6 * 22) + Duration::from_millis(3100) + refresh * 2;
            assert!(lease_ttl_for(refresh) > worst, "{refresh:?}");
        }
    }

    /// `spill_dir` is resolved against the config's directory, and may not be the file
    /// store's own directory (its `ID.spill.json` would read as a credential `ID.spill`).
    #[test]
    fn spill_dir_is_relative_to_the_config_and_apart_from_the_file_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        let write = |extra: &str| {
            std::fs::write(
                &path,
                format!("version = 1\nstore = {{ file = \"creds\" }}\n{extra}"),
            )
            .unwrap();
        };
        write("spill_dir = \"spill\"\n");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.spill_dir, Some(dir.path().join("spill")));
        for same in ["creds", "./creds/"] {
            write(&format!("spill_dir = \"{same}\"\n"));
            let err = Config::load(&path).unwrap_err();
            assert!(
                err.contains("spill_dir must not be the file store"),
                "{err}"
            );
        }
        write("");
        assert_eq!(Config::load(&path).unwrap().spill_dir, None);
    }
}
