use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A scripted token endpoint: answers from a queue of (status, body), counting calls.
/// Status 0 is a connection refused; status 1 an endpoint that takes the request and never
/// answers.
struct Scripted {
    calls: AtomicUsize,
    replies: Mutex<Vec<(u16, String)>>,
    delay: Duration,
    seen: Mutex<Vec<String>>,
    /// `Retry-After` value put on every 429 and 503 reply.
    retry_after: Option<&'static str>,
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
        let retry_after = self.retry_after.filter(|_| status == 429 || status == 503);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if status == 0 {
                return Err(TransportError("connection refused".into()));
            }
            if status == 1 {
                std::future::pending::<()>().await;
            }
            let mut resp = http::Response::builder().status(status);
            if let Some(v) = retry_after {
                resp = resp.header(http::header::RETRY_AFTER, v);
            }
            Ok(resp.body(body.into_bytes()).unwrap())
        })
    }
}

fn scripted(replies: &[(u16, &str)], delay: Duration) -> Arc<Scripted> {
    Arc::new(Scripted {
        calls: AtomicUsize::new(0),
        replies: Mutex::new(replies.iter().map(|(s, b)| (*s, b.to_string())).collect()),
        delay,
        seen: Mutex::new(Vec::new()),
        retry_after: None,
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
/// The fields of a `refresh_token` grant whose refresh token is `refresh-1`.
const RT: &str = "client_id = { env = \"CID\" }, refresh_token = { env = \"RT\" }";

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
    // Cooling down after the failed mint: answered at once, the IdP is not called.
    let err = cache.token(&s).await.unwrap_err().to_string();
    assert!(err.contains("next attempt in 1 s"), "{err}");
    assert_eq!(t.calls.load(Ordering::SeqCst), 3);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"back");

    let t = scripted(
        &[(
            400,
            r#"{"error":"invalid_grant","error_description":"token reused: rt-SECRET"}"#,
        )],
        Duration::ZERO,
    );
    let (s, sources) = secret("refresh_token", RT);
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
    let (s, sources) = secret("refresh_token", RT);
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

/// A rate-limit answer is "later", even with an OAuth `error` field in its body (Auth0's
/// 429 carries `too_many_requests`): retried within the mint, never a final refusal.
#[tokio::test(start_paused = true)]
async fn rate_limit_with_an_error_body_is_retried_not_final() {
    for grant in ["client_credentials", "jwt"] {
        let t = scripted(
            &[
                (429, r#"{"error":"too_many_requests"}"#),
                (408, r#"{"error":"request_timeout"}"#),
                (200, r#"{"access_token":"ok","expires_in":60}"#),
            ],
            Duration::ZERO,
        );
        assert_eq!(
            parse_token_response(429, br#"{"error":"too_many_requests"}"#).unwrap_err(),
            MintError::Status(429)
        );
        if grant == "jwt" {
            continue; // parse_token_response above is the jwt_bearer/gcp/broker path
        }
        let (s, sources) = secret(grant, CC);
        let cache = TokenCache::new(t.clone(), sources, settings());
        assert_eq!(cache.token(&s).await.unwrap().expose(), b"ok");
        assert_eq!(t.calls.load(Ordering::SeqCst), 3);
        assert!(cache.status("API_TOKEN").unwrap().failed.is_none());
    }
}

/// What an IdP puts in `error` is shown only when it looks like an OAuth error code: a
/// client secret echoed there (or a forged log line) becomes `unrecognized_error`.
#[tokio::test(start_paused = true)]
async fn idp_error_text_is_never_shown_verbatim() {
    for body in [
        r#"{"error":"bad_cs_REALclientSECRET_991"}"#,
        r#"{"error":"x\n2026-01-01 INFO forged line"}"#,
    ] {
        let t = scripted(&[(400, body)], Duration::ZERO);
        let (s, sources) = secret("client_credentials", CC);
        let cache = TokenCache::new(t.clone(), sources, settings());
        let err = cache.token(&s).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "credential unavailable: token endpoint refused the grant: unrecognized_error"
        );
        let st = cache.status("API_TOKEN").unwrap();
        assert!(!format!("{st:?}").contains("REAL"), "{st:?}");
    }
    assert_eq!(sanitize_code("invalid_grant"), "invalid_grant");
    assert_eq!(sanitize_code("abcdefghij0123456789"), "unrecognized_error");
}

/// `expires_in` as a fraction, huge, zero or negative: the token is used (whole seconds,
/// clamped, or the default lifetime), on the oauth2-crate grants as on the others. A token
/// with a line break is an unusable answer.
#[tokio::test(start_paused = true)]
async fn odd_expires_in_is_accepted_and_control_characters_are_not() {
    for (expires, lifetime) in [
        ("3600.5", 3600),
        ("1e12", 86_400),
        ("99999999999999999999", 86_400),
        ("0", 300),
        ("-5", 300),
        ("\"-5\"", 300),
        ("\"120\"", 120),
    ] {
        let body = format!(r#"{{"access_token":"t","expires_in":{expires}}}"#);
        let t = scripted(&[(200, &body)], Duration::ZERO);
        let (s, sources) = secret("client_credentials", CC);
        let cache = TokenCache::new(t.clone(), sources, settings());
        assert_eq!(cache.token(&s).await.unwrap().expose(), b"t", "{expires}");
        let left = cache.status("API_TOKEN").unwrap().expires_in.unwrap();
        assert!(
            left.as_secs() <= lifetime && left.as_secs() + 1 >= lifetime,
            "{expires}: {left:?}"
        );
        let parsed = parse_token_response(200, body.as_bytes()).unwrap();
        assert_eq!(parsed.lifetime.as_secs(), lifetime, "{expires}");
    }
    let t = scripted(
        &[(200, r#"{"access_token":"a\r\nX-Evil: 1","expires_in":60}"#)],
        Duration::ZERO,
    );
    let (s, sources) = secret("client_credentials", CC);
    let cache = TokenCache::new(t.clone(), sources, settings());
    let err = cache.token(&s).await.unwrap_err().to_string();
    assert!(err.contains("invalid token response"), "{err}");
    assert!(
        parse_token_response(200, br#"{"access_token":"a\nb"}"#).is_err(),
        "a token with a line break"
    );
}

/// A change of other inputs (here the client secret: a reload) keeps the refresh token the
/// IdP rotated: sending the configured one again would be reuse of a rotated-out token.
#[tokio::test(start_paused = true)]
async fn rotated_refresh_token_survives_a_change_of_other_inputs() {
    let t = scripted(
        &[
            (
                200,
                r#"{"access_token":"a1","expires_in":10,"refresh_token":"refresh-2"}"#,
            ),
            (200, r#"{"access_token":"a2","expires_in":10}"#),
        ],
        Duration::ZERO,
    );
    let (s, sources) = secret("refresh_token", RT);
    let cache = TokenCache::new(t.clone(), sources.clone(), settings());
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"a1");
    let (s2, _) = secret(
        "refresh_token",
        "client_id = { env = \"CID\" }, client_secret = { env = \"CS\" }, refresh_token = { env = \"RT\" }",
    );
    assert_eq!(cache.token(&s2).await.unwrap().expose(), b"a2");
    let seen = t.seen.lock().unwrap().clone();
    assert!(seen[1].contains("refresh_token=refresh-2"), "{seen:?}");
}

/// Inputs changed (a reload) while a refresh is in flight: the next mint waits for it and
/// presents the refresh token it rotated to, never the one it is presenting (two refreshes
/// with one token in flight is reuse to an IdP with reuse detection).
#[tokio::test(start_paused = true)]
async fn a_change_of_inputs_mid_refresh_waits_for_the_rotation() {
    let t = scripted(
        &[
            (
                200,
                r#"{"access_token":"a1","expires_in":600,"refresh_token":"refresh-2"}"#,
            ),
            (200, r#"{"access_token":"a2","expires_in":600}"#),
        ],
        Duration::from_secs(2),
    );
    let (s, sources) = secret("refresh_token", RT);
    let cache = TokenCache::new(t.clone(), sources, settings());
    let first = tokio::spawn({
        let (cache, s) = (cache.clone(), s.clone());
        async move { cache.token(&s).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(t.calls.load(Ordering::SeqCst), 1);
    let (s2, _) = secret(
        "refresh_token",
        "client_id = { env = \"CID\" }, client_secret = { env = \"CS\" }, refresh_token = { env = \"RT\" }",
    );
    assert_eq!(cache.token(&s2).await.unwrap().expose(), b"a2");
    assert_eq!(first.await.unwrap().unwrap().expose(), b"a1");
    let seen = t.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].contains("refresh_token=refresh-1"), "{seen:?}");
    assert!(seen[1].contains("refresh_token=refresh-2"), "{seen:?}");
}

/// Traffic against a failing IdP: one mint, then a cool-down that doubles (1 s, 2 s, 4 s…)
/// during which requests are answered without calling the IdP.
#[tokio::test(start_paused = true)]
async fn failing_idp_is_not_driven_by_traffic() {
    let t = scripted(&[(503, "")], Duration::ZERO);
    let (s, sources) = secret("client_credentials", CC);
    let cache = TokenCache::new(t.clone(), sources, settings());
    // 60 s of a request every 100 ms.
    for _ in 0..600 {
        let _ = cache.token(&s).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = t.calls.load(Ordering::SeqCst);
    // Mints start at about 0, 1, 3, 7, 15, 31 s: 6 mints of 3 attempts.
    assert!(calls <= 7 * 3, "{calls} IdP calls in 60 s");
    assert!(calls >= 3, "{calls}");
}

/// The signed assertion of a service account is good for an hour of tokens: a key file whose
/// `token_uri` is not https is refused before anything is signed or sent.
#[test]
fn keyfile_token_uri_must_be_https() {
    let Err(e) = ServiceAccountKey::parse(
        br#"{"client_email":"a@b.test","private_key":"x","token_uri":"http://idp.test/token"}"#,
    ) else {
        panic!("accepted an http token_uri")
    };
    assert_eq!(e.to_string(), "keyfile token_uri must be an https:// URL");
}

/// `Retry-After` on a 429/503 (RFC 9110 §10.2.3): a wait longer than the next backoff ends
/// the mint, and no caller reaches the endpoint again before it is over, on every grant
/// path (oauth2 crate, form post, broker); a short one is waited within the mint.
#[tokio::test(start_paused = true)]
async fn retry_after_keeps_callers_away_from_the_endpoint() {
    let broker = "version = 1\n[[secrets]]\nname = \"API_TOKEN\"\ntype = \"brokered_token\"\ncredential = \"c\"\nbroker = { url = \"http://127.0.0.1:9\" }\nhosts = [\"api.test\"]\n";
    for (kind, status) in [("cc", 429), ("broker", 503)] {
        let ok = r#"{"access_token":"ok","expires_in":3600}"#;
        let t = Arc::new(Scripted {
            retry_after: Some("30"),
            ..Arc::into_inner(scripted(&[(status, "{}"), (200, ok)], Duration::ZERO)).unwrap()
        });
        let (s, sources) = match kind {
            "cc" => secret("client_credentials", CC),
            _ => {
                let p = iron_policy::Policy::parse(broker, std::path::Path::new("p.toml")).unwrap();
                let env = Arc::new(HashMap::<String, String>::new());
                (p.secrets[0].clone(), Arc::new(SourceResolver::new(env)))
            }
        };
        let cache = TokenCache::new(t.clone(), sources, settings());
        let err = cache.token(&s).await.unwrap_err().to_string();
        assert!(err.contains("retry after 30 s"), "{kind}: {err}");
        assert_eq!(
            t.calls.load(Ordering::SeqCst),
            1,
            "{kind}: retried within the mint"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        let err = cache.token(&s).await.unwrap_err().to_string();
        assert!(err.contains("next attempt in 10 s"), "{kind}: {err}");
        assert_eq!(
            t.calls.load(Ordering::SeqCst),
            1,
            "{kind}: called during the wait"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(cache.token(&s).await.unwrap().expose(), b"ok", "{kind}");
        assert_eq!(t.calls.load(Ordering::SeqCst), 2, "{kind}");
    }

    // The form-post path (jwt_bearer, gcp_auth, the broker's refresh).
    let t = Arc::new(Scripted {
        retry_after: Some("45"),
        ..Arc::into_inner(scripted(&[(503, "")], Duration::ZERO)).unwrap()
    });
    let err = post_form(&*t, "https://idp.test/token", &[], &[])
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(45)), "{err}");
    assert_eq!(
        err.to_string(),
        "token endpoint answered http 503; retry after 45 s"
    );

    // A wait of a few seconds (a broker's `Retry-After: 1`) is kept within the mint: the
    // request still gets its token, one second later.
    let t = Arc::new(Scripted {
        retry_after: Some("1"),
        ..Arc::into_inner(scripted(
            &[
                (429, "{}"),
                (200, r#"{"access_token":"ok","expires_in":60}"#),
            ],
            Duration::ZERO,
        ))
        .unwrap()
    });
    let (s, sources) = secret("client_credentials", CC);
    let cache = TokenCache::new(t.clone(), sources, settings());
    let asked = Instant::now();
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"ok");
    assert_eq!(t.calls.load(Ordering::SeqCst), 2);
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
}

/// The two forms of `Retry-After`, the cap, and what does not count.
#[test]
fn retry_after_header_forms() {
    let h = |v: &str| {
        let mut m = http::HeaderMap::new();
        m.insert(http::header::RETRY_AFTER, v.parse().unwrap());
        m
    };
    assert_eq!(retry_after(429, &h("120")), Some(Duration::from_secs(120)));
    assert_eq!(retry_after(503, &h(" 7 ")), Some(Duration::from_secs(7)));
    assert_eq!(
        retry_after(429, &h("99999999999999999999999")),
        Some(MAX_RETRY_AFTER)
    );
    let later = std::time::SystemTime::now() + Duration::from_secs(90);
    let w = retry_after(503, &h(&httpdate::fmt_http_date(later))).unwrap();
    assert!(
        w <= Duration::from_secs(90) && w >= Duration::from_secs(85),
        "{w:?}"
    );
    assert_eq!(
        retry_after(503, &h("Sun, 06 Nov 1994 08:49:37 GMT")),
        Some(Duration::ZERO)
    );
    assert_eq!(retry_after(429, &h("soon")), None);
    assert_eq!(retry_after(429, &h("-5")), None);
    assert_eq!(
        retry_after(500, &h("30")),
        None,
        "only 429 and 503 ask for a wait"
    );
    assert_eq!(retry_after(429, &http::HeaderMap::new()), None);
}

/// A 2xx with a new refresh token and no usable access token keeps the refresh token (in
/// the error, for the broker to store); without one it is plain `Malformed`.
#[test]
fn a_rotated_refresh_token_without_an_access_token_is_kept() {
    for access in [r#""""#, r#""a\nb""#, "null"] {
        let body = format!(r#"{{"access_token":{access},"refresh_token":"rt2"}}"#);
        match parse_token_response(200, body.as_bytes()) {
            Err(MintError::RotatedWithoutAccess(rt)) => assert_eq!(rt.expose(), b"rt2"),
            other => panic!("{access}: {other:?}"),
        }
    }
    assert_eq!(
        parse_token_response(200, br#"{"access_token":"","refresh_token":""}"#).unwrap_err(),
        MintError::Malformed
    );
    let e = MintError::RotatedWithoutAccess(SecretValue::new(b"rt2".to_vec()));
    assert!(!format!("{e} {e:?}").contains("rt2"));
}

/// The proxy's own refresh_token grant: an answer that rotates the refresh token but has no
/// usable access token is not retried with the old token; the next mint uses the new one.
#[tokio::test(start_paused = true)]
async fn a_rotation_without_an_access_token_is_used_next_not_retried() {
    let t = scripted(
        &[
            (
                200,
                r#"{"access_token":"","token_type":"bearer","expires_in":10,"refresh_token":"refresh-2"}"#,
            ),
            (
                200,
                r#"{"access_token":"a2","token_type":"bearer","expires_in":10}"#,
            ),
        ],
        Duration::ZERO,
    );
    let (s, sources) = secret("refresh_token", RT);
    let cache = TokenCache::new(t.clone(), sources, settings());
    assert!(cache.token(&s).await.is_err());
    assert_eq!(
        t.seen.lock().unwrap().len(),
        1,
        "retried with the old token"
    );
    tokio::time::advance(Duration::from_secs(120)).await;
    assert_eq!(cache.token(&s).await.unwrap().expose(), b"a2");
    let seen = t.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].contains("refresh_token=refresh-1"), "{seen:?}");
    assert!(seen[1].contains("refresh_token=refresh-2"), "{seen:?}");
}

/// The proxy's own refresh_token grant, once the IdP has rotated the token: an answer lost
/// after the request was sent (a gateway's 504, an empty 200 — how a transport reports a
/// reset or timeout after sending — or our own deadline on an endpoint that never answers) is not replayed with the same
/// token; the secret fails as `rotation_interrupted` and the IdP is not called again.
#[tokio::test(start_paused = true)]
async fn a_lost_answer_to_a_rotating_refresh_is_not_replayed() {
    const ROTATE: &str = r#"{"access_token":"a1","token_type":"bearer","expires_in":10,"refresh_token":"refresh-2"}"#;
    for lost in [(504, ""), (200, ""), (1, "")] {
        let t = scripted(&[(200, ROTATE), lost, (200, ROTATE)], Duration::ZERO);
        let (s, sources) = secret("refresh_token", RT);
        let cache = TokenCache::new(t.clone(), sources, settings());
        assert_eq!(cache.token(&s).await.unwrap().expose(), b"a1");
        tokio::time::advance(Duration::from_secs(11)).await;
        let e = cache.token(&s).await.unwrap_err();
        assert!(
            e.to_string().contains("rotation_interrupted"),
            "{lost:?}: {e}"
        );
        assert_eq!(t.seen.lock().unwrap().len(), 2, "{lost:?}: replayed");
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(cache.token(&s).await.is_err());
        assert_eq!(
            t.seen.lock().unwrap().len(),
            2,
            "{lost:?}: called again after the interruption"
        );
        let status = cache.status("API_TOKEN").unwrap();
        assert!(
            status
                .failed
                .is_some_and(|f| f.contains("rotation_interrupted"))
        );
    }
}

/// An IdP that does not rotate (it sends no refresh token back, or the same one): a lost
/// answer is retried as before, since the token it holds is still the only one.
#[tokio::test(start_paused = true)]
async fn a_lost_answer_to_a_non_rotating_refresh_is_retried() {
    for first in [
        r#"{"access_token":"a1","token_type":"bearer","expires_in":10}"#,
        r#"{"access_token":"a1","token_type":"bearer","expires_in":10,"refresh_token":"refresh-1"}"#,
    ] {
        let t = scripted(
            &[
                (200, first),
                (504, ""),
                (200, ""),
                (
                    200,
                    r#"{"access_token":"a2","token_type":"bearer","expires_in":10}"#,
                ),
            ],
            Duration::ZERO,
        );
        let (s, sources) = secret("refresh_token", RT);
        let cache = TokenCache::new(t.clone(), sources, settings());
        assert_eq!(cache.token(&s).await.unwrap().expose(), b"a1");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(cache.token(&s).await.unwrap().expose(), b"a2");
        let seen = t.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen.iter().all(|b| b.contains("refresh_token=refresh-1")));
    }
}
