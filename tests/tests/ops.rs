//! End-to-end: operations — hot reload under load, drop-in fragments, the admin API
//! (secrets, readiness, metrics, probe) and graceful shutdown.

#![allow(clippy::expect_used)] // setup helpers: a failed step is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use iron_proxy::client;
use iron_proxy::origin::OriginOptions;
use iron_tests::*;

async fn admin(p: &InProcess) -> SocketAddr {
    let (addr, _task) =
        iron_proxy::admin::start(p.rt.clone(), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("admin");
    addr
}

async fn get_json(addr: SocketAddr, method: Method, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = iron_proxy::admin::call(addr, method, path)
        .await
        .expect("admin call");
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: &str,
) -> u16 {
    let req = Request::get("/loop")
        .header("host", authority)
        .header("authorization", "Bearer GITHUB_TOKEN")
        .body(Full::new(Bytes::new()))
        .expect("req");
    client::fetch(send, req)
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_nothing_and_keeps_the_old_policy_on_errors() {
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let authority = format!("api.github.test:{}", w.port());
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (addr, ca, authority) = (p.addr(), p.ca.ca.cert_pem().to_string(), authority.clone());
        loops.push(tokio::spawn(async move {
            let mut send = client::tunnel(addr, &authority, "api.github.test", &ca)
                .await
                .expect("tunnel");
            while !stop.load(Ordering::Relaxed) {
                // Every policy version below allows this request.
                if get(&mut send, &authority).await == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let good = std::fs::read_to_string(&w.policy_path).expect("policy");
    let mut refused = 0;
    for i in 0..20 {
        let text = match i % 4 {
            // Invalid: a typo'd key.
            1 => good.replace("allow_cidrs", "allow_cidr"),
            // Invalid: a secret without hosts.
            3 => good.replace("hosts = [\"inject.test:", "hostz = [\"inject.test:"),
            // Valid: a different but compatible policy.
            2 => good.replace("other.test", "other2.test"),
            _ => good.clone(),
        };
        std::fs::write(&w.policy_path, text).expect("write");
        match p.rt.reload().await {
            Ok(_) => {}
            Err(diags) => {
                refused += 1;
                assert!(diags.iter().any(|d| {
                    d.to_string()
                        .starts_with(&w.policy_path.display().to_string())
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("loop");
    }
    assert_eq!(refused, 10);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "too few requests to mean anything"
    );
    // The last write was invalid: the previous valid policy (with other2.test) stays.
    assert!(
        p.rt.policy()
            .allows_destination("other2.test", w.port(), true)
    );
    let m = p.rt.metrics.encode();
    assert!(
        m.contains("iron_proxy_reloads_total{result=\"invalid\"} 10"),
        "{m}"
    );
    assert!(
        m.contains("iron_proxy_reloads_total{result=\"ok\"} 10"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_in_secret_is_usable_without_restart() {
    if !have("curl") {
        return;
    }
    let policy = STANDARD_POLICY.replacen(
        "version = 1\n",
        "version = 1\ninclude = [\"policy.d/*.toml\"]\n",
        1,
    );
    let w = World::new(&policy, OriginOptions::default()).await;
    let mut env = standard_env();
    env.insert("REAL_LATE_KEY".into(), "late_REALsecret_321".into());
    let p = w.proxy(env).await;
    iron_proxy::watch::spawn(p.rt.clone()).expect("watch");
    let port = w.port();
    let url = format!("https://other.test:{port}/late");
    let r = p.curl(&[&url, "-H", "X-Late-Key: LATE_KEY_PH"]).await;
    assert_eq!(r.status, 200, "placeholder unknown so far: forwarded as is");
    // The include directory appears only now; then a broken fragment: refused, traffic
    // continues on the old policy.
    std::fs::create_dir(w.dir.path().join("policy.d")).expect("mkdir");
    std::fs::write(
        w.dir.path().join("policy.d/10-late.toml"),
        "[[secrets]]\nname = \"LATE_KEY\"\nbroken = true\n",
    )
    .expect("write");
    // The good version replaces it; the watcher picks it up.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(p.rt.policy().secret("LATE_KEY").is_none());
    std::fs::write(
        w.dir.path().join("policy.d/10-late.toml"),
        format!("[[secrets]]\nname = \"LATE_KEY\"\nplaceholder = \"LATE_KEY_PH\"\ntype = \"http\"\nsource = {{ env = \"REAL_LATE_KEY\" }}\nmatch_headers = [\"X-Late-Key\"]\nhosts = [\"other.test:{port}\"]\n"),
    )
    .expect("write");
    let mut seen = false;
    for _ in 0..40 {
        if p.rt.policy().secret("LATE_KEY").is_some() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "drop-in not loaded within 2 s");
    let r = p.curl(&[&url, "-H", "X-Late-Key: LATE_KEY_PH"]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        w.origin
            .records()
            .last()
            .expect("rec")
            .header("x-late-key")
            .as_deref(),
        Some("late_REALsecret_321")
    );
    let m = p.rt.metrics.encode();
    assert!(
        m.contains("iron_proxy_reloads_total{result=\"invalid\"}"),
        "{m}"
    );
}

/// A policy mounted the Kubernetes ConfigMap way (`policy.toml -> ..data/policy.toml`,
/// `..data -> ..v1`) is reloaded when `..data` is swapped to a new version, an event that
/// names neither the policy file nor a `.toml`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_style_symlink_swap_is_reloaded() {
    let mut w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let dir = w.dir.path().to_path_buf();
    let text = std::fs::read_to_string(&w.policy_path)
        .expect("policy")
        .replace(
            "\"origin-ca.pem\"",
            &format!("{:?}", dir.join("origin-ca.pem")),
        )
        .replace("\"basic.json\"", &format!("{:?}", dir.join("basic.json")));
    let cm = dir.join("cm");
    std::fs::create_dir_all(cm.join("..v1")).expect("mkdir");
    std::fs::create_dir_all(cm.join("..v2")).expect("mkdir");
    std::fs::write(cm.join("..v1/policy.toml"), &text).expect("write");
    std::fs::write(
        cm.join("..v2/policy.toml"),
        text.replace("other.test", "other2.test"),
    )
    .expect("write");
    std::os::unix::fs::symlink("..v1", cm.join("..data")).expect("link");
    std::os::unix::fs::symlink("..data/policy.toml", cm.join("policy.toml")).expect("link");
    w.policy_path = cm.join("policy.toml");
    let p = w.proxy(standard_env()).await;
    iron_proxy::watch::spawn(p.rt.clone()).expect("watch");
    let port = w.port();
    assert!(p.rt.policy().allows_destination("other.test", port, true));
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::os::unix::fs::symlink("..v2", cm.join("..data_tmp")).expect("link");
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).expect("swap");
    let mut seen = false;
    for _ in 0..60 {
        if p.rt.policy().allows_destination("other2.test", port, true) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen,
        "the swapped ConfigMap version was not loaded within 3 s"
    );
    assert!(!p.rt.policy().allows_destination("other.test", port, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_secrets_readiness_and_probe() {
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let mut env = standard_env();
    env.remove("REAL_MAPS_KEY");
    let p = w.proxy(env).await;
    let a = admin(&p).await;
    let (status, list) = get_json(a, Method::GET, "/v1/secrets").await;
    assert_eq!(status, 200);
    let text = list.to_string();
    for real in ALL_REAL {
        assert!(!text.contains(real), "a value in /v1/secrets");
    }
    let maps = list["secrets"]
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["name"] == "MAPS_KEY")
        .expect("MAPS_KEY")
        .clone();
    assert_eq!(maps["state"], "missing");
    assert!(
        maps["reason"]
            .as_str()
            .expect("reason")
            .contains("REAL_MAPS_KEY")
    );
    assert_eq!(maps["sources"][0]["kind"], "env");
    assert_eq!(maps["sources"][0]["ref"], "REAL_MAPS_KEY");
    let (_, gh) = get_json(a, Method::GET, "/v1/secrets/GITHUB_TOKEN").await;
    assert_eq!(gh["state"], "ok");
    assert_eq!(gh["type"], "http");
    assert_eq!(get_json(a, Method::GET, "/v1/secrets/NOPE").await.0, 404);
    assert_eq!(get_json(a, Method::GET, "/v1/nothing").await.0, 404);
    assert_eq!(get_json(a, Method::DELETE, "/v1/secrets").await.0, 405);

    // Readiness: MAPS_KEY is required and missing.
    let (status, ready) = get_json(a, Method::GET, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        ready["reasons"][0]
            .as_str()
            .expect("reason")
            .contains("MAPS_KEY")
    );
    // Make it optional: ready.
    let text = std::fs::read_to_string(&w.policy_path)
        .expect("read")
        .replace(
            "source = { env = \"REAL_MAPS_KEY\" }",
            "source = { env = \"REAL_MAPS_KEY\" }\noptional = true",
        );
    std::fs::write(&w.policy_path, text).expect("write");
    let (status, body) = get_json(a, Method::POST, "/v1/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get_json(a, Method::GET, "/readyz").await.0, 200);
    // A broken policy: 422 with positions, and the old policy stays.
    std::fs::write(&w.policy_path, "version = 1\n[proxy]\nlisten = 7\n").expect("write");
    let (status, body) = get_json(a, Method::POST, "/v1/reload").await;
    assert_eq!(status, 422);
    assert!(
        body["errors"][0]
            .as_str()
            .expect("error")
            .contains("policy.toml:3:10"),
        "{body}"
    );
    assert_eq!(get_json(a, Method::GET, "/readyz").await.0, 200);

    // Usage counters after a request.
    let mut send = client::tunnel(
        p.addr(),
        &format!("api.github.test:{}", w.port()),
        "api.github.test",
        p.ca.ca.cert_pem(),
    )
    .await
    .expect("tunnel");
    assert_eq!(
        get(&mut send, &format!("api.github.test:{}", w.port())).await,
        200
    );
    let (_, gh) = get_json(a, Method::GET, "/v1/secrets/GITHUB_TOKEN").await;
    assert_eq!(gh["invocations"], 1);
    assert!(gh["last_used"].is_string());

    // Probe: the origin is reachable (any answer counts); an unreachable host is reported.
    let (_, probe) = get_json(a, Method::POST, "/v1/secrets/GITHUB_TOKEN/probe").await;
    let r = &probe["results"][0];
    assert_eq!(r["reachable"], true, "{probe}");
    assert_eq!(r["status"], 200);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let text = std::fs::read_to_string(&w.policy_path).ok();
    assert!(text.is_some());
    std::fs::write(
        &w.policy_path,
        STANDARD_POLICY
            .replace("{PORT}", &w.port().to_string())
            .replace(
                &format!("hosts = [\"api.github.test:{}\"]", w.port()),
                &format!(
                    "hosts = [\"api.github.test:{}\", \"api.github.test:{dead_port}\"]",
                    w.port()
                ),
            )
            .replace(
                "source = { env = \"REAL_MAPS_KEY\" }",
                "source = { env = \"REAL_MAPS_KEY\" }\noptional = true",
            ),
    )
    .expect("write");
    assert_eq!(get_json(a, Method::POST, "/v1/reload").await.0, 200);
    let (_, probe) = get_json(a, Method::POST, "/v1/secrets/GITHUB_TOKEN/probe").await;
    assert_eq!(probe["results"][0]["reachable"], true, "{probe}");
    assert_eq!(probe["results"][1]["reachable"], false, "{probe}");
    assert_eq!(
        probe["results"][1]["error"], "upstream_unreachable",
        "{probe}"
    );
}

/// Upstream keep-alive across client connections: three curls, each its own tunnel and
/// TLS session toward the proxy, reach the origin over one pooled upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_client_connections_share_one_upstream_connection() {
    if !have("curl") {
        return;
    }
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let a = admin(&p).await;
    let url = format!("https://api.github.test:{}/m", w.port());
    for _ in 0..3 {
        let c = p
            .curl(&[url.as_str(), "-H", "Authorization: Bearer GITHUB_TOKEN"])
            .await;
        assert_eq!(c.status, 200, "{c:?}");
    }
    let (status, body) = iron_proxy::admin::call(a, Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("iron_proxy_injections_total{secret=\"GITHUB_TOKEN\"} 3"),
        "{body}"
    );
    assert!(
        body.contains("iron_proxy_upstream_connections_opened_total 1\n"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_request_and_parse() {
    if !have("curl") {
        return;
    }
    let (w, p) = {
        let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
        let p = w.proxy(standard_env()).await;
        (w, p)
    };
    let a = admin(&p).await;
    let port = w.port();
    let mut sent = 0;
    for args in [
        vec![
            format!("https://api.github.test:{port}/m"),
            "-H".into(),
            "Authorization: Bearer GITHUB_TOKEN".into(),
        ],
        vec![format!("https://other.test:{port}/m")],
        vec![
            format!("https://other.test:{port}/m"),
            "-H".into(),
            "Authorization: Bearer GITHUB_TOKEN".into(),
        ],
        vec![format!("https://evil.test:{port}/m")],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        p.curl(&args).await;
        sent += 1;
    }
    let (status, body) = iron_proxy::admin::call(a, Method::GET, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"));
    // Sum of iron_proxy_requests_total over all label sets = requests sent (each curl is one
    // request, or one refused CONNECT).
    let total: f64 = body
        .lines()
        .filter(|l| l.starts_with("iron_proxy_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, f64::from(sent), "{body}");
    assert!(
        body.contains("iron_proxy_injections_total{secret=\"GITHUB_TOKEN\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("iron_proxy_refusals_total{code=\"placeholder_not_allowed\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("iron_proxy_refusals_total{code=\"destination_not_allowed\"} 1"),
        "{body}"
    );
    // Two requests were forwarded, to two authorities: one upstream connection each.
    assert!(
        body.contains("iron_proxy_upstream_connections_opened_total 2\n"),
        "{body}"
    );
    // No upstream closed a connection under a request: nothing was sent twice.
    assert!(
        body.contains("iron_proxy_upstream_requests_resent_total 0\n"),
        "{body}"
    );
    for real in ALL_REAL {
        assert!(!body.contains(real));
    }
    // A real Prometheus/OpenMetrics parser accepts it, when installed (CI installs it).
    let parser = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    if parser {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("m.txt");
        std::fs::write(&f, &body).expect("write");
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nfams = list(p(open(sys.argv[1]).read()))\nprint(int(sum(s.value for f in fams if f.name == 'iron_proxy_requests' for s in f.samples if s.name == 'iron_proxy_requests_total')))",
            ])
            .arg(&f)
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{sent}")
        );
    }
}

/// The serve binary on `policy`, with a 600 kB upload (placeholder in `Authorization`) to
/// the origin's `/slow` under way through it at `rate` (curl's `--limit-rate`).
async fn slow_upload(
    policy: &str,
    rate: &'static str,
) -> (World, Spawned, tokio::task::JoinHandle<Curl>) {
    let w = World::new(policy, OriginOptions::default()).await;
    let home = w.dir.path().join("home");
    let proxy = Spawned::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_iron-proxy-e2e")),
        &w.policy_path,
        &home,
        &standard_env(),
        "info",
    );
    let file = w.dir.path().join("slow.bin");
    std::fs::write(&file, vec![1u8; 600_000]).expect("write");
    let url = format!("https://api.github.test:{}/slow", w.port());
    let (addr, ca) = (proxy.addr, proxy.ca.clone());
    let file_s = file.display().to_string();
    let upload = tokio::spawn(async move {
        let auth = "Authorization: Bearer GITHUB_TOKEN";
        curl_via(
            addr,
            &ca,
            &["-T", &file_s, "--limit-rate", rate, "-H", auth, &url],
        )
        .await
    });
    (w, proxy, upload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_slow_upload_in_flight() {
    if !have("curl") {
        return;
    }
    let (_w, proxy, upload) = slow_upload(STANDARD_POLICY, "200K").await;
    // Wait until the upload is under way, then SIGTERM.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pid = proxy.child.id();
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    let r = upload.await.expect("upload");
    assert_eq!(r.status, 200, "upload cut by shutdown: {r:?}");
    assert!(r.body.contains("\"bytes\":600000"), "{}", r.body);
    let log = proxy.stop();
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("drained; exiting"), "{log}");
}

/// An upload still going when the grace period ends is cut, and its request is in the
/// audit log (`closed`, `"error": "shutdown"`, the bytes received so far) before the
/// proxy exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_the_grace_period_cuts_and_audits_what_is_left() {
    if !have("curl") {
        return;
    }
    let policy = format!("{STANDARD_POLICY}\n[proxy.limits]\nshutdown_grace_secs = 1\n");
    // 600 kB at 50 kB/s: 12 s, far past the 1 s grace period.
    let (_w, proxy, upload) = slow_upload(&policy, "50K").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let log = tokio::task::spawn_blocking(move || proxy.stop())
        .await
        .expect("stop");
    let r = upload.await.expect("upload");
    assert_ne!(r.status, 200, "the upload was not cut: {r:?}");
    assert!(log.contains("grace period over"), "{log}");
    let cut: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["path"] == "/slow")
        .collect();
    assert_eq!(cut.len(), 1, "{log}");
    assert_eq!(cut[0]["outcome"], "closed", "{log}");
    assert_eq!(cut[0]["error"], "shutdown", "{log}");
    let got = cut[0]["bytes_in"].as_u64().unwrap_or(0);
    assert!(got > 0 && got < 600_000, "{log}");
    assert_eq!(cut[0]["secrets"][0]["name"], "GITHUB_TOKEN", "{log}");
}

/// `enabled = false`: not checked at load (its source may be absent), shown `disabled`,
/// not counted against readiness, and its placeholder is refused, never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_secret_is_listed_and_refused() {
    if !have("curl") {
        return;
    }
    let policy = format!(
        "{STANDARD_POLICY}\n[[secrets]]\nname = \"OFF_KEY\"\ntype = \"http\"\nsource = {{ env = \"OFF_KEY_NEVER_SET\" }}\nmatch_headers = [\"X-Off\"]\nhosts = [\"other.test:{{PORT}}\"]\nenabled = false\n"
    );
    let w = World::new(&policy, OriginOptions::default()).await;
    let env: Arc<dyn iron_broker::Env> = Arc::new(standard_env());
    let (loaded, diags) = iron_proxy::loader::load(&w.policy_path, env);
    assert!(
        loaded.is_some() && !iron_proxy::loader::has_errors(&diags),
        "{diags:?}"
    );
    let p = w.proxy(standard_env()).await;
    let a = admin(&p).await;
    let (status, off) = get_json(a, Method::GET, "/v1/secrets/OFF_KEY").await;
    assert_eq!(status, 200);
    assert_eq!(off["state"], "disabled", "{off}");
    let (status, ready) = get_json(a, Method::GET, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let port = w.port();
    let r = p
        .curl(&[
            &format!("https://other.test:{port}/"),
            "-H",
            "X-Off: OFF_KEY",
        ])
        .await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.error_code().as_deref(), Some("credential_unavailable"));
    assert!(w.origin.records().is_empty());
}

/// Reloads, expecting a refusal; returns its diagnostics, one per line.
async fn refused_reload(p: &InProcess) -> String {
    let errs = p.rt.reload().await.expect_err("reload accepted");
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A reload that would make a working secret's source absent (a typo in the variable
/// name) is refused with a positioned error, and the running policy stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_to_break_a_working_secret() {
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let text = std::fs::read_to_string(&w.policy_path).expect("policy");
    assert!(text.contains("env = \"REAL_GITHUB_TOKEN\""));
    std::fs::write(
        &w.policy_path,
        text.replace("env = \"REAL_GITHUB_TOKEN\"", "env = \"REAL_GITHUB_TOKN\""),
    )
    .expect("write");
    let joined = refused_reload(&p).await;
    assert!(
        joined.contains("REAL_GITHUB_TOKN") && joined.contains("refused"),
        "{joined}"
    );
    let secret = p.rt.policy().secret("GITHUB_TOKEN").cloned().expect("kept");
    assert!(
        format!("{:?}", secret.sources()).contains("REAL_GITHUB_TOKEN\""),
        "the old policy was replaced"
    );
    // A new secret whose source is absent is still only a warning.
    std::fs::write(
        &w.policy_path,
        format!(
            "{text}\n[[secrets]]\nname = \"LATER_KEY\"\ntype = \"http\"\nsource = {{ env = \"LATER_KEY_UNSET\" }}\nmatch_headers = [\"X-Later\"]\nhosts = [\"other.test:{}\"]\n",
            w.port()
        ),
    )
    .expect("write");
    p.rt.reload()
        .await
        .expect("a new absent secret is a warning");
    assert!(p.rt.policy().secret("LATER_KEY").is_some());
}

/// Postgres relays follow reloads (REFERENCE D27): a `pg_dsn` secret added while its DSN is
/// unset is accepted with a warning, and its relay starts on the reload that finds the DSN;
/// a `listen` that cannot be bound refuses the reload (the running policy stays); a
/// removed secret's relay stops accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relays_follow_reloads() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let state = w.dir.path().join("state");
    assert!(
        iron_proxy::pg::start_all(&p.rt, &state, true)
            .await
            .expect("start")
            .is_empty()
    );
    let text = std::fs::read_to_string(&w.policy_path).expect("policy");
    let with_pg = |listen: &str| {
        format!(
            "{text}\n[[secrets]]\nname = \"DATABASE_URL\"\ntype = \"pg_dsn\"\ndatabase = \"app\"\nsource = {{ file = \"dsn.txt\" }}\n{listen}\n"
        )
    };
    std::fs::write(&w.policy_path, with_pg("")).expect("write");
    let summary = p.rt.reload().await.expect("reload");
    assert!(summary.added.contains(&"DATABASE_URL".to_string()));
    assert!(
        summary
            .warnings
            .iter()
            .any(|w| w.contains("DATABASE_URL") && w.contains("DSN is not set")),
        "{:?}",
        summary.warnings
    );
    assert!(iron_proxy::pg::running(&p.rt).await.is_empty());

    // The DSN appears: the next reload starts the relay, which answers an SSLRequest.
    std::fs::write(
        w.dir.path().join("dsn.txt"),
        "postgresql://app:pw@127.0.0.1:9/app?sslmode=disable",
    )
    .expect("dsn");
    p.rt.reload().await.expect("reload");
    let running = iron_proxy::pg::running(&p.rt).await;
    assert_eq!(running.len(), 1, "{running:?}");
    let addr = running[0].1;
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("relay");
    c.write_all(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f])
        .await
        .expect("ssl request");
    let mut answer = [0u8; 1];
    c.read_exact(&mut answer).await.expect("answer");
    assert!(answer[0] == b'S' || answer[0] == b'N', "{answer:?}");
    drop(c);

    // Moved to a `listen` that is taken: refused whole; the relay and policy stay.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    std::fs::write(
        &w.policy_path,
        with_pg(&format!("listen = \"127.0.0.1:{port}\"")),
    )
    .expect("write");
    let refused =
        p.rt.reload()
            .await
            .expect_err("bind failure refuses the reload");
    assert!(
        refused.iter().any(|d| d.message.contains("cannot listen")),
        "{refused:?}"
    );
    assert_eq!(iron_proxy::pg::running(&p.rt).await, running);
    assert!(p.rt.policy().secret("DATABASE_URL").is_some_and(
        |s| matches!(&s.kind, iron_policy::SecretKind::Pg(spec) if spec.listen.is_none())
    ));

    // Removed: its relay stops accepting.
    std::fs::write(&w.policy_path, &text).expect("write");
    p.rt.reload().await.expect("reload");
    assert!(iron_proxy::pg::running(&p.rt).await.is_empty());
    let mut closed = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the removed secret's relay still accepts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_drops_when_the_listener_drains() {
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let listening = || p.rt.listening.load(std::sync::atomic::Ordering::Relaxed);
    assert!(listening());
    let rt = p.rt.clone();
    let InProcess { running, .. } = p;
    assert!(running.drain(Duration::from_secs(1)).await);
    // `/readyz` reads this flag: 503 "not bound" while shutting down.
    assert!(!rt.listening.load(std::sync::atomic::Ordering::Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_change_is_reported_on_every_reload_until_a_restart() {
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let text = std::fs::read_to_string(&w.policy_path).unwrap();
    std::fs::write(
        &w.policy_path,
        text.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
    )
    .unwrap();
    for round in 0..2 {
        let summary = p.rt.reload().await.expect("reload");
        assert!(
            summary
                .warnings
                .iter()
                .any(|w| w.contains("[proxy] listen") && w.contains("restart")),
            "round {round}: {:?}",
            summary.warnings
        );
    }
}

/// The admin listener keeps its boot address until a restart: a reload that drops
/// `admin_token` while it listens beyond loopback is refused (it would serve reload,
/// secrets and probes unauthenticated); keeping the token, or a loopback listener, reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cannot_drop_the_admin_token_of_a_public_admin_listener() {
    let with_token = STANDARD_POLICY.replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\nadmin_token = { env = \"ADMIN_BEARER\" }",
        1,
    );
    assert_ne!(with_token, STANDARD_POLICY);
    let w = World::new(&with_token, OriginOptions::default()).await;
    let mut env = standard_env();
    env.insert("ADMIN_BEARER".into(), "admin-bearer-1234".into());
    let p = w.proxy(env).await;
    let text = std::fs::read_to_string(&w.policy_path).expect("policy");
    // Token dropped, listener moved to loopback in the file: the running one is not.
    let dropped = text
        .replace("admin_token = { env = \"ADMIN_BEARER\" }\n", "")
        .replace(
            "admin_listen = \"0.0.0.0:0\"",
            "admin_listen = \"127.0.0.1:0\"",
        );
    assert!(!dropped.contains("admin_token"));
    std::fs::write(&w.policy_path, &dropped).expect("write");
    let joined = refused_reload(&p).await;
    assert!(joined.contains("admin_token removed"), "{joined}");
    assert!(
        p.rt.policy().proxy.admin_token.is_some(),
        "the old policy was replaced"
    );
    std::fs::write(&w.policy_path, &text).expect("write");
    p.rt.reload().await.expect("the token kept");

    // Booted on loopback, the admin listener may drop its token: only local processes
    // reach it, as with no token at boot.
    let local = with_token.replace(
        "admin_listen = \"0.0.0.0:0\"",
        "admin_listen = \"127.0.0.1:0\"",
    );
    let w = World::new(&local, OriginOptions::default()).await;
    let mut env = standard_env();
    env.insert("ADMIN_BEARER".into(), "admin-bearer-1234".into());
    let p = w.proxy(env).await;
    let text = std::fs::read_to_string(&w.policy_path).expect("policy");
    let dropped = text.replace("admin_token = { env = \"ADMIN_BEARER\" }\n", "");
    assert!(!dropped.contains("admin_token"));
    std::fs::write(&w.policy_path, &dropped).expect("write");
    p.rt.reload()
        .await
        .expect("a loopback admin listener may drop its token");
    assert!(p.rt.policy().proxy.admin_token.is_none());
}

/// At `max_connections` a new connection waits in the listen backlog (it is served once a
/// slot frees), and the proxy says so once in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_and_are_logged() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let policy = format!("{STANDARD_POLICY}\n[proxy.limits]\nmax_connections = 1\n");
    let w = World::new(&policy, OriginOptions::default()).await;
    let proxy = Spawned::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_iron-proxy-e2e")),
        &w.policy_path,
        &w.dir.path().join("home"),
        &standard_env(),
        "info",
    );
    let first = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("first");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("second");
    let authority = format!("api.github.test:{}", w.port());
    second
        .write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = [0u8; 12];
    let waited = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(waited.is_err(), "served over the cap");
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut buf))
        .await
        .expect("not served after a slot freed")
        .expect("read");
    assert_eq!(&buf, b"HTTP/1.1 200");
    drop(second);
    let log = proxy.stop();
    assert_eq!(log.matches("max_connections reached").count(), 1, "{log}");
}

/// A reload that changes only secrets keeps the pooled upstream connections (no new TLS
/// handshake to the origin); one that changes what connections were dialed under (here
/// `resolve`) drops them, so nothing dialed under old rules is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_upstream_connections_unless_transport_settings_change() {
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let p = w.proxy(standard_env()).await;
    let port = w.port();
    let proxy_url = format!("http://{}", p.addr());
    let get = || async {
        let r = w.github_get(&proxy_url, &p.ca.cert, &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
    };
    get().await;
    get().await;
    let first = w.origin.connections();
    assert_eq!(
        first, 1,
        "the second request did not reuse the pooled connection"
    );

    let text = std::fs::read_to_string(&w.policy_path).expect("policy");
    let with_secret = format!(
        "{text}\n[[secrets]]\nname = \"NEW_KEY\"\ntype = \"http\"\nsource = {{ env = \"REAL_GITHUB_TOKEN\" }}\nmatch_headers = [\"X-New\"]\nhosts = [\"other.test:{port}\"]\n"
    );
    std::fs::write(&w.policy_path, &with_secret).expect("write");
    p.rt.reload().await.expect("reload");
    get().await;
    assert_eq!(
        w.origin.connections(),
        first,
        "a secret-only reload dropped the pool"
    );

    assert!(with_secret.contains("\"private.test\" = \"10.1.2.3\""));
    std::fs::write(
        &w.policy_path,
        with_secret.replace(
            "\"private.test\" = \"10.1.2.3\"",
            "\"private.test\" = \"10.1.2.4\"",
        ),
    )
    .expect("write");
    p.rt.reload().await.expect("reload");
    get().await;
    assert_eq!(
        w.origin.connections(),
        first + 1,
        "a connection dialed under the old resolve table was reused"
    );
}
