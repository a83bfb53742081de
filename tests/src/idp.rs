//! A fake identity provider over TLS on loopback: `POST /token` implementing the
//! client_credentials, refresh_token (with optional rotation and reuse detection), password
//! and JWT-bearer grants (RFC 7523, also Google's service-account flow), verifying
//! assertions with the public key. Switches make it fail with 5xx, answer slowly, or refuse
//! with `invalid_grant`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use iron_certs::{CertificateAuthority, LeafCache};
use tokio::net::TcpListener;

/// Expected client id.
pub const CLIENT_ID: &str = "client-abc";
/// Expected client secret.
pub const CLIENT_SECRET: &str = "cs_REALclientSECRET_991";
/// The first refresh token.
pub const REFRESH_TOKEN: &str = "rt_REALrefreshTOKEN_0";
/// Password-grant user.
pub const USERNAME: &str = "alice";
/// Password-grant password.
pub const PASSWORD: &str = "pw_REALpassword_55";
/// JWT issuer / GCP client email.
pub const ISSUER: &str = "svc@iron-test.iam.gserviceaccount.com";

/// Switches and counters shared with the test.
#[derive(Debug, Default)]
pub struct IdpState {
    /// Token requests received.
    pub calls: AtomicUsize,
    /// Answer this many next requests with 500.
    pub fail_next: AtomicU32,
    /// Answer every request with 400 invalid_grant.
    pub invalid_grant: AtomicBool,
    /// Rotate refresh tokens (and refuse reuse of an old one).
    pub rotate: AtomicBool,
    /// Process this many next requests (rotating the refresh token) and answer them with a
    /// gateway's 504, as a proxy in front of the IdP that gave up waiting would.
    pub gateway_timeout_next: AtomicU32,
    /// Delay before answering, in ms.
    pub delay_ms: AtomicU64,
    /// `expires_in` of issued tokens (0: omit it). Default 3600.
    pub expires_in: AtomicU64,
    /// Access tokens issued, in order.
    pub issued: Mutex<Vec<String>>,
    /// Grant types received, in order.
    pub grants: Mutex<Vec<String>>,
    current_refresh: Mutex<String>,
    counter: AtomicU64,
}

/// A running fake IdP. Shuts down on drop.
pub struct Idp {
    /// Its address.
    pub addr: SocketAddr,
    /// Its CA (PEM).
    pub ca_pem: String,
    /// Switches and counters.
    pub state: Arc<IdpState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    /// Makes `token` the only refresh token the IdP accepts (a human re-consented).
    pub fn set_refresh_token(&self, token: &str) {
        *self.state.current_refresh.lock().expect("lock") = token.to_string();
    }

    /// Starts an IdP that verifies RS256 assertions with `public_pem` and expects
    /// `https://idp.test:PORT/token` (its own port) as their `aud`.
    pub async fn start(public_pem: String) -> Self {
        let (ca, _) = CertificateAuthority::generate("fake idp CA").expect("ca");
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
        let audience = format!("https://idp.test:{}/token", addr.port());
        let state = Arc::new(IdpState::default());
        state.expires_in.store(3600, Ordering::SeqCst);
        *state.current_refresh.lock().expect("lock") = REFRESH_TOKEN.to_string();
        let st = state.clone();
        let key = Arc::new(
            jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes()).expect("public key"),
        );
        let audience = Arc::new(audience);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (st, leaves, key, audience) =
                    (st.clone(), leaves.clone(), key.clone(), audience.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    );
                    let Ok(start) = acceptor.await else { return };
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
                        let (st, key, audience) = (st.clone(), key.clone(), audience.clone());
                        async move { Ok::<_, Infallible>(token(&st, &key, &audience, req).await) }
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
}

fn json(status: u16, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let d = |s: &str| {
                String::from_utf8_lossy(&iron_policy::encoding::decode_mapped(s, true).bytes)
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

async fn token(
    st: &IdpState,
    key: &jsonwebtoken::DecodingKey,
    audience: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    st.calls.fetch_add(1, Ordering::SeqCst);
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if req.uri().path() != "/token" || req.method() != http::Method::POST {
        return json(404, serde_json::json!({"error": "not_found"}));
    }
    let basic = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).ok())
        .map(|d| String::from_utf8_lossy(&d).into_owned());
    let extra_header = req
        .headers()
        .get("x-idp-key")
        .map(|v| v.as_bytes().to_vec());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let f = form(&body);
    let grant = f.get("grant_type").cloned().unwrap_or_default();
    st.grants.lock().expect("lock").push(grant.clone());
    if st
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return json(
            500,
            serde_json::json!({"error": "server_error", "detail": "boom"}),
        );
    }
    if st.invalid_grant.load(Ordering::SeqCst) {
        return json(
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "revoked"}),
        );
    }
    if let Some(k) = extra_header
        && k != b"idp-header-value"
    {
        return json(401, serde_json::json!({"error": "invalid_client"}));
    }
    let client_ok = || {
        let (id, secret) = match &basic {
            Some(b) => {
                let (i, s) = b.split_once(':').unwrap_or((b, ""));
                (i.to_string(), Some(s.to_string()))
            }
            None => (
                f.get("client_id").cloned().unwrap_or_default(),
                f.get("client_secret").cloned(),
            ),
        };
        id == CLIENT_ID && secret.as_deref().is_none_or(|s| s == CLIENT_SECRET)
    };
    let mut new_refresh = None;
    let ok = match grant.as_str() {
        "client_credentials" => client_ok() && (basic.is_some() || f.contains_key("client_secret")),
        "password" => {
            client_ok()
                && f.get("username").map(String::as_str) == Some(USERNAME)
                && f.get("password").map(String::as_str) == Some(PASSWORD)
        }
        "refresh_token" => {
            let mut cur = st.current_refresh.lock().expect("lock");
            if !client_ok() || f.get("refresh_token") != Some(&*cur) {
                return json(
                    400,
                    serde_json::json!({"error": "invalid_grant", "error_description": "refresh token reused or unknown"}),
                );
            }
            if st.rotate.load(Ordering::SeqCst) {
                let next = format!(
                    "rt_REALrotated_{}",
                    st.counter.fetch_add(1, Ordering::SeqCst) + 1
                );
                *cur = next.clone();
                new_refresh = Some(next);
            }
            true
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            v.set_audience(&[audience]);
            v.set_issuer(&[ISSUER]);
            jsonwebtoken::decode::<serde_json::Value>(
                f.get("assertion").map_or("", String::as_str),
                key,
                &v,
            )
            .is_ok()
        }
        _ => false,
    };
    if !ok {
        return json(400, serde_json::json!({"error": "invalid_client"}));
    }
    let n = st.counter.fetch_add(1, Ordering::SeqCst);
    let tok = format!("at_REAL_{}_{n}", grant.rsplit(':').next().unwrap_or("x"));
    st.issued.lock().expect("lock").push(tok.clone());
    let mut resp = serde_json::json!({"access_token": tok, "token_type": "Bearer"});
    let exp = st.expires_in.load(Ordering::SeqCst);
    if exp > 0 {
        resp["expires_in"] = exp.into();
    }
    if let Some(r) = new_refresh {
        resp["refresh_token"] = r.into();
    }
    if st
        .gateway_timeout_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return json(504, serde_json::json!({"message": "gateway timeout"}));
    }
    json(200, resp)
}
