//! The listener: accepts client connections (bounded by `max_connections`), serves the
//! proxy protocol on each — CONNECT and absolute-form `http://` — and runs the tunnels:
//! passthrough hosts are spliced unmodified; others are intercepted with a leaf for the
//! CONNECT host (TLS, first byte 0x16) or served as cleartext HTTP (first byte a letter).
//! CONNECT-stage refusals (egress policy, deny CIDRs) are answered before the tunnel opens.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use iron_policy::{Limits, normalize_host};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{Instrument as _, debug, debug_span, warn};

use crate::audit::AuditRecord;
use crate::body::{ProxyBody, full};
use crate::callers;
use crate::error::ProxyError;
use crate::io::{Prefixed, WriteStall, relay};
use crate::metrics::Metrics;
use crate::pipeline::{self, Conn, Dest};
use crate::upstream::{DialError, resolve_checked};
use crate::{Phase, Runtime};

/// A client connection's hold on one of the `max_connections` slots; tunnels opened on the
/// connection share it, so the slot is released when the last of them ends.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Accepts connections on `listener` until `shutdown` turns true, then asks every open
/// connection to finish its current request and close, and returns once all have (the
/// caller bounds the wait with its grace period).
pub async fn serve(rt: Arc<Runtime>, listener: TcpListener, mut shutdown: watch::Receiver<Phase>) {
    let max = rt.policy().proxy.limits.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    // Logged once each time the cap is reached (not per waiting connection).
    let mut saturated = false;
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => {
                saturated = false;
                p
            }
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                if !saturated {
                    warn!(
                        max_connections = max,
                        "max_connections reached: new connections wait in the listen backlog until one closes"
                    );
                    saturated = true;
                }
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = shutdown.wait_for(|p| *p >= Phase::Draining) => break,
                }
            }
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|p| *p >= Phase::Draining) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        rt.metrics.active_connections.inc();
        let slot = Arc::new(Slot {
            _permit: permit,
            gauge: rt.metrics.active_connections.clone(),
        });
        let rt = rt.clone();
        let shutdown = shutdown.clone();
        crate::workers::hand_off(tcp, move |tcp| {
            // At debug level, like the request span (pipeline::handle): entered and left on
            // every poll, it cost ~1.1k instructions per keep-alive request at `info`. The
            // warnings of a connection name the client themselves.
            let span = debug_span!("conn", client = %peer);
            serve_proxy_connection(rt, tcp, peer, slot, shutdown).instrument(span)
        });
    }
    drop(listener);
    tracing::info!("stopped accepting; draining open connections");
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// Completes once `phase` is at `at` or later. A listener gone without a drain (its sender
/// dropped) counts as [`Phase::Draining`], never as [`Phase::Closing`].
pub(crate) async fn reached(mut phase: watch::Receiver<Phase>, at: Phase) {
    if phase.wait_for(|p| *p >= at).await.is_err() && at == Phase::Closing {
        std::future::pending::<()>().await;
    }
}

/// Serves `conn` until it ends, or until the drain starts, after which the connection
/// finishes its in-flight request and closes; at [`Phase::Closing`] it is dropped as it
/// is (its requests in flight are written to the audit log as cut by the shutdown).
async fn graceful<I, S, B>(
    conn: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    shutdown: watch::Receiver<Phase>,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        () = reached(shutdown.clone(), Phase::Draining) => conn.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        r = conn.as_mut() => r,
        () = reached(shutdown, Phase::Closing) => Ok(()),
    }
}

fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.client_header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        // Header names reach the origin in the client's casing, and responses reach the
        // client in the origin's (REFERENCE §4 "keeps the client's casing on the wire"):
        // hyper records the casing in the request's extensions, which the pipeline keeps.
        .preserve_header_case(true)
        .keep_alive(true);
    b
}

async fn serve_proxy_connection(
    rt: Arc<Runtime>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Arc<Slot>,
    shutdown: watch::Receiver<Phase>,
) {
    let limits = rt.policy().proxy.limits.clone();
    // The connection slot lives as long as the connection or any tunnel opened on it.
    let conn = Arc::new(Conn {
        client: peer,
        dest: None,
        slot: Some(slot),
        shutdown: shutdown.clone(),
        caller: None,
    });
    // A SOCKS5 client speaks first with its version byte; an HTTP client with a method
    // name. Peeked, not read: hyper reads the stream from its start.
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.client_header_timeout, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == crate::socks::VERSION => {
            return crate::socks::serve(rt, tcp, conn).await;
        }
        Ok(Ok(1)) => {}
        // Closed, failed or silent: nothing to serve (hyper would time out the same way).
        _ => return,
    }
    let svc = service_fn(move |req: Request<Incoming>| {
        let rt = rt.clone();
        let conn = conn.clone();
        async move {
            Ok::<_, Infallible>(if req.method() == Method::CONNECT {
                connect(rt, conn, req).await
            } else {
                pipeline::handle(rt, conn, req).await
            })
        }
    });
    // A write pending past the idle timeout ends the connection (a client that stopped
    // reading); below the tunnels' TLS, so it bounds every request and upgrade on it.
    let io = WriteStall::new(tcp, limits.idle_timeout);
    let served = http1_builder(&limits)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    if let Err(e) = graceful(served, shutdown).await {
        debug!(error = %e, "client connection ended with an error");
    }
}

/// The client's own stream back from hyper's upgrade after a CONNECT, with any bytes hyper
/// read past the CONNECT's head (a ClientHello sent without waiting for the 200) put back
/// in front: the tunnel's TLS then runs on the socket itself, not through hyper's boxed
/// `Upgraded` (a virtual call and a rewind buffer on every read and write). `None` (never
/// expected: the connection is always served over this type) when the stream is some
/// other type; the tunnel is then dropped with a warning.
fn client_stream(up: hyper::upgrade::Upgraded) -> Option<Prefixed<WriteStall<TcpStream>>> {
    match up.downcast::<TokioIo<WriteStall<TcpStream>>>() {
        Ok(parts) => Some(Prefixed::new(
            parts.read_buf.to_vec(),
            parts.io.into_inner(),
        )),
        Err(_) => {
            warn!("CONNECT upgrade on an unexpected stream type; tunnel dropped");
            None
        }
    }
}

/// Handles CONNECT: checks the destination, answers 200, and runs the tunnel.
async fn connect(
    rt: Arc<Runtime>,
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let id = rt.next_request_id();
    let mut rec = AuditRecord::new("connect", id, conn.client, "CONNECT");
    rec.scheme = "tunnel";
    // The caller first (REFERENCE.md D21): an unauthenticated client learns nothing of
    // the policy, not even whether the destination is allowed.
    let (conn, checked) = match callers::authenticate(&rt, &rt.policy(), req.headers()) {
        Ok(caller) => {
            rec.caller = caller.as_ref().map(|c| c.name.clone());
            let conn = conn.as_caller(caller);
            let checked = check_connect(&rt, &req, &mut rec).await;
            (conn, checked)
        }
        Err(e) => {
            if let Some(a) = req.uri().authority() {
                rec.host = normalize_host(a.host()).unwrap_or_default();
                rec.port = a.port_u16().unwrap_or(0);
            }
            (conn, Err(e))
        }
    };
    match checked {
        Err(e) => {
            rec.status = e.status().as_u16();
            rec.outcome = "refused";
            rec.error = Some(e.code());
            rec.stop_clock();
            rt.emit(rec);
            e.to_response(&id.to_string())
        }
        Ok((host, port, passthrough)) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(
                async move {
                    let Ok(up) = on_upgrade.await else { return };
                    let Some(io) = client_stream(up) else { return };
                    run_tunnel(rt, conn, host, port, passthrough, rec, io).await;
                }
                .in_current_span(),
            );
            let mut resp = Response::new(full(bytes::Bytes::new()));
            *resp.status_mut() = StatusCode::OK;
            resp
        }
    }
}

/// Runs the tunnel a CONNECT (or a SOCKS5 CONNECT) opened to `host:port` on the client's
/// stream `io`, once the client was told it is open: spliced to `upstream` when the
/// destination is passed through (after checking the ClientHello names `host`), else
/// intercepted ([`intercept`]). `rec` is the CONNECT's audit record.
pub(crate) async fn run_tunnel<T>(
    rt: Arc<Runtime>,
    conn: Arc<Conn>,
    host: String,
    port: u16,
    upstream: Option<TcpStream>,
    mut rec: AuditRecord,
    mut io: T,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(upstream) = upstream else {
        return intercept(rt, io, conn, host, port, rec).await;
    };
    // The connection (and its max_connections slot) is held until the tunnel ends.
    let held = conn;
    // Only a TLS ClientHello naming the CONNECT host is spliced (decision 1; REFERENCE.md
    // §2.5): else the tunnel would carry traffic for any name the upstream serves.
    let hello = match peek_client_hello(&mut io).await {
        Ok((bytes, sni)) if normalize_host(&sni).as_deref() == Some(host.as_str()) => bytes,
        refused => {
            let code = match refused {
                Ok(_) => "sni_mismatch",
                Err(code) => code,
            };
            warn!(client = %held.client, host = %host, port, code, "passthrough refused: the ClientHello does not name the CONNECT host");
            rec.kind = "tunnel";
            rec.status = 200;
            rec.outcome = "refused";
            rec.error = Some(code);
            rec.stop_clock();
            rt.emit(rec);
            return;
        }
    };
    let idle = rt.policy().proxy.limits.idle_timeout;
    let closing = reached(held.shutdown.clone(), Phase::Closing);
    let (to_up, to_client) = relay(Prefixed::new(hello, io), upstream, idle, closing).await;
    if rt.is_closing() {
        rec.error = Some("shutdown");
    }
    rec.kind = "tunnel";
    rec.status = 200;
    rec.outcome = "closed";
    rec.bytes_in = to_up;
    rec.bytes_out = to_client;
    rec.stop_clock();
    rt.emit(rec);
}

/// Longest a passthrough client may take to send its ClientHello (REFERENCE.md §2.5).
const CLIENT_HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Most bytes read while looking for a complete ClientHello (REFERENCE.md §2.5).
const CLIENT_HELLO_MAX: usize = 16 * 1024;

/// Reads a TLS ClientHello (TLS 1.2 or 1.3, over one or more records) from `io`, parsed by
/// rustls's [`rustls::server::Acceptor`]. Returns the bytes read, to be replayed upstream,
/// and the SNI host name.
///
/// # Errors
/// An audit error code: `client_hello_timeout` (none within 5 s), `client_hello_too_large`
/// (over 16 KiB), `client_hello_invalid` (not TLS, malformed, or the client closed),
/// `client_hello_ech` (Encrypted Client Hello: the real name is hidden), `sni_missing` (no
/// server_name extension).
async fn peek_client_hello<T>(io: &mut T) -> Result<(Vec<u8>, String), &'static str>
where
    T: tokio::io::AsyncRead + Unpin,
{
    let read = async {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut seen = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = io
                .read(&mut chunk)
                .await
                .map_err(|_| "client_hello_invalid")?;
            if n == 0 {
                return Err("client_hello_invalid");
            }
            if seen.len() + n > CLIENT_HELLO_MAX {
                return Err("client_hello_too_large");
            }
            seen.extend_from_slice(&chunk[..n]);
            let mut fed = &chunk[..n];
            while !fed.is_empty() {
                acceptor
                    .read_tls(&mut fed)
                    .map_err(|_| "client_hello_invalid")?;
            }
            match acceptor.accept() {
                Ok(None) => {}
                Ok(Some(accepted)) => {
                    let sni = accepted.client_hello().server_name().map(str::to_string);
                    // Encrypted Client Hello hides the real server name inside; the outer
                    // SNI names only the front, so the check above would mean nothing.
                    match hello_has_extension(&seen, EXT_ENCRYPTED_CLIENT_HELLO) {
                        Some(false) => {}
                        Some(true) => return Err("client_hello_ech"),
                        None => return Err("client_hello_invalid"),
                    }
                    return sni.map(|s| (seen, s)).ok_or("sni_missing");
                }
                Err(_) => return Err("client_hello_invalid"),
            }
        }
    };
    tokio::time::timeout(CLIENT_HELLO_TIMEOUT, read)
        .await
        .map_err(|_| "client_hello_timeout")?
}

/// The `encrypted_client_hello` extension (draft-ietf-tls-esni, type 0xfe0d).
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// Whether the ClientHello in the TLS records `records` (as read from the client, possibly
/// several records) carries extension `ext` (RFC 8446 §4.1.2 layout); `None` when it cannot
/// be parsed.
fn hello_has_extension(records: &[u8], ext: u16) -> Option<bool> {
    let mut hs = Vec::new();
    let mut pos = 0;
    while pos + 5 <= records.len() {
        let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
        let frag = records.get(pos + 5..pos + 5 + len)?;
        if records[pos] == 22 {
            hs.extend_from_slice(frag);
        }
        pos += 5 + len;
    }
    let u16_at = |b: &[u8], i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *b.get(i)?,
            *b.get(i + 1)?,
        ])))
    };
    if hs.first() != Some(&1) {
        return None;
    }
    let body_len = (usize::from(*hs.get(1)?) << 16) | u16_at(&hs, 2)?;
    let body = hs.get(4..4 + body_len)?;
    let mut i = 2 + 32; // legacy_version, random
    i += 1 + usize::from(*body.get(i)?); // legacy_session_id
    i += 2 + u16_at(body, i)?; // cipher_suites
    i += 1 + usize::from(*body.get(i)?); // legacy_compression_methods
    let ext_end = i + 2 + u16_at(body, i)?;
    let mut j = i + 2;
    while j + 4 <= ext_end.min(body.len()) {
        if u16_at(body, j)? == usize::from(ext) {
            return Some(true);
        }
        j += 4 + u16_at(body, j + 2)?;
    }
    Some(false)
}

/// The CONNECT-stage checks: a `host:port` authority, on the egress allowlist, resolving to
/// at least one permitted address. Passthrough hosts are dialled here (the checked address),
/// so a dial failure is answered before the tunnel opens. Stub hosts (token endpoints) are
/// never dialled.
async fn check_connect(
    rt: &Runtime,
    req: &Request<Incoming>,
    rec: &mut AuditRecord,
) -> Result<(String, u16, Option<TcpStream>), ProxyError> {
    let auth = req.uri().authority().ok_or(ProxyError::BadRequest(
        "CONNECT needs a host:port authority",
    ))?;
    // RFC 9110 §9.3.6: the target is authority-form, `host:port` and nothing else; no
    // scheme or path, no userinfo (which would be dropped silently), digits-only port.
    let port_text = auth.as_str().rsplit_once(':').map_or("", |(_, p)| p);
    if req.uri().scheme().is_some()
        || auth.as_str().contains('@')
        || port_text.is_empty()
        || !port_text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(ProxyError::BadRequest(
            "CONNECT target must be host:port (authority-form)",
        ));
    }
    let host = normalize_host(auth.host()).ok_or(ProxyError::BadRequest("invalid CONNECT host"))?;
    let port = auth
        .port_u16()
        .ok_or(ProxyError::BadRequest("CONNECT authority needs a port"))?;
    let upstream = check_target(rt, &host, port, rec).await?;
    Ok((host, port, upstream))
}

/// Checks a tunnel's destination `host:port` (normalized) before the client is told the
/// tunnel is open, recording it in `rec`: on the egress allowlist, its addresses outside
/// the deny CIDRs; for a passthrough destination, dialed. Returns that upstream
/// connection, or `None` for a tunnel to intercept.
///
/// # Errors
/// [`ProxyError::DestinationNotAllowed`], [`ProxyError::DestinationAddressDenied`],
/// [`ProxyError::UpstreamUnreachable`] (no address, or the passthrough dial failed),
/// [`ProxyError::UpstreamTimeout`] (the look-up or dial outlasted the connect timeout).
pub(crate) async fn check_target(
    rt: &Runtime,
    host: &str,
    port: u16,
    rec: &mut AuditRecord,
) -> Result<Option<TcpStream>, ProxyError> {
    let host = host.to_string();
    let policy = rt.policy();
    rec.host.clone_from(&host);
    rec.port = port;
    rec.host_class = policy.host_class(&host, port, true);
    // What the tunnel carries (TLS or cleartext HTTP) is known only after it opens; each
    // request in it is checked again with the real answer. A host pattern without a port
    // means 443 for TLS and 80 for cleartext, so `CONNECT pypi.org:80` (curl -p, undici)
    // passes here when cleartext to it is allowed.
    if !(policy.allows_destination(&host, port, true) || policy.allows_forward(&host, port, false))
    {
        return Err(ProxyError::DestinationNotAllowed { host, port });
    }
    if policy.is_stub_host(&host, port) {
        // Token endpoints are answered locally; other paths on the host are checked when
        // (and if) a request is forwarded.
        return Ok(None);
    }
    let limits = &policy.proxy.limits;
    let deny = |e| match e {
        DialError::Denied { host } => ProxyError::DestinationAddressDenied { host },
        DialError::Resolve { .. } => ProxyError::UpstreamUnreachable,
    };
    // Through an `upstream_proxy` the proxy resolves the name; the deny CIDRs are checked
    // as far as this host can tell (`via_upstream_proxy`).
    let proxied = policy
        .proxy
        .upstream_proxy
        .as_ref()
        .is_some_and(|p| p.covers(&host));
    // The look-up is bounded like a dial: a name server that drops queries would otherwise
    // hold the CONNECT for the system resolver's whole retry cycle.
    let addrs = if proxied {
        tokio::time::timeout(
            limits.upstream_connect_timeout,
            crate::upstream::via_upstream_proxy(&policy, &host, port),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?
        .map_err(deny)?;
        Vec::new()
    } else {
        tokio::time::timeout(
            limits.upstream_connect_timeout,
            resolve_checked(&policy, &host, port),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?
        .map_err(deny)?
    };
    if !policy.is_passthrough(&host, port) {
        return Ok(None);
    }
    let tcp = if proxied {
        crate::upstream::dial_tcp(
            &policy,
            &rt.sources,
            &host,
            port,
            limits.upstream_connect_timeout,
        )
        .await
        .map_err(|e| {
            debug!(error = %e, "passthrough dial through the upstream proxy failed");
            ProxyError::UpstreamUnreachable
        })?
    } else {
        tokio::time::timeout(
            limits.upstream_connect_timeout,
            TcpStream::connect(&addrs[..]),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?
        .map_err(|e| {
            debug!(error = %e, "passthrough dial failed");
            ProxyError::UpstreamUnreachable
        })?
    };
    let _ = tcp.set_nodelay(true);
    Ok(Some(tcp))
}

/// Runs an intercepted tunnel bound to `host:port`. Its requests are audited one by one;
/// `rec` (the CONNECT's record) is written only when the tunnel fails before its first
/// request could be read — the client sent nothing, or its TLS handshake with the proxy's
/// leaf failed (typically: the sandbox does not trust the proxy's CA; REFERENCE.md §5 c1),
/// or it spoke neither TLS nor HTTP, or no request reached the pipeline (see
/// [`serve_tunnel`]) — with `outcome` `client_cancel` and the `error` `client_silent`,
/// `client_tls_handshake_failed`, `client_tls_handshake_timeout`, `tunnel_not_tls_or_http`,
/// `no_request`, `request_head_too_large` or `request_head_invalid`.
async fn intercept<T>(
    rt: Arc<Runtime>,
    mut io: T,
    outer: Arc<Conn>,
    host: String,
    port: u16,
    mut rec: AuditRecord,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = rt.policy().proxy.limits.clone();
    // The record keeps scheme `tunnel` until the first byte tells what the tunnel carries.
    let ended = |mut rec: AuditRecord, outcome: &'static str, code: &'static str| {
        rec.status = 200;
        rec.outcome = outcome;
        rec.error = Some(code);
        rec.stop_clock();
        rt.emit(rec);
    };
    let failed = |rec, code| ended(rec, "client_cancel", code);
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.client_header_timeout, io.read(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return failed(rec, "client_silent"),
    }
    let io = Prefixed::new(first.to_vec(), io);
    if first[0] == 0x16 {
        rec.scheme = "https";
        let handshakes = &rt.metrics.tls_handshakes;
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let start = match tokio::time::timeout(limits.tls_handshake_timeout, acceptor).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                Metrics::count(handshakes, "error");
                debug!(error = %e, "client hello failed");
                return failed(rec, "client_tls_handshake_failed");
            }
            Err(_) => {
                Metrics::count(handshakes, "timeout");
                debug!("client hello timed out");
                return failed(rec, "client_tls_handshake_timeout");
            }
        };
        let sni = start.client_hello().server_name().and_then(normalize_host);
        let config = match rt.leaves.server_config_traced(&host) {
            Ok((c, hit)) => {
                Metrics::count(&rt.metrics.leaf_cache, if hit { "hit" } else { "miss" });
                c
            }
            Err(e) => {
                Metrics::count(handshakes, "error");
                warn!(client = %outer.client, host = %host, error = %pipeline::ErrorChain(&e), "failed to mint leaf certificate");
                return ended(rec, "refused", "leaf_certificate_failed");
            }
        };
        let tls = match tokio::time::timeout(
            limits.tls_handshake_timeout,
            start.into_stream(config),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                Metrics::count(handshakes, "error");
                // Most often the client does not trust the proxy's CA: worth a warning
                // (and the audit line), since that client's requests never arrive.
                warn!(client = %outer.client, host = %host, error = %e, "client TLS handshake with the proxy's leaf failed");
                return failed(rec, "client_tls_handshake_failed");
            }
            Err(_) => {
                Metrics::count(handshakes, "timeout");
                debug!("client tls handshake timed out");
                return failed(rec, "client_tls_handshake_timeout");
            }
        };
        Metrics::count(handshakes, "ok");
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let conn = outer.tunnel(Dest::new(host, port, true, sni));
        let served = if h2 {
            serve_tunnel_h2(rt.clone(), tls, conn).await
        } else {
            serve_tunnel(rt.clone(), tls, conn).await
        };
        if let Some(code) = served {
            failed(rec, code);
        }
    } else if first[0].is_ascii_alphabetic() {
        // CONNECT checked the host as TLS; cleartext HTTP in the tunnel is classed as such.
        rec.scheme = "http";
        rec.host_class = rt.policy().host_class(&host, port, false);
        let conn = outer.tunnel(Dest::new(host, port, false, None));
        if let Some(code) = serve_tunnel(rt.clone(), io, conn).await {
            failed(rec, code);
        }
    } else {
        debug!("tunnel carries neither TLS nor HTTP; closing");
        failed(rec, "tunnel_not_tls_or_http");
    }
}

/// Serves the requests of an intercepted tunnel until it closes. Each request writes its
/// own audit line; when none reached the pipeline, returns the error code for the tunnel's
/// CONNECT line: `client_silent` (no request head within `client_header_timeout`),
/// `request_head_too_large` / `request_head_invalid` (hyper answered 431 / 400), or
/// `no_request` (the client closed without asking anything, e.g. a pinning client after
/// the handshake).
async fn serve_tunnel<T>(rt: Arc<Runtime>, io: T, conn: Conn) -> Option<&'static str>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = rt.policy().proxy.limits.clone();
    let shutdown = conn.shutdown.clone();
    let conn = Arc::new(conn);
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = asked.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let rt = rt.clone();
        let conn = conn.clone();
        seen.store(true, std::sync::atomic::Ordering::Relaxed);
        async move { Ok::<_, Infallible>(pipeline::handle(rt, conn, req).await) }
    });
    let served = http1_builder(&limits)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let ended = graceful(served, shutdown).await;
    if let Err(e) = &ended {
        debug!(error = %e, "tunnel connection ended with an error");
    }
    if asked.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    Some(match ended {
        Err(e) if e.is_timeout() => "client_silent",
        Err(e) if e.is_parse_too_large() => "request_head_too_large",
        Err(e) if e.is_parse() => "request_head_invalid",
        _ => "no_request",
    })
}

/// [`serve_tunnel`] for a client that chose HTTP/2 (ALPN `h2`, RFC 9113) in the
/// intercepted TLS: each stream is a request through the pipeline, as on HTTP/1.1. The
/// connection ends (GOAWAY, its open streams finish) when no request came within
/// `client_header_timeout` of the start, or none in an `idle_timeout`, or at the drain.
/// Returns `client_silent` or `no_request` when no request reached the pipeline.
async fn serve_tunnel_h2<T>(rt: Arc<Runtime>, io: T, conn: Conn) -> Option<&'static str>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    let limits = rt.policy().proxy.limits.clone();
    let shutdown = conn.shutdown.clone();
    let conn = Arc::new(conn);
    let asked = Arc::new(AtomicU64::new(0));
    let seen = asked.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let rt = rt.clone();
        let conn = conn.clone();
        seen.fetch_add(1, Ordering::Relaxed);
        async move { Ok::<_, Infallible>(pipeline::handle(rt, conn, req).await) }
    });
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(128);
    let served = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(served);
    // Whether requests keep coming: checked every `idle_timeout` (the first time after
    // `client_header_timeout`); none since the last look ends the connection gracefully.
    let idle = {
        let asked = asked.clone();
        async move {
            tokio::time::sleep(limits.client_header_timeout).await;
            let mut last = 0;
            loop {
                let now = asked.load(Ordering::Relaxed);
                if now == last {
                    return;
                }
                last = now;
                tokio::time::sleep(limits.idle_timeout).await;
            }
        }
    };
    let mut silent = false;
    let ended = tokio::select! {
        r = served.as_mut() => Some(r),
        () = reached(shutdown.clone(), Phase::Draining) => None,
        () = idle => {
            silent = true;
            None
        }
    };
    let ended = match ended {
        Some(r) => r,
        None => {
            served.as_mut().graceful_shutdown();
            tokio::select! {
                r = served.as_mut() => r,
                () = reached(shutdown, Phase::Closing) => Ok(()),
            }
        }
    };
    if let Err(e) = &ended {
        debug!(error = %e, "HTTP/2 tunnel connection ended with an error");
    }
    if asked.load(Ordering::Relaxed) > 0 {
        return None;
    }
    Some(if silent {
        "client_silent"
    } else {
        "no_request"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello from rustls for `name`, as the bytes a client sends.
    fn rustls_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            rustls_pki_types::ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// A ClientHello record whose extensions are `exts` (type, data).
    fn hello_with(exts: &[(u16, &[u8])]) -> Vec<u8> {
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend_from_slice(&t.to_be_bytes());
            e.extend_from_slice(&u16::try_from(d.len()).unwrap().to_be_bytes());
            e.extend_from_slice(d);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&u16::try_from(e.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&e);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_ech_extension_is_found_in_a_client_hello() {
        let real = rustls_hello("pass.test");
        assert_eq!(hello_has_extension(&real, 0), Some(true), "server_name");
        assert_eq!(
            hello_has_extension(&real, EXT_ENCRYPTED_CLIENT_HELLO),
            Some(false)
        );
        let ech = hello_with(&[(0, b"\0\0"), (EXT_ENCRYPTED_CLIENT_HELLO, b"\0\x01\x02")]);
        assert_eq!(
            hello_has_extension(&ech, EXT_ENCRYPTED_CLIENT_HELLO),
            Some(true)
        );
        // The same hello split over two records.
        let (hdr, hs) = ech.split_at(5);
        let (a, b) = hs.split_at(20);
        let mut split = vec![22, 3, 1, 0, 20];
        split.extend_from_slice(a);
        split.extend_from_slice(&[22, 3, 1]);
        split.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
        split.extend_from_slice(b);
        assert_eq!(hdr[0], 22);
        assert_eq!(
            hello_has_extension(&split, EXT_ENCRYPTED_CLIENT_HELLO),
            Some(true)
        );
        assert_eq!(hello_has_extension(&ech[..ech.len() - 3], 0), None);
        assert_eq!(hello_has_extension(b"GET / HTTP/1.1\r\n", 0), None);
    }
}
