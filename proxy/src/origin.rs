//! A local recording origin: an HTTP/1.1 server on `127.0.0.1:0`, with TLS from its own CA
//! (not the proxy's) or in cleartext, that records every request it receives. `demo` uses
//! it, and so do the end-to-end tests, as the "real API" behind the proxy.
//!
//! Routes: `/sse` streams `text/event-stream` events, each released by
//! [`Origin::release_event`]; `/download/N` streams N bytes; an `Upgrade` request is
//! answered 101 and echoed; `/git/…` runs `git http-backend` on [`OriginOptions::git_root`]
//! behind a Basic-auth challenge; anything else drains the body (counting, never buffering)
//! and answers `{"ok":true,"bytes":N}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use iron_certs::{CertificateAuthority, LeafCache};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body::{BoxError, ProxyBody, full};

/// One request as the origin received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Raw path and query, as received.
    pub target: String,
    /// Headers, lowercase names.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body length in bytes.
    pub body_len: u64,
    /// SNI of the connection, if TLS.
    pub sni: Option<String>,
    /// The HTTP version it came in.
    pub version: http::Version,
}

impl Recorded {
    /// The first value of header `name` (lowercase), lossily as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// How to run an origin.
#[derive(Debug, Clone, Default)]
pub struct OriginOptions {
    /// Serve cleartext HTTP instead of TLS.
    pub plain: bool,
    /// Bare git repositories served under `/git/` by `git http-backend`.
    pub git_root: Option<PathBuf>,
    /// Present one self-signed certificate for these names (marked CA:TRUE, as
    /// `openssl req -x509` makes them) instead of leaves from a CA; `ca_pem` is then that
    /// certificate.
    pub self_signed: Option<Vec<String>>,
    /// Offer HTTP/2 (ALPN `h2` before `http/1.1`) and serve it to clients that take it.
    pub http2: bool,
}

/// A server configuration presenting one self-signed certificate (CA:TRUE) for `names`;
/// returns it with the certificate's PEM.
fn self_signed_config(names: &[String]) -> Result<(Arc<rustls::ServerConfig>, String), String> {
    let err = |e: rcgen::Error| e.to_string();
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(crate::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), cert.pem()))
}

/// A running origin. Shuts down when dropped.
pub struct Origin {
    /// Its address.
    pub addr: SocketAddr,
    /// Its CA certificate (PEM): what a client must trust to reach it.
    pub ca_pem: String,
    records: Arc<Mutex<Vec<Recorded>>>,
    upgraded: Arc<Mutex<Vec<u8>>>,
    events: Arc<Semaphore>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    records: Arc<Mutex<Vec<Recorded>>>,
    upgraded: Arc<Mutex<Vec<u8>>>,
    events: Arc<Semaphore>,
    git_root: Option<PathBuf>,
}

impl Origin {
    /// Starts an origin on `127.0.0.1:0`. With TLS it presents, for whatever SNI it is
    /// asked (or `127.0.0.1` without SNI), a leaf from a fresh CA of its own, or the one
    /// self-signed certificate of [`OriginOptions::self_signed`].
    ///
    /// # Errors
    /// Bind or certificate errors, as text.
    pub async fn start(opts: OriginOptions) -> Result<Self, String> {
        let (ca, _) = CertificateAuthority::generate("iron-proxy test origin CA")
            .map_err(|e| e.to_string())?;
        let fixed = opts
            .self_signed
            .as_deref()
            .map(self_signed_config)
            .transpose()?;
        let ca_pem = fixed
            .as_ref()
            .map_or_else(|| ca.cert_pem().to_string(), |(_, pem)| pem.clone());
        let fixed = fixed.map(|(config, _)| config);
        let leaves = Arc::new(
            LeafCache::new(
                Arc::new(ca),
                crate::crypto_provider(),
                64,
                if opts.http2 {
                    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
                } else {
                    vec![b"http/1.1".to_vec()]
                },
            )
            .map_err(|e| e.to_string())?,
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(Semaphore::new(0));
        let upgraded = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            records: records.clone(),
            upgraded: upgraded.clone(),
            events: events.clone(),
            git_root: opts.git_root.clone(),
        });
        let plain = opts.plain;
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let shared = shared.clone();
                let leaves = leaves.clone();
                let fixed = fixed.clone();
                tokio::spawn(async move {
                    if plain {
                        serve(shared, TokioIo::new(tcp), None, false).await;
                        return;
                    }
                    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    );
                    let Ok(start) = acceptor.await else { return };
                    let sni = start.client_hello().server_name().map(str::to_string);
                    let name = sni.clone().unwrap_or_else(|| "127.0.0.1".into());
                    let config = match &fixed {
                        Some(config) => config.clone(),
                        None => match leaves.server_config(&name) {
                            Ok(config) => config,
                            Err(_) => return,
                        },
                    };
                    let Ok(tls) = start.into_stream(config).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve(shared, TokioIo::new(tls), sni, h2).await;
                });
            }
        });
        Ok(Self {
            addr,
            ca_pem,
            records,
            upgraded,
            events,
            accepted,
            task,
        })
    }

    /// TCP connections accepted so far (each a new upstream connection of the proxy).
    pub fn connections(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn records(&self) -> Vec<Recorded> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Every byte received on upgraded (WebSocket) connections so far, in arrival order
    /// (each is echoed back as it arrives).
    pub fn upgraded_bytes(&self) -> Vec<u8> {
        self.upgraded.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Lets `/sse` send its next event.
    pub fn release_event(&self) {
        self.events.add_permits(1);
    }
}

/// Serves one connection, over HTTP/2 when `h2` (ALPN chose it), else HTTP/1.1.
async fn serve<I>(shared: Arc<Shared>, io: I, sni: Option<String>, h2: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let sni = sni.clone();
        async move { Ok::<_, Infallible>(route(shared, req, sni).await) }
    });
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades()
            .await;
    }
}

async fn route(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    sni: Option<String>,
) -> Response<ProxyBody> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let mut rec = Recorded {
        method: req.method().to_string(),
        target: target.clone(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body_len: 0,
        sni,
        version: req.version(),
    };
    let path = req.uri().path().to_string();
    if req.headers().contains_key(http::header::UPGRADE) {
        let upgrade = req.headers()[http::header::UPGRADE].clone();
        let on = hyper::upgrade::on(&mut req);
        push(&shared, rec);
        let log = shared.upgraded.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    if let Ok(mut l) = log.lock() {
                        l.extend_from_slice(&buf[..n]);
                    }
                    if io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = io.shutdown().await;
            }
        });
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(http::header::UPGRADE, upgrade);
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        return resp;
    }
    if path.starts_with("/git/") {
        push(&shared, rec);
        return git(&shared, req).await;
    }
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    rec.body_len += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let echoed = rec.headers.clone();
    push(&shared, rec);
    if path.starts_with("/redirect") {
        // A redirect that echoes the request's path and query, as canonical-host and
        // trailing-slash redirects do, with a `Link` to the same target.
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
        for (name, value) in [
            (
                http::header::LOCATION,
                format!("https://www.elsewhere.test{target}"),
            ),
            (http::header::LINK, format!("<{target}>; rel=\"canonical\"")),
        ] {
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, v);
            }
        }
        return resp;
    }
    if path.starts_with("/echo") {
        // A debugging endpoint that reflects the request: its headers and target in the
        // body, sent in 5-byte chunks (so a reflected value spans chunks), the
        // Authorization header in `X-Echo-Authorization` and the status text, with a
        // `Content-Length` unless the target says `chunked`; a `Range` request gets the
        // whole body as a 206.
        let mut text = format!("{target}\n");
        for (n, v) in &echoed {
            text.push_str(&format!("{n}: {}\n", String::from_utf8_lossy(v)));
        }
        let len = text.len();
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = text
            .into_bytes()
            .chunks(5)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed());
        let h = resp.headers_mut();
        if !target.contains("chunked") {
            h.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
        }
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        if echoed.iter().any(|(n, _)| n == "range") {
            h.insert(
                http::header::CONTENT_RANGE,
                http::HeaderValue::from_str(&format!("bytes 0-{}/{len}", len.saturating_sub(1)))
                    .unwrap_or(http::HeaderValue::from_static("*")),
            );
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        if let Some((_, auth)) = echoed.iter().find(|(n, _)| n == "authorization") {
            if let Ok(v) = http::HeaderValue::from_bytes(auth) {
                resp.headers_mut().insert("x-echo-authorization", v);
            }
            let mut reason = b"OK for ".to_vec();
            reason.extend_from_slice(auth);
            if let Ok(r) = hyper::ext::ReasonPhrase::try_from(reason) {
                resp.extensions_mut().insert(r);
            }
        }
        return resp;
    }
    if path == "/grpc" {
        // A gRPC-like answer: a length-prefixed message, then trailers with the status and
        // the request's Authorization echoed (an error detail quoting the credential).
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        if let Some((_, auth)) = echoed.iter().find(|(n, _)| n == "authorization")
            && let Ok(v) = http::HeaderValue::from_bytes(auth)
        {
            trailers.insert("x-echo-authorization", v);
        }
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02ok"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        return resp;
    }
    if path == "/sse" {
        let events = shared.events.clone();
        let stream = futures_util::stream::unfold(0u32, move |n| {
            let events = events.clone();
            async move {
                if n >= 3 {
                    return None;
                }
                if n > 0 {
                    let permit = events.acquire().await.ok()?;
                    permit.forget();
                }
                let frame = Frame::data(Bytes::from(format!("data: event {n}\n\n")));
                Some((Ok::<_, BoxError>(frame), n + 1))
            }
        });
        let mut resp = Response::new(StreamBody::new(stream).boxed());
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        return resp;
    }
    if let Some(n) = path
        .strip_prefix("/download/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        const CHUNK: usize = 64 * 1024;
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let stream = futures_util::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(CHUNK as u64);
                let data = chunk.slice(..usize::try_from(take).unwrap_or(CHUNK));
                Some((Ok::<_, BoxError>(Frame::data(data)), left - take))
            }
        });
        let mut resp = Response::new(StreamBody::new(stream).boxed());
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
        return resp;
    }
    let len = shared
        .records
        .lock()
        .ok()
        .and_then(|r| r.last().map(|r| r.body_len))
        .unwrap_or(0);
    let mut resp = Response::new(full(Bytes::from(format!(
        "{{\"ok\":true,\"bytes\":{len}}}\n"
    ))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn push(shared: &Shared, rec: Recorded) {
    if let Ok(mut r) = shared.records.lock() {
        r.push(rec);
    }
}

/// Runs `git http-backend` as a CGI for `/git/…`, after a Basic-auth challenge.
async fn git(shared: &Shared, req: Request<Incoming>) -> Response<ProxyBody> {
    let status = |s: u16, msg: &'static str| {
        let mut r = Response::new(full(Bytes::from_static(msg.as_bytes())));
        *r.status_mut() = StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r
    };
    let Some(root) = shared.git_root.clone() else {
        return status(404, "no git root\n");
    };
    if !req.headers().contains_key(http::header::AUTHORIZATION) {
        let mut r = status(401, "authentication required\n");
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"git\""),
        );
        return r;
    }
    let path_info = req.uri().path().trim_start_matches("/git").to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().to_string();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let gzip = req
        .headers()
        .get(http::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return status(400, "bad body\n");
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", content_type)
        .env("REMOTE_USER", "git")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if gzip {
        cmd.env("HTTP_CONTENT_ENCODING", "gzip");
    }
    let Ok(mut child) = cmd.spawn() else {
        return status(500, "git http-backend failed to start\n");
    };
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt as _;
        let _ = stdin.write_all(&body).await;
    }
    let Ok(out) = child.wait_with_output().await else {
        return status(500, "git http-backend failed\n");
    };
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((i, sep)) = split else {
        return status(500, "git http-backend gave no headers\n");
    };
    let head = String::from_utf8_lossy(&raw[..i]).into_owned();
    let mut resp = Response::new(full(Bytes::copy_from_slice(&raw[i + sep..])));
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            let code = v
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(500);
            *resp.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}
