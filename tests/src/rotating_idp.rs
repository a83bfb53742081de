//! A fake OAuth2 identity provider over TLS on loopback that rotates refresh tokens with reuse
//! detection, the way Okta, Auth0 and Entra ID do: every successful `refresh_token` grant
//! consumes the presented refresh token and issues a new one in the same *family*; presenting
//! an already-consumed refresh token is treated as theft and revokes the whole family (every
//! refresh and access token descended from the same consent). Used by end-to-end tests of a
//! refresh-token broker. Switches make it answer slowly or fail with 503.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use iron_certs::{CertificateAuthority, LeafCache};
use serde_json::json;
use tokio::net::TcpListener;

/// Expected client id.
pub const CLIENT_ID: &str = "broker-client";
/// Expected client secret.
pub const CLIENT_SECRET: &str = "cs_REALbrokerCLIENT_7";
/// The first refresh token of family 0, accepted from the start.
pub const SEED_REFRESH: &str = "rt_REALseed_0";

/// `expires_in` used when [`RotState::lifetime_secs`] is 0.
const DEFAULT_LIFETIME: u64 = 3600;
/// Slack allowed past an access token's expiry by [`RotatingIdp::is_valid_access`].
const GRACE: Duration = Duration::from_secs(2);

/// Token bookkeeping, behind one mutex (never held across an await).
#[derive(Debug, Default)]
struct Tokens {
    /// Refresh token -> (family id, already used).
    refresh: HashMap<String, (u64, bool)>,
    /// Family id -> revoked.
    families: HashMap<u64, bool>,
    /// Access token -> (family id, expiry).
    access: HashMap<String, (u64, Instant)>,
}

/// Switches and counters shared with the test.
#[derive(Debug, Default)]
pub struct RotState {
    /// `expires_in` of issued access tokens, in seconds; 0 means 3600.
    pub lifetime_secs: AtomicU64,
    /// Delay before answering a token request, in ms.
    pub delay_ms: AtomicU64,
    /// Answer this many next token requests with an empty 503 (state is left untouched).
    pub fail_next: AtomicU32,
    /// When not 0, those 503 answers carry `Retry-After: <this many seconds>`.
    pub retry_after_secs: AtomicU64,
    /// Rotate the refresh token on this many next valid requests but answer `200` with a
    /// body that is not a token response (a lost or garbled answer).
    pub malformed_next: AtomicU32,
    /// Rotate the refresh token on this many next valid requests and answer `200` with the
    /// new refresh token but an empty `access_token`.
    pub empty_access_next: AtomicU32,
    /// Rotate the refresh token on this many next valid requests but answer `502` (a
    /// gateway whose backend committed the rotation and then failed).
    pub bad_gateway_next: AtomicU32,
    /// The `502` answers of `bad_gateway_next` carry a 2 MiB HTML page (over the broker's
    /// 1 MiB limit on token responses) instead of no body.
    pub bad_gateway_big_body: std::sync::atomic::AtomicBool,
    /// The status of `bad_gateway_next`'s answers when not 0 (Cloudflare's 520 or 524, say),
    /// else `502`.
    pub bad_gateway_status: std::sync::atomic::AtomicU16,
    /// Answer this many next token requests with `403` and an HTML page, no OAuth error
    /// code (a WAF in front of the IdP); the token state is left untouched.
    pub forbidden_next: AtomicU32,
    /// Rotate on the next valid request, then hold the answer this many ms (longer than
    /// the caller's timeout: the answer is lost after the rotation happened). One-shot.
    pub stall_after_rotate_ms: AtomicU64,
    /// Successful refresh grants.
    pub refreshes: AtomicU64,
    /// All token requests received.
    pub requests: AtomicU64,
    /// Times an already-used refresh token was presented.
    pub reuse_events: AtomicU64,
    /// Token families revoked.
    pub revoked_families: AtomicU64,
    /// Requests with wrong or missing client authentication.
    pub bad_client: AtomicU64,
    tokens: Mutex<Tokens>,
    counter: AtomicU64,
}

/// A running rotating IdP. Shuts down on drop.
pub struct RotatingIdp {
    /// Its address (127.0.0.1).
    pub addr: SocketAddr,
    /// Its CA (PEM).
    pub ca_pem: String,
    /// Switches, counters and token state.
    pub state: Arc<RotState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RotatingIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RotatingIdp {
    /// Starts the IdP on `127.0.0.1:0`, serving TLS with a leaf for 127.0.0.1 from a fresh CA.
    /// [`SEED_REFRESH`] is valid from the start (family 0).
    pub async fn start() -> Self {
        let (ca, _) = CertificateAuthority::generate("rotating idp CA").expect("ca");
        let ca_pem = ca.cert_pem().to_string();
        let leaves = Arc::new(
            LeafCache::new(
                Arc::new(ca),
                iron_proxy::crypto_provider(),
                8,
                vec![b"http/1.1".to_vec()],
            )
            .expect("leaves"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(RotState::default());
        {
            let mut t = state.tokens.lock().expect("lock");
            t.refresh.insert(SEED_REFRESH.to_string(), (0, false));
            t.families.insert(0, false);
        }
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (st, leaves) = (st.clone(), leaves.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    );
                    let Ok(start) = acceptor.await else { return };
                    // Clients connecting to an IP send no SNI: use the loopback address.
                    let name = start
                        .client_hello()
                        .server_name()
                        .unwrap_or("127.0.0.1")
                        .to_string();
                    let Ok(config) = leaves.server_config(&name) else {
                        return;
                    };
                    let Ok(tls) = start.into_stream(config).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_pem,
            state,
            task,
        }
    }

    /// The token endpoint, `https://127.0.0.1:PORT/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("https://127.0.0.1:{}/oauth/token", self.addr.port())
    }

    /// A fresh valid refresh token in a new family (a human re-consented).
    pub fn new_family(&self) -> String {
        let n = self.state.counter.fetch_add(1, Ordering::SeqCst);
        let mut t = self.state.tokens.lock().expect("lock");
        let family = t.families.len() as u64; // ids are 0..len
        t.families.insert(family, false);
        let token = format!("rt_REALrot_{family}_{n}");
        t.refresh.insert(token.clone(), (family, false));
        token
    }

    /// True when `token` is an access token issued by this IdP whose family is not revoked
    /// and which has not expired (allowing a 2 s grace).
    pub fn is_valid_access(&self, token: &str) -> bool {
        let t = self.state.tokens.lock().expect("lock");
        t.access.get(token).is_some_and(|&(family, expires)| {
            !t.families.get(&family).copied().unwrap_or(true) && Instant::now() <= expires + GRACE
        })
    }
}

fn reply(status: StatusCode, v: Option<serde_json::Value>) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(status);
    if v.is_some() {
        r = r
            .header("content-type", "application/json")
            .header("cache-control", "no-store");
    }
    let body = v.map_or_else(Bytes::new, |v| v.to_string().into());
    r.body(Full::new(body)).expect("response")
}

fn html(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/html")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

fn invalid_grant(description: &str) -> Response<Full<Bytes>> {
    let v = json!({"error": "invalid_grant", "error_description": description});
    reply(StatusCode::BAD_REQUEST, Some(v))
}

/// Decodes one `application/x-www-form-urlencoded` component: `+` is a space, `%XX` a byte
/// (a malformed escape is kept literally).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        match (b[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(h)) => {
                let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push((digit(h[0]) << 4) | digit(h[1]));
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

async fn handle(st: &RotState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/oauth/token" || req.method() != http::Method::POST {
        return reply(StatusCode::NOT_FOUND, Some(json!({"error": "not_found"})));
    }
    st.requests.fetch_add(1, Ordering::SeqCst);
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if st
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let mut r = reply(StatusCode::SERVICE_UNAVAILABLE, None);
        let wait = st.retry_after_secs.load(Ordering::SeqCst);
        if wait > 0 {
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, wait.into());
        }
        return r;
    }
    if st
        .forbidden_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return html(
            StatusCode::FORBIDDEN,
            b"<html>request blocked</html>".to_vec(),
        );
    }
    // RFC 6749 §2.3.1: id and secret are form-encoded, joined by ':', then base64-encoded.
    let basic = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b.trim()).ok()
        })
        .map(|d| String::from_utf8_lossy(&d).into_owned());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let f = form(&body);
    let (id, secret) = match &basic {
        Some(b) => b
            .split_once(':')
            .map(|(i, s)| (decode(i), decode(s)))
            .unwrap_or_default(),
        None => (
            f.get("client_id").cloned().unwrap_or_default(),
            f.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    if id != CLIENT_ID || secret != CLIENT_SECRET {
        st.bad_client.fetch_add(1, Ordering::SeqCst);
        return reply(
            StatusCode::UNAUTHORIZED,
            Some(json!({"error": "invalid_client"})),
        );
    }
    if f.get("grant_type").map(String::as_str) != Some("refresh_token") {
        let v = json!({"error": "unsupported_grant_type"});
        return reply(StatusCode::BAD_REQUEST, Some(v));
    }
    let presented = f.get("refresh_token").cloned().unwrap_or_default();
    let lifetime = Some(st.lifetime_secs.load(Ordering::SeqCst))
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_LIFETIME);
    let (access, refresh) = {
        let mut t = st.tokens.lock().expect("lock");
        let Some(&(family, used)) = t.refresh.get(&presented) else {
            return invalid_grant("unknown refresh token");
        };
        if t.families.get(&family).copied().unwrap_or(false) {
            return invalid_grant("token family revoked");
        }
        if used {
            st.reuse_events.fetch_add(1, Ordering::SeqCst);
            // The family was checked above as not revoked; revoking it also invalidates its
            // access tokens (`is_valid_access` consults the family).
            t.families.insert(family, true);
            st.revoked_families.fetch_add(1, Ordering::SeqCst);
            return invalid_grant("refresh token reuse detected");
        }
        t.refresh.insert(presented, (family, true));
        let n = st.counter.fetch_add(1, Ordering::SeqCst);
        let refresh = format!("rt_REALrot_{family}_{n}");
        let access = format!("at_REAL_{family}_{n}");
        t.refresh.insert(refresh.clone(), (family, false));
        let expires = Instant::now() + Duration::from_secs(lifetime);
        t.access.insert(access.clone(), (family, expires));
        (access, refresh)
    };
    st.refreshes.fetch_add(1, Ordering::SeqCst);
    let stall = st.stall_after_rotate_ms.swap(0, Ordering::SeqCst);
    if stall > 0 {
        tokio::time::sleep(Duration::from_millis(stall)).await;
    }
    if st
        .bad_gateway_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        if st.bad_gateway_big_body.load(Ordering::SeqCst) {
            return html(StatusCode::BAD_GATEWAY, vec![b'x'; 2 << 20]);
        }
        let status = StatusCode::from_u16(st.bad_gateway_status.load(Ordering::SeqCst))
            .unwrap_or(StatusCode::BAD_GATEWAY);
        return reply(status, None);
    }
    if st
        .malformed_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return html(
            StatusCode::OK,
            b"<html>upstream proxy error</html>".to_vec(),
        );
    }
    let empty_access = st
        .empty_access_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let mut v = json!({
        "access_token": if empty_access { String::new() } else { access },
        "token_type": "Bearer",
        "expires_in": lifetime,
        "refresh_token": refresh,
    });
    if let Some(scope) = f.get("scope") {
        v["scope"] = scope.clone().into();
    }
    reply(StatusCode::OK, Some(v))
}
