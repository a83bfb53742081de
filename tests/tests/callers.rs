//! End-to-end: caller authentication at the proxy port and per-caller grants
//! (`[[callers]]`, REFERENCE.md D21), with real curl through an in-process proxy and the
//! `iron-proxy run --caller` binary.
#![allow(clippy::expect_used)] // setup helpers: a failed step is a failed test

use std::collections::HashMap;
use std::path::PathBuf;

use iron_proxy::origin::OriginOptions;
use iron_tests::*;

const CI_TOKEN: &str = "ci-proxy-token-0123456789abcdef";
const OPS_TOKEN: &str = "ops/proxy:token+0123456789@abc";

/// The standard policy with two callers: `ci` may use `GITHUB_TOKEN` only, `ops` every
/// secret (its token has characters a proxy URL must percent-encode).
fn policy() -> String {
    format!(
        r#"{STANDARD_POLICY}
[[callers]]
name = "ci"
token = {{ env = "CI_PROXY_TOKEN" }}
secrets = ["GITHUB_TOKEN"]

[[callers]]
name = "ops"
token = {{ file = "ops.token" }}
secrets = ["*"]
"#
    )
}

fn env() -> HashMap<String, String> {
    let mut env = standard_env();
    env.insert("CI_PROXY_TOKEN".into(), CI_TOKEN.into());
    env
}

async fn world() -> World {
    let w = World::new(&policy(), OriginOptions::default()).await;
    std::fs::write(w.dir.path().join("ops.token"), format!("{OPS_TOKEN}\n")).expect("token");
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_authenticate_and_use_only_their_grants() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let w = world().await;
    let p = w.proxy(env()).await;
    let port = w.port();
    let github = format!("https://api.github.test:{port}/user");
    let bearer = ["-H", "Authorization: Bearer GITHUB_TOKEN"];
    let ci = format!("ci:{CI_TOKEN}");

    // No credential, or a wrong one: the CONNECT gets 407 and nothing reaches the origin.
    for extra in [&[][..], &["--proxy-user", "ci:wrong-token"][..]] {
        let args: Vec<&str> = [github.as_str()]
            .into_iter()
            .chain(bearer)
            .chain(extra.iter().copied())
            .collect();
        let refused = p.curl(&args).await;
        assert_ne!(refused.exit, 0, "{refused:?}");
        assert!(refused.stderr.contains("407"), "{refused:?}");
    }
    assert!(w.origin.records().is_empty());
    let connects: Vec<_> = p
        .audit
        .records()
        .into_iter()
        .filter(|r| r.kind == "connect")
        .collect();
    assert_eq!(connects.len(), 2);
    for r in &connects {
        assert_eq!(r.status, 407);
        assert_eq!(r.error, Some("proxy_auth_required"));
        assert_eq!(r.host, "api.github.test");
        assert!(r.caller.is_none());
    }
    // An absolute-form request gets the 407 envelope with the challenge.
    let plain = p.curl(&["-i", &format!("http://plain.test:{port}/")]).await;
    assert_eq!(plain.status, 407, "{plain:?}");
    assert!(
        plain
            .body
            .to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm=\"iron-proxy\""),
        "{plain:?}"
    );
    assert!(plain.body.contains("\"error\":\"proxy_auth_required\""));

    // `ci` (Basic, from the proxy URL's user and password): its secret is swapped.
    let ok = p
        .curl(&[&github, bearer[0], bearer[1], "--proxy-user", &ci])
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let recs = w.origin.records();
    assert_eq!(
        recs.last().and_then(|r| r.header("authorization")),
        Some(format!("Bearer {REAL_GITHUB}"))
    );
    assert!(
        recs.iter()
            .all(|r| r.header("proxy-authorization").is_none()),
        "the proxy credential reached the origin"
    );
    let rec = p.audit.records().pop().expect("audit");
    assert_eq!(rec.caller.as_deref(), Some("ci"));
    assert_eq!(rec.status, 200);

    // `ci` is not granted MAPS_KEY: its placeholder is refused, and the origin sees nothing.
    let before = w.origin.records().len();
    let maps = format!("https://maps.test:{port}/geo?key=MAPS_KEY");
    let denied = p.curl(&[&maps, "--proxy-user", &ci]).await;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.error_code().as_deref(), Some("secret_not_granted"));
    assert!(denied.body.contains("MAPS_KEY") && denied.body.contains("ci"));
    assert_eq!(w.origin.records().len(), before);
    // Nor INJECT_KEY: the request goes without it (as to a host with no secret).
    let inject = format!("https://inject.test:{port}/x");
    let bare = p.curl(&[&inject, "--proxy-user", &ci]).await;
    assert_eq!(bare.status, 200, "{bare:?}");
    assert_eq!(
        w.origin.records().pop().and_then(|r| r.header("x-api-key")),
        None
    );

    // `ops` (Bearer in Proxy-Authorization) is granted everything.
    let ops_auth = format!("Proxy-Authorization: Bearer {OPS_TOKEN}");
    let swapped = p.curl(&[&maps, "--proxy-header", &ops_auth]).await;
    assert_eq!(swapped.status, 200, "{swapped:?}");
    let injected = p.curl(&[&inject, "--proxy-header", &ops_auth]).await;
    assert_eq!(injected.status, 200, "{injected:?}");
    assert_eq!(
        w.origin.records().pop().and_then(|r| r.header("x-api-key")),
        Some(format!("Token {REAL_INJECT}"))
    );
    assert_eq!(
        p.audit.records().pop().and_then(|r| r.caller).as_deref(),
        Some("ops")
    );
    // Absolute-form with a credential goes through (a plain-HTTP allowed host).
    let plain = p
        .curl(&[&format!("http://plain.test:{port}/"), "--proxy-user", &ci])
        .await;
    assert_ne!(plain.status, 407, "{plain:?}");
    assert_eq!(
        p.audit.records().pop().and_then(|r| r.caller).as_deref(),
        Some("ci")
    );

    // Per-caller counters on /metrics.
    let text = p.rt.metrics.encode();
    assert!(
        text.contains("iron_proxy_caller_requests_total{caller=\"ci\",outcome=\"refused\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("iron_proxy_caller_requests_total{caller=\"ops\",outcome=\"forwarded\"} 2")
    );

    // No audit line or log holds a token.
    let lines: String = p
        .audit
        .records()
        .iter()
        .map(|r| {
            let mut out = Vec::new();
            r.write_json(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .collect();
    assert!(!lines.contains(CI_TOKEN) && !lines.contains("0123456789@abc"));
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_iron-proxy-e2e"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_a_caller_puts_its_token_in_the_proxy_url() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let w = world().await;
    let port = w.port();
    let run = |args: &[&str], script: String| {
        tokio::process::Command::new(bin())
            .args(["run", "--policy"])
            .arg(&w.policy_path)
            .args(args)
            .args(["--", "sh", "-c"])
            .arg(script)
            .env("IRON_PROXY_HOME", w.dir.path().join("home"))
            .envs(env())
            .output()
    };
    let out = run(
        &["--caller", "ci"],
        format!(
            "env; curl -sS -w ' %{{http_code}}' https://api.github.test:{port}/user -H \"Authorization: Bearer $GITHUB_TOKEN\""
        ),
    )
    .await
    .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with("200"), "{stdout}");
    assert!(
        stdout.contains(&format!("HTTPS_PROXY=http://ci:{CI_TOKEN}@127.0.0.1:")),
        "{stdout}"
    );
    // Only the granted secret's placeholder; no token source reaches the child.
    assert!(stdout.contains("GITHUB_TOKEN=GITHUB_TOKEN"));
    assert!(!stdout.contains("MAPS_KEY="), "{stdout}");
    assert!(!stdout.contains("CI_PROXY_TOKEN="), "{stdout}");
    assert!(!stdout.contains("0123456789@abc"), "{stdout}");
    assert_eq!(
        w.origin
            .records()
            .pop()
            .and_then(|r| r.header("authorization")),
        Some(format!("Bearer {REAL_GITHUB}"))
    );

    // The `ops` token is percent-encoded in the URL, and curl decodes it back.
    let out = run(
        &["--caller", "ops"],
        format!("echo \"$HTTPS_PROXY\"; curl -sS -w ' %{{http_code}}' 'https://maps.test:{port}/geo?key='\"$MAPS_KEY\""),
    )
    .await
    .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("http://ops:ops%2Fproxy%3Atoken+0123456789%40abc@127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("200"), "{stdout}");

    // Without --caller the policy's callers make `run` refuse, naming them.
    let out = run(&[], "true".into()).await.expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--caller NAME (one of: ci, ops)"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_takes_a_callers_token_as_its_password() {
    if !have("curl") {
        return eprintln!("curl not installed; skipped");
    }
    let w = world().await;
    let p = w.proxy(env()).await;
    let curl = |proxy: String| {
        let (w, ca) = (&w, p.ca.cert.clone());
        async move { w.github_get(&proxy, &ca, &[]).await }
    };
    let addr = p.addr();
    let ok = curl(format!("socks5h://ci:{CI_TOKEN}@{addr}")).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        w.last_authorization(),
        Some(format!("Bearer {REAL_GITHUB}"))
    );
    assert_eq!(
        p.audit.records().pop().and_then(|r| r.caller).as_deref(),
        Some("ci")
    );
    // No credentials (curl offers only "no authentication"), or a wrong token: refused
    // before any destination check, and audited.
    for proxy in [
        format!("socks5h://{addr}"),
        format!("socks5h://ci:wrong-token@{addr}"),
    ] {
        let before = w.origin.records().len();
        let refused = curl(proxy.clone()).await;
        assert_ne!(refused.exit, 0, "{proxy}: {refused:?}");
        assert_eq!(w.origin.records().len(), before);
        let rec = p.audit.records().pop().expect("audit");
        assert_eq!(
            (rec.method.as_ref(), rec.error),
            ("SOCKS5", Some("proxy_auth_required")),
            "{proxy}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lists_callers_and_a_reload_revokes_a_tunnels_caller() {
    use base64::Engine as _;
    use http::Method;
    let w = world().await;
    // `ci`'s token variable is unset: its state says so, /readyz names it.
    let mut e = env();
    e.remove("CI_PROXY_TOKEN");
    let p = w.proxy(e).await;
    let (a, _task) = iron_proxy::admin::start(p.rt.clone(), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("admin");
    let call = |method: Method, path: &'static str| async move {
        let (status, body) = iron_proxy::admin::call(a, method, path)
            .await
            .expect("admin call");
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
        )
    };
    let (status, list) = call(Method::GET, "/v1/callers").await;
    assert_eq!(status, 200);
    assert!(
        !list.to_string().contains("0123456789"),
        "a token in /v1/callers"
    );
    assert_eq!(list["callers"][0]["name"], "ci");
    assert_eq!(
        list["callers"][0]["secrets"],
        serde_json::json!(["GITHUB_TOKEN"])
    );
    assert_eq!(list["callers"][0]["token"]["kind"], "env");
    assert_eq!(list["callers"][0]["token"]["ref"], "CI_PROXY_TOKEN");
    assert_eq!(list["callers"][0]["token"]["state"], "missing");
    assert_eq!(list["callers"][1]["secrets"], serde_json::json!(["*"]));
    assert_eq!(list["callers"][1]["token"]["state"], "ok");
    let (status, ready) = call(Method::GET, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        ready["reasons"].to_string().contains("caller ci"),
        "{ready}"
    );
    assert_eq!(call(Method::DELETE, "/v1/callers").await.0, 405);

    // A token no readable caller has, while `ci`'s cannot be read: 503, not 407 (it may
    // be `ci`'s).
    let port = w.port();
    let authority = format!("api.github.test:{port}");
    let (status, _, head) = iron_proxy::client::connect_as(
        p.addr(),
        &authority,
        Some("Bearer not-a-known-token-at-all"),
    )
    .await
    .expect("connect");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&head));
    assert!(String::from_utf8_lossy(&head).contains("caller_token_unavailable"));

    // A tunnel is its caller's as long as the caller keeps its token and stays in the
    // policy; each of its requests checks again.
    let basic = |token: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("ops:{token}"))
        )
    };
    let open = |auth: Option<String>| {
        let (addr, authority, ca) = (p.addr(), authority.clone(), p.ca.ca.cert_pem().to_string());
        async move {
            iron_proxy::client::tunnel_as(addr, &authority, "api.github.test", &ca, auth.as_deref())
                .await
                .expect("tunnel")
        }
    };
    let get = || {
        http::Request::get("/user")
            .header("host", authority.as_str())
            .header("authorization", "Bearer GITHUB_TOKEN")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request")
    };
    let status_of = |f: iron_proxy::client::Fetched| {
        (
            f.status,
            f.headers
                .get("x-iron-proxy-error")
                .map(|v| v.to_str().unwrap_or_default().to_string()),
        )
    };
    let mut first = open(Some(basic(OPS_TOKEN))).await;
    assert_eq!(
        status_of(
            iron_proxy::client::fetch(&mut first, get())
                .await
                .expect("fetch")
        ),
        (200, None)
    );
    // The token is rotated: the old tunnel is refused, one with the new token works.
    let rotated = "ops-rotated-token-9876543210fedcba";
    std::fs::write(w.dir.path().join("ops.token"), rotated).expect("rotate");
    let seen = w.origin.records().len();
    assert_eq!(
        status_of(
            iron_proxy::client::fetch(&mut first, get())
                .await
                .expect("fetch")
        ),
        (403, Some("caller_revoked".into()))
    );
    assert_eq!(w.origin.records().len(), seen);
    let refused = p.audit.records().pop().expect("audit");
    assert_eq!(
        (refused.host.as_str(), refused.port, refused.error),
        ("api.github.test", port, Some("caller_revoked"))
    );
    let mut second = open(Some(basic(rotated))).await;
    assert_eq!(
        status_of(
            iron_proxy::client::fetch(&mut second, get())
                .await
                .expect("fetch")
        ),
        (200, None)
    );
    // A reload that removes `ops` refuses its tunnel's next request.
    let text = std::fs::read_to_string(&w.policy_path).expect("policy");
    let without_ops = &text[..text.find("[[callers]]\nname = \"ops\"").expect("ops entry")];
    std::fs::write(&w.policy_path, without_ops).expect("write");
    let (status, body) = call(Method::POST, "/v1/reload").await;
    assert_eq!(status, 200, "{body}");
    let seen = w.origin.records().len();
    assert_eq!(
        status_of(
            iron_proxy::client::fetch(&mut second, get())
                .await
                .expect("fetch")
        ),
        (403, Some("caller_revoked".into()))
    );
    assert_eq!(w.origin.records().len(), seen);
    // Without callers, a tunnel needs no credential; once a reload adds callers, that
    // unauthenticated tunnel's next request is refused 407.
    let no_callers = &text[..text.find("[[callers]]").expect("callers")];
    std::fs::write(&w.policy_path, no_callers).expect("write");
    assert_eq!(call(Method::POST, "/v1/reload").await.0, 200);
    let mut open_tunnel = open(None).await;
    assert_eq!(
        status_of(
            iron_proxy::client::fetch(&mut open_tunnel, get())
                .await
                .expect("fetch")
        ),
        (200, None)
    );
    std::fs::write(&w.policy_path, &text).expect("write");
    assert_eq!(call(Method::POST, "/v1/reload").await.0, 200);
    assert_eq!(
        status_of(
            iron_proxy::client::fetch(&mut open_tunnel, get())
                .await
                .expect("fetch")
        ),
        (407, Some("proxy_auth_required".into()))
    );
}
