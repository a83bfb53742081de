//! The request pipeline, as named phases over one request:
//! `bind` (the request's authority must be the connection's destination, decision 1) →
//! `plan` (pure placeholder plan, decisions 2–4) → `resolve` (secret values) → `rewrite`
//! (swap, mark injected values sensitive, strip hop-by-hop headers) → `forward` (pooled,
//! verified upstream, bodies streamed) → `audit` (always one line, when the response body
//! ends or the request is refused or abandoned).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use iron_broker::SecretValue;
use iron_broker::tokens::TokenError;
use iron_policy::{RequestView, SecretKind, SecretValues, Stub, normalize_host};
use tracing::{Instrument as _, debug, debug_span, warn};

use crate::Runtime;
use crate::audit::{AppliedAt, AppliedSecret, AuditRecord};
use crate::body::{BodyEnd, Counted, ProxyBody, Tally};
use crate::error::ProxyError;
use crate::upstream::classify;

/// The destination a client connection is bound to.
#[derive(Debug, Clone)]
pub struct Dest {
    /// CONNECT host, normalized.
    pub host: String,
    /// CONNECT port.
    pub port: u16,
    /// True inside an intercepted TLS tunnel.
    pub tls: bool,
    /// SNI the client sent, normalized, if any.
    pub sni: Option<String>,
    /// `host:port` as a URI authority, built on the first request (every request of the
    /// tunnel is forwarded to it).
    authority: std::sync::OnceLock<http::uri::Authority>,
}

impl Dest {
    /// The destination `host` (normalized) and `port`; `tls` inside an intercepted TLS
    /// tunnel, with the client's `sni`.
    pub fn new(host: String, port: u16, tls: bool, sni: Option<String>) -> Self {
        Self {
            host,
            port,
            tls,
            sni,
            authority: std::sync::OnceLock::new(),
        }
    }
}

/// One client connection: who, and (inside a tunnel) to where.
#[derive(Debug, Clone)]
pub struct Conn {
    /// Client address.
    pub client: std::net::SocketAddr,
    /// `None` on the proxy port (absolute-form requests), `Some` inside a CONNECT tunnel.
    pub dest: Option<Dest>,
    /// The `max_connections` slot this connection (and its tunnels) holds.
    pub slot: Option<Arc<crate::server::Slot>>,
    /// The listener's shutdown phase.
    pub shutdown: tokio::sync::watch::Receiver<crate::Phase>,
    /// The caller a CONNECT or SOCKS5 handshake authenticated (`[[callers]]`), for the
    /// tunnel it opens: `None` when the policy had no callers, and always on the proxy
    /// port itself, where each absolute-form request authenticates on its own.
    pub caller: Option<crate::callers::Authenticated>,
}

impl Conn {
    /// The connection of a tunnel this client connection opened to `dest`: same client,
    /// slot, shutdown signal and caller.
    pub fn tunnel(&self, dest: Dest) -> Self {
        Self {
            client: self.client,
            dest: Some(dest),
            slot: self.slot.clone(),
            shutdown: self.shutdown.clone(),
            caller: self.caller.clone(),
        }
    }

    /// This connection as `caller` authenticated it (a CONNECT's or a SOCKS5 handshake's
    /// tunnel is that caller's); itself when there is none.
    pub fn as_caller(self: Arc<Self>, caller: Option<crate::callers::Authenticated>) -> Arc<Self> {
        match caller {
            None => self,
            Some(c) => Arc::new(Self {
                caller: Some(c),
                ..(*self).clone()
            }),
        }
    }
}

/// Headers never forwarded (RFC 9110 §7.6.1), plus `Proxy-Authorization`.
/// `Trailer` is not one (RFC 9110 §6.6.2, unlike RFC 2616 §13.5.1): it names the trailer
/// fields, and hyper forwards only the fields it names.
static HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
    http::header::TE,
    http::header::TRANSFER_ENCODING,
    UPGRADE,
];

/// Emits the record (`client_cancel`, or `closed` by a shutdown) if the request is dropped
/// before an outcome.
struct AuditGuard {
    rec: Option<AuditRecord>,
    rt: Arc<Runtime>,
    /// The request's byte counters once it is being forwarded: a request cut before its
    /// response is written with the bytes received so far.
    tally: Option<Tally>,
}

impl AuditGuard {
    fn rec(&mut self) -> &mut AuditRecord {
        // Only taken by `take`, after which the guard is not used.
        self.rec.get_or_insert_with(|| {
            AuditRecord::new(
                "request",
                crate::RequestId::default(),
                ([0, 0, 0, 0], 0).into(),
                "",
            )
        })
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if let Some(mut r) = self.rec.take() {
            if let Some(t) = &self.tally {
                r.bytes_in = t[0].load(Ordering::Relaxed);
                r.bytes_out = t[1].load(Ordering::Relaxed);
            }
            r.outcome = cut_outcome(&self.rt, &mut r);
            r.stop_clock();
            self.rt.emit(r);
        }
    }
}

/// The outcome of a request whose future or response body was dropped before its end:
/// `closed` with `"error": "shutdown"` when the proxy's drain closed it, else
/// `client_cancel` (the client went away).
fn cut_outcome(rt: &Runtime, rec: &mut AuditRecord) -> &'static str {
    if rt.is_closing() {
        rec.error = Some("shutdown");
        "closed"
    } else {
        "client_cancel"
    }
}

/// Waits for the response to a request whose body is still being sent. While the body
/// flows there is no deadline, only a stall limit: no body bytes for `idle` is a timeout.
/// Once the body has ended, the response headers must come within `header_timeout`.
///
/// # Errors
/// `Err(None)` on a timeout; `Err(Some(BodyEnd::Error))` when the request failed after the
/// client's body broke off (the client went away). A failure after a complete body, or
/// after the upstream side dropped the body unread to its end (`BodyEnd::Dropped`: hyper's
/// client does that when the upstream resets or closes mid-upload), is `Ok(Err(..))`, the
/// upstream's failure (REFERENCE §4: `client_cancel` only when the client goes away first).
async fn await_response<F, T>(
    response: F,
    body_end: tokio::sync::oneshot::Receiver<BodyEnd>,
    tally: &Tally,
    header_timeout: std::time::Duration,
    idle: std::time::Duration,
) -> Result<Result<T, crate::upstream::UpstreamError>, Option<BodyEnd>>
where
    F: std::future::Future<Output = Result<T, crate::upstream::UpstreamError>>,
{
    tokio::pin!(response);
    let mut body_end = body_end;
    let mut seen = tally[0].load(Ordering::Relaxed);
    let end = loop {
        tokio::select! {
            r = &mut response => {
                // A failure right after the client's body broke off is the client's doing.
                if r.is_err() && body_end.try_recv() == Ok(BodyEnd::Error) {
                    return Err(Some(BodyEnd::Error));
                }
                return Ok(r);
            }
            end = &mut body_end => break end.unwrap_or(BodyEnd::Dropped),
            () = tokio::time::sleep(idle) => {
                let now = tally[0].load(Ordering::Relaxed);
                if now == seen {
                    return Err(None);
                }
                seen = now;
            }
        }
    };
    match tokio::time::timeout(header_timeout, response).await {
        Err(_) => Err(None),
        Ok(Err(_)) if end == BodyEnd::Error => Err(Some(end)),
        Ok(r) => Ok(r),
    }
}

/// The values a plan needs, by secret index: the first inline (a request usually needs
/// one), borrowed from the policy's cache when it has them.
#[derive(Default)]
struct Values<'a> {
    first: Option<(usize, Cow<'a, SecretValue>)>,
    rest: Vec<(usize, Cow<'a, SecretValue>)>,
}

impl<'a> Values<'a> {
    fn push(&mut self, index: usize, value: Cow<'a, SecretValue>) {
        if self.first.is_none() {
            self.first = Some((index, value));
        } else {
            self.rest.push((index, value));
        }
    }
}

impl Values<'_> {
    /// The value of secret `index`, shared (not copied).
    fn shared(&self, index: usize) -> Option<&SecretValue> {
        self.first
            .iter()
            .chain(&self.rest)
            .find(|(i, _)| *i == index)
            .map(|(_, v)| &**v)
    }
}

impl SecretValues for Values<'_> {
    fn value(&self, index: usize) -> &[u8] {
        self.first
            .iter()
            .chain(&self.rest)
            .find(|(i, _)| *i == index)
            .map_or(&[][..], |(_, v)| v.expose())
    }
}

/// The real values `plan` put into the request, in the forms an origin may echo them in
/// ([`crate::echo`]): each applied secret's value (its body scrubbing as the secret says);
/// for a header whose `Basic` credentials were re-encoded around a swapped value, the new
/// blob put back to the client's own; for an injected header (a formatter may encode the
/// value, `Basic` base64), the whole value and its credentials put back to the
/// placeholder. Empty, and free, when no secret was applied.
fn echoes_of(
    active: &crate::Active,
    plan: &iron_policy::Plan,
    values: &Values<'_>,
    sent: &[(&str, &[u8])],
    out: &iron_policy::Rewritten,
) -> crate::echo::Echoes {
    let mut echoes = crate::echo::Echoes::new();
    if plan.applied.is_empty() {
        return echoes;
    }
    let policy = &*active.policy;
    let mut body = false;
    for &s in &plan.secrets {
        let secret = &policy.secrets[s];
        body |= secret.scrub_response_body;
        if let Some(v) = values.shared(s) {
            active.add_echoes(&mut echoes, s, v);
        }
    }
    // `Basic` then spaces or tabs (RFC 9110 §11.4: 1*SP; clients send tabs too).
    fn basic(v: &[u8]) -> Option<&[u8]> {
        v.get(..6)
            .is_some_and(|p| p[..5].eq_ignore_ascii_case(b"basic") && matches!(p[5], b' ' | b'\t'))
            .then(|| v[6..].trim_ascii())
    }
    for (i, new) in &out.headers {
        if let Some((_, old)) = sent.get(*i)
            && let (Some(old), Some(new)) = (basic(old), basic(new))
        {
            echoes.add_exact(new, old, body);
        }
    }
    for (name, value) in &out.set_headers {
        let injected = plan.applied.iter().find(|a| {
            matches!(&a.location, iron_policy::Location::Header(h) if h.eq_ignore_ascii_case(name))
                && matches!(
                    policy.secrets[a.secret].mode,
                    iron_policy::HttpMode::Inject { .. }
                )
        });
        if let Some(a) = injected {
            let secret = &policy.secrets[a.secret];
            let placeholder = secret.placeholder.as_bytes();
            echoes.add_exact(value, placeholder, secret.scrub_response_body);
            if let Some(creds) = basic(value) {
                echoes.add_exact(creds, placeholder, secret.scrub_response_body);
            }
        }
    }
    echoes
}

/// The rewrites of a WebSocket connection's two directions, for the secrets among
/// `secrets` with `websocket_frames`: client to server, each placeholder to its value;
/// server to client, the forms response headers are scrubbed of: `sent`, the echoes of
/// what the upgrade request itself carried (with the re-encoded `Basic` blob and injected
/// header values), and each frame secret's value in its echoable forms
/// ([`crate::Active::add_echoes`]). Both empty when no secret has `websocket_frames`
/// (frames then pass as bytes).
fn frame_rules<'s>(
    active: &crate::Active,
    secrets: impl Iterator<Item = &'s usize>,
    values: &Values<'_>,
    sent: &crate::echo::Echoes,
) -> (crate::ws::Rules, crate::ws::Rules) {
    let (mut swaps, mut echoes) = (Vec::new(), None);
    for &s in secrets {
        let secret = &active.policy.secrets[s];
        if let (true, Some(value)) = (secret.websocket_frames, values.shared(s)) {
            swaps.push((secret.placeholder.as_bytes().to_vec(), value.clone()));
            active.add_echoes(echoes.get_or_insert_with(|| sent.clone()), s, value);
        }
    }
    (
        crate::ws::Rules::swap(swaps),
        echoes.map(crate::ws::Rules::scrub).unwrap_or_default(),
    )
}

/// Whether a response body is scrubbed as it streams, and then whether its length must
/// stand (it has a `Content-Length`, is a 206 range whose `Content-Range` counts the
/// origin's bytes, or is gRPC, whose messages carry their own lengths): `Some` for a body
/// that is there (not a `HEAD`, 1xx, 204 or 304) and not content-encoded (a compressed
/// body is relayed as it is; the request asked for `identity`).
fn body_scrubbable(parts: &http::response::Parts, is_head: bool) -> Option<bool> {
    let status = parts.status.as_u16();
    if is_head || matches!(status, 100..=199 | 204 | 304) {
        return None;
    }
    let mut sized = status == 206;
    for (n, v) in &parts.headers {
        if n == http::header::CONTENT_ENCODING && !v.as_bytes().eq_ignore_ascii_case(b"identity") {
            return None;
        }
        sized |= n == http::header::CONTENT_LENGTH
            || (n == http::header::CONTENT_TYPE
                && v.as_bytes()
                    .get(..16)
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"application/grpc")));
    }
    Some(sized)
}

/// Handles one request from a client connection: refuses it with the error envelope or
/// forwards it. Never fails: every error becomes a response.
pub async fn handle(
    rt: Arc<Runtime>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let id = rt.next_request_id();
    // At debug level: an enabled span per request (created, formatted, entered on every
    // poll) costs ~7 % of a keep-alive request's instructions at the default info level
    // (bench/README.md). The warnings below carry the request id and client themselves.
    let span = debug_span!("request", id = %id, method = %req.method());
    let mut guard = AuditGuard {
        rec: Some(AuditRecord::new(
            "request",
            id,
            conn.client,
            req.method().as_str(),
        )),
        rt: rt.clone(),
        tally: None,
    };
    let h2 = req.version() == http::Version::HTTP_2;
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let result = exchange(
        &rt,
        &conn,
        Request::from_parts(parts, ()),
        &mut body,
        &mut guard,
    )
    .instrument(span)
    .await;
    // A request body nothing forwarded (a stub, a refusal) stays open until the response
    // has gone, on HTTP/2 (`body::holding`).
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            if let Some(mut rec) = guard.rec.take() {
                rec.status = e.status().as_u16();
                if let Some(t) = &guard.tally {
                    rec.bytes_in = t[0].load(Ordering::Relaxed);
                    rec.bytes_out = t[1].load(Ordering::Relaxed);
                }
                // The upstream failed, or the proxy refused (a missing credential too:
                // nothing was forwarded).
                rec.outcome = if e.code().starts_with("upstream_") {
                    "upstream_error"
                } else {
                    "refused"
                };
                rec.error = Some(e.code());
                rec.stop_clock();
                rt.emit(rec);
            }
            e.to_response(&id.to_string())
        }
    };
    match body {
        Some(unread) if h2 => resp.map(|b| crate::body::holding(b, unread)),
        _ => resp,
    }
}

async fn exchange(
    rt: &Arc<Runtime>,
    conn: &Conn,
    mut req: Request<()>,
    body: &mut Option<Incoming>,
    guard: &mut AuditGuard,
) -> Result<Response<ProxyBody>, ProxyError> {
    let id = guard.rec().request_id;
    let active = rt.active();
    let policy = &active.policy;

    // the caller: a tunnel's is its CONNECT's; an absolute-form request names its own
    let caller = match &conn.dest {
        Some(_) => crate::callers::recheck(rt, policy, conn.caller.as_ref()),
        None => crate::callers::authenticate(rt, policy, req.headers()).map(|a| a.map(|a| a.name)),
    }
    .inspect_err(|_| {
        // Named as the tunnel was bound, or as the absolute-form target says.
        let rec = guard.rec();
        match &conn.dest {
            Some(dest) => {
                rec.host.clone_from(&dest.host);
                rec.port = dest.port;
            }
            None => {
                rec.host = req
                    .uri()
                    .host()
                    .and_then(normalize_host)
                    .unwrap_or_default();
                rec.port = req.uri().port_u16().unwrap_or(0);
            }
        }
        rec.path.push_str(req.uri().path());
    })?;
    if caller.is_some() {
        guard.rec().caller.clone_from(&caller);
    }
    let grants = crate::callers::grants(policy, caller.as_deref())?;

    // bind
    let (host, port, tls) = match bind(conn, &req) {
        Ok(b) => b,
        Err(e) => {
            // The audit line still names where the connection was bound (the CONNECT
            // authority), not what the request claimed.
            if let Some(dest) = &conn.dest {
                let rec = guard.rec();
                rec.host.push_str(&dest.host);
                rec.port = dest.port;
                rec.scheme = if dest.tls { "https" } else { "http" };
                rec.host_class = policy.host_class(&dest.host, dest.port, dest.tls);
            }
            guard.rec().path.push_str(req.uri().path());
            return Err(e);
        }
    };
    // A clone shares the request target's bytes: path and query are borrowed from it.
    let target = req.uri().clone();
    let (path, query) = (target.path(), target.query());
    {
        let rec = guard.rec();
        rec.host.push_str(&host);
        rec.port = port;
        rec.scheme = if tls { "https" } else { "http" };
        rec.host_class = policy.host_class(&host, port, tls);
        rec.path.push_str(path);
    }
    // Token-endpoint and metadata-server stubs are answered here and never forwarded, so the
    // allowlist and the denied address ranges (169.254.169.254) do not apply to them.
    let stub = policy.stub_for_grants(&host, port, tls, req.method().as_str(), path, grants);
    if stub.is_none() {
        if !policy.allows_forward(&host, port, tls) {
            return Err(ProxyError::DestinationNotAllowed {
                host: host.into_owned(),
                port,
            });
        }
        if let Ok(ip) = host.parse::<std::net::IpAddr>()
            && policy.is_address_denied(ip)
        {
            return Err(ProxyError::DestinationAddressDenied {
                host: host.into_owned(),
            });
        }
    }
    if !(path.starts_with('/') || (path == "*" && req.method() == Method::OPTIONS)) {
        return Err(ProxyError::BadRequest("request path must start with /"));
    }
    if iron_policy::encoding::has_dot_segment(path) {
        return Err(ProxyError::InvalidPath);
    }

    // token-endpoint stubs: answered here, never forwarded
    if let Some((s, stub)) = stub {
        let secret = &policy.secrets[s];
        if !grants.allows(s) {
            return Err(ProxyError::SecretNotGranted {
                secret: secret.name.clone(),
                caller: caller.as_deref().unwrap_or_default().to_string(),
            });
        }
        let mut rec = guard.rec.take().unwrap_or_else(|| {
            AuditRecord::new("request", crate::RequestId::default(), conn.client, "")
        });
        rec.status = 200;
        rec.outcome = "stubbed";
        rec.host_class = "stub";
        rec.secrets = smallvec::smallvec![AppliedSecret {
            stats: active.stats(s).clone(),
            location: AppliedAt::Stub,
        }];
        rec.stop_clock();
        rt.emit(rec);
        return Ok(stub_response(&secret.placeholder, stub));
    }

    // plan: hop-by-hop headers go first (they are never forwarded, so never matched); the
    // plan's header indices are positions in the remaining map's iteration order.
    let is_upgrade = is_upgrade(req.headers());
    let upgrade = if is_upgrade {
        req.headers().get(UPGRADE).cloned()
    } else {
        None
    };
    // Parts the plan does not swap in but that are forwarded: the method, the Upgrade
    // value (hop-by-hop, but passed on for a WebSocket) and the target's authority. A
    // placeholder there is never sent (decision 3).
    // The request target's authority too: an HTTP/2 request names its host there
    // (`:authority`), not in a `Host` header the plan would refuse it in.
    let unswapped = std::iter::once(("method", req.method().as_str().as_bytes()))
        .chain(upgrade.iter().map(|u| ("header:upgrade", u.as_bytes())))
        .chain(
            req.uri()
                .authority()
                .map(|a| ("authority", a.as_str().as_bytes())),
        );
    for (location, bytes) in unswapped {
        if let Some(secret) = policy.placeholder_in(bytes) {
            return Err(ProxyError::PlaceholderNotAllowed {
                secret: secret.name.clone(),
                location: location.to_string(),
            });
        }
    }
    // `TE: trailers` (the client takes trailer fields) goes on: without it an origin may
    // leave its trailers out, and they pass through here like the body.
    // Found by walking the entries (a name compare each): a keyed look-up hashes the name,
    // which costs more per request than the few headers a request has.
    let takes_trailers = req.headers().iter().any(|(n, v)| {
        n == http::header::TE
            && v.to_str().is_ok_and(|s| {
                s.split(',').any(|t| {
                    t.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .eq_ignore_ascii_case("trailers")
                })
            })
    });
    strip_hop_by_hop(req.headers_mut(), false);
    let client_version = req.version();
    if client_version == http::Version::HTTP_2 {
        join_cookies(req.headers_mut());
    }
    if takes_trailers {
        req.headers_mut()
            .insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    // On the stack for up to 16 headers (a typical API request has fewer).
    let view_headers: smallvec::SmallVec<[(&str, &[u8]); 16]> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    let view = RequestView {
        host: &host,
        port,
        tls,
        method: req.method().as_str(),
        path,
        query,
        headers: &view_headers,
    };
    let mut plan = policy
        .plan_for(&view, grants)
        .map_err(|e| ProxyError::from_plan(e, caller.as_deref()))?;
    // A WebSocket upgrade also takes the values of the secrets bound to this host whose
    // placeholders are swapped in its text messages (`websocket_frames`), whether or not
    // the upgrade request itself carries them: resolved, rate-counted and audited here once.
    let frame_secrets: smallvec::SmallVec<[usize; 2]> = if is_upgrade {
        policy
            .secrets
            .iter()
            .enumerate()
            .filter(|&(i, s)| {
                s.websocket_frames
                    && grants.allows(i)
                    && s.enabled
                    && !plan.secrets.contains(&i)
                    && !matches!(s.kind, SecretKind::Pg(_))
                    && s.allows_host(&host, port, tls)
                    && (tls || s.allow_plaintext)
                    && iron_policy::matcher::capability_allows(s, &view)
            })
            .map(|(i, _)| i)
            .collect()
    } else {
        smallvec::SmallVec::new()
    };

    // resolve
    let mut values = Values::default();
    // Secrets that fail open (`on_failure = "open"`) and were left out for want of a value.
    let mut skipped: smallvec::SmallVec<[usize; 1]> = smallvec::SmallVec::new();
    let mut k = 0;
    while k < plan.secrets.len() + frame_secrets.len() {
        let s = match plan.secrets.get(k) {
            Some(&s) => s,
            None => frame_secrets[k - plan.secrets.len()],
        };
        let secret = &policy.secrets[s];
        let value = if secret.enabled {
            Ok(())
        } else {
            warn!(request_id = %id, client = %conn.client, secret = %secret.name, "secret is disabled (enabled = false)");
            Err(ProxyError::CredentialUnavailable {
                secret: secret.name.clone(),
            })
        };
        let value = match (value, &secret.kind) {
            (Err(e), _) => Err(e),
            (Ok(()), SecretKind::Static(source)) => active.static_value(&rt.sources, s, source).map_err(|e| {
                warn!(request_id = %id, client = %conn.client, secret = %secret.name, error = %e, "secret source unavailable");
                rt.secret_failed(&secret.name, &e.to_string());
                ProxyError::CredentialUnavailable {
                    secret: secret.name.clone(),
                }
            }),
            // pg_dsn secrets have no placeholder in the HTTP matcher; never planned here.
            (Ok(()), SecretKind::Pg(_)) => Err(ProxyError::CredentialUnavailable {
                secret: secret.name.clone(),
            }),
            (Ok(()), SecretKind::OAuth(_) | SecretKind::Gcp(_) | SecretKind::Brokered(_)) => {
                Box::pin(rt.tokens.token(secret)).await.map(Cow::Owned).map_err(|e| {
                    warn!(request_id = %id, client = %conn.client, secret = %secret.name, error = %e, "no access token");
                    rt.secret_failed(&secret.name, &e.to_string());
                    let brokered = matches!(secret.kind, SecretKind::Brokered(_));
                    match e {
                        // The broker is the one minting: a slow broker is unavailable.
                        TokenError::Pending if !brokered => ProxyError::CredentialPending {
                            secret: secret.name.clone(),
                        },
                        TokenError::Pending | TokenError::Unavailable { .. } => {
                            ProxyError::CredentialUnavailable {
                                secret: secret.name.clone(),
                            }
                        }
                    }
                })
            }
        };
        match value {
            Ok(v) => {
                values.push(s, v);
                k += 1;
            }
            // Left out of the plan, so the next secret is now at `k`.
            Err(_) if secret.fail_open && plan.skip_inject(s) => {
                warn!(request_id = %id, client = %conn.client, secret = %secret.name, "on_failure = open: forwarding without the credential");
                skipped.push(s);
            }
            Err(e) => {
                warn!(request_id = %id, client = %conn.client, secret = %secret.name, "no value for the secret; refusing the request");
                return Err(e);
            }
        }
    }
    // Rate limits, once every value is in hand: a request refused above (a missing source,
    // no token) has not used the secret and takes nothing from its limit.
    for &s in plan.secrets.iter().chain(&frame_secrets) {
        if let Err(wait) = active.check_rate(s) {
            return Err(ProxyError::RateLimited {
                secret: policy.secrets[s].name.clone(),
                retry_after_secs: iron_broker::tokens::retry_after_secs(wait),
            });
        }
    }

    // rewrite, in place: only swapped values and injected headers change
    let mut out = plan.apply(policy, &view, &values);
    let echoes = echoes_of(&active, &plan, &values, &view_headers, &out);
    let scrubs_body = echoes.scrubs_body();
    let frames = is_upgrade.then(|| {
        frame_rules(
            &active,
            plan.secrets.iter().chain(&frame_secrets),
            &values,
            &echoes,
        )
    });
    drop(view_headers);
    let first_secret = || ProxyError::CredentialUnavailable {
        secret: plan
            .secrets
            .first()
            .map(|&s| policy.secrets[s].name.clone())
            .unwrap_or_default(),
    };
    let headers = req.headers_mut();
    if !out.headers.is_empty() {
        for (i, (_, value)) in headers.iter_mut().enumerate() {
            if let Some((_, new)) = out.headers.iter_mut().find(|(j, _)| *j == i) {
                // The rewritten bytes become the value as they are (validated, not copied).
                let new = bytes::Bytes::from(std::mem::take(new));
                let mut v = HeaderValue::from_maybe_shared(new).map_err(|_| first_secret())?;
                v.set_sensitive(true);
                *value = v;
            }
        }
    }
    for (name, value) in &out.set_headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ProxyError::BadRequest("invalid injected header name"))?;
        let mut v = HeaderValue::from_bytes(value).map_err(|_| first_secret())?;
        v.set_sensitive(true);
        headers.insert(name, v);
    }
    if scrubs_body {
        // A compressed response body cannot be scrubbed as it streams: ask for none (no
        // `Accept-Encoding` would let the origin pick any).
        const IDENTITY: HeaderValue = HeaderValue::from_static("identity");
        headers.insert(http::header::ACCEPT_ENCODING, IDENTITY);
    }
    if frames
        .as_ref()
        .is_some_and(|(to_server, to_client)| !to_server.is_empty() || !to_client.is_empty())
    {
        // Compressed messages could not be rewritten: offer no extension, so none is
        // agreed (RFC 6455 §9.1).
        headers.remove(http::header::SEC_WEBSOCKET_EXTENSIONS);
    }
    if let Some(u) = upgrade {
        headers.insert(UPGRADE, u);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let uri = upstream_uri(
        &host,
        port,
        tls,
        conn.dest.as_ref(),
        req.uri(),
        out.path,
        out.query,
    )?;
    guard.rec().secrets = std::mem::take(&mut plan.applied)
        .into_iter()
        .map(|a| AppliedSecret {
            stats: active.stats(a.secret).clone(),
            location: AppliedAt::Request(a.location),
        })
        .chain(frame_secrets.iter().map(|&s| AppliedSecret {
            stats: active.stats(s).clone(),
            location: AppliedAt::WebSocket,
        }))
        .chain(skipped.iter().map(|&s| AppliedSecret {
            stats: active.stats(s).clone(),
            location: AppliedAt::Skipped,
        }))
        .collect();
    for a in &guard.rec().secrets {
        debug!(host = %host, secret = %a.stats.name, location = %a.location, "injected credential");
    }

    // forward
    let client_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut req));
    let is_head = req.method() == http::Method::HEAD;
    let tally: Tally = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    guard.tally = Some(tally.clone());
    let (mut parts, ()) = req.into_parts();
    let body = body
        .take()
        .ok_or(ProxyError::BadRequest("request body already taken"))?;
    // A request with a body reports its end: the response-header timeout runs from there
    // (an upload may take longer than the timeout), and a client that went away mid-body
    // is told apart from an upstream failure.
    let (body_end_tx, body_end) = if http_body::Body::is_end_stream(&body) {
        (None, None)
    } else {
        let (tx, rx) = tokio::sync::oneshot::channel::<BodyEnd>();
        (Some(tx), Some(rx))
    };
    let on_end = move |end| {
        if let Some(tx) = body_end_tx {
            let _ = tx.send(end);
        }
    };
    // Trailer fields are checked like headers, but nothing is swapped into them: a
    // placeholder there fails the body, the upstream never gets the request whole, and the
    // client gets the refusal. Over HTTP/1.1 only declared ones (`Trailer`) are forwarded
    // by hyper's client, over HTTP/2 all of them.
    let upstream_h2 = client_version == http::Version::HTTP_2 && tls;
    let trailer_refusal: Arc<std::sync::OnceLock<(String, String)>> = Arc::default();
    let body = if upstream_h2 || parts.headers.keys().any(|n| n == http::header::TRAILER) {
        let (policy, refusal) = (Arc::clone(policy), Arc::clone(&trailer_refusal));
        let check = move |trailers: &http::HeaderMap| {
            for (name, value) in trailers {
                let found = policy
                    .placeholder_in(name.as_str().as_bytes())
                    .or_else(|| policy.placeholder_in(value.as_bytes()));
                if let Some(secret) = found {
                    let _ = refusal.set((secret.name.clone(), format!("trailer:{name}")));
                    return Err("placeholder in a request trailer".into());
                }
            }
            Ok(())
        };
        let checked = crate::body::CheckedTrailers::new(body, check);
        Counted::new(checked, tally.clone(), 0, on_end).boxed()
    } else {
        Counted::new(body, tally.clone(), 0, on_end).boxed()
    };
    parts.uri = uri;
    // An HTTP/2 client's request to a TLS origin asks for HTTP/2 upstream (gRPC needs it
    // end to end); the upstream client falls back to HTTP/1.1 when the origin declines.
    parts.version = if upstream_h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    // The extensions are kept: they hold the header casing hyper recorded (its type is
    // private to hyper), which the client writes back. The upgrade handle was taken above.
    let up = Request::from_parts(parts, body);
    let limits = &policy.proxy.limits;
    let sent = std::time::Instant::now();
    let response = active.client().request(up);
    let waited = match body_end {
        None => tokio::time::timeout(limits.upstream_response_header_timeout, response)
            .await
            .map_err(|_| None),
        Some(body_end) => {
            await_response(
                response,
                body_end,
                &tally,
                limits.upstream_response_header_timeout,
                limits.idle_timeout,
            )
            .await
        }
    };
    let resp = match waited {
        Err(None) => return Err(ProxyError::UpstreamTimeout),
        Err(Some(BodyEnd::Error)) if trailer_refusal.get().is_some() => {
            let (secret, location) = trailer_refusal.get().cloned().unwrap_or_default();
            return Err(ProxyError::PlaceholderNotAllowed { secret, location });
        }
        Err(Some(BodyEnd::Error | BodyEnd::Dropped)) => {
            // The client's body broke off: its cancel, not an upstream failure.
            if let Some(mut rec) = guard.rec.take() {
                rec.bytes_in = tally[0].load(Ordering::Relaxed);
                rec.outcome = cut_outcome(rt, &mut rec);
                rec.stop_clock();
                rt.emit(rec);
            }
            return Err(ProxyError::Upstream);
        }
        Err(Some(BodyEnd::Complete)) => return Err(ProxyError::UpstreamTimeout),
        Ok(Err(e)) => {
            let mapped = classify(&e);
            warn!(request_id = %id, client = %conn.client, host = %host, port, error = %ErrorChain(&e), code = mapped.code(), "upstream request failed");
            return Err(mapped);
        }
        Ok(Ok(r)) => {
            rt.metrics
                .upstream_seconds
                .observe(sent.elapsed().as_secs_f64());
            r
        }
    };

    // respond, audit when the body ends
    let mut resp = resp;
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    if switching && client_upgrade.is_none() {
        // A 101 to a request that asked for no upgrade: nothing to switch to.
        warn!(request_id = %id, client = %conn.client, host = %host, port, "upstream switched protocols without an upgrade request");
        return Err(ProxyError::Upstream);
    }
    let upstream_upgrade = switching.then(|| hyper::upgrade::on(&mut resp));
    let (mut parts, body) = resp.into_parts();
    // The client's HTTP version, whatever the upstream's.
    parts.version = client_version;
    strip_hop_by_hop(&mut parts.headers, switching);
    let mut echoed = echoes.mask_headers(&mut parts.headers);
    if !echoes.is_empty()
        && let Some(reason) = parts.extensions.get::<hyper::ext::ReasonPhrase>()
        && let Some((masked, n)) =
            echoes.scrub(reason.as_bytes(), crate::echo::Scope::Header, false)
    {
        // A custom status text (`401 bad token …`) is written back to the client as is.
        echoed += n;
        match hyper::ext::ReasonPhrase::try_from(masked) {
            Ok(r) => {
                parts.extensions.insert(r);
            }
            Err(_) => {
                parts.extensions.remove::<hyper::ext::ReasonPhrase>();
            }
        }
    }
    let scrub_body = if scrubs_body {
        body_scrubbable(&parts, is_head)
    } else {
        None
    };
    let mut rec = guard.rec.take().unwrap_or_else(|| {
        AuditRecord::new("request", crate::RequestId::default(), conn.client, "")
    });
    rec.status = parts.status.as_u16();
    if let Some(upstream_upgrade) = upstream_upgrade {
        // Audited when the upgraded connection ends, like a passthrough tunnel: with the
        // bytes it moved each way and its whole duration.
        rec.outcome = "upgraded";
        if let Some(client_upgrade) = client_upgrade {
            let idle = policy.proxy.limits.idle_timeout;
            // The relay holds the connection's max_connections slot until it ends, like a
            // passthrough tunnel (hyper's connection future ends at the upgrade).
            let slot = conn.slot.clone();
            let shutdown = conn.shutdown.clone();
            let rt = rt.clone();
            tokio::spawn(
                async move {
                    let _slot = slot;
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((c, u)) => {
                            let (to_server, to_client) = frames.unwrap_or_default();
                            let (up, down) = crate::ws::relay(
                                TokioIo::new(c),
                                TokioIo::new(u),
                                idle,
                                crate::server::reached(shutdown, crate::Phase::Closing),
                                to_server.clone(),
                                to_client.clone(),
                            )
                            .await;
                            rec.bytes_in = rec.bytes_in.saturating_add(up);
                            rec.bytes_out = rec.bytes_out.saturating_add(down);
                            rec.echoes_scrubbed += to_client.made();
                            if to_server.failed() || to_client.failed() {
                                rec.error = Some("websocket_message_too_large");
                            }
                            if to_client.made() > 0 {
                                warn!(request_id = %rec.request_id, host = %rec.host, echoes = to_client.made(), "the origin's WebSocket messages echoed a credential; put back to its placeholder");
                            }
                            debug!(swapped = to_server.made(), echoes = to_client.made(), "WebSocket connection ended");
                            if rt.is_closing() {
                                rec.error = Some("shutdown");
                            }
                        }
                        Err(e) => {
                            debug!(error = %e, "upgrade failed");
                            rec.error = Some("upgrade_failed");
                        }
                    }
                    rec.stop_clock();
                    rt.emit(rec);
                }
                .in_current_span(),
            );
        }
        return Ok(Response::from_parts(
            parts,
            http_body_util::Empty::new().map_err(|n| match n {}).boxed(),
        ));
    }
    let sink = rt.clone();
    let counts = tally.clone();
    let body = crate::body::Idle::new(body, limits.idle_timeout);
    if echoed > 0 {
        tally[2].fetch_add(echoed, Ordering::Relaxed);
    }
    let body = crate::echo::Scrubbed::new(body, echoes, scrub_body, Some(tally.clone()));
    let body = Counted::new(body, tally, 1, move |end| {
        rec.bytes_in = counts[0].load(Ordering::Relaxed);
        rec.bytes_out = counts[1].load(Ordering::Relaxed);
        rec.echoes_scrubbed = counts[2].load(Ordering::Relaxed);
        if rec.echoes_scrubbed > 0 {
            // The origin reflects credentials: worth knowing, since the sandbox could have
            // had the value had it not been put back.
            warn!(request_id = %rec.request_id, host = %rec.host, echoes = rec.echoes_scrubbed, "the origin's response echoed a credential; put back to its placeholder");
        }
        rec.outcome = match end {
            BodyEnd::Complete => "forwarded",
            BodyEnd::Error => "upstream_error",
            BodyEnd::Dropped => cut_outcome(&sink, &mut rec),
        };
        rec.stop_clock();
        sink.emit(rec);
    });
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The synthetic token response of a stub: the secret's placeholder as the access token,
/// which the proxy then replaces on the secret's hosts.
fn stub_response(placeholder: &str, stub: Stub) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "access_token": placeholder,
        "token_type": "Bearer",
        "expires_in": 3600,
    });
    let mut resp = Response::new(crate::body::full(bytes::Bytes::from(
        serde_json::to_vec(&body).unwrap_or_default(),
    )));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if stub == Stub::GcpMetadata {
        h.insert("metadata-flavor", HeaderValue::from_static("Google"));
    }
    resp
}

/// The `bind` phase: the request's authority (absolute-form URI, else `Host`) must name the
/// connection's destination; on the proxy port an absolute `http://` URI is required and
/// `Host` must agree with it.
fn bind<'c>(conn: &'c Conn, req: &Request<()>) -> Result<(Cow<'c, str>, u16, bool), ProxyError> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let first_host = hosts.next();
    if hosts.next().is_some() {
        // RFC 9112 §3.2: more than one Host is a 400; an upstream could route by either.
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    let host_header = match first_host {
        Some(h) => Some(
            h.to_str()
                .map_err(|_| ProxyError::BadRequest("invalid Host header"))?,
        ),
        None => None,
    };
    match &conn.dest {
        Some(dest) => {
            let default_port = if dest.tls { 443 } else { 80 };
            let uri_auth = req.uri().authority().map(|a| a.as_str());
            let named = uri_auth
                .or(host_header)
                .ok_or(ProxyError::BadRequest("missing Host header"))?;
            if uri_auth.is_none()
                && names_dest(named, dest, default_port)
                && dest.sni.as_ref().is_none_or(|s| *s == dest.host)
            {
                // The common case, an origin-form request whose Host is the destination as
                // the client wrote it: no parse needed.
                return Ok((Cow::Borrowed(&dest.host), dest.port, dest.tls));
            }
            let (h, p) = split_authority(named, default_port)?;
            if h != dest.host || p != dest.port {
                return Err(ProxyError::AuthorityMismatch);
            }
            if let (Some(_), Some(hh)) = (uri_auth, host_header)
                && split_authority(hh, default_port)? != (h.clone(), p)
            {
                return Err(ProxyError::AuthorityMismatch);
            }
            if dest.sni.as_ref().is_some_and(|s| *s != dest.host) {
                return Err(ProxyError::AuthorityMismatch);
            }
            Ok((Cow::Owned(h), p, dest.tls))
        }
        None => {
            match req.uri().scheme_str() {
                Some("http") => {}
                Some(_) => {
                    return Err(ProxyError::BadRequest(
                        "only http:// absolute-form requests are proxied; use CONNECT for https",
                    ));
                }
                None => {
                    return Err(ProxyError::BadRequest(
                        "this is a proxy: send CONNECT or an absolute http:// URI",
                    ));
                }
            }
            let auth = req
                .uri()
                .authority()
                .ok_or(ProxyError::BadRequest("absolute URI has no host"))?;
            let (h, p) = split_authority(auth.as_str(), 80)?;
            if let Some(hh) = host_header
                && split_authority(hh, 80)? != (h.clone(), p)
            {
                return Err(ProxyError::AuthorityMismatch);
            }
            Ok((Cow::Owned(h), p, false))
        }
    }
}

/// True when `named` (a `Host` value) is exactly `dest`'s host, ASCII case aside, with its
/// port or, for the default port, without one. False is not a mismatch: the caller then
/// parses and normalizes.
fn names_dest(named: &str, dest: &Dest, default_port: u16) -> bool {
    let (h, port) = match named.rsplit_once(':') {
        // Digits only: `u16::from_str` would also take a sign (`+443`).
        Some((h, p))
            if !h.contains(':') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            match p.parse::<u16>() {
                Ok(p) => (h, p),
                Err(_) => return false,
            }
        }
        Some(_) => return false,
        None => (named, default_port),
    };
    port == dest.port && h.eq_ignore_ascii_case(&dest.host)
}

/// Splits `host[:port]` (IPv6 in brackets), normalizing the host; a missing port is
/// `default_port`. Userinfo is refused.
pub(crate) fn split_authority(auth: &str, default_port: u16) -> Result<(String, u16), ProxyError> {
    let a: http::uri::Authority = auth
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid authority"))?;
    if a.as_str().contains('@') {
        return Err(ProxyError::BadRequest("userinfo in authority"));
    }
    let host = normalize_host(a.host()).ok_or(ProxyError::BadRequest("invalid host"))?;
    Ok((host, a.port_u16().unwrap_or(default_port)))
}

/// A WebSocket upgrade request: `Upgrade: websocket` and `upgrade` in `Connection`. Any
/// other protocol (`h2c`, `TLS/1.0`) is not offered to the origin: its `Upgrade` header is
/// dropped as hop-by-hop and the request goes as a plain one (RFC 9110 §7.8 lets a server
/// ignore it) — after an `h2c` upgrade the proxy could see no further request.
fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(UPGRADE).is_some_and(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .next()
                .is_some_and(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
    }) && h.get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    })
}

/// The position of `name` in [`HOP_BY_HOP`]: one string match (by length, then bytes) per
/// name, cheaper than comparing it with each entry.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "proxy-authorization" => Some(3),
        "proxy-authenticate" => Some(4),
        "te" => Some(5),
        "transfer-encoding" => Some(6),
        "upgrade" => Some(7),
        _ => None,
    }
}

/// Removes the hop-by-hop headers ([`HOP_BY_HOP`]) and every header named in `Connection`
/// (RFC 9110 §7.6.1). With `keep_upgrade`, `Upgrade` and `Connection` stay (a 101 response).
/// One pass over the names finds which are present, so a message without any (most
/// requests) costs no hash look-up, and one with `Connection: keep-alive` (most responses)
/// two removals, not one per name of [`HOP_BY_HOP`]. Allocates only when `Connection` names
/// a header outside [`HOP_BY_HOP`] (`close` and `keep-alive`, the usual tokens, do not).
/// An HTTP/2 client may send its cookies as several `cookie` fields (RFC 9113 §8.2.3);
/// they go upstream as one, joined with `; ` as that section says, since an HTTP/1.1
/// origin takes a single `Cookie` (RFC 6265 §5.4).
fn join_cookies(h: &mut HeaderMap) {
    use http::header::COOKIE;
    let mut all = h.get_all(COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in h.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(mut v) = HeaderValue::from_bytes(&joined) {
        v.set_sensitive(true);
        h.insert(COOKIE, v);
    }
}

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let mut present: smallvec::SmallVec<[&'static HeaderName; 4]> = smallvec::SmallVec::new();
    let mut has_connection = false;
    for name in h.keys() {
        let Some(n) = hop_by_hop_index(name).map(|i| &HOP_BY_HOP[i]) else {
            continue;
        };
        has_connection |= n == CONNECTION;
        if !(keep_upgrade && (n == UPGRADE || n == CONNECTION)) {
            present.push(n);
        }
    }
    if !has_connection && present.is_empty() {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|n| t.eq_ignore_ascii_case(n.as_str()))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in present {
        h.remove(n);
    }
    for n in named {
        h.remove(n);
    }
}

/// The absolute URI a request is forwarded to: the bound destination's scheme and
/// authority, and the client's path and query as sent unless the rewrite changed them.
///
/// # Errors
/// [`ProxyError::BadRequest`] when the result is not a valid URI.
fn upstream_uri(
    host: &str,
    port: u16,
    tls: bool,
    dest: Option<&Dest>,
    sent: &Uri,
    path: Option<String>,
    query: Option<String>,
) -> Result<Uri, ProxyError> {
    let bad = |_| ProxyError::BadRequest("request target cannot be forwarded");
    let build = || {
        let a = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        http::uri::Authority::from_maybe_shared(bytes::Bytes::from(a)).map_err(bad)
    };
    // A tunnel's requests all go to its destination: its authority is built once.
    let authority = match dest {
        Some(d) if d.host == host && d.port == port => match d.authority.get() {
            Some(a) => a.clone(),
            None => {
                let a = build()?;
                d.authority.get_or_init(|| a).clone()
            }
        },
        _ => build()?,
    };
    let path_and_query = match (path, query) {
        (None, None) => match sent.path_and_query() {
            Some(pq) => pq.clone(),
            None => http::uri::PathAndQuery::from_static("/"),
        },
        (path, query) => {
            let path = path.as_deref().unwrap_or(sent.path());
            let query = query.as_deref().or(sent.query());
            let pq = match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::from(pq)).map_err(bad)?
        }
    };
    Uri::builder()
        .scheme(if tls {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        })
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
}

/// Displays an error with its whole cause chain, for logs.
pub(crate) struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str, port: u16) -> Dest {
        Dest::new(host.into(), port, true, None)
    }

    #[test]
    fn host_fast_path_matches_only_the_destination() {
        let d = dest("api.example.com", 443);
        assert!(names_dest("api.example.com", &d, 443));
        assert!(names_dest("API.Example.com:443", &d, 443));
        assert!(!names_dest("api.example.com:8443", &d, 443));
        assert!(!names_dest("evil.example.com", &d, 443));
        assert!(!names_dest("api.example.com.evil", &d, 443));
        assert!(!names_dest("user@api.example.com", &d, 443));
        assert!(!names_dest("api.example.com:", &d, 443));
        assert!(!names_dest("api.example.com:+443", &d, 443));
        // IPv6 literals always take the parsing path.
        assert!(!names_dest("[::1]:443", &dest("::1", 443), 443));
    }

    #[test]
    fn upstream_uri_keeps_the_target_bytes_unless_rewritten() {
        let sent: Uri = "/a%2Fb?x=1&y=%41".parse().unwrap();
        let u = upstream_uri("api.example.com", 443, true, None, &sent, None, None).unwrap();
        assert_eq!(u.to_string(), "https://api.example.com:443/a%2Fb?x=1&y=%41");
        let u = upstream_uri("::1", 8080, false, None, &sent, None, Some("x=2".into())).unwrap();
        assert_eq!(u.to_string(), "http://[::1]:8080/a%2Fb?x=2");
        let u = upstream_uri("h", 80, false, None, &sent, Some("/new".into()), None).unwrap();
        assert_eq!(u.to_string(), "http://h:80/new?x=1&y=%41");
        // A tunnel's authority is built once and reused; another host is not given it.
        let d = dest("api.example.com", 443);
        for _ in 0..2 {
            let u =
                upstream_uri("api.example.com", 443, true, Some(&d), &sent, None, None).unwrap();
            assert_eq!(u.to_string(), "https://api.example.com:443/a%2Fb?x=1&y=%41");
        }
        let u = upstream_uri("other.example", 443, true, Some(&d), &sent, None, None).unwrap();
        assert_eq!(u.authority().map(|a| a.as_str()), Some("other.example:443"));
    }

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(n), Some(i), "{n}");
        }
        assert_eq!(hop_by_hop_index(&http::header::HOST), None);
        assert_eq!(hop_by_hop_index(&HeaderName::from_static("x-te")), None);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("X-Drop, upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let mut switching = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-keep"]
        );
        strip_hop_by_hop(&mut switching, true);
        let mut kept: Vec<_> = switching.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["connection", "upgrade", "x-keep"]);

        // Nothing hop-by-hop: the map is left as it was.
        let mut plain = HeaderMap::new();
        plain.insert("x-keep", HeaderValue::from_static("1"));
        plain.append("accept", HeaderValue::from_static("a"));
        plain.append("accept", HeaderValue::from_static("b"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain, before);

        // No Connection header: each hop-by-hop name present goes, with all its values.
        let mut h = HeaderMap::new();
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eA=="),
        );
        h.append("te", HeaderValue::from_static("trailers"));
        h.append("te", HeaderValue::from_static("gzip"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-keep"]
        );

        // A 101 keeps Connection, but what it names still goes.
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("upgrade, x-drop"));
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        let mut kept: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["connection", "upgrade"]);
    }
}
