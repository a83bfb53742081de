//! End-to-end with the `iron-proxy` binary as a separate process: large bodies under a
//! memory bound, no secret in trace-level logs, `run`, `check`, `ca init`, `env`, and git.

use std::path::PathBuf;

use iron_proxy::origin::OriginOptions;
use iron_tests::*;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_iron-proxy-e2e"))
}

/// Size of the streamed upload and download. 1 GiB by default; `IRON_E2E_BIG_MIB` lowers it.
fn big_bytes() -> u64 {
    std::env::var("IRON_E2E_BIG_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024)
        * 1024
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_with_bounded_memory() {
    if !have("curl") {
        return;
    }
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let home = w.dir.path().join("home");
    let proxy = Spawned::start(&bin(), &w.policy_path, &home, &standard_env(), "info");
    let port = w.port();
    let size = big_bytes();

    // Upload: a sparse file, streamed by curl -T (which also sends Expect: 100-continue).
    let file = w.dir.path().join("big.bin");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(size))
        .expect("sparse file");
    let up = curl_via(
        proxy.addr,
        &proxy.ca,
        &[
            "-T",
            file.to_str().expect("path"),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
            &format!("https://api.github.test:{port}/upload"),
        ],
    )
    .await;
    assert_eq!(up.status, 200, "{up:?}");
    assert!(
        up.body.contains(&format!("\"bytes\":{size}")),
        "{}",
        up.body
    );
    let rec = w.origin.records().pop().expect("upload record");
    assert_eq!(rec.body_len, size);
    assert_eq!(
        rec.header("authorization"),
        Some(format!("Bearer {REAL_GITHUB}"))
    );

    // Download.
    let down = curl_via(
        proxy.addr,
        &proxy.ca,
        &[
            "-o",
            "/dev/null",
            &format!("https://api.github.test:{port}/download/{size}"),
        ],
    )
    .await;
    assert_eq!(down.status, 200, "{down:?}");
    let peak = proxy.peak_rss();
    eprintln!(
        "{} MiB each way; proxy peak RSS {:.1} MiB",
        size >> 20,
        peak as f64 / 1048576.0
    );
    let log = proxy.stop();
    assert!(peak > 0);
    assert!(
        peak < 64 * 1024 * 1024,
        "peak RSS {} MiB",
        peak / (1024 * 1024)
    );
    let audit: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let dl = audit
        .iter()
        .find(|a| {
            a["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/download/"))
        })
        .expect("download audited");
    assert_eq!(dl["bytes_out"].as_u64(), Some(size));
    let ul = audit
        .iter()
        .find(|a| a["path"] == "/upload")
        .expect("upload audited");
    assert_eq!(ul["bytes_in"].as_u64(), Some(size));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_trace_logs_or_responses() {
    if !have("curl") {
        return;
    }
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let home = w.dir.path().join("home");
    let proxy = Spawned::start(&bin(), &w.policy_path, &home, &standard_env(), "trace");
    let port = w.port();
    let mut bodies = String::new();
    for args in [
        vec![
            format!("https://api.github.test:{port}/u?token=x"),
            "-H".into(),
            "Authorization: Bearer GITHUB_TOKEN".into(),
        ],
        vec![
            format!("https://api.github.test:{port}/"),
            "-u".into(),
            "me:GITHUB_TOKEN".into(),
        ],
        vec![
            format!("https://other.test:{port}/"),
            "-H".into(),
            "Authorization: Bearer GITHUB_TOKEN".into(),
        ],
        vec![format!("https://maps.test:{port}/MAPS_KEY?key=MAPS_KEY")],
        vec![format!("https://inject.test:{port}/")],
        vec![format!("https://basic.test:{port}/")],
        vec![
            format!("http://api.github.test:{port}/"),
            "-H".into(),
            "Authorization: Bearer GITHUB_TOKEN".into(),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = curl_via(proxy.addr, &proxy.ca, &args).await;
        bodies.push_str(&r.body);
        bodies.push_str(&r.stderr);
    }
    let log = proxy.stop();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "not at trace level"
    );
    assert!(log.contains("GITHUB_TOKEN"), "audit should name the secret");
    for real in ALL_REAL {
        assert!(!log.contains(real), "secret value in logs");
        assert!(!bodies.contains(real), "secret value in a response");
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, real);
        assert!(!log.contains(&b64), "encoded secret value in logs");
    }
    // The origin did receive them.
    assert!(
        w.origin
            .records()
            .iter()
            .any(|r| r.header("x-api-key") == Some(format!("Token {REAL_INJECT}")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_gives_the_child_a_working_sandbox_without_secrets() {
    if !have("curl") {
        return;
    }
    let policy = STANDARD_POLICY.replace(
        "[proxy]\n",
        "[proxy]\nadmin_token = { env = \"ADMIN_BEARER\" }\n",
    );
    let w = World::new(&policy, OriginOptions::default()).await;
    let port = w.port();
    let out = tokio::process::Command::new(bin())
        .args(["run", "--policy"])
        .arg(&w.policy_path)
        .args(["--", "sh", "-c"])
        .arg(format!(
            "env; curl -sS -w ' %{{http_code}}' https://api.github.test:{port}/user -H \"Authorization: Bearer $GITHUB_TOKEN\""
        ))
        .env("IRON_PROXY_HOME", w.dir.path().join("home"))
        .envs(standard_env())
        .env("ADMIN_BEARER", "admin-bearer-value")
        .env("IRON_PROXY_ADMIN_TOKEN", "admin-bearer-value")
        .output()
        .await
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The admin API's token would let the sandbox reload or probe the proxy.
    assert!(
        !stdout.contains("admin-bearer-value"),
        "child inherited the admin token"
    );
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with("200"), "{stdout}");
    assert!(stdout.contains("GITHUB_TOKEN=GITHUB_TOKEN"));
    assert!(stdout.contains("HTTPS_PROXY=http://127.0.0.1:"));
    for real in ALL_REAL {
        assert!(!stdout.contains(real), "child saw a real secret");
    }
    assert!(
        !stdout.contains("REAL_GITHUB_TOKEN"),
        "child inherited a source variable"
    );
    let rec = w.origin.records().pop().expect("record");
    assert_eq!(
        rec.header("authorization"),
        Some(format!("Bearer {REAL_GITHUB}"))
    );

    // The child's exit status passes through.
    let st = tokio::process::Command::new(bin())
        .args(["run", "--policy"])
        .arg(&w.policy_path)
        .args(["--", "sh", "-c", "exit 7"])
        .env("IRON_PROXY_HOME", w.dir.path().join("home"))
        .envs(standard_env())
        .status()
        .await
        .expect("run");
    assert_eq!(st.code(), Some(7));

    // Run as root without --user, the command could read the proxy's memory and files: a
    // warning says so. With --user it runs as that user and cannot read the proxy's
    // environment (where the real values of `env` sources are), yet reaches the API.
    let root = String::from_utf8_lossy(&out.stderr).contains("runs as root");
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    assert_eq!(root, is_root, "{}", String::from_utf8_lossy(&out.stderr));
    if !is_root || !std::path::Path::new("/proc/self/environ").exists() {
        return;
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        // The sandbox user must reach the CA bundle in the state directory.
        std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let out = tokio::process::Command::new(bin())
        .args(["run", "--user", "65534", "--policy"])
        .arg(&w.policy_path)
        .args(["--", "sh", "-c"])
        .arg(format!(
            "id -u; if cat /proc/$PPID/environ >/dev/null 2>&1; then echo environ-readable; else echo environ-refused; fi; curl -sS -w ' %{{http_code}}' https://api.github.test:{port}/user -H \"Authorization: Bearer $GITHUB_TOKEN\""
        ))
        .env("IRON_PROXY_HOME", w.dir.path().join("home"))
        .envs(standard_env())
        .output()
        .await
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout} {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "65534", "{stdout}");
    assert_eq!(lines[1], "environ-refused", "{stdout}");
    assert!(stdout.trim_end().ends_with("200"), "{stdout} {stderr}");
    assert!(!stderr.contains("without --user"), "{stderr}");
    for real in ALL_REAL {
        assert!(!stdout.contains(real), "child saw a real secret");
    }
}

#[test]
fn check_reports_every_error_with_position_and_no_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "version = 1\n[proxy]\negress = \"everything\"\n\n[[secrets]]\nname = \"GITHUB_TOKEN\"\ntype = \"http\"\nsource = { env = \"REAL_GITHUB_TOKEN\" }\nhosts = [\"*.com\"]\n",
    )
    .expect("write");
    let out = std::process::Command::new(bin())
        .args(["check", "--policy"])
        .arg(&p)
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let file = p.display().to_string();
    assert!(
        text.contains(&format!("{file}:3:10: `egress` must be")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{file}:9:10: `hosts`: host pattern `*.com` covers a whole top-level domain"
        )),
        "{text}"
    );

    // A valid policy whose required source is missing: an error at the source; with the
    // variable set: ok, and the value is never printed.
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "version = 1\n[[secrets]]\nname = \"GITHUB_TOKEN\"\ntype = \"http\"\nsource = { env = \"REAL_GITHUB_TOKEN\" }\nhosts = [\"api.github.com\"]\n",
    )
    .expect("write");
    let out = std::process::Command::new(bin())
        .args(["check", "--policy"])
        .arg(&good)
        .env_remove("REAL_GITHUB_TOKEN")
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains(&format!(
            "{}:5:10: secret `GITHUB_TOKEN`: environment variable REAL_GITHUB_TOKEN is not set",
            good.display()
        )),
        "{text}"
    );
    let out = std::process::Command::new(bin())
        .args(["check", "--policy"])
        .arg(&good)
        .env("REAL_GITHUB_TOKEN", REAL_GITHUB)
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains(REAL_GITHUB));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(REAL_GITHUB));
}

#[test]
fn ca_init_and_env() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let ok = std::process::Command::new(bin())
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .status()
        .expect("ca init");
    assert!(ok.success());
    let mode = std::fs::metadata(ca.join("ca.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = std::process::Command::new(bin())
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .expect("ca init");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "version = 1\n[proxy]\nlisten = \"127.0.0.1:18080\"\nca_cert = \"ca/ca.crt\"\nca_key = \"ca/ca.key\"\n[[secrets]]\nname = \"GITHUB_TOKEN\"\ntype = \"http\"\nsource = { env = \"REAL_GITHUB_TOKEN\" }\nhosts = [\"api.github.com\"]\n",
    )
    .expect("write");
    let out = std::process::Command::new(bin())
        .args(["env", "--policy"])
        .arg(&policy)
        .env("IRON_PROXY_HOME", dir.path().join("home"))
        .env("REAL_GITHUB_TOKEN", REAL_GITHUB)
        .output()
        .expect("env");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "export HTTPS_PROXY='http://127.0.0.1:18080'",
        "export http_proxy='http://127.0.0.1:18080'",
        "export GITHUB_TOKEN='GITHUB_TOKEN'",
        "export NODE_USE_ENV_PROXY='1'",
        &format!(
            "export NODE_EXTRA_CA_CERTS='{}'",
            ca.join("ca.crt").display()
        ),
        "export GIT_SSL_CAINFO='",
        "export REQUESTS_CA_BUNDLE='",
        "export SSL_CERT_FILE='",
        "export CURL_CA_BUNDLE='",
        "export CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE='",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains(REAL_GITHUB));
    // The bundle starts with the proxy CA.
    let bundle = dir.path().join("home").join("ca-bundle.pem");
    let ca_pem = std::fs::read_to_string(ca.join("ca.crt")).expect("ca");
    assert!(
        std::fs::read_to_string(bundle)
            .expect("bundle")
            .starts_with(&ca_pem)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_with_placeholder_in_url_userinfo() {
    if !have("git") || !have("curl") {
        return eprintln!("git not installed; skipped");
    }
    let root = tempfile::tempdir().expect("tempdir");
    let repo = root.path().join("repo.git");
    let work = root.path().join("work");
    let git = |args: &[&str], cwd: &std::path::Path| {
        let st = std::process::Command::new("git")
            .args(args)
            .current_dir(cwd)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .expect("git");
        assert!(
            st.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    };
    std::fs::create_dir_all(&work).expect("mkdir");
    git(&["init", "-q", "-b", "main", "."], &work);
    std::fs::write(work.join("README"), "hello through iron-proxy\n").expect("write");
    git(&["add", "README"], &work);
    git(&["commit", "-q", "-m", "init"], &work);
    git(
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().expect("p"),
            repo.to_str().expect("p"),
        ],
        root.path(),
    );

    let w = World::new(
        STANDARD_POLICY,
        OriginOptions {
            git_root: Some(root.path().to_path_buf()),
            ..Default::default()
        },
    )
    .await;
    let p = w.proxy(standard_env()).await;
    let dest = root.path().join("clone");
    let out = tokio::process::Command::new("git")
        .args(["clone", "-q"])
        .arg(format!(
            "https://x-access-token:GITHUB_TOKEN@api.github.test:{}/git/repo.git",
            w.port()
        ))
        .arg(&dest)
        .env("https_proxy", format!("http://{}", p.addr()))
        .env("GIT_SSL_CAINFO", &p.ca.cert)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", root.path())
        .output()
        .await
        .expect("git clone");
    assert!(
        out.status.success(),
        "clone failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("README")).expect("README"),
        "hello through iron-proxy\n"
    );
    let authed: Vec<_> = w
        .origin
        .records()
        .into_iter()
        .filter_map(|r| r.header("authorization"))
        .collect();
    assert!(!authed.is_empty());
    for a in authed {
        let decoded = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            a.trim_start_matches("Basic "),
        )
        .expect("basic");
        assert_eq!(
            String::from_utf8_lossy(&decoded),
            format!("x-access-token:{REAL_GITHUB}")
        );
    }
}

/// `serve` with a required secret whose variable is unset: it starts (with a warning),
/// `/readyz` is 503 naming it, `/v1/secrets` shows it `missing` with the variable name and
/// no value, a request needing it is refused (502, nothing reaches the origin), and `check`
/// still fails on the same policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_a_missing_required_secret_and_fails_closed() {
    if !have("curl") {
        return;
    }
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let text = std::fs::read_to_string(&w.policy_path)
        .expect("policy")
        .replacen(
            "[proxy]\n",
            &format!("[proxy]\nadmin_listen = \"{admin}\"\n"),
            1,
        );
    std::fs::write(&w.policy_path, text).expect("write policy");
    let mut env = standard_env();
    env.remove("REAL_GITHUB_TOKEN");
    let check = std::process::Command::new(bin())
        .args(["check", "--policy"])
        .arg(&w.policy_path)
        .envs(&env)
        .env_remove("REAL_GITHUB_TOKEN")
        .output()
        .expect("check");
    assert!(
        !check.status.success(),
        "check accepted a missing required source"
    );
    let home = w.dir.path().join("home");
    let proxy = Spawned::start(&bin(), &w.policy_path, &home, &env, "info");
    let get = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}"])
            .arg(format!("http://{admin}{path}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse::<u16>().unwrap_or(0), body.to_string())
    };
    let (code, body) = get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("GITHUB_TOKEN"), "{body}");
    let (code, body) = get("/v1/secrets/GITHUB_TOKEN");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["state"], "missing", "{body}");
    assert!(body.contains("REAL_GITHUB_TOKEN"), "{body}");
    let port = w.port();
    let r = curl_via(
        proxy.addr,
        &proxy.ca,
        &[
            &format!("https://api.github.test:{port}/"),
            "-H",
            "Authorization: Bearer GITHUB_TOKEN",
        ],
    )
    .await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.error_code().as_deref(), Some("credential_unavailable"));
    assert!(w.origin.records().is_empty());
    let request_id = serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["request_id"].as_str().map(str::to_string))
        .expect("the envelope names the request");
    // Other secrets work meanwhile.
    let r = curl_via(
        proxy.addr,
        &proxy.ca,
        &[&format!("https://inject.test:{port}/")],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let log = proxy.stop();
    assert!(log.contains("REAL_GITHUB_TOKEN is not set"), "{log}");
    // The refusal's warning names the request (as the envelope and the audit line do) and
    // the client.
    assert!(
        log.lines().any(|l| l.contains("secret source unavailable")
            && l.contains(&format!("request_id={request_id}"))
            && l.contains("client=127.0.0.1:")),
        "{log}"
    );
    for real in ALL_REAL {
        assert!(!log.contains(real));
    }
}

/// With several event loops (`TOKIO_WORKER_THREADS=3`), connections are spread over them and
/// each loop swaps placeholders and pools its own upstream connections: concurrent clients
/// all get the origin's answer, and the origin sees only real values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_event_loops_serve_concurrent_connections() {
    if !have("curl") {
        return;
    }
    let w = World::new(STANDARD_POLICY, OriginOptions::default()).await;
    let home = w.dir.path().join("home");
    let mut env = standard_env();
    env.insert("TOKIO_WORKER_THREADS".into(), "3".into());
    let proxy = Spawned::start(&bin(), &w.policy_path, &home, &env, "info");
    let port = w.port();
    let url = format!("https://api.github.test:{port}/loops");
    let runs = (0..12).map(|_| {
        let url = url.clone();
        let ca = proxy.ca.clone();
        let addr = proxy.addr;
        async move {
            curl_via(
                addr,
                &ca,
                &[&url, "-H", "Authorization: Bearer GITHUB_TOKEN"],
            )
            .await
        }
    });
    let results = futures_util::future::join_all(runs).await;
    for r in &results {
        assert_eq!(r.status, 200, "curl: {} {}", r.stderr, r.body);
    }
    let log = proxy.stop();
    let records = w.origin.records();
    let swapped = records
        .iter()
        .filter(|r| r.header("authorization") == Some(format!("Bearer {REAL_GITHUB}")))
        .count();
    assert_eq!(
        swapped, 12,
        "every request reached the origin with the real token"
    );
    assert!(!log.contains(REAL_GITHUB), "secret value in logs");
    assert_eq!(
        log.matches("\"kind\":\"request\"").count(),
        12,
        "one audit line per request"
    );
}

#[test]
fn check_fails_when_the_admin_token_source_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("admin.toml");
    std::fs::write(
        &p,
        "version = 1\n[proxy]\nadmin_token = { env = \"ADMIN_BEARER_UNSET\" }\n",
    )
    .expect("write");
    let out = std::process::Command::new(bin())
        .args(["check", "--policy"])
        .arg(&p)
        .env_remove("ADMIN_BEARER_UNSET")
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("{}:3:", p.display())) && text.contains("admin_token"),
        "{text}"
    );
    let ok = std::process::Command::new(bin())
        .args(["check", "--policy"])
        .arg(&p)
        .env("ADMIN_BEARER_UNSET", "set-now")
        .output()
        .expect("check");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
}

#[test]
fn secrets_list_shows_names_never_values_and_creates_no_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("policy.toml");
    std::fs::write(
        &p,
        "version = 1\n[[secrets]]\nname = \"GITHUB_TOKEN\"\ntype = \"http\"\nsource = { env = \"REAL_GITHUB_TOKEN\" }\nhosts = [\"api.github.com\"]\ncapabilities = [{ method = \"GET\", path = \"/repos\" }]\n",
    )
    .expect("write");
    let home = dir.path().join("home");
    let out = std::process::Command::new(bin())
        .args(["secrets", "list", "--policy"])
        .arg(&p)
        .env("IRON_PROXY_HOME", &home)
        .env("REAL_GITHUB_TOKEN", REAL_GITHUB)
        .current_dir(dir.path())
        .output()
        .expect("secrets list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("GITHUB_TOKEN") && text.contains("api.github.com"),
        "{text}"
    );
    assert!(!text.contains(REAL_GITHUB));
    assert!(!home.exists(), "secrets list wrote a state directory");
    assert!(!dir.path().join(".iron-proxy").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_command_reads_only_admin_listen_from_the_policy() {
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let policy = STANDARD_POLICY.replace(
        "[proxy]\n",
        &format!("[proxy]\nadmin_listen = \"{admin}\"\n"),
    );
    let w = World::new(&policy, OriginOptions::default()).await;
    let home = w.dir.path().join("home");
    let proxy = Spawned::start(&bin(), &w.policy_path, &home, &standard_env(), "info");
    // This shell lacks the secrets' variables; the server has them.
    let out = std::process::Command::new(bin())
        .args(["reload", "--policy"])
        .arg(&w.policy_path)
        .env_remove("REAL_GITHUB_TOKEN")
        .output()
        .expect("reload");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("reloaded"), "{text}");
    assert!(
        !text.contains("REAL_GITHUB_TOKEN"),
        "the CLI checked its own environment: {text}"
    );
    drop(proxy);
}
