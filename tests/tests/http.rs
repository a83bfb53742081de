//! End-to-end: the interception proxy with `http` secrets, driven by real curl where it
//! matters, against a recording TLS origin on loopback.

use base64::Engine as _;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use iron_proxy::client;
use iron_proxy::origin::OriginOptions;
use iron_tests::*;

async fn world() -> (World, InProcess) {
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    (w, p)
}

/// curl GET `/user` on `api.github.test` through `p` with the `GITHUB_TOKEN` placeholder:
/// asserts 200 and that the origin's only request so far carried the real token.
async fn github_swap_reaches_the_origin(w: &World, p: &InProcess) {
    github_swap_reaches_the_origin_again(w, p).await;
    assert_eq!(w.origin.records().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_header_swap_reaches_only_the_secrets_host() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let (w, p) = world().await;
    let port = w.port();
    github_swap_reaches_the_origin(&w, &p).await;
    assert_eq!(
        w.origin.records()[0].sni.as_deref(),
        Some("api.github.test")
    );

    let refused = p
        .curl(&[
            &format!("https://other.test:{port}/user"),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
        ])
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        refused.error_code().as_deref(),
        Some("placeholder_not_allowed")
    );
    assert_eq!(
        w.origin.records().len(),
        1,
        "the other host received something"
    );
    // Without a placeholder, the other host is reachable.
    let plain = p.curl(&[&format!("https://other.test:{port}/")]).await;
    assert_eq!(plain.status, 200);
    // The client leg takes the proxy's cipher order (AES-128-GCM first), not the client's
    // (this one asks for AES-256-GCM first).
    let ordered = p
        .curl(&[
            "-v",
            "--tls13-ciphers",
            "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256",
            &format!("https://other.test:{port}/"),
        ])
        .await;
    assert_eq!(ordered.status, 200, "{ordered:?}");
    assert!(
        ordered.stderr.contains("TLSv1.3 / TLS_AES_128_GCM_SHA256"),
        "{}",
        ordered.stderr
    );

    let audit = p.audit.records();
    let swapped = audit
        .iter()
        .find(|r| r.status == 200 && r.host == "api.github.test")
        .expect("audit");
    assert_eq!(swapped.secrets[0].stats.name.as_ref(), "GITHUB_TOKEN");
    assert_eq!(
        swapped.secrets[0].location.to_string(),
        "header:authorization"
    );
    let refusal = audit
        .iter()
        .find(|r| r.status == 403)
        .expect("audit of refusal");
    assert_eq!(refusal.error, Some("placeholder_not_allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_path_and_raw_bytes() {
    if !have("curl") {
        return;
    }
    let (w, p) = world().await;
    let port = w.port();
    let r = p
        .curl(&[&format!(
            "https://maps.test:{port}/v1/a%2Fb/MAPS_KEY/x?z=%2F+1&key=MAPS%5FKEY&b=2"
        )])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let recs = w.origin.records();
    assert_eq!(
        recs[0].target,
        "/v1/a%2Fb/maps%20real%2Fkey%2B1/x?z=%2F+1&key=maps%20real%2Fkey%2B1&b=2"
    );
    // The placeholder in a parameter the secret does not list is refused.
    let r = p
        .curl(&[&format!("https://maps.test:{port}/?other=MAPS_KEY")])
        .await;
    assert_eq!(r.error_code().as_deref(), Some("placeholder_not_allowed"));
    // In a header the secret does not scan: refused.
    let r = p
        .curl(&[
            &format!("https://maps.test:{port}/"),
            "-H",
            "X-Key: MAPS_KEY",
        ])
        .await;
    assert_eq!(r.error_code().as_deref(), Some("placeholder_not_allowed"));
    assert_eq!(w.origin.records().len(), 1);
}

/// An origin that redirects to its canonical host, echoing the path and query it got: the
/// real key swapped into them is put back to its placeholder in `Location` and `Link`, so
/// the sandbox never holds it (and following the redirect sends the placeholder, which the
/// proxy refuses off the secret's hosts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_echoing_the_url_hands_back_the_placeholder() {
    if !have("curl") {
        return;
    }
    let (w, p) = world().await;
    let port = w.port();
    let r = p
        .curl(&[
            "-i",
            &format!("https://maps.test:{port}/redirect/MAPS_KEY?key=MAPS_KEY&q=1"),
        ])
        .await;
    assert_eq!(r.status, 301, "{r:?}");
    let recs = w.origin.records();
    assert_eq!(
        recs[0].target, "/redirect/maps%20real%2Fkey%2B1?key=maps%20real%2Fkey%2B1&q=1",
        "the origin got the real key"
    );
    let head = r.body.to_ascii_lowercase();
    assert!(
        head.contains(
            "\r\nlocation: https://www.elsewhere.test/redirect/maps_key?key=maps_key&q=1\r\n"
        ),
        "{}",
        r.body
    );
    assert!(
        head.contains("\r\nlink: </redirect/maps_key?key=maps_key&q=1>; rel=\"canonical\"\r\n"),
        "{}",
        r.body
    );
    for real in [REAL_MAPS, "maps%20real%2Fkey%2B1", "maps+real%2Fkey%2B1"] {
        assert!(!r.body.contains(real), "{real} in {}", r.body);
    }
}

/// An origin that reflects the request (a debugging endpoint: headers and target in the
/// body, in 5-byte chunks so every value spans chunks, `Authorization` in a response
/// header) never hands the sandbox a real value: swapped in a header or inside `Basic`
/// credentials, injected by a formatter (`Token {value}`, `Basic` base64), or put into the
/// path and query. The sandbox gets its placeholders back (for an injected header the
/// secret's placeholder): exactly in headers and in a chunked body, fitted with `*` to the
/// value's length in a body with a `Content-Length` (which must stand). A compressed answer
/// is not asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_echoes_the_request_hands_back_placeholders() {
    if !have("curl") {
        return;
    }
    let (w, p) = world().await;
    let port = w.port();
    let cases: [(String, Vec<&str>, Vec<&str>); 6] = [
        (
            format!("https://api.github.test:{port}/echo"),
            vec![
                "-H",
                "Authorization: Bearer GITHUB_TOKEN",
                "-H",
                "Accept-Encoding: gzip, br",
            ],
            vec![
                "authorization: Bearer GITHUB_TOKEN******************\n",
                "x-echo-authorization: Bearer GITHUB_TOKEN\r\n",
                "http/1.1 200 ok for bearer GITHUB_TOKEN\r\n",
                "accept-encoding: identity",
                "content-length: ",
            ],
        ),
        (
            // A range request is no way around the scrubbing.
            format!("https://api.github.test:{port}/echo"),
            vec![
                "-H",
                "Authorization: Bearer GITHUB_TOKEN",
                "-H",
                "Range: bytes=0-",
            ],
            vec![
                "http/1.1 206",
                "authorization: Bearer GITHUB_TOKEN******************\n",
            ],
        ),
        (
            format!("https://api.github.test:{port}/echo"),
            vec!["-u", "x-access-token:GITHUB_TOKEN"],
            vec!["authorization: Basic eC1hY2Nlc3MtdG9rZW46R0lUSFVCX1RPS0VO"],
        ),
        (
            format!("https://maps.test:{port}/echo/MAPS_KEY?key=MAPS_KEY&chunked"),
            vec![],
            vec![
                "/echo/MAPS_KEY?key=MAPS_KEY&chunked\n",
                "transfer-encoding: chunked",
            ],
        ),
        (
            format!("https://inject.test:{port}/echo"),
            vec![],
            vec!["x-api-key: INJECT_KEY"],
        ),
        (
            format!("https://basic.test:{port}/echo"),
            vec![],
            vec!["authorization: BASIC_PW", "x-echo-authorization: BASIC_PW"],
        ),
    ];
    // Over both HTTP versions; a status text and chunked framing exist only in HTTP/1.1.
    for ((url, extra, want), version) in cases
        .iter()
        .flat_map(|c| [(c, "--http1.1"), (c, "--http2")])
    {
        let mut args = vec!["-i", "-sS", version, url.as_str()];
        args.extend(extra.iter().copied());
        let r = p.curl(&args).await;
        assert!(matches!(r.status, 200 | 206), "{url}: {r:?}");
        let text = r.body.to_ascii_lowercase();
        for w in want.iter().filter(|w| {
            version == "--http1.1"
                || !(w.starts_with("http/1.1") || w.starts_with("transfer-encoding"))
        }) {
            assert!(
                text.contains(&w.to_ascii_lowercase()),
                "{url}: no {w:?} in {}",
                r.body
            );
        }
        for real in ALL_REAL {
            assert!(
                !r.body.contains(real),
                "{url}: {real} reached the sandbox: {}",
                r.body
            );
        }
        for encoded in [
            "maps%20real%2Fkey%2B1",
            "maps+real%2Fkey%2B1",
            // base64 of x-access-token:<real> and robot:<real>
            "eC1hY2Nlc3MtdG9rZW46Z2hwX1JFQUxnaXRodWJTRUNSRVQwMTIzNDU2Nzg5",
            "cm9ib3Q6cHdfUkVBTGJhc2ljU0VDUkVUNzc=",
        ] {
            assert!(!r.body.contains(encoded), "{url}: {}", r.body);
        }
    }
    // The origin did get the real values (the echo is of what it received).
    let recs = w.origin.records();
    assert_eq!(
        recs[0].header("authorization").as_deref(),
        Some(format!("Bearer {REAL_GITHUB}").as_str())
    );
    // Each echo is in the audit record (a count, never a value).
    let first = p
        .audit
        .records()
        .into_iter()
        .find(|r| r.path == "/echo")
        .expect("audited");
    assert!(first.echoes_scrubbed >= 3, "{:?}", first.echoes_scrubbed);
    // Asked for no compression, whether the client asked for some or sent nothing.
    for r in &recs[..3] {
        assert_eq!(r.header("accept-encoding").as_deref(), Some("identity"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_inject_modes() {
    if !have("curl") {
        return;
    }
    let (w, p) = world().await;
    let port = w.port();
    // curl -u builds Authorization: Basic base64(user:GITHUB_TOKEN).
    let r = p
        .curl(&[
            &format!("https://api.github.test:{port}/"),
            "-u",
            "x-access-token:GITHUB_TOKEN",
        ])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let auth = w.origin.records()[0]
        .header("authorization")
        .unwrap_or_default();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim_start_matches("Basic "))
        .unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&decoded),
        format!("x-access-token:{REAL_GITHUB}")
    );

    // Inject: the header is set (overwriting the client's), with the formatter.
    let r = p
        .curl(&[
            &format!("https://inject.test:{port}/"),
            "-H",
            "x-api-key: whatever",
        ])
        .await;
    assert_eq!(r.status, 200);
    let rec = &w.origin.records()[1];
    let values: Vec<_> = rec
        .headers
        .iter()
        .filter(|(n, _)| n == "x-api-key")
        .collect();
    assert_eq!(values.len(), 1);
    assert_eq!(
        String::from_utf8_lossy(&values[0].1),
        format!("Token {REAL_INJECT}")
    );

    let r = p.curl(&[&format!("https://basic.test:{port}/")]).await;
    assert_eq!(r.status, 200);
    let auth = w.origin.records()[2]
        .header("authorization")
        .unwrap_or_default();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim_start_matches("Basic "))
        .unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&decoded),
        format!("robot:{REAL_BASIC}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_refusals() {
    if !have("curl") {
        return;
    }
    let (w, p) = world().await;
    let port = w.port();
    // Host mismatch inside the tunnel.
    let r = p
        .curl(&[
            &format!("https://api.github.test:{port}/"),
            "-H",
            "Host: other.test",
        ])
        .await;
    assert_eq!(r.status, 421, "{r:?}");
    assert_eq!(r.error_code().as_deref(), Some("authority_mismatch"));
    // Not on the allowlist: refused at CONNECT.
    let (status, _, head) = client::connect(p.addr(), "evil.test:443")
        .await
        .expect("connect");
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&head).contains("x-iron-proxy-error: destination_not_allowed"));
    // Only authority-form: no userinfo, scheme or signed port.
    let port = w.port();
    for target in [
        format!("user@api.github.test:{port}"),
        format!("http://api.github.test:{port}/"),
        format!("api.github.test:+{port}"),
    ] {
        let (status, _, head) = client::connect(p.addr(), &target).await.expect("connect");
        assert_eq!(status, 400, "{target}: {}", String::from_utf8_lossy(&head));
    }
    // Allowed port only: the secret host on another port is not reachable.
    let (status, _, _) = client::connect(p.addr(), "api.github.test:443")
        .await
        .expect("connect");
    assert_eq!(status, 403);
    // Dot segments.
    let r = p
        .curl(&[
            "--path-as-is",
            &format!("https://other.test:{port}/a/%2e%2E/b"),
        ])
        .await;
    assert_eq!(r.error_code().as_deref(), Some("invalid_path"));
    assert!(w.origin.records().is_empty());
    // SNI that differs from the CONNECT authority: the client cannot verify the leaf
    // (minted for the CONNECT host), and nothing reaches the origin.
    let res = client::tunnel(
        p.addr(),
        &format!("api.github.test:{port}"),
        "other.test",
        p.ca.ca.cert_pem(),
    )
    .await;
    assert!(res.is_err());
    assert!(w.origin.records().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_address_and_untrusted_origin() {
    // private.test resolves to 10.1.2.3 and is allowed by name but not by address.
    let policy = STANDARD_POLICY.replace(
        "allow = [\"other.test:{PORT}\", \"plain.test:{PORT}\"]",
        "allow = [\"other.test:{PORT}\", \"private.test:443\", \"10.9.9.9:443\"]",
    );
    let w = World::new(&policy, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let (status, _, head) = client::connect(p.addr(), "private.test:443")
        .await
        .expect("connect");
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&head).contains("destination_address_denied"));
    let (status, _, _) = client::connect(p.addr(), "10.9.9.9:443")
        .await
        .expect("connect");
    assert_eq!(status, 403);

    // An origin whose CA is not trusted: 502 upstream_tls_error, never forwarded.
    let w2 = World::new(
        &STANDARD_POLICY.replace("upstream_ca = [\"origin-ca.pem\"]", "upstream_ca = []"),
        OriginOptions::default(),
    )
    .await;
    let p2 = w2.proxy(standard_env()).await;
    let mut send = client::tunnel(
        p2.addr(),
        &format!("api.github.test:{}", w2.port()),
        "api.github.test",
        p2.ca.ca.cert_pem(),
    )
    .await
    .expect("tunnel");
    let resp = client::fetch(
        &mut send,
        Request::get("/")
            .header("host", format!("api.github.test:{}", w2.port()))
            .header("authorization", "Bearer GITHUB_TOKEN")
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await
    .expect("fetch");
    assert_eq!(resp.status, 502);
    assert_eq!(resp.headers["x-iron-proxy-error"], "upstream_tls_error");
    assert!(w2.origin.records().is_empty());
}

/// An `upstream_ca` scoped to some hosts vouches only for them: the origin its CA signed
/// is reached as `other.test`, but as the secret's host `api.github.test` the same origin
/// is refused (502 `upstream_tls_error`) and nothing, least of all the real token, is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_upstream_ca_vouches_only_for_its_hosts() {
    if !have("curl") {
        return;
    }
    let w = World::new(
        &STANDARD_POLICY.replace(
            "upstream_ca = [\"origin-ca.pem\"]",
            "upstream_ca = [{ file = \"origin-ca.pem\", hosts = [\"other.test\", \"*.corp.test\"] }]",
        ),
        OriginOptions::default(),
    )
    .await;
    let p = w.proxy(standard_env()).await;
    let other = p
        .curl(&[&format!("https://other.test:{}/scoped", w.port())])
        .await;
    assert_eq!(other.status, 200, "{other:?}");
    let secret = p
        .curl(&[
            &format!("https://api.github.test:{}/user", w.port()),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
        ])
        .await;
    assert_eq!(secret.status, 502, "{secret:?}");
    let recs = w.origin.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = audit_record(&p, "/user").await;
    assert_eq!(rec.error, Some("upstream_tls_error"), "{rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_http_is_proxied_but_never_injected() {
    if !have("curl") {
        return;
    }
    let w = World::new(
        STANDARD_POLICY,
        OriginOptions {
            plain: true,
            ..Default::default()
        },
    )
    .await;
    let p = w.proxy(standard_env()).await;
    let port = w.port();
    let r = p
        .curl(&[&format!("http://plain.test:{port}/hello?q=1")])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(w.origin.records()[0].target, "/hello?q=1");
    let r = p
        .curl(&[
            &format!("http://api.github.test:{port}/"),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
        ])
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.error_code().as_deref(),
        Some("cleartext_injection_refused")
    );
    let r = p
        .curl(&[
            &format!("http://plain.test:{port}/"),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
        ])
        .await;
    assert_eq!(r.error_code().as_deref(), Some("placeholder_not_allowed"));
    assert_eq!(w.origin.records().len(), 1);
}

/// A WebSocket frame (RFC 6455 §5.2) with `first` (FIN, RSV, opcode) and `payload`,
/// masked with `mask` when given, as a client sends it.
fn ws_frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![first];
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(bit | n as u8),
        n @ 126..=0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mut p = payload.to_vec();
    if let Some(m) = mask {
        out.extend_from_slice(&m);
        for (i, b) in p.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    out.extend_from_slice(&p);
    out
}

/// The WebSocket frames in `b`, each as (first byte, masked, payload unmasked); panics on
/// a frame cut off.
fn ws_frames_of(mut b: &[u8]) -> Vec<(u8, bool, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let (mut at, len) = match b[1] & 0x7f {
            126 => (4, u64::from(u16::from_be_bytes([b[2], b[3]]))),
            127 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (10, u64::from_be_bytes(l))
            }
            n => (2, u64::from(n)),
        };
        let mask = (b[1] & 0x80 != 0).then(|| {
            at += 4;
            [b[at - 4], b[at - 3], b[at - 2], b[at - 1]]
        });
        let end = at + usize::try_from(len).unwrap_or(usize::MAX);
        let mut p = b[at..end].to_vec();
        if let Some(m) = mask {
            for (i, x) in p.iter_mut().enumerate() {
                *x ^= m[i % 4];
            }
        }
        out.push((b[0], mask.is_some(), p));
        b = &b[end..];
    }
    assert!(b.is_empty(), "a frame cut off");
    out
}

/// The audit record of the first upgraded (WebSocket) connection, written when it closes;
/// waits up to 10 s for it.
async fn upgraded_record(p: &InProcess) -> iron_proxy::audit::AuditRecord {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(r) = p
            .audit
            .records()
            .into_iter()
            .find(|r| r.outcome == "upgraded")
        {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit line for the upgrade"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Opens a WebSocket through `p` to `/ws` on `host` (the test origin), with `extra`
/// headers on the upgrade request; returns the upgraded stream.
#[allow(clippy::expect_used)] // a test helper: a failed step is a failed test
async fn ws_open(
    p: &InProcess,
    w: &World,
    host: &str,
    extra: &[(&str, &str)],
) -> hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {
    let authority = format!("{host}:{}", w.port());
    let mut send = client::tunnel(p.addr(), &authority, host, p.ca.ca.cert_pem())
        .await
        .expect("tunnel");
    send.ready().await.expect("ready");
    let mut req = Request::get("/ws")
        .header("host", &authority)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).expect("req"))
        .await
        .expect("upgrade");
    assert_eq!(resp.status(), 101);
    hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"))
}

const DEFLATE: (&str, &str) = ("sec-websocket-extensions", "permessage-deflate");

/// `websocket_frames = true`: the placeholder in the client's text message reaches the
/// origin as the value (its upgrade request carried no secret), the origin's echo of it
/// comes back as the placeholder, a binary frame passes as bytes, the upgrade goes without
/// `Sec-WebSocket-Extensions`, and the audit line names the secret at `websocket` with the
/// echo counted. On a host the secret is not bound to, nothing is rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_text_messages_get_the_swap_and_echoes_are_put_back() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let policy = STANDARD_POLICY.replace(
        "source = { env = \"REAL_GITHUB_TOKEN\" }\n",
        "source = { env = \"REAL_GITHUB_TOKEN\" }\nwebsocket_frames = true\n",
    );
    assert!(policy.contains("websocket_frames"));
    let w = World::new(&policy, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let mut io = ws_open(&p, &w, "api.github.test", &[DEFLATE]).await;
    let key = [0x12, 0x34, 0x56, 0x78];
    let text = ws_frame(
        0x81,
        br#"{"type":"auth","token":"GITHUB_TOKEN"}"#,
        Some(key),
    );
    let binary = ws_frame(0x82, b"GITHUB_TOKEN", Some(key));
    // A text message in two fragments, the placeholder split between them.
    let fragments = [
        ws_frame(0x01, br#"{"again":"GITHUB_"#, Some(key)),
        ws_frame(0x80, br#"TOKEN"}"#, Some(key)),
    ]
    .concat();
    io.write_all(&[text.clone(), binary.clone(), fragments].concat())
        .await
        .expect("write");
    // The origin received the swapped message and the one put together from the
    // fragments, each masked with a key of the proxy's own, and the binary frame as it
    // was.
    let swapped = format!(r#"{{"type":"auth","token":"{REAL_GITHUB}"}}"#).into_bytes();
    let joined = format!(r#"{{"again":"{REAL_GITHUB}"}}"#).into_bytes();
    let want = [
        ws_frame(0x81, &swapped, Some([0; 4])),
        binary.clone(),
        ws_frame(0x81, &joined, Some([0; 4])),
    ];
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let got = w.origin.upgraded_bytes();
            if got.len() >= want.iter().map(Vec::len).sum() {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the origin gets the frames");
    assert_eq!(
        ws_frames_of(&got),
        [
            (0x81, true, swapped.clone()),
            (0x82, true, b"GITHUB_TOKEN".to_vec()),
            (0x81, true, joined.clone()),
        ]
    );
    // The origin echoed them back; the value in its text frames was put back.
    let echoed = [
        (
            0x81,
            true,
            br#"{"type":"auth","token":"GITHUB_TOKEN"}"#.to_vec(),
        ),
        (0x82, true, b"GITHUB_TOKEN".to_vec()),
        (0x81, true, br#"{"again":"GITHUB_TOKEN"}"#.to_vec()),
    ];
    let len = echoed
        .iter()
        .map(|(first, _, p)| ws_frame(*first, p, Some(key)).len())
        .sum();
    let mut back = vec![0u8; len];
    io.read_exact(&mut back).await.expect("echo");
    assert_eq!(ws_frames_of(&back), echoed);
    let ws = w
        .origin
        .records()
        .into_iter()
        .find(|r| r.target == "/ws")
        .expect("ws record");
    assert_eq!(ws.header("sec-websocket-extensions"), None);
    assert_eq!(ws.header("authorization"), None);
    io.shutdown().await.expect("shutdown");
    drop(io);
    let rec = upgraded_record(&p).await;
    let applied: Vec<(String, String)> = rec
        .secrets
        .iter()
        .map(|a| (a.stats.name.to_string(), a.location.to_string()))
        .collect();
    assert_eq!(
        applied,
        [("GITHUB_TOKEN".to_string(), "websocket".to_string())]
    );
    assert_eq!(rec.echoes_scrubbed, 2);

    // other.test is allowed but not the secret's host: frames pass as bytes, the offer of
    // an extension stays.
    let before = w.origin.upgraded_bytes().len();
    let mut io = ws_open(&p, &w, "other.test", &[DEFLATE]).await;
    io.write_all(&text).await.expect("write");
    let mut back = vec![0u8; text.len()];
    io.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, text);
    assert_eq!(&w.origin.upgraded_bytes()[before..], &text[..]);
    let other = w
        .origin
        .records()
        .into_iter()
        .filter(|r| r.target == "/ws")
        .nth(1)
        .expect("second ws record");
    assert_eq!(
        other.header("sec-websocket-extensions").as_deref(),
        Some("permessage-deflate")
    );
}

/// A client that sends its TLS ClientHello in the same write as the CONNECT, without
/// waiting for the 200 (bytes hyper has read past the CONNECT's head): the proxy hands them
/// to the tunnel's TLS and the request goes through with the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_sent_with_the_connect_is_not_lost() {
    use rustls_pki_types::pem::PemObject as _;
    use std::io::{Read as _, Write as _};
    let (w, p) = world().await;
    let authority = format!("api.github.test:{}", w.port());
    let (addr, ca) = (p.addr(), p.ca.ca.cert_pem().to_string());
    let response = tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.expect("ca pem")).expect("root");
        }
        let config = rustls::ClientConfig::builder_with_provider(iron_proxy::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("api.github.test").expect("name");
        let mut tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
            .expect("client connection");
        let mut first = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
            .into_bytes();
        let hello_at = first.len();
        tls.write_tls(&mut first).expect("client hello");
        assert!(first.len() > hello_at + 40, "a ClientHello follows the CONNECT");
        let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        tcp.write_all(&first).expect("one write");
        // The 200, read byte by byte so no TLS byte after it is taken.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(tcp.read(&mut b).expect("read 200"), 1, "{head:?}");
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
        let mut s = rustls::Stream::new(&mut tls, &mut tcp);
        s.write_all(
            format!(
                "GET /user HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer GITHUB_TOKEN\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("request");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // The origin may close without close_notify once the response is whole.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("read: {e}; so far {}", String::from_utf8_lossy(&out)),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("client thread");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let recs = w.origin.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].header("authorization").as_deref(),
        Some(format!("Bearer {REAL_GITHUB}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_sse_and_websocket() {
    let (w, p) = world().await;
    let authority = format!("api.github.test:{}", w.port());
    let mut send = client::tunnel(p.addr(), &authority, "api.github.test", p.ca.ca.cert_pem())
        .await
        .expect("tunnel");
    for _ in 0..3 {
        let resp = client::fetch(
            &mut send,
            Request::get("/k")
                .header("host", &authority)
                .header("authorization", "token GITHUB_TOKEN")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("fetch");
        assert_eq!(resp.status, 200);
    }
    assert_eq!(w.origin.records().len(), 3);
    // A later request on the same tunnel naming another host is refused.
    let resp = client::fetch(
        &mut send,
        Request::get("/k")
            .header("host", format!("other.test:{}", w.port()))
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await
    .expect("fetch");
    assert_eq!(resp.status, 421);

    // SSE: each event arrives before the origin is allowed to send the next one.
    use http_body_util::BodyExt as _;
    let mut send = client::tunnel(p.addr(), &authority, "api.github.test", p.ca.ca.cert_pem())
        .await
        .expect("tunnel");
    send.ready().await.expect("ready");
    let resp = send
        .send_request(
            Request::get("/sse")
                .header("host", &authority)
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("sse");
    let mut body = resp.into_body();
    for n in 0..3 {
        let frame = loop {
            let f = body.frame().await.expect("frame").expect("ok");
            if let Ok(d) = f.into_data() {
                break d;
            }
        };
        assert_eq!(frame, Bytes::from(format!("data: event {n}\n\n")));
        w.origin.release_event();
    }

    // WebSocket-style upgrade: header swap applies, then bytes are relayed both ways.
    let bearer = ("authorization", "Bearer GITHUB_TOKEN");
    let mut io = ws_open(&p, &w, "api.github.test", &[bearer]).await;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    io.write_all(b"ping frame").await.expect("write");
    let mut buf = [0u8; 10];
    io.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping frame");
    let ws = w
        .origin
        .records()
        .into_iter()
        .find(|r| r.target == "/ws")
        .expect("ws record");
    assert_eq!(
        ws.header("authorization"),
        Some(format!("Bearer {REAL_GITHUB}"))
    );
    assert_eq!(ws.header("upgrade").as_deref(), Some("websocket"));
    // Audited when it closes, with what it moved each way.
    io.shutdown().await.expect("shutdown");
    drop(io);
    let rec = upgraded_record(&p).await;
    assert_eq!(rec.status, 101);
    assert_eq!((rec.bytes_in, rec.bytes_out), (10, 10), "{rec:?}");
    assert_eq!(rec.error, None);

    // Any other upgrade (h2c) is not offered to the origin: after it the proxy would see
    // no further request. The request goes as a plain one.
    let mut send = client::tunnel(p.addr(), &authority, "api.github.test", p.ca.ca.cert_pem())
        .await
        .expect("tunnel");
    let r = client::fetch(
        &mut send,
        Request::get("/h2c")
            .header("host", &authority)
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await
    .expect("h2c");
    assert_eq!(r.status, 200, "{r:?}");
    let h2c = w
        .origin
        .records()
        .into_iter()
        .find(|r| r.target == "/h2c")
        .expect("h2c record");
    assert!(h2c.header("upgrade").is_none(), "{h2c:?}");
    assert!(h2c.header("http2-settings").is_none(), "{h2c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_source_fails_closed_and_passthrough_is_untouched() {
    let (w, p) = {
        let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
        let mut env = standard_env();
        env.remove("REAL_GITHUB_TOKEN");
        let p = w.proxy(env).await;
        (w, p)
    };
    let authority = format!("api.github.test:{}", w.port());
    let mut send = client::tunnel(p.addr(), &authority, "api.github.test", p.ca.ca.cert_pem())
        .await
        .expect("tunnel");
    let resp = client::fetch(
        &mut send,
        Request::get("/")
            .header("host", &authority)
            .header("authorization", "Bearer GITHUB_TOKEN")
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await
    .expect("fetch");
    assert_eq!(resp.status, 502);
    assert_eq!(resp.headers["x-iron-proxy-error"], "credential_unavailable");
    assert!(w.origin.records().is_empty());
    // Nothing was forwarded: audited (and counted) as a refusal, not an upstream error.
    let rec = p.audit.records();
    let rec = rec
        .iter()
        .find(|r| r.error == Some("credential_unavailable"))
        .expect("audit");
    assert_eq!(rec.outcome, "refused");

    // Passthrough: the client talks TLS with the origin itself (origin CA, not the proxy's).
    let resp = passthrough_get(&p, &w, Some("Bearer GITHUB_TOKEN")).await;
    assert_eq!(resp.status, 200);
    // Unmodified: the placeholder went through as the client sent it.
    assert_eq!(
        w.origin.records()[0].header("authorization").as_deref(),
        Some("Bearer GITHUB_TOKEN")
    );

    // A passthrough tunnel carries only TLS naming its CONNECT host: another SNI (domain
    // fronting), no SNI, or cleartext is cut before anything reaches the origin.
    let pass = format!("pass.test:{}", w.port());
    for sni in ["other.test", "127.0.0.1"] {
        let r = client::tunnel(p.addr(), &pass, sni, &w.origin.ca_pem).await;
        assert!(r.is_err(), "SNI {sni} was spliced");
    }
    let (status, mut tcp, _) = client::connect(p.addr(), &pass).await.expect("connect");
    assert_eq!(status, 200);
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: pass.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(buf.is_empty(), "cleartext was spliced");
    assert_eq!(
        w.origin.records().len(),
        1,
        "a refused tunnel reached the origin"
    );
    let codes: Vec<_> = p
        .audit
        .records()
        .iter()
        .filter(|r| r.kind == "tunnel" && r.outcome == "refused")
        .filter_map(|r| r.error)
        .collect();
    assert_eq!(
        codes,
        ["sni_mismatch", "sni_missing", "client_hello_invalid"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_and_chunked_uploads_stream() {
    if !have("curl") {
        return;
    }
    let (w, p) = world().await;
    let port = w.port();
    let file = w.dir.path().join("up.bin");
    std::fs::write(&file, vec![7u8; 300_000]).expect("write");
    let r = p
        .curl(&[
            // `Connection` names hop-by-hop fields only in HTTP/1.1.
            "--http1.1",
            &format!("https://api.github.test:{port}/up"),
            "-T",
            file.to_str().expect("path"),
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Connection: X-Drop-Me",
            "-H",
            "X-Drop-Me: 1",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "Proxy-Authorization: Basic Zm9vOkdJVEhVQl9UT0tFTg==",
            "-H",
            "X-Keep: yes",
        ])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let rec = w.origin.records().pop().expect("record");
    assert_eq!(rec.body_len, 300_000);
    assert_eq!(rec.header("x-keep").as_deref(), Some("yes"));
    for h in ["x-drop-me", "keep-alive", "proxy-authorization"] {
        assert!(rec.header(h).is_none(), "{h} was forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_through_the_proxy() {
    let has_requests = std::process::Command::new("python3")
        .args(["-c", "import requests"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_requests {
        return eprintln!("python3 with requests not installed; skipped");
    }
    let (w, p) = world().await;
    let script = format!(
        "import os, requests\n\
         r = requests.get('https://api.github.test:{port}/py', headers={{'Authorization': 'Bearer ' + os.environ['GITHUB_TOKEN']}})\n\
         print(r.status_code)\n\
         r = requests.get('https://other.test:{port}/py', headers={{'Authorization': 'Bearer ' + os.environ['GITHUB_TOKEN']}})\n\
         print(r.status_code, r.headers.get('x-iron-proxy-error'))\n",
        port = w.port()
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .env("HTTPS_PROXY", format!("http://{}", p.addr()))
        .env("REQUESTS_CA_BUNDLE", &p.ca.cert)
        .env("GITHUB_TOKEN", "GITHUB_TOKEN")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "200\n403 placeholder_not_allowed\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = w.origin.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].header("authorization"),
        Some(format!("Bearer {REAL_GITHUB}"))
    );
}

/// An upstream presenting a self-signed certificate marked CA:TRUE (what `openssl req -x509`
/// makes, and webpki refuses as an end-entity) is reached when that very certificate is in
/// `upstream_ca`, as curl does with `--cacert`; the same kind of certificate not naming the
/// host is still refused, and nothing is forwarded to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_upstream_listed_in_upstream_ca_is_reached() {
    if !have("curl") {
        return;
    }
    let names = |n: &str| OriginOptions {
        self_signed: Some(vec![n.to_string()]),
        ..OriginOptions::default()
    };
    let w = World::new(STANDARD_POLICY, names("api.github.test")).await;
    let p = w.proxy(standard_env()).await;
    github_swap_reaches_the_origin(&w, &p).await;

    let w2 = World::new(STANDARD_POLICY, names("somewhere-else.test")).await;
    let p2 = w2.proxy(standard_env()).await;
    let refused = p2
        .curl(&[
            &format!("https://api.github.test:{}/user", w2.port()),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
        ])
        .await;
    assert_eq!(refused.status, 502, "{refused:?}");
    assert_eq!(refused.error_code().as_deref(), Some("upstream_tls_error"));
    assert!(w2.origin.records().is_empty());
}

const CAPABILITY_POLICY: &str = r#"version = 1

[proxy]
listen = "127.0.0.1:0"
allow_cidrs = ["127.0.0.1/32"]
upstream_ca = ["origin-ca.pem"]
resolve = { "api.github.test" = "127.0.0.1", "inject.test" = "127.0.0.1" }

[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = { env = "REAL_GITHUB_TOKEN" }
hosts = ["api.github.test:{PORT}"]
capabilities = [
  { name = "read-issues", method = "GET", path = "/repos/acme/*/issues" },
  { method = "POST", path = "/repos/acme/widget/issues/*/comments" },
]
rate_limit = { requests_per_minute = 1, burst = 3 }

[[secrets]]
name = "INJECT_KEY"
type = "http"
mode = "inject"
source = { env = "REAL_INJECT_KEY" }
inject_header = "X-Api-Key"
hosts = ["inject.test:{PORT}"]
capabilities = [{ method = "GET", path = "/geocode" }]

[[secrets]]
name = "MISSING_KEY"
type = "http"
source = { env = "SET_NOWHERE_AT_ALL" }
optional = true
hosts = ["api.github.test:{PORT}"]
rate_limit = { requests_per_minute = 1, burst = 1 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_and_rate_limits_gate_each_secret() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let w = World::new(CAPABILITY_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let port = w.port();
    let gh = |method: &'static str, path: &'static str| {
        let url = format!("https://api.github.test:{port}{path}");
        let p = &p;
        async move {
            p.curl(&[
                "-X",
                method,
                &url,
                "-H",
                "Authorization: Bearer GITHUB_TOKEN",
                "-D",
                "/dev/stderr",
            ])
            .await
        }
    };
    // Inside the capabilities: swapped and forwarded.
    for (m, path) in [
        ("GET", "/repos/acme/widget/issues"),
        ("POST", "/repos/acme/widget/issues/7/comments"),
    ] {
        let r = gh(m, path).await;
        assert_eq!(r.status, 200, "{m} {path}: {r:?}");
    }
    let recs = w.origin.records();
    assert_eq!(recs.len(), 2);
    assert!(
        recs.iter().all(|r| r.header("authorization").as_deref()
            == Some(format!("Bearer {REAL_GITHUB}").as_str()))
    );
    // Outside them (method, path, an encoded slash past the pattern): refused, not sent.
    for (m, path) in [
        ("DELETE", "/repos/acme/widget/issues"),
        ("GET", "/repos/acme/widget/pulls"),
        ("GET", "/repos/acme/widget/issues/a%2F..%2F..%2Fsecrets"),
    ] {
        let r = gh(m, path).await;
        assert_eq!(r.status, 403, "{m} {path}: {r:?}");
        assert_eq!(r.error_code().as_deref(), Some("capability_not_allowed"));
        assert!(!r.body.contains(REAL_GITHUB));
    }
    // A `..` with a path parameter is a dot segment to servlet containers: 400 first.
    let r = gh("GET", "/repos/acme/widget/issues/..;/..;/secrets").await;
    assert_eq!(r.error_code().as_deref(), Some("invalid_path"), "{r:?}");
    assert_eq!(
        w.origin.records().len(),
        2,
        "a refused request reached the origin"
    );
    // Burst 3, one a minute: the third swap passes, the fourth waits for the limit.
    assert_eq!(gh("GET", "/repos/acme/widget/issues").await.status, 200);
    let limited = gh("GET", "/repos/acme/widget/issues").await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.error_code().as_deref(), Some("rate_limited"));
    let retry_after: u64 = limited
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(w.origin.records().len(), 3);
    // A request without the placeholder is not the secret's business.
    let plain = p
        .curl(&[&format!("https://api.github.test:{port}/anything")])
        .await;
    assert_eq!(plain.status, 200);
    // A request refused for a missing value does not use up the secret's limit.
    for _ in 0..2 {
        let r = p
            .curl(&[
                &format!("https://api.github.test:{port}/x"),
                "-H",
                "X-Api-Key: MISSING_KEY",
            ])
            .await;
        assert_eq!(
            r.error_code().as_deref(),
            Some("credential_unavailable"),
            "{r:?}"
        );
    }
    // A reload that keeps the limit keeps its count.
    p.rt.reload().await.expect("reload");
    assert_eq!(gh("GET", "/repos/acme/widget/issues").await.status, 429);

    // An injecting secret outside its capabilities refuses rather than forward bare.
    let ok = p
        .curl(&[&format!("https://inject.test:{port}/geocode/json?q=x")])
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let bare = p
        .curl(&[&format!("https://inject.test:{port}/directions")])
        .await;
    assert_eq!(bare.error_code().as_deref(), Some("capability_not_allowed"));
    let recs = w.origin.records();
    assert_eq!(recs.len(), 5);
    assert_eq!(recs[4].header("x-api-key").as_deref(), Some(REAL_INJECT));

    // The admin view shows the rules and the refusals, never the value.
    let view =
        iron_proxy::admin::secret_view(&p.rt, p.rt.active().policy.secret("GITHUB_TOKEN").unwrap());
    assert_eq!(view["capabilities"][0]["name"], "read-issues");
    assert_eq!(view["capabilities"][1]["method"], "POST");
    assert_eq!(view["rate_limit"]["burst"], 3);
    assert_eq!(view["rate_limited"], 2);
    assert_eq!(view["invocations"], 3);
    assert!(!view.to_string().contains(REAL_GITHUB));
    let audit = p.audit.records();
    assert_eq!(
        audit
            .iter()
            .filter(|r| r.error == Some("rate_limited"))
            .count(),
        2
    );
    assert_eq!(
        audit
            .iter()
            .filter(|r| r.error == Some("capability_not_allowed"))
            .count(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_where_nothing_is_swapped_and_duplicate_hosts_are_refused() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let (w, p) = world().await;
    let port = w.port();
    let other = format!("https://other.test:{port}/ws");
    for (args, location) in [
        (vec!["-X", "GITHUB_TOKEN"], "method"),
        (
            vec![
                "-H",
                "Connection: Upgrade",
                "-H",
                "Upgrade: websocket, GITHUB_TOKEN",
            ],
            "header:upgrade",
        ),
    ] {
        // HTTP/1.1: the method is refused either way, an Upgrade field exists only there.
        let mut a: Vec<&str> = vec!["--http1.1", &other];
        a.extend(args);
        let r = p.curl(&a).await;
        assert_eq!(r.status, 403, "{location}: {r:?}");
        assert_eq!(r.error_code().as_deref(), Some("placeholder_not_allowed"));
        assert!(r.body.contains(location), "{location}: {}", r.body);
    }
    // Two Host headers: an upstream might route by the second one.
    let authority = format!("api.github.test:{port}");
    let ca = std::fs::read_to_string(&p.ca.cert).unwrap();
    let mut send = client::tunnel(p.addr(), &authority, "api.github.test", &ca)
        .await
        .expect("tunnel");
    let req = Request::get("/user")
        .header("host", &authority)
        .header("host", format!("other.test:{port}"))
        .header("authorization", "Bearer GITHUB_TOKEN")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = client::fetch(&mut send, req).await.expect("fetch");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.headers["x-iron-proxy-error"], "bad_request");
    // A Host that disagrees with the tunnel is audited under the tunnel's destination.
    let r = p
        .curl(&[
            &format!("https://api.github.test:{port}/user"),
            "-H",
            &format!("Host: other.test:{port}"),
        ])
        .await;
    assert_eq!(r.error_code().as_deref(), Some("authority_mismatch"));
    assert!(w.origin.records().is_empty(), "something was forwarded");
    let audit = p.audit.records();
    let mismatch = audit
        .iter()
        .find(|r| r.error == Some("authority_mismatch"))
        .expect("audit");
    assert_eq!(
        (mismatch.host.as_str(), mismatch.port),
        ("api.github.test", port)
    );
    assert_eq!(mismatch.path, "/user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_header_is_never_swapped() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let policy = STANDARD_POLICY
        .replace(
            "hosts = [\"api.github.test:{PORT}\"]",
            "match_headers = [\"*\"]\nhosts = [\"*.github.test:{PORT}\"]",
        )
        .replace(
            "resolve = {",
            "resolve = { \"github_token.github.test\" = \"127.0.0.1\",",
        );
    let w = World::new(&policy, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    // The CONNECT host, SNI and Host (HTTP/2: `:authority`) all agree, so bind passes;
    // the plan must still not put the secret into the routing header.
    for version in ["--http1.1", "--http2"] {
        let r = p
            .curl(&[
                version,
                &format!("https://GITHUB_TOKEN.github.test:{}/", w.port()),
            ])
            .await;
        assert_eq!(
            r.error_code().as_deref(),
            Some("placeholder_not_allowed"),
            "{version}: {r:?}"
        );
    }
    assert!(w.origin.records().is_empty());
}

/// An HTTP/2 client (ALPN `h2` in the intercepted TLS, D10) gets the swap as on HTTP/1.1,
/// and an HTTP/1.1 answer from the origin comes back as HTTP/2; its cookie fields, which
/// HTTP/2 lets it split (RFC 9113 §8.2.3), reach the HTTP/1.1 origin as one `Cookie`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_the_swap_and_their_cookies_go_as_one() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let (w, p) = world().await;
    let r = p
        .curl(&[
            "--http2",
            "-i",
            &format!("https://api.github.test:{}/user", w.port()),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
            "-H",
            "Cookie: a=1",
            "-H",
            "Cookie: b=2",
        ])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("HTTP/2 200"), "{}", r.body);
    let recs = w.origin.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(
        recs[0].header("authorization").as_deref(),
        Some(format!("Bearer {REAL_GITHUB}").as_str())
    );
    assert_eq!(recs[0].header("cookie").as_deref(), Some("a=1; b=2"));
    let cookies = recs[0]
        .headers
        .iter()
        .filter(|(n, _)| n == "cookie")
        .count();
    assert_eq!(cookies, 1);
    // A refusal before the upload was read still reaches the client whole (the stream is
    // reset with NO_ERROR after it, not CANCEL before it).
    let file = w.dir.path().join("upload.bin");
    std::fs::write(&file, vec![b'x'; 1 << 20]).expect("write");
    let upload = format!("@{}", file.display());
    let r = p
        .curl(&[
            "--http2",
            &format!("https://other.test:{}/up", w.port()),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
            "--data-binary",
            &upload,
        ])
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.error_code().as_deref(), Some("placeholder_not_allowed"));
    assert_eq!(w.origin.records().len(), 1);
}

/// gRPC through the proxy (D10): an HTTP/2 client's request reaches an HTTP/2 origin over
/// HTTP/2 with the swap, the response's trailers come back (the credential the origin
/// quoted in one put back to its placeholder), and a second request shares the one
/// upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_goes_over_http2_both_ways_with_its_trailers() {
    let w = World::new(
        STANDARD_POLICY,
        OriginOptions {
            http2: true,
            ..OriginOptions::default()
        },
    )
    .await;
    let p = w.proxy(standard_env()).await;
    let authority = format!("api.github.test:{}", w.port());
    let mut send = client::tunnel_h2(p.addr(), &authority, "api.github.test", p.ca.ca.cert_pem())
        .await
        .expect("h2 tunnel");
    for _ in 0..2 {
        let req = Request::post(format!("https://{authority}/grpc"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", "Bearer GITHUB_TOKEN")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
            .expect("request");
        let resp = client::fetch_h2(&mut send, req).await.expect("fetch");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(&resp.body[..], b"\0\0\0\0\x02ok");
        let trailers = resp.trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-echo-authorization"], "Bearer GITHUB_TOKEN");
    }
    let recs = w.origin.records();
    assert_eq!(recs.len(), 2, "{recs:?}");
    for r in &recs {
        assert_eq!(r.version, http::Version::HTTP_2);
        assert_eq!(
            r.header("authorization").as_deref(),
            Some(format!("Bearer {REAL_GITHUB}").as_str())
        );
        assert_eq!(r.body_len, 7);
    }
    assert_eq!(w.origin.connections(), 1, "one upstream HTTP/2 connection");

    // Over HTTP/2 every request trailer is forwarded, declared or not: one holding a
    // placeholder fails the request, as a declared one does over HTTP/1.1.
    type Frames = http_body_util::StreamBody<
        futures_util::stream::Iter<
            std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
        >,
    >;
    let mut send =
        client::tunnel_h2::<Frames>(p.addr(), &authority, "api.github.test", p.ca.ca.cert_pem())
            .await
            .expect("h2 tunnel");
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-late", http::HeaderValue::from_static("GITHUB_TOKEN"));
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(vec![
        Ok(hyper::body::Frame::data(Bytes::from_static(
            b"\0\0\0\0\x02hi",
        ))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ]));
    let req = Request::post(format!("https://{authority}/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("request");
    let resp = client::fetch_h2(&mut send, req).await.expect("fetch");
    assert_eq!(resp.status, 403, "{resp:?}");
    let body = String::from_utf8_lossy(&resp.body);
    assert!(
        body.contains("placeholder_not_allowed") && body.contains("trailer:x-late"),
        "{body}"
    );
}

/// `upstream_proxy` (REFERENCE D19): intercepted requests and passthrough tunnels go
/// through the corporate proxy with `CONNECT` (to the `resolve` override's address), a
/// `no_proxy` host is dialed directly, and an address in a deny CIDR is refused before the
/// corporate proxy is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dial_goes_through_the_upstream_proxy_but_no_proxy_hosts() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let corp = iron_tests::corp_proxy::CorpProxy::start().await;
    let policy = STANDARD_POLICY.replace(
        "passthrough = [",
        &format!(
            "upstream_proxy = \"http://{}\"\nno_proxy = [\"other.test\"]\npassthrough = [",
            corp.addr
        ),
    );
    let policy = policy.replace(
        "allow = [\"other.test:{PORT}\"",
        "allow = [\"private.test:{PORT}\", \"other.test:{PORT}\"",
    );
    assert!(policy.contains("upstream_proxy") && policy.contains("private.test:{PORT}\""));
    let w = World::new(&policy, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let port = w.port();
    let target = format!("127.0.0.1:{port}");

    let r = w
        .github_get(&format!("http://{}", p.addr()), &p.ca.cert, &[])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(corp.targets(), std::slice::from_ref(&target));
    assert_eq!(
        w.origin.records()[0].header("authorization").as_deref(),
        Some(format!("Bearer {REAL_GITHUB}").as_str())
    );

    // no_proxy: straight to the origin.
    let r = p.curl(&[&format!("https://other.test:{port}/")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(corp.targets().len(), 1);

    // A passthrough tunnel is spliced through the corporate proxy too.
    let resp = passthrough_get(&p, &w, None).await;
    assert_eq!(resp.status, 200);
    assert_eq!(corp.targets(), [target.clone(), target]);

    // private.test resolves to 10.1.2.3 (denied): refused here, the proxy never asked.
    let r = p.curl(&[&format!("https://private.test:{port}/")]).await;
    assert!(r.stderr.contains("403") || r.status == 403, "{r:?}");
    assert_eq!(corp.targets().len(), 2);
    let denied = p
        .audit
        .records()
        .iter()
        .any(|r| r.error == Some("destination_address_denied"));
    assert!(denied, "no destination_address_denied in the audit log");
}

/// `upstream_proxy` over SOCKS5 (`socks5h://`) and HTTP CONNECT, each requiring the
/// proxy's own credential (`upstream_proxy_auth`, a secret reference): requests and
/// passthrough tunnels go through with it; a wrong credential gets nothing through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_and_authenticated_upstream_proxies() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    for scheme in ["socks5h", "http"] {
        let corp = iron_tests::corp_proxy::CorpProxy::start_with_auth("svc:c0rp s3cret").await;
        let policy = STANDARD_POLICY.replace(
            "passthrough = [",
            &format!(
                "upstream_proxy = \"{scheme}://{}\"\nupstream_proxy_auth = {{ env = \"CORP_PROXY_AUTH\" }}\npassthrough = [",
                corp.addr
            ),
        );
        let w = World::new(&policy, OriginOptions::default()).await;
        let port = w.port();
        let via = |t: &str| {
            if scheme == "http" {
                t.to_string()
            } else {
                format!("socks5 {t}")
            }
        };
        let target = via(&format!("127.0.0.1:{port}"));
        let mut env = standard_env();
        env.insert("CORP_PROXY_AUTH".into(), "svc:c0rp s3cret".into());
        let p = w.proxy(env).await;
        let proxy_url = format!("http://{}", p.addr());
        let r = w.github_get(&proxy_url, &p.ca.cert, &[]).await;
        assert_eq!(r.status, 200, "{scheme}: {r:?}");
        assert_eq!(corp.targets(), std::slice::from_ref(&target), "{scheme}");
        assert_eq!(
            w.last_authorization(),
            Some(format!("Bearer {REAL_GITHUB}"))
        );
        let resp = passthrough_get(&p, &w, None).await;
        assert_eq!(resp.status, 200, "{scheme}");
        assert_eq!(corp.targets().len(), 2, "{scheme}");
        drop(p);

        // The same policy with a wrong credential: refused by the corporate proxy, so
        // the request fails (502) and the origin sees nothing more.
        let mut env = standard_env();
        env.insert("CORP_PROXY_AUTH".into(), "svc:wrong".into());
        let p = w.proxy(env).await;
        let seen = w.origin.records().len();
        let r = w
            .github_get(&format!("http://{}", p.addr()), &p.ca.cert, &[])
            .await;
        assert_eq!(r.status, 502, "{scheme}: {r:?}");
        assert_eq!(w.origin.records().len(), seen, "{scheme}");
        assert_eq!(
            corp.targets().len(),
            2,
            "{scheme}: the refused CONNECT was recorded"
        );
    }
}

/// `GET /` to `pass.test` through a passthrough tunnel of `p` (the client talks TLS with
/// the origin itself, trusting the origin's CA), with `authorization` if given.
#[allow(clippy::expect_used)] // test helper: a failure is a failed test
async fn passthrough_get(p: &InProcess, w: &World, authorization: Option<&str>) -> client::Fetched {
    let mut send = client::tunnel(
        p.addr(),
        &format!("pass.test:{}", w.port()),
        "pass.test",
        &w.origin.ca_pem,
    )
    .await
    .expect("passthrough tunnel");
    let mut req = Request::get("/").header("host", "pass.test");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    client::fetch(&mut send, req.body(Full::new(Bytes::new())).expect("req"))
        .await
        .expect("fetch")
}

/// A test world whose policy sends `name` to a loopback origin of the test's own that
/// presents `pem` (trusted as `upstream_ca`), with `secrets` (TOML) after the `[proxy]` table.
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn world_with_origin(name: &str, pem: &str, secrets: &str) -> World {
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    std::fs::write(w.dir.path().join("own-origin.pem"), pem).unwrap();
    std::fs::write(
        &w.policy_path,
        format!(
            r#"version = 1

[proxy]
listen = "127.0.0.1:0"
allow_cidrs = ["127.0.0.1/32"]
upstream_ca = ["own-origin.pem"]
resolve = {{ "{name}" = "127.0.0.1" }}

{secrets}"#
        ),
    )
    .unwrap();
    w
}

/// A loopback listener with a TLS acceptor for `name` (a self-signed certificate that is
/// its own CA): the listener, the acceptor, its address and the certificate (PEM).
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn tls_listener(
    name: &str,
) -> (
    tokio::net::TcpListener,
    tokio_rustls::TlsAcceptor,
    std::net::SocketAddr,
    String,
) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(iron_proxy::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, acceptor, addr, cert.pem())
}

/// A TLS origin for `name` that records each request head as received (raw bytes, so the
/// header casing shows) and answers `200 ok` with a mixed-case header, one request per
/// connection. Returns its address, its self-signed certificate (PEM) and the heads.
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn raw_head_origin(
    name: &str,
) -> (
    std::net::SocketAddr,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::AsyncWriteExt as _;
    let (listener, acceptor, addr, pem) = tls_listener(name).await;
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = heads.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let head = read_request_head(&mut tls).await.unwrap_or_default();
            recorded
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let _ = tls
                .write_all(
                    b"HTTP/1.1 200 OK\r\nX-Origin-MixedCase: yes\r\ncontent-length: 2\r\nConnection: close\r\n\r\nok",
                )
                .await;
            let _ = tls.shutdown().await;
        }
    });
    (addr, pem, heads)
}

/// Header names keep the client's casing on the way to the origin, swapped or not, and the
/// origin's casing on the way back (REFERENCE §4 "keeps the client's casing on the wire");
/// a header the proxy adds (inject) goes out in Title-Case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_casing_is_kept_both_ways() {
    if !have("curl") {
        return;
    }
    let (addr, pem, heads) = raw_head_origin("case.test").await;
    let port = addr.port();
    let w = world_with_origin(
        "case.test",
        &pem,
        &format!(
            r#"[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = {{ env = "REAL_GITHUB_TOKEN" }}
hosts = ["case.test:{port}"]

[[secrets]]
name = "INJECT_KEY"
type = "http"
mode = "inject"
source = {{ env = "REAL_INJECT_KEY" }}
inject_header = "x-inject-key"
hosts = ["case.test:{port}"]
"#
        ),
    )
    .await;
    let p = w.proxy(standard_env()).await;
    let r = p
        .curl(&[
            // HTTP/2 field names are lower case on the wire.
            "--http1.1",
            &format!("https://case.test:{port}/x"),
            "-i",
            "-H",
            "AUTHORIZATION: Bearer GITHUB_TOKEN",
            "-H",
            "x-MiXeD-Case: 1",
            "-H",
            "accept: */*",
        ])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("\nX-Origin-MixedCase: yes"), "{}", r.body);
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = &heads[0];
    assert!(
        head.contains(&format!("\r\nAUTHORIZATION: Bearer {REAL_GITHUB}\r\n")),
        "{head}"
    );
    assert!(head.contains("\r\nx-MiXeD-Case: 1\r\n"), "{head}");
    assert!(head.contains("\r\naccept: */*\r\n"), "{head}");
    assert!(
        head.contains(&format!("\r\nX-Inject-Key: {REAL_INJECT}\r\n")),
        "{head}"
    );
}

/// A TLS origin for `name` whose first connection answers one request (keep-alive), then
/// reads the next request head and drops the connection without a word (no close_notify),
/// as when its keep-alive timer fires just as that request arrives; later connections answer
/// every request. Returns its address, its certificate (PEM), the request targets it read
/// and the connections it accepted.
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn keepalive_dropping_origin(
    name: &str,
) -> (
    std::net::SocketAddr,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (listener, acceptor, addr, pem) = tls_listener(name).await;
    let targets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (t, a) = (targets.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let index = a.fetch_add(1, Ordering::SeqCst);
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let t = t.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for n in 0.. {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    };
                    let head: Vec<u8> = buf.drain(..end).collect();
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let target = head.split(' ').nth(1).unwrap_or("").to_string();
                    t.lock().unwrap().push(target);
                    if index == 0 && n == 1 {
                        return; // dropped: no answer, no close_notify
                    }
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if tls.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, pem, targets, accepted)
}

/// An origin that drops a keep-alive connection just as a GET arrives on it (after it sat
/// idle in the proxy's pool): the proxy sends the GET again on a new connection and the
/// client gets the answer, not a 502; the resend is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_dropped_by_the_origin_on_an_idle_connection_is_sent_again() {
    use std::sync::atomic::Ordering;
    if !have("curl") {
        return;
    }
    let (addr, pem, targets, accepted) = keepalive_dropping_origin("drop.test").await;
    let port = addr.port();
    let w = world_with_origin(
        "drop.test",
        &pem,
        &format!(
            r#"[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = {{ env = "REAL_GITHUB_TOKEN" }}
hosts = ["drop.test:{port}"]
"#
        ),
    )
    .await;
    let p = w.proxy(standard_env()).await;
    let auth = "Authorization: Bearer GITHUB_TOKEN";
    let first = p
        .curl(&[&format!("https://drop.test:{port}/first"), "-H", auth])
        .await;
    assert_eq!(first.status, 200, "{first:?}");
    // Idle in the pool long enough that a resend is allowed (250 ms).
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let second = p
        .curl(&[&format!("https://drop.test:{port}/second"), "-H", auth])
        .await;
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(second.body, "ok");
    assert_eq!(
        targets.lock().unwrap().clone(),
        ["/first", "/second", "/second"]
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let (status, body) = iron_proxy::admin::call(
        iron_proxy::admin::start(p.rt.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .0,
        http::Method::GET,
        "/metrics",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("iron_proxy_upstream_requests_resent_total 1\n"),
        "{body}"
    );
}

/// A world whose policy reaches the cleartext origin `name:port` (on loopback) as the
/// `GITHUB_TOKEN` secret's host, `extra` appended to the policy.
async fn cleartext_origin_world(name: &str, port: u16, extra: &str) -> World {
    // The policy names an upstream CA (unused: the origin is cleartext).
    let (_, _, _, pem) = tls_listener(name).await;
    world_with_origin(
        name,
        &pem,
        &format!(
            r#"[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = {{ env = "REAL_GITHUB_TOKEN" }}
hosts = ["{name}:{port}"]
allow_plaintext = true

{extra}"#
        ),
    )
    .await
}

/// A raw TCP connection to the proxy with a CONNECT tunnel to `host:port` opened on it (the
/// proxy's `200` read), for tests that speak inside the tunnel byte by byte.
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn open_tunnel(p: &InProcess, host: &str, port: u16) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    tcp.write_all(
        format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    tcp
}

/// Reads a request head, through its blank line, from `io` (a test origin's side): the
/// bytes read, or `None` when the stream ends or fails first.
async fn read_request_head<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    Some(head)
}

/// The audit record of the request to `path`, waiting up to 5 s for it to be written.
async fn audit_record(p: &InProcess, path: &str) -> iron_proxy::audit::AuditRecord {
    audit_record_where(p, |r| r.path == path).await
}

/// The first audit record `pick` accepts, waiting up to 5 s for it to be written.
async fn audit_record_where(
    p: &InProcess,
    pick: impl Fn(&iron_proxy::audit::AuditRecord) -> bool,
) -> iron_proxy::audit::AuditRecord {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(r) = p.audit.records().into_iter().find(|r| pick(r)) {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "no such audit record");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A client that does not trust the proxy's CA fails its TLS handshake inside the CONNECT
/// tunnel: none of its requests ever arrive, so the tunnel itself is audited (`connect`,
/// `client_tls_handshake_failed`, the host) — the case REFERENCE.md §5 c1 asks to surface.
/// A tunnel whose client sends neither TLS nor HTTP is audited too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn a_tunnel_whose_client_rejects_the_proxy_ca_is_audited() {
    use tokio::io::AsyncWriteExt as _;
    if !have("curl") {
        return;
    }
    let (w, p) = world().await;
    let (_, _, _, other_ca) = tls_listener("other-ca.test").await;
    let wrong = w.dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong, other_ca).unwrap();
    let port = w.port();
    let r = curl_via(
        p.addr(),
        &wrong,
        &[&format!("https://api.github.test:{port}/user")],
    )
    .await;
    assert_ne!(r.exit, 0, "{r:?}");
    assert_eq!(r.status, 0, "{r:?}");
    assert!(w.origin.records().is_empty());
    let tunnel = audit_record_where(&p, |r| r.kind == "connect").await;
    assert_eq!(tunnel.host, "api.github.test", "{tunnel:?}");
    assert_eq!(tunnel.port, port, "{tunnel:?}");
    assert_eq!(tunnel.method, "CONNECT", "{tunnel:?}");
    assert_eq!(tunnel.outcome, "client_cancel", "{tunnel:?}");
    assert_eq!(
        tunnel.error,
        Some("client_tls_handshake_failed"),
        "{tunnel:?}"
    );
    assert_eq!(tunnel.scheme, "https", "{tunnel:?}");

    // Neither TLS nor HTTP inside the tunnel: the record says only `tunnel`.
    let mut tcp = open_tunnel(&p, "api.github.test", port).await;
    tcp.write_all(&[0u8, 1, 2, 3]).await.unwrap();
    let rec = audit_record_where(&p, |r| r.error == Some("tunnel_not_tls_or_http")).await;
    assert_eq!(rec.scheme, "tunnel", "{rec:?}");

    // Cleartext HTTP inside the tunnel whose first head hyper refuses (400), and one the
    // client abandons half-written: no request reaches the pipeline, the tunnel is audited.
    for (sent, code) in [
        (&b"GARBAGE\r\n\r\n"[..], "request_head_invalid"),
        (&b"GET / HT"[..], "no_request"),
    ] {
        let mut tcp = open_tunnel(&p, "api.github.test", port).await;
        tcp.write_all(sent).await.unwrap();
        tcp.shutdown().await.unwrap();
        let rec = audit_record_where(&p, |r| r.error == Some(code)).await;
        assert_eq!(
            (rec.kind, rec.outcome, rec.host.as_str(), rec.scheme),
            ("connect", "client_cancel", "api.github.test", "http"),
            "{rec:?}"
        );
    }
}

/// An origin that sends the response head and 10 of 100 body bytes, then stalls: after
/// `idle_timeout_secs` without a byte the proxy cuts the response (the client sees it end
/// short of its Content-Length instead of waiting as long as the origin holds on) and
/// audits `upstream_error` with the 10 bytes it passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn a_response_body_that_stalls_is_cut_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = origin.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = origin.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut tcp).await.is_none() {
                    return;
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                    .await;
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            });
        }
    });
    let w = cleartext_origin_world(
        "stall.test",
        port,
        "[proxy.limits]\nidle_timeout_secs = 1\n",
    )
    .await;
    let p = w.proxy(standard_env()).await;
    let mut tcp = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    tcp.write_all(
        format!("GET http://stall.test:{port}/slow HTTP/1.1\r\nHost: stall.test:{port}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tcp.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(ended.is_ok(), "the response was not cut: {answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n0123456789"), "{answer}");
    let rec = audit_record(&p, "/slow").await;
    assert_eq!(rec.outcome, "upstream_error", "{rec:?}");
    assert_eq!(rec.bytes_out, 10, "{rec:?}");
}

/// A client that asks for a large body and stops reading: once the proxy's write to it has
/// been stuck for `idle_timeout_secs`, the connection is closed and the request audited
/// (hyper stops polling the body while it cannot flush, so only a write timeout can end it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn a_client_that_stops_reading_is_cut_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const BODY: usize = 256 * 1024 * 1024;
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = origin.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = origin.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut tcp).await.is_none() {
                    return;
                }
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
                if tcp.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let block = vec![b'x'; 64 * 1024];
                for _ in 0..BODY / block.len() {
                    if tcp.write_all(&block).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let w =
        cleartext_origin_world("deaf.test", port, "[proxy.limits]\nidle_timeout_secs = 1\n").await;
    let p = w.proxy(standard_env()).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(p.addr()).await.unwrap();
    tcp.write_all(
        format!("GET http://deaf.test:{port}/big HTTP/1.1\r\nHost: deaf.test:{port}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    // Never read: the proxy's writes stall once the socket buffers are full.
    let rec = audit_record_where(&p, |r| r.path == "/big").await;
    assert_eq!(rec.outcome, "client_cancel", "{rec:?}");
    assert!(
        rec.bytes_out < BODY as u64,
        "the whole body went out: {rec:?}"
    );
    // The connection is closed: draining what was buffered ends, short of the body.
    let mut got = Vec::new();
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tcp.read_to_end(&mut got),
    )
    .await;
    assert!(ended.is_ok(), "the connection was left open");
    assert!(got.len() < BODY, "{}", got.len());
}

/// An origin that closes the connection halfway through an upload: the client still there
/// gets 502 `upstream_error`, and the audit line says `upstream_error`, not the client's
/// cancel (hyper's client drops the request body when the upstream fails under it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn an_origin_cutting_an_upload_is_the_upstreams_failure_not_the_clients() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = origin.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = origin.accept().await {
            // Read the head and about 64 KiB of the body, then close with the rest unread
            // (the kernel answers the next segments with a reset).
            let mut got = 0;
            let mut chunk = vec![0u8; 16 * 1024];
            while got < 64 * 1024 {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            drop(tcp);
        }
    });
    let w = cleartext_origin_world("cut.test", port, "").await;
    let p = w.proxy(standard_env()).await;
    let total = 8 * 1024 * 1024;
    let tcp = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let head = format!(
        "POST http://cut.test:{port}/upload HTTP/1.1\r\nHost: cut.test:{port}\r\nContent-Length: {total}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let block = vec![b'u'; 64 * 1024];
        for _ in 0..total / block.len() {
            wr.write_all(&block).await?;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    writer.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("upstream_error"), "{answer}");
    let rec = audit_record(&p, "/upload").await;
    assert_eq!(rec.outcome, "upstream_error", "{rec:?}");
    assert_eq!(rec.status, 502, "{rec:?}");
}

/// The response-header timeout runs from the end of the request body: an upload that takes
/// longer than it still completes. A body that stalls for `idle_timeout_secs` is cut (504),
/// and a client that goes away mid-body is audited `client_cancel` with the bytes it sent,
/// not as an upstream failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_uploads_complete_and_stalled_or_abandoned_ones_are_told_apart() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if !have("curl") {
        return;
    }
    let policy = format!(
        "{STANDARD_POLICY}\n[proxy.limits]\nupstream_response_header_timeout_secs = 1\nidle_timeout_secs = 2\n"
    );
    let w = World::new(
        &policy,
        OriginOptions {
            plain: true,
            ..OriginOptions::default()
        },
    )
    .await;
    let p = w.proxy(standard_env()).await;
    let port = w.port();
    let file = w.dir.path().join("up.bin");
    std::fs::write(&file, vec![7u8; 250_000]).expect("write");
    // ~2.5 s of upload against a 1 s response-header timeout.
    let r = p
        .curl(&[
            &format!("http://plain.test:{port}/up"),
            "-T",
            file.to_str().expect("path"),
            "--limit-rate",
            "100K",
        ])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(w.origin.records().pop().expect("record").body_len, 250_000);

    let head = format!(
        "POST http://plain.test:{port}/stall HTTP/1.1\r\nHost: plain.test:{port}\r\nContent-Length: 100\r\n\r\n0123456789"
    );
    // Stalled: 10 of 100 bytes, then nothing.
    let mut tcp = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    tcp.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("upstream_timeout"), "{answer}");

    // Abandoned: 10 of 100 bytes, then the connection closes.
    let mut tcp = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    tcp.write_all(head.replace("/stall", "/gone").as_bytes())
        .await
        .expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(tcp);
    let rec = audit_record(&p, "/gone").await;
    assert_eq!(rec.outcome, "client_cancel", "{rec:?}");
    assert_eq!(rec.bytes_in, 10, "{rec:?}");
    let stalled = p
        .audit
        .records()
        .into_iter()
        .find(|r| r.path == "/stall")
        .expect("stall record");
    assert_eq!(stalled.error, Some("upstream_timeout"));
    assert_eq!(stalled.bytes_in, 10, "{stalled:?}");
}

/// An upstream that accepts the TCP connection and never finishes the TLS handshake is given
/// up on after the connect and handshake timeouts (504), not held until the response-header
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_handshake_times_out() {
    if !have("curl") {
        return;
    }
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    std::fs::write(
        &w.policy_path,
        format!(
            "version = 1\n[proxy]\nlisten = \"127.0.0.1:0\"\nallow = [\"stall.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32\"]\nresolve = {{ \"stall.test\" = \"127.0.0.1\" }}\n[proxy.limits]\nupstream_connect_timeout_secs = 1\ntls_handshake_timeout_secs = 1\n"
        ),
    )
    .expect("policy");
    let p = w.proxy(standard_env()).await;
    let started = std::time::Instant::now();
    let r = p.curl(&[&format!("https://stall.test:{port}/")]).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.error_code().as_deref(), Some("upstream_timeout"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    drop(silent);
}

/// Reads from `io` until `done` holds for what was read, the stream ends, or 10 s pass.
async fn read_until<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    done: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done(&got) {
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    got
}

/// True when `bytes` holds a whole chunked message: a head, a last chunk and the trailer
/// section (possibly empty) closed by its blank line.
fn chunked_message_complete(bytes: &[u8]) -> bool {
    let Some(head) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let body = &bytes[head + 2..];
    body.windows(5)
        .position(|w| w == b"\r\n0\r\n")
        .is_some_and(|i| {
            let rest = &body[i + 5..];
            rest.starts_with(b"\r\n") || rest.windows(4).any(|w| w == b"\r\n\r\n")
        })
}

/// Trailer fields pass both ways: a chunked upload's declared trailer reaches the origin,
/// with `TE: trailers`, and the origin's response trailer reaches the client that asked
/// for trailers. A placeholder in a request trailer is refused (403
/// `placeholder_not_allowed`, naming the trailer) and the origin never gets that request
/// whole: nothing is swapped into a trailer, and nothing is sent unswapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)] // test set-up: a failure is a failed test
async fn trailer_fields_pass_both_ways_and_a_placeholder_in_one_is_refused() {
    use tokio::io::AsyncWriteExt as _;
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = origin.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = origin.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                loop {
                    let req = read_until(&mut tcp, chunked_message_complete).await;
                    if !chunked_message_complete(&req) {
                        return;
                    }
                    recorded
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&req).to_ascii_lowercase());
                    let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n";
                    if tcp.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let w = cleartext_origin_world("trail.test", port, "").await;
    let p = w.proxy(standard_env()).await;
    let upload = |trailer: &str| {
        format!(
            "POST http://trail.test:{port}/up HTTP/1.1\r\nHost: trail.test:{port}\r\nTE: trailers\r\nTrailer: X-Digest\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Digest: {trailer}\r\n\r\n"
        )
    };

    let mut tcp = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    tcp.write_all(upload("sha=1").as_bytes()).await.unwrap();
    let answer = read_until(&mut tcp, chunked_message_complete).await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n0\r\nx-checksum: abc\r\n\r\n"),
        "{answer}"
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        for part in [
            "\r\nte: trailers\r\n",
            "\r\ntrailer: x-digest\r\n",
            "hello",
            "\r\n0\r\nx-digest: sha=1\r\n\r\n",
        ] {
            assert!(seen[0].contains(part), "{part:?} not in {}", seen[0]);
        }
    }

    let mut tcp = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    tcp.write_all(upload("GITHUB_TOKEN").as_bytes())
        .await
        .unwrap();
    let answer = read_until(&mut tcp, |b| {
        String::from_utf8_lossy(b).contains("placeholder_not_allowed\"")
    })
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("trailer:x-digest"), "{answer}");
    let rec = audit_record_where(&p, |r| r.error == Some("placeholder_not_allowed")).await;
    assert_eq!((rec.status, rec.path.as_str()), (403, "/up"), "{rec:?}");
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        1,
        "the origin got the refused request whole: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.contains("github_token") || s.contains(&REAL_GITHUB.to_ascii_lowercase()))
    );
}

/// Sends raw SOCKS5 bytes `greeting` then `request` (when the method reply allows) and
/// returns every byte the proxy answered before closing.
#[allow(clippy::expect_used)] // a test helper: a failed step is a failed test
async fn socks_raw(proxy: std::net::SocketAddr, greeting: &[u8], request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(greeting).await.expect("greeting");
    let mut method = [0u8; 2];
    s.read_exact(&mut method).await.expect("method reply");
    let mut out = method.to_vec();
    if method[1] != 0xff {
        s.write_all(request).await.expect("request");
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_clients_get_the_same_tunnel_as_connect() {
    if !have("curl") {
        return;
    }
    let (w, p) = world().await;
    let port = w.port();
    let socks = format!("socks5h://{}", p.addr());
    // A domain-name target: intercepted, swapped, audited as the tunnel's requests.
    let ok = w.github_get(&socks, &p.ca.cert, &[]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        w.last_authorization(),
        Some(format!("Bearer {REAL_GITHUB}"))
    );
    // The placeholder elsewhere is refused inside the tunnel as over CONNECT.
    let refused = curl_via_url(
        &socks,
        &p.ca.cert,
        &[
            &format!("https://other.test:{port}/"),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
        ],
    )
    .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    // A destination off the allowlist: reply 0x02 (not allowed by ruleset), audited.
    let denied = curl_via_url(&socks, &p.ca.cert, &["https://evil.test/"]).await;
    assert_ne!(denied.exit, 0, "{denied:?}");
    let rec = p
        .audit
        .records()
        .into_iter()
        .rfind(|r| r.method == "SOCKS5")
        .expect("socks audit line");
    assert_eq!(
        (rec.host.as_str(), rec.error),
        ("evil.test", Some("destination_not_allowed"))
    );
    // Raw protocol: no acceptable method; a BIND (command 2);
    // an IPv4 target off the allowlist; an unknown address type.
    assert_eq!(socks_raw(p.addr(), &[5, 1, 0x80], &[]).await, [5, 0xff]);
    let bind = socks_raw(p.addr(), &[5, 1, 0], &[5, 2, 0, 1, 127, 0, 0, 1, 0, 80]).await;
    assert_eq!(&bind[..4], [5, 0, 5, 7], "{bind:?}");
    let ip = socks_raw(
        p.addr(),
        &[5, 1, 0],
        &[5, 1, 0, 1, 127, 0, 0, 2, (port >> 8) as u8, port as u8],
    )
    .await;
    assert_eq!(&ip[..4], [5, 0, 5, 2], "{ip:?}");
    let atyp = socks_raw(p.addr(), &[5, 1, 0], &[5, 1, 0, 9, 0, 0]).await;
    assert_eq!(&atyp[..4], [5, 0, 5, 8], "{atyp:?}");
    // HTTP clients on the same port are unaffected.
    github_swap_reaches_the_origin_again(&w, &p).await;
}

/// As `github_swap_reaches_the_origin`, when the origin has already seen requests.
async fn github_swap_reaches_the_origin_again(w: &World, p: &InProcess) {
    let ok = w
        .github_get(&format!("http://{}", p.addr()), &p.ca.cert, &[])
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        w.last_authorization(),
        Some(format!("Bearer {REAL_GITHUB}"))
    );
}

/// `on_failure = "open"` (REFERENCE D15): an injecting secret whose value cannot be had
/// is left out and the request forwarded without it (audited `skipped`); a request that
/// carries its placeholder is still refused; `closed` (the default) refuses with 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injecting_secret_that_fails_open_is_left_out() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let policy = STANDARD_POLICY.replace(
        "inject_formatter = \"Token {value}\"",
        "inject_formatter = \"Token {value}\"\non_failure = \"open\"",
    );
    assert!(policy.contains("on_failure"));
    let w = World::new(&policy, OriginOptions::default()).await;
    let port = w.port();
    let mut env = standard_env();
    env.remove("REAL_INJECT_KEY");
    let p = w.proxy(env).await;
    let url = format!("https://inject.test:{port}/x");
    let open = p.curl(&[&url]).await;
    assert_eq!(open.status, 200, "{open:?}");
    let rec = w.origin.records().pop().expect("forwarded");
    assert_eq!(rec.header("x-api-key"), None);
    let audit = p.audit.records().pop().expect("audit");
    assert_eq!(audit.outcome, "forwarded");
    assert_eq!(
        audit.secrets[0].location.to_string(),
        "skipped:credential_unavailable"
    );
    assert_eq!(p.rt.stats("INJECT_KEY").usage().invocations, 0);
    // The placeholder in the injected header is never forwarded without its value.
    let seen = w.origin.records().len();
    let carried = p.curl(&[&url, "-H", "X-Api-Key: INJECT_KEY"]).await;
    assert_eq!(carried.status, 502, "{carried:?}");
    assert_eq!(
        carried.error_code().as_deref(),
        Some("credential_unavailable")
    );
    assert_eq!(w.origin.records().len(), seen);
    drop(p);

    // The default fails closed.
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let mut env = standard_env();
    env.remove("REAL_INJECT_KEY");
    let p = w.proxy(env).await;
    let closed = p
        .curl(&[&format!("https://inject.test:{}/x", w.port())])
        .await;
    assert_eq!(closed.status, 502, "{closed:?}");
    assert!(w.origin.records().is_empty());
}
