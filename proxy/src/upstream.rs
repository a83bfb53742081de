//! The upstream side: name resolution under the egress policy, the pooled HTTP client with
//! verified TLS, and the classification of its errors.
//!
//! Every dial goes through [`PolicyResolver`]: `resolve` overrides first, then DNS; every
//! address in a deny CIDR (and not in `allow_cidrs`) is dropped, and only the remaining,
//! checked addresses are dialled — there is no second resolution (DESIGN.md decision 5).
//! Upstream TLS always verifies against the web PKI roots plus `upstream_ca` (decision 6).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use iron_policy::Policy;
use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;

use crate::body::ProxyBody;
use crate::error::ProxyError;

/// A dial refused or failed before any connection was made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Every resolved address is in a deny CIDR.
    #[error("every address of {host} is in a denied range")]
    Denied {
        /// The host.
        host: String,
    },
    /// The name did not resolve.
    #[error("failed to resolve {host}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
}

/// Resolves `host` under the policy: a `resolve` override or an IP literal as is, else DNS;
/// then drops denied addresses. `port` is set on every returned address.
///
/// # Errors
/// [`DialError::Denied`] when nothing is left; [`DialError::Resolve`] when DNS fails.
pub async fn resolve_checked(
    policy: &Policy,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, DialError> {
    let addrs: Vec<IpAddr> = if let Some(ip) = policy.proxy.resolve.get(host) {
        vec![*ip]
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        vec![ip]
    } else {
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| DialError::Resolve {
                host: host.to_string(),
                source,
            })?
            .map(|a| a.ip())
            .collect()
    };
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|ip| !policy.is_address_denied(*ip))
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    if allowed.is_empty() {
        return Err(DialError::Denied {
            host: host.to_string(),
        });
    }
    Ok(allowed)
}

/// The resolver the pooled client dials through (see [`resolve_checked`]).
#[derive(Clone)]
pub struct PolicyResolver {
    policy: Arc<Policy>,
}

impl Service<Name> for PolicyResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            // The connector sets the port; 0 here is replaced.
            let host = name.as_str().to_ascii_lowercase();
            resolve_checked(&policy, &host, 0).await.map(Vec::into_iter)
        })
    }
}

use tower_service::Service;

/// The pooled client's connector: TCP connect (hyper-util's [`HttpConnector`] over
/// [`PolicyResolver`]) and TLS handshake under one deadline. The TCP
/// connect timeout alone let an upstream that accepts and never finishes the handshake hold
/// a request until the response-header timeout (120 s by default). A miss is an
/// [`io::ErrorKind::TimedOut`] error, which [`classify`] answers 504 `upstream_timeout`.
///
/// A host that is an IP literal never reaches the resolver ([`HttpConnector`] dials it as
/// it is), so the denied address ranges are checked here too: every dial of the pooled
/// client, a token endpoint's as much as a proxied request's, meets them
/// ([`DialError::Denied`], which [`classify`] answers 403 `destination_address_denied`).
#[derive(Clone)]
pub struct ConnectDeadline {
    inner: HttpsConnector<Dial>,
    deadline: std::time::Duration,
    policy: Arc<Policy>,
}

impl Service<http::Uri> for ConnectDeadline {
    type Response = <HttpsConnector<Dial> as Service<http::Uri>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let literal = dst.host().and_then(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok()
        });
        if let Some(ip) = literal
            && self.policy.is_address_denied(ip)
        {
            let host = ip.to_string();
            return Box::pin(async move { Err(DialError::Denied { host }.into()) });
        }
        let connecting = self.inner.call(dst);
        let deadline = self.deadline;
        Box::pin(async move {
            match tokio::time::timeout(deadline, connecting).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TCP connect and TLS handshake to the upstream did not finish in time",
                )
                .into()),
            }
        })
    }
}

/// A boxed error, as connectors return them.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a dial through the `upstream_proxy` asks it to `CONNECT` to, for `host:port`: the
/// `resolve` override's address, or the IP literal, or the name (the proxy resolves it).
/// The deny CIDRs hold as far as this host can tell: the override, the literal, or every
/// address the name resolves to here must be allowed (one denied address refuses, since
/// the proxy may pick it); a name that does not resolve here (only the proxy's DNS knows
/// it) goes to the proxy as it is.
///
/// # Errors
/// [`DialError::Denied`] when an address is in a deny CIDR.
pub async fn via_upstream_proxy(
    policy: &Policy,
    host: &str,
    port: u16,
) -> Result<String, DialError> {
    let denied = || DialError::Denied {
        host: host.to_string(),
    };
    let ip = policy
        .proxy
        .resolve
        .get(host)
        .copied()
        .or_else(|| host.parse::<IpAddr>().ok());
    if let Some(ip) = ip {
        if policy.is_address_denied(ip) {
            return Err(denied());
        }
        return Ok(SocketAddr::new(ip, port).to_string());
    }
    if let Ok(addrs) = tokio::net::lookup_host((host, port)).await
        && addrs.into_iter().any(|a| policy.is_address_denied(a.ip()))
    {
        return Err(denied());
    }
    Ok(format!("{host}:{port}"))
}

/// A TCP connection to `host:port` for a relay (passthrough tunnels, the Postgres relay):
/// through the policy's `upstream_proxy` with `CONNECT` unless `host` is in its
/// `no_proxy`, else directly to the first allowed address that answers
/// ([`resolve_checked`]); within `timeout`.
///
/// # Errors
/// [`DialError::Denied`] (as a boxed error) for a denied address; resolution, connect,
/// proxy refusal or timeout errors.
pub async fn dial_tcp(
    policy: &Arc<Policy>,
    sources: &Arc<iron_broker::SourceResolver>,
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> Result<tokio::net::TcpStream, BoxError> {
    let mut dial = Dial::new(policy, timeout, sources);
    let authority = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    let uri: http::Uri = format!("http://{authority}").parse()?;
    match tokio::time::timeout(timeout, dial.call(uri)).await {
        Ok(r) => r.map(hyper_util::rt::TokioIo::into_inner),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out").into()),
    }
}

/// The TCP dial under the pooled client's TLS: directly ([`HttpConnector`] over
/// [`PolicyResolver`]), or, with the policy's `upstream_proxy`, through it
/// ([`iron_broker::upstream_proxy::ProxyDial`]: HTTP `CONNECT` or SOCKS5, with its
/// credential) unless the host is in its `no_proxy` ([`via_upstream_proxy`] says where the
/// tunnel goes).
#[derive(Clone)]
pub struct Dial {
    direct: HttpConnector<PolicyResolver>,
    via: Option<iron_broker::upstream_proxy::ProxyDial>,
    policy: Arc<Policy>,
}

impl Dial {
    /// The dial for `policy`, connecting (and, through a proxy, its handshake) within
    /// `timeout`; the proxy's credential is read through `sources`.
    fn new(
        policy: &Arc<Policy>,
        timeout: std::time::Duration,
        sources: &Arc<iron_broker::SourceResolver>,
    ) -> Self {
        let mut direct = HttpConnector::new_with_resolver(PolicyResolver {
            policy: policy.clone(),
        });
        direct.enforce_http(false);
        direct.set_nodelay(true);
        direct.set_connect_timeout(Some(timeout));
        // The policy checked the authority; a failure here is never expected, and the
        // dials then go direct (logged).
        let via = policy.proxy.upstream_proxy.as_ref().and_then(|p| {
            iron_broker::upstream_proxy::ProxyDial::new(p, timeout, sources.clone())
                .inspect_err(|e| tracing::error!(error = %e, "upstream_proxy unusable"))
                .ok()
        });
        Self {
            direct,
            via,
            policy: policy.clone(),
        }
    }
}

impl Service<http::Uri> for Dial {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let host = dst
            .host()
            .and_then(iron_policy::normalize_host)
            .unwrap_or_default();
        let port = dst
            .port_u16()
            .unwrap_or(if dst.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        if let Some(via) = self.via.as_ref().filter(|v| v.covers(&host)) {
            let via = via.clone();
            let policy = self.policy.clone();
            return Box::pin(async move {
                let target = via_upstream_proxy(&policy, &host, port).await?;
                via.connect(&target).await
            });
        }
        let mut direct = self.direct.clone();
        Box::pin(async move { direct.call(dst).await.map_err(Into::into) })
    }
}

/// Builds the rustls client configuration for upstreams from the policy's `upstream_ca`
/// ([`iron_broker::tls::client_config`]).
///
/// # Errors
/// A message naming the `upstream_ca` file that cannot be read or holds no certificate.
pub fn client_tls_config(
    policy: &Policy,
    provider: Arc<CryptoProvider>,
) -> Result<ClientConfig, String> {
    iron_broker::tls::client_config(&policy.proxy.upstream_ca, provider)
}

/// What a pooled upstream client is built from: the policy's `resolve`, `allow_cidrs` and
/// limits, and the `upstream_ca` files (paths and contents). A reload whose key is equal
/// keeps the running clients and their pooled connections (no burst of new TLS handshakes
/// after a policy edit); any difference builds new ones, so a connection dialed under old
/// resolution, address rules or trust is never reused.
#[derive(Debug, PartialEq, Eq)]
pub struct TransportKey {
    resolve: Vec<(String, std::net::IpAddr)>,
    allow_cidrs: Vec<ipnet::IpNet>,
    limits: iron_policy::Limits,
    upstream_ca: Vec<(iron_policy::UpstreamCa, Option<Vec<u8>>)>,
    upstream_proxy: Option<iron_policy::UpstreamProxy>,
}

impl TransportKey {
    /// The key of `policy` (reads the `upstream_ca` files; an unreadable one keys as `None`).
    pub fn of(policy: &Policy) -> Self {
        let mut resolve: Vec<_> = policy
            .proxy
            .resolve
            .iter()
            .map(|(h, ip)| (h.clone(), *ip))
            .collect();
        resolve.sort();
        Self {
            resolve,
            allow_cidrs: policy.proxy.allow_cidrs.clone(),
            limits: policy.proxy.limits.clone(),
            upstream_ca: policy
                .proxy
                .upstream_ca
                .iter()
                .map(|ca| (ca.clone(), std::fs::read(&ca.file).ok()))
                .collect(),
            upstream_proxy: policy.proxy.upstream_proxy.clone(),
        }
    }
}

/// What a pooled client counts (shared with the metrics registry).
#[derive(Debug, Clone, Default)]
pub struct UpstreamCounters {
    /// Connections dialed (`iron_proxy_upstream_connections_opened_total`).
    pub opened: prometheus_client::metrics::counter::Counter,
    /// Requests sent again on a new connection after the upstream closed an idle one under
    /// them (`iron_proxy_upstream_requests_resent_total`, see [`UpstreamClient`]).
    pub resent: prometheus_client::metrics::counter::Counter,
}

/// Builds the pooled client: keep-alive connections pooled per scheme and authority,
/// TCP_NODELAY, the policy's connect and idle timeouts; `counters` count the connections
/// it dials and the requests it sends again.
pub fn build_client(
    policy: &Arc<Policy>,
    tls: ClientConfig,
    counters: UpstreamCounters,
    sources: &Arc<iron_broker::SourceResolver>,
) -> UpstreamClient {
    let limits = &policy.proxy.limits;
    let http = Dial::new(policy, limits.upstream_connect_timeout, sources);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http.clone());
    let deadline = limits.upstream_connect_timeout + limits.tls_handshake_timeout;
    let connector = ConnectDeadline {
        policy: policy.clone(),
        inner: https,
        deadline,
    };
    // For HTTP/2 clients: ALPN offers `h2` and `http/1.1`, the origin picks.
    let h2_connector = ConnectDeadline {
        policy: policy.clone(),
        inner: hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_all_versions()
            .wrap_connector(http),
        deadline,
    };
    let mut h2 = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    h2.timer(hyper_util::rt::TokioTimer::new())
        // A dead connection (no answer to a ping in 10 s) is found and dropped, not left
        // to hold every request to its origin until the response-header timeout.
        .keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Room for several streams whose readers are slow before the others stall.
        .initial_connection_window_size(16 << 20);
    let mut h1 = hyper::client::conn::http1::Builder::new();
    // The casing hyper recorded when it parsed the client's request (and, for the
    // response, the origin's) is written back; a header the proxy adds (inject,
    // `token_endpoint_headers`) goes out in Title-Case.
    h1.preserve_header_case(true).title_case_headers(true);
    UpstreamClient {
        pool: Arc::new(Pool {
            connector,
            h1,
            h2_connector,
            h2,
            multiplexed: Mutex::new(H2Set::default()),
            idle: Mutex::new(IdleSet::default()),
            idle_timeout: limits.idle_timeout,
            reaper: std::sync::atomic::AtomicBool::new(false),
            counters,
        }),
    }
}

/// Most idle connections kept per scheme and authority (in each event loop's pool).
const MAX_IDLE_PER_HOST: usize = 64;

/// Most idle connections kept in all (in each event loop's pool): when the pool is full, the
/// connection idle longest is closed for a new one. Without it a sandbox requesting many
/// hosts (`egress = "open"`, a wildcard over wildcard DNS) would hold a descriptor per host
/// until the idle timeout.
const MAX_IDLE_TOTAL: usize = 128;

/// The pooled upstream client: HTTP/1.1 over verified TLS (or plain TCP for `http`), with
/// idle keep-alive connections kept per scheme and authority. Each event loop has its own
/// ([`crate::Active::client`]); the connections it dials are served on the calling loop.
///
/// A connection goes back to the pool when its response body has been read to the end
/// (or at once when the response has no body) and hyper will take a next request on it
/// (an upload still running after an early response is waited for, see
/// `GiveBack::give_back`), unless the response switched protocols;
/// one idle longer than the policy's `idle_timeout` is closed. A request that a pooled
/// connection refused before writing anything (the upstream closed it while idle) is sent
/// again on the next idle connection or a new one. Once any of it was written it is resent
/// only when all of these hold (RFC 9110 §9.2.2, as Go's transport does): the connection had
/// sat idle for 250 ms or more (`RESEND_AFTER_IDLE`), the upstream closed it before any response
/// came, the method is safe (or the request has an `Idempotency-Key`) and there is no body; the resend goes on a new
/// connection, once. Kept from hyper-util's legacy client, which this replaced: the resend
/// of a refused request, `Host` from the URI, origin form, the idle timeout; dropped: its
/// per-byte hashing of the pool key, boxed futures and a task per request
/// (bench/README.md).
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

struct Pool {
    connector: ConnectDeadline,
    h1: hyper::client::conn::http1::Builder,
    /// Dials offering HTTP/2 (ALPN `h2`, `http/1.1`), for HTTP/2 clients.
    h2_connector: ConnectDeadline,
    h2: hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    /// One HTTP/2 connection per `https` authority, shared by every request to it (RFC
    /// 9113 §9.1: a client should not open more than one per origin).
    multiplexed: Mutex<H2Set>,
    /// Idle connections by authority (`host:port` as in the URI), `[http, https]`; the
    /// newest at the end of each list.
    idle: Mutex<IdleSet>,
    idle_timeout: std::time::Duration,
    /// Whether the task that drops expired idle connections was started.
    reaper: std::sync::atomic::AtomicBool,
    /// Connections dialed, requests resent.
    counters: UpstreamCounters,
}

/// The idle connections of a pool, and how many there are (at most [`MAX_IDLE_TOTAL`]).
#[derive(Default)]
struct IdleSet {
    maps: [HashMap<Box<str>, Vec<Idle>>; 2],
    count: usize,
}

impl IdleSet {
    /// Drops what checkout would not hand out (closed, or idle past `timeout`) and the lists
    /// left empty.
    fn reap(&mut self, now: std::time::Instant, timeout: std::time::Duration) {
        for map in &mut self.maps {
            map.retain(|_, list| {
                list.retain(|i| i.usable(now, timeout));
                !list.is_empty()
            });
        }
        self.count = self
            .maps
            .iter()
            .flat_map(|m| m.values())
            .map(Vec::len)
            .sum();
    }

    /// Makes room for one more: reaps, then drops the longest-idle connection if the set
    /// is still full. Runs only when the set is full (one pass over it).
    fn make_room(&mut self, now: std::time::Instant, timeout: std::time::Duration) {
        self.reap(now, timeout);
        if self.count < MAX_IDLE_TOTAL {
            return;
        }
        // Each list is oldest first: the oldest overall is the first of some list.
        let oldest = self
            .maps
            .iter_mut()
            .flat_map(|m| m.iter_mut())
            .min_by_key(|(_, list)| list.first().map(|i| i.since));
        if let Some((_, list)) = oldest
            && !list.is_empty()
        {
            list.remove(0);
            self.count -= 1;
        }
    }
}

struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    since: std::time::Instant,
}

impl Idle {
    /// Whether checkout may hand it out: ready (open, and not busy: only ready connections
    /// are pooled, and a closed one is not ready) and idle for less than `timeout`.
    fn usable(&self, now: std::time::Instant, timeout: std::time::Duration) -> bool {
        self.sender.is_ready() && now.saturating_duration_since(self.since) < timeout
    }
}

/// Why an upstream request failed. [`classify`] maps it to what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection: resolution, a denied address, TCP connect or the TLS handshake
    /// failed or timed out.
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// The connection failed while sending the request or reading the response head.
    #[error("upstream request failed")]
    Request(#[source] hyper::Error),
    /// The request URI has no `http`/`https` scheme or no authority (a bug of the caller).
    #[error("the upstream request URI is not absolute")]
    NotAbsolute,
}

impl UpstreamError {
    /// Whether the error came from opening the connection.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

impl UpstreamClient {
    /// Sends `req`, whose URI is absolute (`https://host:port/path?query`): on an idle
    /// pooled connection to that scheme and authority, else on a new one. The request goes
    /// out in origin form, with a `Host` header from the URI when it has none.
    ///
    /// # Errors
    /// [`UpstreamError::Connect`] when no connection could be made,
    /// [`UpstreamError::Request`] when the exchange failed before the response head,
    /// [`UpstreamError::NotAbsolute`] for a URI without scheme or authority.
    pub async fn request(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let uri = req.uri().clone();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(UpstreamError::NotAbsolute),
        };
        let Some(authority) = uri.authority().cloned() else {
            return Err(UpstreamError::NotAbsolute);
        };
        // HTTP/2 clients' requests to TLS origins, boxed: the rest of the requests do not
        // carry (and copy) the larger future.
        let mut dialed = None;
        if req.version() == http::Version::HTTP_2 && tls {
            match Box::pin(self.request_h2(req, &uri, &authority)).await? {
                OverH2::Answered(resp) => return Ok(resp),
                OverH2::Declined(back, sender) => {
                    req = back;
                    dialed = sender;
                }
            }
        }
        if !req.headers().contains_key(http::header::HOST) {
            let default_port = if tls { 443 } else { 80 };
            let host = match authority.port_u16() {
                Some(p) if p == default_port => authority.host(),
                _ => authority.as_str(),
            };
            if let Ok(v) = http::HeaderValue::from_str(host) {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
        let origin_form = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = http::Uri::from(origin_form);
        // After the upstream closed a long-idle connection under the request, the resend
        // goes on a new connection: its idle siblings may be closing too.
        let mut fresh_only = false;
        loop {
            let checked_out = if fresh_only {
                None
            } else {
                self.pool.checkout(tls, authority.as_str())
            };
            let (mut sender, idle_for) = match (dialed.take(), checked_out) {
                (Some(s), _) => (s, None),
                (None, Some((s, idle_for))) => (s, Some(idle_for)),
                (None, None) => (Box::pin(self.pool.dial(uri.clone())).await?, None),
            };
            let reused = idle_for.is_some();
            if reused
                && std::future::poll_fn(|cx| sender.poll_ready(cx))
                    .await
                    .is_err()
            {
                continue; // closed while idle: the next one
            }
            let resend = match idle_for {
                Some(idle) if idle >= RESEND_AFTER_IDLE => replay_copy(&req),
                _ => None,
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.pool.wrap(resp, sender, tls, authority)),
                Err(mut e) => match (e.take_message(), resend) {
                    // Refused before a byte was written: safe to send again.
                    (Some(r), _) if reused => req = r,
                    (None, Some(copy)) if closed_under_request(e.error()) => {
                        tracing::debug!(authority = %authority, error = %e.error(), "upstream closed an idle connection under the request; sending it again on a new one");
                        self.pool.counters.resent.inc();
                        req = copy;
                        fresh_only = true;
                    }
                    _ => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
    }
}

impl UpstreamClient {
    /// Sends an HTTP/2 client's `req` to `https` `authority` over the origin's HTTP/2
    /// connection ([`Pool::multiplex`]). The target goes as `:scheme`, `:authority`
    /// (without the default port) and `:path`; a `Host` would have to agree with it (RFC
    /// 9113 §8.3.1), so it goes. A request the connection refused before sending it (a
    /// GOAWAY crossed it, or `REFUSED_STREAM`, RFC 9113 §8.7) goes once more on a new
    /// connection. When the origin speaks only HTTP/1.1 the request comes back, as
    /// HTTP/1.1, with the connection dialed for it if one was.
    ///
    /// # Errors
    /// As [`UpstreamClient::request`].
    async fn request_h2(
        &self,
        mut req: Request<ProxyBody>,
        uri: &http::Uri,
        authority: &http::uri::Authority,
    ) -> Result<OverH2, UpstreamError> {
        let mut fresh = false;
        loop {
            let sender = match self.pool.multiplex(uri, authority).await? {
                Multiplexed::H2(sender) => sender,
                Multiplexed::Pooled => {
                    *req.version_mut() = http::Version::HTTP_11;
                    return Ok(OverH2::Declined(req, None));
                }
                Multiplexed::Dialed(sender) => {
                    *req.version_mut() = http::Version::HTTP_11;
                    return Ok(OverH2::Declined(req, Some(sender)));
                }
            };
            req.headers_mut().remove(http::header::HOST);
            if authority.port_u16() == Some(443) && req.uri().port_u16().is_some() {
                let mut parts = uri.clone().into_parts();
                parts.authority = http::uri::Authority::try_from(authority.host()).ok();
                if let Ok(u) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
            let mut sender = sender;
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok(OverH2::Answered(
                        resp.map(|body| PooledBody { body, back: None }),
                    ));
                }
                Err(mut e) if e.message().is_some() && !fresh => {
                    self.pool.forget_h2(authority);
                    req = e.take_message().unwrap_or_default();
                    fresh = true;
                }
                Err(e) => {
                    if e.error().is_closed() || e.error().is_timeout() {
                        self.pool.forget_h2(authority);
                    }
                    return Err(UpstreamError::Request(e.into_error()));
                }
            }
        }
    }
}

/// What [`UpstreamClient::request_h2`] came to.
enum OverH2 {
    /// The origin answered over HTTP/2.
    Answered(Response<PooledBody>),
    /// The origin speaks only HTTP/1.1: the request, and a connection dialed for it.
    Declined(Request<ProxyBody>, Option<http1::SendRequest<ProxyBody>>),
}

/// How long a pooled connection must have sat idle for a request sent on it to be sent
/// again when the upstream closes the connection under it. An origin's keep-alive timer
/// closes connections idle for its timeout (1 s and up: gunicorn 2 s, Node.js 5 s, nginx
/// 75 s), and that close can cross the proxy's next request on the wire; the proxy's idle
/// clock starts a little after the origin's, so the threshold sits well below a second. A
/// connection busier than that is not one such a timer closes, and under load (the
/// connections a few milliseconds idle) no request pays for the copy.
const RESEND_AFTER_IDLE: std::time::Duration = std::time::Duration::from_millis(250);

/// A copy of `req` to send again, when that is safe: a safe method (RFC 9110 §9.2.1: GET,
/// HEAD, OPTIONS, TRACE) or a request carrying `Idempotency-Key` / `X-Idempotency-Key`, and
/// no body (a streamed body cannot be replayed). `None` otherwise. PUT and DELETE are
/// idempotent by RFC 9110 §9.2.2 but not in every API (`DELETE /queue/next`), so they are
/// not replayed on their own; Go's `net/http` transport draws the same line.
fn replay_copy(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    use http::Method;
    let replayable = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || req.headers().contains_key("idempotency-key")
        || req.headers().contains_key("x-idempotency-key");
    if !replayable || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(crate::body::full(bytes::Bytes::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    // The header casing hyper recorded (its type is private to hyper) goes along.
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

/// Whether `e` says the connection closed under the request before any of the response
/// came: end of stream before a response head, or a reset or broken pipe.
fn closed_under_request(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

impl Pool {
    /// The newest idle connection to `authority` that is open and not expired, with how
    /// long it sat idle; the closed and expired ones met on the way are dropped.
    fn checkout(
        &self,
        tls: bool,
        authority: &str,
    ) -> Option<(http1::SendRequest<ProxyBody>, std::time::Duration)> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let idle = &mut *idle;
        let list = idle.maps[usize::from(tls)].get_mut(authority)?;
        let now = std::time::Instant::now();
        while let Some(i) = list.pop() {
            idle.count -= 1;
            if i.usable(now, self.idle_timeout) {
                return Some((i.sender, now.saturating_duration_since(i.since)));
            }
        }
        None
    }

    /// A new connection: dial (resolution under the policy, TCP, TLS under one deadline),
    /// the HTTP/1.1 handshake, and the connection's task spawned on the calling loop.
    async fn dial(&self, uri: http::Uri) -> Result<http1::SendRequest<ProxyBody>, UpstreamError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(UpstreamError::Connect)?;
        let io = connector.call(uri).await.map_err(UpstreamError::Connect)?;
        self.handshake_h1(io).await
    }

    /// Where an HTTP/2 client's request to `https` `authority` goes: the origin's HTTP/2
    /// connection, open or dialed now; else, when the origin speaks only HTTP/1.1 (it
    /// took `http/1.1` in ALPN), the HTTP/1.1 pool ([`Multiplexed::Pooled`] when it has an
    /// idle connection, which is tried before dialing again) or the connection just dialed.
    async fn multiplex(
        &self,
        uri: &http::Uri,
        authority: &http::uri::Authority,
    ) -> Result<Multiplexed, UpstreamError> {
        let now = std::time::Instant::now();
        let (open, h1_only) = {
            let mut set = self
                .multiplexed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let open = match set.open.get_mut(authority.as_str()) {
                Some((s, used))
                    if !s.is_closed()
                        && now.saturating_duration_since(*used) < self.idle_timeout =>
                {
                    *used = now;
                    Some(s.clone())
                }
                Some(_) => {
                    set.open.remove(authority.as_str());
                    None
                }
                None => None,
            };
            (open, set.h1_only.contains(authority.as_str()))
        };
        if let Some(mut s) = open
            && std::future::poll_fn(|cx| s.poll_ready(cx)).await.is_ok()
        {
            return Ok(Multiplexed::H2(s));
        }
        if h1_only {
            return Ok(Multiplexed::Pooled);
        }
        let mut connector = self.h2_connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(UpstreamError::Connect)?;
        let io = connector
            .call(uri.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        use hyper_util::client::legacy::connect::Connection as _;
        if !io.connected().is_negotiated_h2() {
            {
                let mut set = self
                    .multiplexed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if set.h1_only.len() >= MAX_H1_ONLY {
                    set.h1_only.clear();
                }
                set.h1_only.insert(authority.as_str().into());
            }
            return self.handshake_h1(io).await.map(Multiplexed::Dialed);
        }
        let (sender, conn) = self
            .h2
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        self.counters.opened.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        let mut set = self
            .multiplexed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let timeout = self.idle_timeout;
        set.open.retain(|_, (s, used)| {
            !s.is_closed() && now.saturating_duration_since(*used) < timeout
        });
        if set.open.len() >= MAX_IDLE_TOTAL
            && let Some(oldest) = set
                .open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            set.open.remove(&oldest);
        }
        set.open
            .insert(authority.as_str().into(), (sender.clone(), now));
        Ok(Multiplexed::H2(sender))
    }

    /// Drops the HTTP/2 connection kept for `authority` (it refused a request).
    fn forget_h2(&self, authority: &http::uri::Authority) {
        self.multiplexed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .open
            .remove(authority.as_str());
    }

    /// The HTTP/1.1 handshake on a dialed connection, its task spawned on the calling loop.
    async fn handshake_h1<T>(&self, io: T) -> Result<http1::SendRequest<ProxyBody>, UpstreamError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) = self
            .h1
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        self.counters.opened.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// The response with a body that gives `sender` back to the pool when read to its
    /// end; at once when there is no body to read; never after a 101 (the connection is
    /// the upgrade's).
    fn wrap(
        self: &Arc<Self>,
        resp: Response<hyper::body::Incoming>,
        sender: http1::SendRequest<ProxyBody>,
        tls: bool,
        authority: http::uri::Authority,
    ) -> Response<PooledBody> {
        let mut back = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| GiveBack {
            sender,
            pool: Arc::downgrade(self),
            tls,
            authority,
        });
        if http_body::Body::is_end_stream(resp.body())
            && let Some(b) = back.take()
        {
            b.give_back();
        }
        resp.map(|body| PooledBody { body, back })
    }

    /// Adds an idle connection. When its host already has [`MAX_IDLE_PER_HOST`], the host's
    /// longest-idle one is closed for it; else, when the pool has [`MAX_IDLE_TOTAL`], the
    /// pool's longest-idle one is.
    fn put(self: &Arc<Self>, tls: bool, authority: &str, sender: http1::SendRequest<ProxyBody>) {
        let entry = Idle {
            sender,
            since: std::time::Instant::now(),
        };
        {
            let mut idle = self
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let t = usize::from(tls);
            if let Some(list) = idle.maps[t].get_mut(authority)
                && list.len() >= MAX_IDLE_PER_HOST
            {
                // The host's list is full: the newcomer replaces its longest-idle one (the
                // nearest to the origin's own keep-alive timeout); other hosts keep theirs.
                list.remove(0);
                list.push(entry);
            } else {
                if idle.count >= MAX_IDLE_TOTAL {
                    idle.make_room(entry.since, self.idle_timeout);
                }
                let map = &mut idle.maps[t];
                match map.get_mut(authority) {
                    Some(list) => list.push(entry),
                    None => {
                        map.insert(authority.into(), vec![entry]);
                    }
                }
                idle.count += 1;
            }
        }
        // The reaper runs on the loop that first pools a connection (the pool is that
        // loop's); outside a runtime (a body dropped at shutdown) there is none to start.
        if !self.reaper.load(Ordering::Relaxed)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
            && !self.reaper.swap(true, Ordering::Relaxed)
        {
            let pool = Arc::downgrade(self);
            let every = self.idle_timeout.max(std::time::Duration::from_secs(1));
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(pool) = pool.upgrade() else { return };
                    pool.reap();
                }
            });
        }
    }

    /// Drops idle connections checkout would not hand out (closed or past the idle
    /// timeout), and the lists left empty.
    fn reap(&self) {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reap(std::time::Instant::now(), self.idle_timeout);
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = idle
            .maps
            .iter()
            .flat_map(|m| m.values())
            .map(Vec::len)
            .sum();
        assert_eq!(n, idle.count, "the idle count is off");
        n
    }
}

/// The HTTP/2 side of a pool.
#[derive(Default)]
struct H2Set {
    /// The open connection per authority, with when a request last went on it; one unused
    /// for the pool's idle timeout is dropped (its streams still open finish), and there
    /// are at most [`MAX_IDLE_TOTAL`].
    open: HashMap<
        Box<str>,
        (
            hyper::client::conn::http2::SendRequest<ProxyBody>,
            std::time::Instant,
        ),
    >,
    /// Authorities whose origin took `http/1.1` in ALPN: their HTTP/2 clients' requests
    /// use the HTTP/1.1 pool (an origin that speaks HTTP/2 is never sent them over an
    /// HTTP/1.1 connection another client left idle). At most [`MAX_H1_ONLY`].
    h1_only: std::collections::HashSet<Box<str>>,
}

/// Most authorities remembered as HTTP/1.1-only (per event loop's pool); past it the set
/// starts over.
const MAX_H1_ONLY: usize = 4096;

/// Where [`Pool::multiplex`] sends an HTTP/2 client's request.
enum Multiplexed {
    /// The origin's HTTP/2 connection.
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>),
    /// An idle HTTP/1.1 connection of the pool.
    Pooled,
    /// A new HTTP/1.1 connection (the origin declined `h2`).
    Dialed(http1::SendRequest<ProxyBody>),
}

/// What a response body needs to give its connection back.
struct GiveBack {
    sender: http1::SendRequest<ProxyBody>,
    pool: std::sync::Weak<Pool>,
    tls: bool,
    authority: http::uri::Authority,
}

impl GiveBack {
    /// Pools the connection once hyper will take a next request on it: at once in the
    /// usual case (hyper is ready in the same poll that ends the response body); when the
    /// upstream answered before the request body was all sent, a task waits for the upload
    /// to end (at most the idle timeout; the connection is closed otherwise), so no request
    /// ever waits behind another client's upload. A closed connection is dropped.
    fn give_back(self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if self.sender.is_ready() {
            pool.put(self.tls, self.authority.as_str(), self.sender);
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.sender.is_closed() {
            return;
        }
        let Self {
            mut sender,
            pool: weak,
            tls,
            authority,
        } = self;
        let wait = pool.idle_timeout;
        drop(pool);
        rt.spawn(async move {
            let ready =
                tokio::time::timeout(wait, std::future::poll_fn(|cx| sender.poll_ready(cx))).await;
            if let (Ok(Ok(())), Some(pool)) = (ready, weak.upgrade()) {
                pool.put(tls, authority.as_str(), sender);
            }
        });
    }
}

/// A response body from [`UpstreamClient`]: hyper's body, passed through; read to its end,
/// it gives the connection back to the pool. Dropped before the end or failed, the
/// connection is closed (hyper cannot reuse a connection with unread body bytes).
pub struct PooledBody {
    body: hyper::body::Incoming,
    back: Option<GiveBack>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl http_body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let r = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &r {
            None => {
                if let Some(b) = self.back.take() {
                    b.give_back();
                }
            }
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to its last data frame but not polled once more for the end.
        if http_body::Body::is_end_stream(&self.body)
            && let Some(b) = self.back.take()
        {
            b.give_back();
        }
    }
}

/// Token-endpoint requests over the pooled client, so they get the same resolution, deny
/// CIDRs, roots and timeouts as proxied traffic. Redirects are never followed (the client
/// does not follow them); responses over [`iron_broker::tokens::MAX_TOKEN_RESPONSE`] bytes
/// are refused.
#[derive(Clone)]
pub struct ClientTransport {
    active: Arc<arc_swap::ArcSwap<crate::Active>>,
}

impl ClientTransport {
    /// A transport over the client in force (it follows reloads), waiting at most the
    /// policy's `upstream_response_header_timeout` for response headers.
    pub fn new(active: Arc<arc_swap::ArcSwap<crate::Active>>) -> Self {
        Self { active }
    }
}

impl iron_broker::tokens::TokenTransport for ClientTransport {
    fn send(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<http::Response<Vec<u8>>, iron_broker::tokens::TransportError>,
                > + Send,
        >,
    > {
        use http_body_util::BodyExt as _;
        let active = self.active.load_full();
        Box::pin(async move {
            let err = |m: String| iron_broker::tokens::TransportError(m);
            let timeout = active.policy.proxy.limits.upstream_response_header_timeout;
            let (parts, body) = req.into_parts();
            let req = http::Request::from_parts(parts, crate::body::full(bytes::Bytes::from(body)));
            // Once the request may have reached the endpoint, a failure is an answer lost
            // (the `TokenTransport` contract): an empty `200`, never an error the cache
            // would retry with the same, possibly rotated-out, refresh token.
            let lost = || {
                http::Response::builder()
                    .status(200)
                    .body(Vec::new())
                    .unwrap_or_default()
            };
            // Headers and body under one deadline: a token endpoint that stalls mid-body is
            // cut off like one that never answers.
            let exchange = async {
                let resp = match active.client().request(req).await {
                    Ok(r) => r,
                    Err(e) if e.is_connect() => return Err(err(classify(&e).code().to_string())),
                    Err(e) => {
                        tracing::warn!(error = %classify(&e).code(), "token endpoint request failed after it was sent");
                        return Ok(lost());
                    }
                };
                let (parts, body) = resp.into_parts();
                match http_body_util::Limited::new(body, iron_broker::tokens::MAX_TOKEN_RESPONSE)
                    .collect()
                    .await
                {
                    Ok(b) => Ok(http::Response::from_parts(parts, b.to_bytes().to_vec())),
                    Err(_) if parts.status.is_success() => {
                        tracing::warn!("token endpoint response body failed or too large");
                        Ok(lost())
                    }
                    // An error answer keeps its status, which decides what comes next.
                    Err(_) => Ok(http::Response::from_parts(parts, Vec::new())),
                }
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("token endpoint did not answer in time");
                    Ok(lost())
                }
            }
        })
    }
}

/// Maps a client error to the proxy error the client sees, by walking the cause chain:
/// a denied address is `destination_address_denied`, a TLS failure `upstream_tls_error`, a
/// timeout `upstream_timeout`, out of file descriptors `proxy_overloaded`, any other
/// connect failure `upstream_unreachable`, anything else `upstream_error`.
pub fn classify(err: &UpstreamError) -> ProxyError {
    classify_chain(err, err.is_connect())
}

/// [`classify`] over any error chain; `connecting` when the error came from opening the
/// connection.
fn classify_chain(err: &(dyn std::error::Error + 'static), connecting: bool) -> ProxyError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<DialError>() {
            return match d {
                DialError::Denied { host } => {
                    ProxyError::DestinationAddressDenied { host: host.clone() }
                }
                DialError::Resolve { .. } => ProxyError::UpstreamUnreachable,
            };
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            return ProxyError::UpstreamTls;
        }
        // io::Error::source skips the error it wraps, and hyper-rustls wraps io errors in
        // io errors: descend into the wrapped error directly.
        cur = match e.downcast_ref::<io::Error>() {
            Some(io) if io.kind() == io::ErrorKind::TimedOut => {
                return ProxyError::UpstreamTimeout;
            }
            Some(io)
                if io.raw_os_error().is_some_and(|n| {
                    n == rustix::io::Errno::MFILE.raw_os_error()
                        || n == rustix::io::Errno::NFILE.raw_os_error()
                }) =>
            {
                return ProxyError::ProxyOverloaded;
            }
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => e.source(),
            },
            None => e.source(),
        };
    }
    if connecting {
        ProxyError::UpstreamUnreachable
    } else {
        ProxyError::Upstream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::Method;
    use http_body_util::BodyExt as _;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A plain-HTTP origin on loopback that answers every request on a connection with
    /// `answer(n)` (n counts the connection's requests from 0) and records each request
    /// head; `close_after` closes the connection after that many answers.
    struct Origin {
        port: u16,
        accepted: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    fn origin(answer: fn(usize) -> &'static str, close_after: usize) -> Origin {
        origin_with(answer, close_after, false)
    }

    /// As [`origin`]; with `drop_next`, after `close_after` answers it reads one more
    /// request head (recorded) and closes without answering: an origin whose keep-alive
    /// timer closed the connection as that request was on its way.
    fn origin_with(
        answer: fn(usize) -> &'static str,
        close_after: usize,
        drop_next: bool,
    ) -> Origin {
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let port = std.local_addr().unwrap().port();
        let listener = tokio::net::TcpListener::from_std(std).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (a, h) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 0..close_after.saturating_add(usize::from(drop_next)) {
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 1024];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        };
                        let head: Vec<u8> = buf.drain(..end).collect();
                        h.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        if n == close_after {
                            return; // read, never answered
                        }
                        if tcp.write_all(answer(n).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    // Closed, as an origin closes an idle keep-alive connection.
                });
            }
        });
        Origin {
            port,
            accepted,
            heads,
        }
    }

    fn client(idle_timeout: std::time::Duration) -> UpstreamClient {
        let mut policy = Policy::parse(
            "version = 1\n[proxy]\nlisten = \"127.0.0.1:0\"\nallow_cidrs = [\"127.0.0.1/32\"]\n",
            std::path::Path::new("test.toml"),
        )
        .unwrap();
        policy.proxy.limits.idle_timeout = idle_timeout;
        let tls = client_tls_config(&policy, crate::crypto_provider()).unwrap();
        build_client(
            &Arc::new(policy),
            tls,
            Default::default(),
            &Arc::new(iron_broker::SourceResolver::new(Arc::new(
                std::collections::HashMap::<String, String>::new(),
            ))),
        )
    }

    fn get(port: u16, target: &str) -> Request<ProxyBody> {
        Request::get(format!("http://127.0.0.1:{port}{target}"))
            .body(crate::body::full(bytes::Bytes::new()))
            .unwrap()
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    const EMPTY: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    /// A host that is an IP literal in a denied range (loopback, with no `allow_cidrs`) is
    /// refused before any connection is made, though the connector never asks the resolver
    /// for a literal: a token endpoint written as `https://127.0.0.1/...` meets the same
    /// rule as a proxied request.
    #[tokio::test]
    async fn an_ip_literal_in_a_denied_range_is_never_dialed() {
        let o = origin(|_| OK, usize::MAX);
        let policy = Policy::parse(
            "version = 1\n[proxy]\nlisten = \"127.0.0.1:0\"\n",
            std::path::Path::new("test.toml"),
        )
        .unwrap();
        let tls = client_tls_config(&policy, crate::crypto_provider()).unwrap();
        let c = build_client(
            &Arc::new(policy),
            tls,
            Default::default(),
            &Arc::new(iron_broker::SourceResolver::new(Arc::new(
                std::collections::HashMap::<String, String>::new(),
            ))),
        );
        for target in [
            format!("http://127.0.0.1:{}/", o.port),
            format!("https://127.0.0.1:{}/", o.port),
            format!("http://[::ffff:127.0.0.1]:{}/", o.port),
        ] {
            let req = Request::get(&target)
                .body(crate::body::full(bytes::Bytes::new()))
                .unwrap();
            let e = c.request(req).await.expect_err(&target);
            assert_eq!(
                classify(&e).code(),
                "destination_address_denied",
                "{target}"
            );
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 0, "dialed");
    }

    /// Idle connections to many hosts stop at [`MAX_IDLE_TOTAL`]: the one idle longest is
    /// closed for each newcomer, the newest stay pooled.
    #[tokio::test]
    async fn the_pool_keeps_at_most_max_idle_total_connections() {
        let origins: Vec<Origin> = (0..MAX_IDLE_TOTAL + 8)
            .map(|_| origin(|_| OK, usize::MAX))
            .collect();
        let c = client(std::time::Duration::from_secs(60));
        for o in &origins {
            let resp = c.request(get(o.port, "/")).await.unwrap();
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(c.pool.idle_count(), MAX_IDLE_TOTAL);
        for (i, o) in [
            (0, &origins[0]),
            (MAX_IDLE_TOTAL + 7, &origins[MAX_IDLE_TOTAL + 7]),
        ] {
            let resp = c.request(get(o.port, "/")).await.unwrap();
            resp.into_body().collect().await.unwrap();
            let dialed = o.accepted.load(Ordering::SeqCst);
            assert_eq!(dialed, if i == 0 { 2 } else { 1 }, "origin {i}");
        }
        assert_eq!(c.pool.idle_count(), MAX_IDLE_TOTAL);
    }

    /// A host whose idle list is full trades its own longest-idle connection for the one
    /// coming back: the other hosts' connections stay pooled.
    #[tokio::test]
    async fn a_host_at_its_idle_limit_does_not_evict_other_hosts() {
        let others: Vec<Origin> = (0..MAX_IDLE_TOTAL - MAX_IDLE_PER_HOST)
            .map(|_| origin(|_| OK, usize::MAX))
            .collect();
        let busy = origin(|_| OK, usize::MAX);
        let c = client(std::time::Duration::from_secs(60));
        for o in &others {
            let resp = c.request(get(o.port, "/")).await.unwrap();
            resp.into_body().collect().await.unwrap();
        }
        // One more than the per-host limit at once: each needs its own connection.
        let held = futures_util::future::join_all(
            (0..=MAX_IDLE_PER_HOST).map(|_| c.request(get(busy.port, "/"))),
        )
        .await;
        assert_eq!(busy.accepted.load(Ordering::SeqCst), MAX_IDLE_PER_HOST + 1);
        for resp in held {
            resp.unwrap().into_body().collect().await.unwrap();
        }
        assert_eq!(c.pool.idle_count(), MAX_IDLE_TOTAL);
        for o in &others {
            let resp = c.request(get(o.port, "/")).await.unwrap();
            resp.into_body().collect().await.unwrap();
            assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
        }
    }

    /// Requests one after the other share one upstream connection, whether their body
    /// was read to the end or there was none to read; each goes out in origin form with a
    /// `Host` taken from the URI.
    #[tokio::test]
    async fn sequential_requests_share_one_pooled_connection() {
        let o = origin(|n| if n == 1 { EMPTY } else { OK }, usize::MAX);
        let c = client(std::time::Duration::from_secs(60));
        for target in ["/a?b=1", "/empty", "/c"] {
            let resp = c.request(get(o.port, target)).await.unwrap();
            assert_eq!(resp.status(), 200);
            if target != "/empty" {
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"ok");
            }
        }
        assert_eq!(
            o.accepted.load(Ordering::SeqCst),
            1,
            "one connection for three requests"
        );
        let heads = o.heads.lock().unwrap().clone();
        assert!(
            heads[0].starts_with("GET /a?b=1 HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[0].contains(&format!("Host: 127.0.0.1:{}\r\n", o.port)),
            "{}",
            heads[0]
        );
        assert!(heads[2].starts_with("GET /c HTTP/1.1\r\n"), "{}", heads[2]);
        assert_eq!(c.pool.idle_count(), 1);
    }

    /// A pooled connection the origin closed while it was idle is not used: the request
    /// goes out on a new connection and succeeds.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        let o = origin(|_| OK, 1);
        let c = client(std::time::Duration::from_secs(60));
        for _ in 0..3 {
            let resp = c.request(get(o.port, "/")).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(c.pool.counters.opened.get(), 3);
    }

    /// An origin that closes a long-idle connection just as a GET goes out on it: the GET is
    /// sent again on a new connection and answered; the client never sees the close. So is
    /// a bodiless POST or DELETE that carries an `Idempotency-Key` (or `X-Idempotency-Key`):
    /// the client declared it safe to repeat.
    #[tokio::test]
    async fn a_get_the_origin_dropped_on_a_long_idle_connection_is_sent_again() {
        for (method, key) in [
            (Method::GET, None),
            (Method::POST, Some("idempotency-key")),
            (Method::DELETE, Some("x-idempotency-key")),
        ] {
            let o = origin_with(|_| OK, 1, true);
            let c = client(std::time::Duration::from_secs(60));
            let resp = c.request(get(o.port, "/a")).await.unwrap();
            resp.into_body().collect().await.unwrap();
            tokio::time::sleep(RESEND_AFTER_IDLE + std::time::Duration::from_millis(100)).await;
            let mut req = get(o.port, "/b");
            *req.method_mut() = method.clone();
            if let Some(k) = key {
                req.headers_mut()
                    .insert(k, http::HeaderValue::from_static("4f1c-retry-safe"));
            }
            let resp = c.request(req).await.unwrap();
            assert_eq!(resp.status(), 200, "{method}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            let heads = o.heads.lock().unwrap().clone();
            let targets: Vec<&str> = heads.iter().map(|h| h.split(' ').nth(1).unwrap()).collect();
            assert_eq!(targets, ["/a", "/b", "/b"], "{method}: {heads:?}");
            assert_eq!(o.accepted.load(Ordering::SeqCst), 2, "{method}");
            assert_eq!(c.pool.counters.resent.get(), 1, "{method}");
        }
    }

    /// Not sent again (the client gets the error): a request with a body, a method that is
    /// not safe (a bodiless POST or DELETE), and a GET on a connection in use a moment ago.
    #[tokio::test]
    async fn what_cannot_be_safely_resent_is_not() {
        let wait = RESEND_AFTER_IDLE + std::time::Duration::from_millis(100);
        for (method, body, idle) in [
            (Method::PUT, "x", wait),
            (Method::POST, "", wait),
            (Method::DELETE, "", wait),
            (Method::GET, "", std::time::Duration::ZERO),
        ] {
            let o = origin_with(|_| OK, 1, true);
            let c = client(std::time::Duration::from_secs(60));
            let resp = c.request(get(o.port, "/a")).await.unwrap();
            resp.into_body().collect().await.unwrap();
            tokio::time::sleep(idle).await;
            let mut req = Request::new(crate::body::full(bytes::Bytes::from_static(
                body.as_bytes(),
            )));
            *req.method_mut() = method.clone();
            *req.uri_mut() = format!("http://127.0.0.1:{}/b", o.port).parse().unwrap();
            let err = c.request(req).await.unwrap_err();
            assert!(
                matches!(err, UpstreamError::Request(_)),
                "{method}: {err:?}"
            );
            assert_eq!(o.heads.lock().unwrap().len(), 2, "{method}: sent once only");
            assert_eq!(o.accepted.load(Ordering::SeqCst), 1, "{method}");
            assert_eq!(c.pool.counters.resent.get(), 0, "{method}");
        }
    }

    /// A connection idle past the idle timeout is closed and dropped from the pool; the
    /// next request dials a new one.
    #[tokio::test]
    async fn idle_connections_expire() {
        let o = origin(|_| OK, usize::MAX);
        let c = client(std::time::Duration::from_millis(300));
        let resp = c.request(get(o.port, "/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(c.pool.idle_count(), 1);
        // The reaper runs at most once a second.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert_eq!(
            c.pool.idle_count(),
            0,
            "the reaper dropped the expired connection"
        );
        let resp = c.request(get(o.port, "/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(o.accepted.load(Ordering::SeqCst), 2);
    }

    /// After a 101 the connection belongs to the upgrade: it never goes back to the pool.
    #[tokio::test]
    async fn an_upgraded_connection_is_not_pooled() {
        const SWITCH: &str =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n";
        let o = origin(|n| if n == 0 { SWITCH } else { OK }, usize::MAX);
        let c = client(std::time::Duration::from_secs(60));
        let mut req = get(o.port, "/ws");
        req.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        req.headers_mut()
            .insert(http::header::UPGRADE, http::HeaderValue::from_static("x"));
        let mut resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 101);
        let _upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
        assert_eq!(c.pool.idle_count(), 0);
        let resp = c.request(get(o.port, "/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(o.accepted.load(Ordering::SeqCst), 2);
    }

    /// A request body that sends one chunk and then never ends (an upload in progress).
    struct Unfinished(bool);

    impl http_body::Body for Unfinished {
        type Data = bytes::Bytes;
        type Error = crate::body::BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            if self.0 {
                return Poll::Pending;
            }
            self.0 = true;
            Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                b"partial",
            )))))
        }
    }

    /// An origin that answers before the upload ended (as with a 401 or 413): the
    /// connection is still sending that body, so the next request to the host must not be
    /// queued behind it; it goes out on a new connection at once.
    #[tokio::test]
    async fn a_connection_still_uploading_is_not_handed_out() {
        let o = origin(|_| EMPTY, usize::MAX);
        let c = client(std::time::Duration::from_secs(60));
        let post = Request::post(format!("http://127.0.0.1:{}/upload", o.port))
            .body(Unfinished(false).boxed())
            .unwrap();
        let resp = c.request(post).await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            c.request(get(o.port, "/next")),
        )
        .await
        .expect("the next request waited behind the unfinished upload")
        .unwrap();
        assert_eq!(next.status(), 200);
        assert_eq!(o.accepted.load(Ordering::SeqCst), 2);
    }

    /// A URI without scheme or authority is refused before any dial.
    #[tokio::test]
    async fn a_relative_uri_is_refused() {
        let c = client(std::time::Duration::from_secs(60));
        let req = Request::get("/x")
            .body(crate::body::full(bytes::Bytes::new()))
            .unwrap();
        assert!(matches!(
            c.request(req).await,
            Err(UpstreamError::NotAbsolute)
        ));
    }

    /// Out of file descriptors when dialing is the proxy's own overload (503, retry), not an
    /// unreachable upstream (502); a refused connection and a timeout keep their codes.
    #[test]
    fn connect_errors_are_classified_by_cause() {
        let wrapped = |e: io::Error| io::Error::other(e);
        let emfile = wrapped(io::Error::from_raw_os_error(
            rustix::io::Errno::MFILE.raw_os_error(),
        ));
        let e = classify_chain(&emfile, true);
        assert_eq!(e.code(), "proxy_overloaded");
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after(), Some(1));
        let enfile = io::Error::from_raw_os_error(rustix::io::Errno::NFILE.raw_os_error());
        assert_eq!(classify_chain(&enfile, true).code(), "proxy_overloaded");
        let refused = wrapped(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(
            classify_chain(&refused, true).code(),
            "upstream_unreachable"
        );
        let timeout = wrapped(io::Error::from(io::ErrorKind::TimedOut));
        assert_eq!(classify_chain(&timeout, true).code(), "upstream_timeout");
        assert_eq!(classify_chain(&refused, false).code(), "upstream_error");
    }
}
