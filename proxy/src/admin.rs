//! The admin API, on `[proxy] admin_listen` (default [`DEFAULT_ADMIN_LISTEN`]; loopback
//! unless `admin_token` is set, then every request needs `Authorization: Bearer <token>`,
//! compared in constant time):
//!
//! - `GET /healthz`: the process is up.
//! - `GET /readyz`: 200 when the policy and CA are loaded, the proxy listener is bound and
//!   every required secret's sources resolve; else 503 with the reasons.
//! - `GET /metrics`: Prometheus metrics (OpenMetrics text).
//! - `GET /v1/secrets`, `GET /v1/secrets/{name}`: type, placeholder, hosts, source kinds
//!   and reference names, state (`ok | missing | failed | disabled`) with reason, usage counters, token
//!   expiry — never a value.
//! - `GET /v1/callers`: each `[[callers]]` entry's name, granted secrets (`["*"]` for
//!   all), token source kind and reference name, and token state (`ok | missing | failed`)
//!   with reason — never the token.
//! - `POST /v1/reload`: 200 with a summary, or 422 with `FILE:LINE:COL` errors (the running
//!   policy stays).
//! - `POST /v1/secrets/{name}/probe`: connect, TLS and `HEAD /` to each of the secret's
//!   exact hosts through the upstream client; any HTTP answer (401/403 included) is
//!   reachable.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use iron_broker::SecretValue;
use iron_policy::{PortSpec, Secret, SecretKind};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::Runtime;
use crate::body::{ProxyBody, full};

/// Where `serve` puts the admin API when the policy sets no `admin_listen`, and where
/// `iron-proxy reload` looks without `--policy`/`--admin`: `127.0.0.1:9092`.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9092);

/// Binds `addr` and serves the admin API in a background task.
///
/// # Errors
/// The bind error.
pub async fn start(
    rt: Arc<Runtime>,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let rt = rt.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let rt = rt.clone();
                    async move { Ok::<_, Infallible>(route(&rt, req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok((local, task))
}

fn reply(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(full(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    reply(status, &json!({"error": code, "message": message}))
}

async fn route(rt: &Arc<Runtime>, req: Request<Incoming>) -> Response<ProxyBody> {
    let policy = rt.policy();
    if let Some(src) = &policy.proxy.admin_token {
        let expected = match rt.sources.resolve(src) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "admin_token source unavailable; refusing admin requests");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "admin_token_unavailable",
                    "the admin token source cannot be read",
                );
            }
        };
        let given = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 9110 §11.1).
                let v = v.as_bytes();
                (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
            })
            .unwrap_or_default();
        if !iron_broker::ct_eq(given, expected.expose()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong admin bearer token",
            );
        }
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["healthz"]) => reply(StatusCode::OK, &json!({"status": "ok"})),
        (Method::GET, ["readyz"]) => readyz(rt),
        (Method::GET, ["metrics"]) => metrics(rt),
        (Method::GET, ["v1", "secrets"]) => {
            let list: Vec<Value> = policy.secrets.iter().map(|s| secret_view(rt, s)).collect();
            reply(StatusCode::OK, &json!({"secrets": list}))
        }
        (Method::GET, ["v1", "callers"]) => {
            let list: Vec<Value> = policy
                .callers
                .iter()
                .map(|c| caller_view(rt, &policy, c))
                .collect();
            reply(StatusCode::OK, &json!({"callers": list}))
        }
        (Method::GET, ["v1", "secrets", name]) => match policy.secret(name) {
            Some(s) => reply(StatusCode::OK, &secret_view(rt, s)),
            None => error(
                StatusCode::NOT_FOUND,
                "unknown_secret",
                "no secret by that name",
            ),
        },
        (Method::POST, ["v1", "reload"]) => match rt.reload().await {
            Ok(summary) => reply(
                StatusCode::OK,
                &json!({"status": "reloaded", "summary": summary}),
            ),
            Err(diags) => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({
                    "error": "invalid_policy",
                    "message": "the new policy is invalid; the running policy stays",
                    "errors": diags.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
            ),
        },
        (Method::POST, ["v1", "secrets", name, "probe"]) => match policy.secret(name) {
            Some(s) => reply(StatusCode::OK, &probe(rt, s).await),
            None => error(
                StatusCode::NOT_FOUND,
                "unknown_secret",
                "no secret by that name",
            ),
        },
        (
            _,
            ["healthz" | "readyz" | "metrics"]
            | ["v1", "secrets" | "reload" | "callers"]
            | ["v1", "secrets", _]
            | ["v1", "secrets", _, "probe"],
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

/// The state of a secret's sources: (`ok` | `missing` | `failed`, reason).
fn source_state(rt: &Runtime, s: &Secret) -> (&'static str, Option<String>) {
    if !s.enabled {
        return ("disabled", Some("enabled = false in the policy".into()));
    }
    for (field, src) in s.sources() {
        if let Err(e) = rt.sources.resolve(src) {
            let state = if e.is_missing() { "missing" } else { "failed" };
            let reason = if field == "source" {
                e.to_string()
            } else {
                format!("field {field}: {e}")
            };
            return (state, Some(reason));
        }
    }
    if let Some(failed) = rt.tokens.status(&s.name).and_then(|t| t.failed) {
        return ("failed", Some(failed));
    }
    ("ok", None)
}

/// One caller as `GET /v1/callers` shows it: never its token.
fn caller_view(rt: &Runtime, policy: &iron_policy::Policy, c: &iron_policy::Caller) -> Value {
    let (state, reason) = match rt.sources.resolve(&c.token) {
        Ok(_) => ("ok", None),
        Err(e) if e.is_missing() => ("missing", Some(e.to_string())),
        Err(e) => ("failed", Some(e.to_string())),
    };
    let secrets: Vec<&str> = match &c.grants {
        iron_policy::Grants::All => vec!["*"],
        grants => policy
            .secrets
            .iter()
            .enumerate()
            .filter(|&(i, _)| grants.allows(i))
            .map(|(_, s)| s.name.as_str())
            .collect(),
    };
    json!({
        "name": c.name,
        "secrets": secrets,
        "token": {
            "kind": c.token.kind_name(),
            "ref": c.token.reference(),
            "json_key": c.token.json_key,
            "state": state,
            "reason": reason,
        },
    })
}

fn readyz(rt: &Runtime) -> Response<ProxyBody> {
    let mut reasons = Vec::new();
    if !rt.listening.load(std::sync::atomic::Ordering::Relaxed) {
        reasons.push("proxy listener is not bound (starting or shutting down)".to_string());
    }
    for s in rt
        .policy()
        .secrets
        .iter()
        .filter(|s| !s.optional && s.enabled)
    {
        if let (state @ ("missing" | "failed"), reason) = source_state(rt, s) {
            reasons.push(format!(
                "secret {} is {state}: {}",
                s.name,
                reason.unwrap_or_default()
            ));
        }
    }
    let policy = rt.policy();
    for c in &policy.callers {
        if let Err(e) = rt.sources.resolve(&c.token) {
            reasons.push(format!(
                "caller {}'s token is unavailable ({e}): its requests get 503",
                c.name
            ));
        }
    }
    if let Ok(names) = rt.pg_not_started.lock() {
        for n in names.iter() {
            reasons.push(format!(
                "postgres relay of secret {n} was not started (its DSN was absent at start): restart once it is set"
            ));
        }
    }
    if reasons.is_empty() {
        reply(StatusCode::OK, &json!({"ready": true}))
    } else {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reasons": reasons}),
        )
    }
}

fn metrics(rt: &Runtime) -> Response<ProxyBody> {
    for s in rt
        .policy()
        .secrets
        .iter()
        .filter(|s| !matches!(s.kind, SecretKind::Static(_)))
    {
        if let Some(expires) = rt.tokens.status(&s.name).and_then(|t| t.expires_in) {
            rt.metrics
                .token_expiry_seconds
                .get_or_create(&crate::metrics::SecretLabel {
                    secret: s.name.clone(),
                })
                .set(expires.as_secs_f64());
        }
    }
    let mut r = Response::new(full(Bytes::from(rt.metrics.encode())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

/// The public view of a secret: everything but its value.
pub fn secret_view(rt: &Runtime, s: &Secret) -> Value {
    let (state, reason) = source_state(rt, s);
    let usage = rt.stats(&s.name).usage();
    let token = rt.tokens.status(&s.name);
    json!({
        "name": s.name,
        "type": s.type_name(),
        "placeholder": s.placeholder,
        "hosts": s.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "capabilities": s.capabilities.iter().map(|c| json!({
            "name": c.name,
            "method": c.method.as_deref().unwrap_or("*"),
            "path": c.path.as_str(),
        })).collect::<Vec<_>>(),
        "rate_limit": s.rate_limit.map(|r| json!({
            "requests_per_minute": r.per_minute.get(),
            "burst": r.burst.get(),
        })),
        "optional": s.optional,
        "on_failure": if s.fail_open { "open" } else { "closed" },
        "file": s.file.display().to_string(),
        "sources": s.sources().iter().map(|(field, src)| json!({
            "field": field,
            "kind": src.kind_name(),
            "ref": src.reference(),
            "json_key": src.json_key,
        })).collect::<Vec<_>>(),
        "state": state,
        "reason": reason,
        "invocations": usage.invocations,
        "errors": usage.errors,
        "rate_limited": usage.rate_limited,
        "last_error": usage.last_error,
        "last_used": crate::rfc3339(usage.last_used),
        "token_expires_in_secs": token.as_ref().and_then(|t| t.expires_in).map(|d| d.as_secs()),
        "token_last_error": token.and_then(|t| t.last_error),
    })
}

async fn probe(rt: &Runtime, s: &Secret) -> Value {
    let active = rt.active();
    let mut results = Vec::new();
    for pattern in &s.hosts {
        let text = pattern.to_string();
        let host = text.split(':').next().unwrap_or_default().to_string();
        let host = if text.starts_with('[') {
            text.split(']')
                .next()
                .unwrap_or_default()
                .trim_start_matches('[')
                .to_string()
        } else {
            host
        };
        if host.starts_with("*.") {
            results.push(
                json!({"host": text, "skipped": "wildcard pattern: no single host to probe"}),
            );
            continue;
        }
        let port = match pattern.port() {
            PortSpec::Port(p) => p,
            PortSpec::Default | PortSpec::Any => 443,
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let req = Request::head(format!("https://{authority}/"))
            .body(full(Bytes::new()))
            .unwrap_or_default();
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), active.client().request(req)).await;
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        results.push(match r {
            Ok(Ok(resp)) => json!({"host": authority, "reachable": true, "status": resp.status().as_u16(), "latency_ms": ms}),
            Ok(Err(e)) => json!({"host": authority, "reachable": false, "error": crate::upstream::classify(&e).code(), "latency_ms": ms}),
            Err(_) => json!({"host": authority, "reachable": false, "error": "upstream_timeout", "latency_ms": ms}),
        });
    }
    json!({"secret": s.name, "results": results})
}

/// Reads the admin bearer token a CLI should send: `IRON_PROXY_ADMIN_TOKEN`.
pub fn client_token() -> Option<SecretValue> {
    std::env::var_os("IRON_PROXY_ADMIN_TOKEN").map(|v| SecretValue::new(v.into_encoded_bytes()))
}

/// A minimal admin API client for the CLI: sends `method path` to `addr` (plain HTTP) with
/// the bearer token from [`client_token`], returns status and body.
///
/// # Errors
/// Connection or HTTP errors, as text.
pub async fn call(addr: SocketAddr, method: Method, path: &str) -> Result<(u16, String), String> {
    call_with(addr, method, path, true).await
}

/// As [`call`]; the bearer token is sent only when `send_token` (the address was named by
/// the operator, not the built-in default).
///
/// # Errors
/// As [`call`].
pub async fn call_with(
    addr: SocketAddr,
    method: Method,
    path: &str,
    send_token: bool,
) -> Result<(u16, String), String> {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot reach the admin API at {addr}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    if let Some(t) = client_token().filter(|_| send_token) {
        let mut v = http::HeaderValue::from_bytes(&[b"Bearer ", t.expose()].concat())
            .map_err(|_| "invalid admin token".to_string())?;
        v.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, v);
    }
    let req = req
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
