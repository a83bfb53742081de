use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A scripted token endpoint: answers from a queue of (status, body), counting calls.
struct Scripted {
    calls: AtomicUsize,
    replies: Mutex<Vec<(u16, String)>>,
    delay: Duration,
    seen: Mutex<Vec<String>>,
}

impl TokenTransport for Scripted {
    fn send(&self, req: http::Request<Vec<u8>>) -> TransportFuture {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(req.body()).into_owned());
        let (status, body) = {
            let mut r = self.replies.lock().unwrap();
            if r.len() > 1 {
                r.remove(0)
            } else {
                r[0].clone()
            }
        };
        let delay = self.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if status == 0 {
                return Err(TransportError("connection refused".into()));
            }
            Ok(http::Response::builder()
                .status(status)
                .body(body.into_bytes())
                .unwrap())
        })
    }
}

fn scripted(replies: &[(u16, &str)], delay: Duration) -> Arc<Scripted> {
    Arc::new(Scripted {
        calls: AtomicUsize::new(0),
        replies: Mutex::new(replies.iter().map(|(s, b)| (*s, b.to_string())).collect()),
        delay,
        seen: Mutex::new(Vec::new()),
    })
}

fn secret(grant: &str, fields: &str) -> (Secret, Arc<SourceResolver>) {
    let text = format!(
        "version = 1\n[[secrets]]\nname = \"API_TOKEN\"\ntype = \"oauth_token\"\ngrant = \"{grant}\"\ntoken_endpoint = \"https://idp.test/token\"\nfields = {{ {fields} }}\nhosts = [\"api.test\"]\n"
    );
    let p = iron_policy::Policy::parse(&text, std::path::Path::new("p.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let env: HashMap<String, String> = [("CID", "client-1"), ("CS", "s3cret"), ("RT", "refresh-1")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (
        p.secrets[0].clone(),
        Arc::new(SourceResolver::new(Arc::new(env))),
    )
}

const CC: &str = "client_id = { env = \"CID\" }, client_secret = { env = \"CS\" }";

fn settings() -> TokenSettings {
    TokenSettings {
        wait: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        attempts: 3,
        backoff: Duration::from_millis(100),
    }
}

#[tokio::test(start_paused = true)]
async fn caches_refreshes_ahead_and_single_flights() {
    let t = scripted(
        &[
            (
                200,
                r#"{"access_token":"tok-1","token_type":"Bearer","expires_in":100}"#,
            ),
            (
                200,
                r#"{"access_token":"tok-2","token_type":"Bearer","expires_in":100}"#,
            ),
        ],
        Duration::from_millis(50),
    );
    let (s, sources) = secret("client_credentials", CC);
    let cache = TokenCache::new(t.clone(), sources, settings());
    // 200 concurrent first requests: one token request.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = cache.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move { c.token(&s).await }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().expose(), b"tok-1");
    }
    assert_eq!(t.calls.load(Ordering::SeqCst), 1);
    // Cached.
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"tok-1");
    assert_eq!(t.calls.load(Ordering::SeqCst), 1);
    // Within the refresh window (skew = 20 s of 100 s): served from cache, refreshed behind.
    tokio::time::advance(Duration::from_secs(85)).await;
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"tok-1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"tok-2");
    // Client credentials went in the body (client_secret_post).
    let body = t.seen.lock().unwrap()[0].clone();
    assert!(body.contains("grant_type=client_credentials"), "{body}");
    assert!(body.contains("client_secret=s3cret"), "{body}");
}

#[tokio::test(start_paused = true)]
async fn expiry_with_200_concurrent_requests_causes_one_mint() {
    let t = scripted(
        &[(
            200,
            r#"{"access_token":"a","token_type":"bearer","expires_in":60}"#,
        )],
        Duration::from_millis(10),
    );
    let (s, sources) = secret("client_credentials", CC);
    let cache = TokenCache::new(t.clone(), sources, settings());
    cache.token(&s).await.unwrap();
    tokio::time::advance(Duration::from_secs(61)).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = cache.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move { c.token(&s).await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(t.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_gives_up_does_not_cancel_the_mint() {
    let t = scripted(
        &[(200, r#"{"access_token":"slow","token_type":"bearer"}"#)],
        Duration::from_secs(3),
    );
    let (s, sources) = secret("client_credentials", CC);
    let cache = TokenCache::new(t.clone(), sources, settings());
    let c = cache.clone();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { c.token(&s2).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    waiter.abort(); // the client hangs up
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"slow");
    assert_eq!(t.calls.load(Ordering::SeqCst), 1);
    // No expires_in: the default lifetime applies.
    let st = cache.status("API_TOKEN").unwrap();
    assert!(st.expires_in.unwrap() <= DEFAULT_LIFETIME);
    assert!(st.expires_in.unwrap() > DEFAULT_LIFETIME - Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn retries_5xx_then_recovers_and_invalid_grant_is_terminal() {
    let t = scripted(
        &[
            (500, "oops"),
            (503, ""),
            (500, ""),
            (
                200,
                r#"{"access_token":"back","token_type":"bearer","expires_in":3600}"#,
            ),
        ],
        Duration::from_millis(1),
    );
    let (s, sources) = secret("client_credentials", CC);
    let cache = TokenCache::new(t.clone(), sources, settings());
    let err = cache.token(&s).await.unwrap_err();
    assert_eq!(
        err,
        TokenError::Unavailable {
            reason: "token endpoint answered http 500".into()
        }
    );
    assert_eq!(t.calls.load(Ordering::SeqCst), 3);
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"back");

    let t = scripted(
        &[(
            400,
            r#"{"error":"invalid_grant","error_description":"token reused: rt-SECRET"}"#,
        )],
        Duration::ZERO,
    );
    let (s, sources) = secret(
        "refresh_token",
        "client_id = { env = \"CID\" }, refresh_token = { env = \"RT\" }",
    );
    let cache = TokenCache::new(t.clone(), sources, settings());
    let err = cache.token(&s).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "credential unavailable: token endpoint refused the grant: invalid_grant"
    );
    assert!(!err.contains("rt-SECRET"));
    // Failed until inputs change: no second call.
    cache.token(&s).await.unwrap_err();
    assert_eq!(t.calls.load(Ordering::SeqCst), 1);
    assert!(cache.status("API_TOKEN").unwrap().failed.is_some());
}

#[tokio::test(start_paused = true)]
async fn rotated_refresh_token_is_used_next() {
    let t = scripted(
        &[
            (
                200,
                r#"{"access_token":"a1","token_type":"bearer","expires_in":10,"refresh_token":"refresh-2"}"#,
            ),
            (
                200,
                r#"{"access_token":"a2","token_type":"bearer","expires_in":10}"#,
            ),
        ],
        Duration::ZERO,
    );
    let (s, sources) = secret(
        "refresh_token",
        "client_id = { env = \"CID\" }, refresh_token = { env = \"RT\" }",
    );
    let cache = TokenCache::new(t.clone(), sources, settings());
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"a1");
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"a2");
    let seen = t.seen.lock().unwrap().clone();
    assert!(seen[0].contains("refresh_token=refresh-1"), "{seen:?}");
    assert!(seen[1].contains("refresh_token=refresh-2"), "{seen:?}");
}

#[test]
fn token_response_parsing() {
    assert!(matches!(
        parse_token_response(200, b"{}"),
        Err(MintError::Malformed)
    ));
    assert!(matches!(
        parse_token_response(200, b"not json"),
        Err(MintError::Malformed)
    ));
    assert_eq!(
        parse_token_response(502, b"{\"error\":\"x\"}").unwrap_err(),
        MintError::Status(502)
    );
    assert_eq!(
        parse_token_response(400, b"{\"error\":\"<script>\"}").unwrap_err(),
        MintError::Rejected {
            code: "unrecognized_error".into()
        }
    );
    let t = parse_token_response(200, br#"{"access_token":"x","expires_in":"120"}"#).unwrap();
    assert_eq!(t.lifetime, Duration::from_secs(120));
}

/// Token responses from IdPs that bend RFC 6749 §5.1 are still usable: no `token_type`,
/// `expires_in` as a string, status 201.
#[tokio::test(start_paused = true)]
async fn lenient_token_responses_are_accepted() {
    for (status, body, lifetime) in [
        (200, r#"{"access_token":"t1","expires_in":"60"}"#, 60),
        (201, r#"{"access_token":"t1","token_type":"bearer"}"#, 300),
    ] {
        let t = scripted(&[(status, body)], Duration::from_millis(1));
        let (s, sources) = secret("client_credentials", CC);
        let cache = TokenCache::new(t.clone(), sources, settings());
        assert_eq!(cache.token(&s).await.unwrap().expose(), b"t1", "{body}");
        let left = cache.status(&s.name).unwrap().expires_in.unwrap();
        assert!(
            left <= Duration::from_secs(lifetime) && left > Duration::from_secs(lifetime - 5),
            "{body}: {left:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_broker_credential_is_asked_once_per_request_and_not_kept_failed() {
    let t = scripted(
        &[
            (
                422,
                r#"{"error":"credential_dead","reason":"invalid_grant"}"#,
            ),
            (200, r#"{"access_token":"revived","expires_in":3600}"#),
        ],
        Duration::ZERO,
    );
    let text = "version = 1\n[[secrets]]\nname = \"CODEX_TOKEN\"\ntype = \"brokered_token\"\ncredential = \"codex\"\nbroker = { url = \"http://127.0.0.1:9\" }\nhosts = [\"api.test\"]\n";
    let p = iron_policy::Policy::parse(text, std::path::Path::new("p.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let sources = Arc::new(SourceResolver::new(Arc::new(
        HashMap::<String, String>::new(),
    )));
    let cache = TokenCache::new(t.clone(), sources, settings());
    let s = &p.secrets[0];
    let err = cache.token(s).await.unwrap_err().to_string();
    assert!(err.contains("422 credential_dead (invalid_grant)"), "{err}");
    // The broker's answer is final for this request: no retries against it.
    assert_eq!(t.calls.load(Ordering::SeqCst), 1);
    assert!(cache.status("CODEX_TOKEN").unwrap().failed.is_none());
    // Revived on the broker: the next request gets a token, no reload needed.
    assert_eq!(cache.token(s).await.unwrap().expose(), b"revived");
}
