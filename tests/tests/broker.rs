//! End-to-end: `iron-token-broker` (as a process) against a fake IdP that rotates refresh
//! tokens and revokes the family on reuse, with iron-proxy instances fetching access tokens
//! from it (`brokered_token`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed setup step is a failed test

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use iron_proxy::client;
use iron_proxy::origin::OriginOptions;
use iron_tests::pgcluster::PgCluster;
use iron_tests::rotating_idp::{self, RotatingIdp};
use iron_tests::*;

const BROKER_TOKEN: &str = "bt_REALbrokerBEARER_31";
const BIN: &str = env!("CARGO_BIN_EXE_iron-token-broker-e2e");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker config in `dir` for credential `codex` at `idp`, with `store`
/// (a TOML value) and 1 s refresh timeouts scaled for tests.
fn write_config(dir: &Path, idp: &RotatingIdp, port: u16, store: &str) -> PathBuf {
    std::fs::write(dir.join("idp-ca.pem"), &idp.ca_pem).unwrap();
    let path = dir.join(format!("broker-{port}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"version = 1
listen = "127.0.0.1:{port}"
auth_token = {{ env = "BROKER_TOKEN" }}
upstream_ca = ["idp-ca.pem"]
store = {store}
refresh_timeout_secs = 5

[[credentials]]
id = "codex"
token_endpoint = "{url}"
client_id = "{cid}"
client_secret = {{ env = "BROKER_CLIENT_SECRET" }}
scopes = ["openid", "offline_access"]
"#,
            url = idp.token_url(),
            cid = rotating_idp::CLIENT_ID,
        ),
    )
    .unwrap();
    path
}

fn broker_cmd(config: &Path, extra_env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("serve")
        .arg("--config")
        .arg(config)
        .env("BROKER_TOKEN", BROKER_TOKEN)
        .env("BROKER_CLIENT_SECRET", rotating_idp::CLIENT_SECRET)
        .env("IRON_TOKEN_BROKER_LOG", "debug");
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c
}

/// A broker process; its stderr is collected for leak checks.
struct Broker {
    child: Child,
    log: PathBuf,
}

impl Broker {
    fn start(config: &Path, port: u16, extra_env: &[(&str, &str)]) -> Self {
        let log = config.with_extension(format!(
            "log-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = broker_cmd(config, extra_env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn broker");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "broker did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, log }
    }

    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(config: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("BROKER_TOKEN", BROKER_TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `GET /v1/credentials/codex/access_token` with the bearer: (status, body).
async fn access_token(port: u16) -> (u16, serde_json::Value) {
    let (status, body, _) = access_token_with_head(port).await;
    (status, body)
}

/// [`access_token`], with the response head (status line and headers, lower-cased).
async fn access_token_with_head(port: u16) -> (u16, serde_json::Value, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-m", "30", "-D", "-", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {BROKER_TOKEN}"))
        .arg(format!(
            "http://127.0.0.1:{port}/v1/credentials/codex/access_token"
        ))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or(("", rest));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        head.to_ascii_lowercase(),
    )
}

const PROXY_POLICY: &str = r#"version = 1

[proxy]
listen = "127.0.0.1:0"
allow_cidrs = ["127.0.0.1/32"]
upstream_ca = ["origin-ca.pem"]
resolve = { "api.codex.test" = "127.0.0.1" }

[[secrets]]
name = "CODEX_TOKEN"
type = "brokered_token"
credential = "codex"
broker = { url = "http://127.0.0.1:{BROKER_PORT}", token = { env = "BROKER_TOKEN" } }
hosts = ["api.codex.test:{PORT}"]
"#;

fn proxy_env() -> HashMap<String, String> {
    [("BROKER_TOKEN".to_string(), BROKER_TOKEN.to_string())].into()
}

/// Drives `workers` keep-alive loops through `proxy` until `stop`; counts statuses.
fn load(
    p: &InProcess,
    port: u16,
    workers: usize,
    stop: &Arc<AtomicBool>,
    ok: &Arc<AtomicUsize>,
    failed: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let authority = format!("api.codex.test:{port}");
    (0..workers)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let (addr, ca, authority) =
                (p.addr(), p.ca.ca.cert_pem().to_string(), authority.clone());
            tokio::spawn(async move {
                let mut send = client::tunnel(addr, &authority, "api.codex.test", &ca)
                    .await
                    .expect("tunnel");
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get("/v1/responses")
                        .header("host", &authority)
                        .header("authorization", "Bearer CODEX_TOKEN")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    match client::fetch(&mut send, req).await {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            send = client::tunnel(addr, &authority, "api.codex.test", &ca)
                                .await
                                .expect("tunnel");
                        }
                    }
                }
            })
        })
        .collect()
}

/// Waits `dur` while checking, every 100 ms, that each request the origin saw since the
/// last check carried a token the IdP issued and that is valid now (never the placeholder,
/// never nothing, never expired or revoked). `checked` counts the requests checked.
async fn run_checking(w: &World, idp: &RotatingIdp, dur: Duration, checked: &mut usize) {
    let end = Instant::now() + dur;
    loop {
        let recs = w.origin.records();
        for r in &recs[*checked..] {
            let auth = r.header("authorization").unwrap_or_default();
            let token = auth.strip_prefix("Bearer ").unwrap_or_default();
            assert!(
                token.starts_with("at_REAL_"),
                "request forwarded without an access token: {auth:?}"
            );
            assert!(
                idp.is_valid_access(token),
                "request forwarded with an expired or revoked token"
            );
        }
        *checked = recs.len();
        if Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_one_broker_without_reuse_and_nothing_leaks() {
    let idp = RotatingIdp::start().await;
    idp.state.lifetime_secs.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let bport = free_port();
    let config = write_config(dir.path(), &idp, bport, "{ file = \"creds\" }");

    // Not bootstrapped yet: 422 with the reason.
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["reason"], "not_bootstrapped");
    // Bootstrap from stdin, with the daemon running.
    let (ok, out, err) = cli(
        &config,
        &["credentials", "set", "--id", "codex"],
        Some(&format!("{}\n", rotating_idp::SEED_REFRESH)),
    );
    assert!(ok, "{err}");
    assert!(!out.contains("rt_REAL"));
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["access_token"]
            .as_str()
            .unwrap()
            .starts_with("at_REAL_")
    );
    assert!(body["expires_in"].as_f64().unwrap() > 0.0);
    // Auth, unknown id, method.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!(
            "http://127.0.0.1:{bport}/v1/credentials/codex/access_token"
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {BROKER_TOKEN}"))
        .arg(format!(
            "http://127.0.0.1:{bport}/v1/credentials/nope/access_token"
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // Two proxies × 50 concurrent keep-alive loops for 6 s across ~6 token expiries.
    let w = World::new(
        &PROXY_POLICY.replace("{BROKER_PORT}", &bport.to_string()),
        OriginOptions::default(),
    )
    .await;
    let p1 = w.proxy(proxy_env()).await;
    let p2 = w.proxy(proxy_env()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut loops = load(&p1, w.port(), 50, &stop, &ok, &failed);
    loops.extend(load(&p2, w.port(), 50, &stop, &ok, &failed));
    let mut seen = 0;
    run_checking(&w, &idp, Duration::from_secs(6), &mut seen).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let st = &idp.state;
    assert_eq!(
        st.reuse_events.load(Ordering::SeqCst),
        0,
        "refresh token reuse detected"
    );
    assert_eq!(st.revoked_families.load(Ordering::SeqCst), 0);
    let refreshes = st.refreshes.load(Ordering::SeqCst);
    assert!(
        (3..=20).contains(&refreshes),
        "{refreshes} refreshes in 6 s with 1 s tokens"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed");
    run_checking(&w, &idp, Duration::ZERO, &mut seen).await;
    assert!(
        seen > 100 && seen == ok.load(Ordering::Relaxed),
        "{seen} requests"
    );

    // Metrics and `credentials list` show state, never a token; neither do the logs.
    let metrics = Command::new("curl")
        .arg(format!("http://127.0.0.1:{bport}/metrics"))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(
        metrics.contains("broker_refresh_attempts_total{credential=\"codex\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("broker_token_time_to_expiry_seconds"),
        "{metrics}"
    );
    let (ok_list, list, err) = cli(&config, &["credentials", "list"], None);
    assert!(ok_list, "{err}");
    assert!(list.contains("codex") && list.contains(" ok "), "{list}");
    let log = b.kill();
    for text in [&metrics, &list, &log] {
        assert!(
            !text.contains("rt_REAL")
                && !text.contains("at_REAL")
                && !text.contains(BROKER_TOKEN)
                && !text.contains(rotating_idp::CLIENT_SECRET),
            "a token leaked:\n{text}"
        );
    }
    let audit = serde_json::to_string(&p1.audit.records()).unwrap();
    assert!(!audit.contains("at_REAL") && !audit.contains(BROKER_TOKEN));
}

/// A broker killed at each step of a rotation, then restarted: the credential survives, or
/// is reported dead with a reason — never silently dead. The file store is never torn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_each_rotation_step_is_survived_or_reported() {
    for point in [
        "after_intent",
        "after_idp",
        "after_tmp_write",
        "after_commit",
    ] {
        let idp = RotatingIdp::start().await;
        let dir = tempfile::tempdir().unwrap();
        let bport = free_port();
        let config = write_config(dir.path(), &idp, bport, "{ file = \"creds\" }");
        std::fs::write(dir.path().join("seed"), rotating_idp::SEED_REFRESH).unwrap();
        let (ok, _, err) = cli(
            &config,
            &[
                "credentials",
                "set",
                "--id",
                "codex",
                "--refresh-token-file",
                dir.path().join("seed").to_str().unwrap(),
            ],
            None,
        );
        assert!(ok, "{err}");

        // The scheduler refreshes at start: the broker reaches the crash point by itself.
        let status = broker_cmd(&config, &[("IRON_TOKEN_BROKER_CRASH_AT", point)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("broker");
        assert!(
            !status.success(),
            "{point}: the broker should have died mid-rotation"
        );
        // The record is whole JSON whatever the crash point.
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("creds/codex.json")).unwrap())
                .unwrap_or_else(|e| panic!("{point}: torn record: {e}"));
        let b = Broker::start(&config, bport, &[]);
        let (status, body) = access_token(bport).await;
        let (_, list, _) = cli(&config, &["credentials", "list"], None);
        let reuse = idp.state.reuse_events.load(Ordering::SeqCst);
        match point {
            "after_commit" | "after_tmp_write" => {
                // after_commit: the rotated token was durable before the crash. after_tmp_write
                // fires on the first write (the intent): the rename never happened, the old
                // record is intact and the IdP was not called. Either way: served, no reuse.
                assert_eq!(status, 200, "{point}: {body}");
                assert!(rec.get("in_flight").is_none());
                assert_eq!(reuse, 0);
            }
            _ => {
                // A rotation may have happened and its result is lost: reported, not replayed.
                assert_eq!(status, 422, "{point}: {body}");
                assert_eq!(body["reason"], "rotation_interrupted", "{point}");
                assert!(list.contains("rotation_interrupted"), "{list}");
                assert_eq!(
                    reuse, 0,
                    "{point}: the broker replayed a possibly rotated token"
                );
                let metrics = Command::new("curl")
                    .arg(format!("http://127.0.0.1:{bport}/metrics"))
                    .output()
                    .unwrap();
                assert!(String::from_utf8_lossy(&metrics.stdout).contains(
                    "broker_credential_dead{credential=\"codex\",reason=\"rotation_interrupted\"} 1"
                ));
            }
        }
        if point == "after_intent" {
            // The IdP was never called: reviving keeps the family alive.
            assert_eq!(idp.state.refreshes.load(Ordering::SeqCst), 0);
            let (ok, _, err) = cli(&config, &["credentials", "revive", "--id", "codex"], None);
            assert!(ok, "{err}");
            let (status, body) = access_token(bport).await;
            assert_eq!(status, 200, "{body}");
        }
        if point == "after_idp" {
            // Re-consent: a new refresh token from the IdP brings it back.
            let fresh = idp.new_family();
            let (ok, _, err) = cli(
                &config,
                &["credentials", "set", "--id", "codex"],
                Some(&fresh),
            );
            assert!(ok, "{err}");
            let (status, body) = access_token(bport).await;
            assert_eq!(status, 200, "{body}");
        }
        let log = b.kill();
        assert!(
            !log.contains("rt_REAL") && !log.contains("at_REAL"),
            "{log}"
        );
    }
}

/// SIGKILL at random moments under load with 2 s tokens: no request is forwarded without a
/// valid token, and every family revocation is reported as a dead credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sigkills_under_load_never_forward_without_a_token() {
    let idp = RotatingIdp::start().await;
    idp.state.lifetime_secs.store(2, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let bport = free_port();
    let config = write_config(dir.path(), &idp, bport, "{ file = \"creds\" }");
    let (ok, _, err) = cli(
        &config,
        &["credentials", "set", "--id", "codex"],
        Some(rotating_idp::SEED_REFRESH),
    );
    assert!(ok, "{err}");
    let w = World::new(
        &PROXY_POLICY.replace("{BROKER_PORT}", &bport.to_string()),
        OriginOptions::default(),
    )
    .await;
    let p = w.proxy(proxy_env()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let loops = load(&p, w.port(), 8, &stop, &ok, &failed);
    let started = Instant::now();
    let mut kills = 0;
    let mut seen = 0;
    let mut seed = 0x9e37_79b9_u64;
    let secs = secs_from_env("IRON_TESTS_KILL_SECS", 15);
    while started.elapsed() < Duration::from_secs(secs) {
        let b = Broker::start(&config, bport, &[]);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        run_checking(
            &w,
            &idp,
            Duration::from_millis(300 + seed % 1700),
            &mut seen,
        )
        .await;
        let log = b.kill(); // SIGKILL
        assert!(
            !log.contains("rt_REAL") && !log.contains("at_REAL"),
            "{log}"
        );
        kills += 1;
    }
    let b = Broker::start(&config, bport, &[]);
    run_checking(&w, &idp, Duration::from_secs(1), &mut seen).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    run_checking(&w, &idp, Duration::ZERO, &mut seen).await;
    let revoked = idp.state.revoked_families.load(Ordering::SeqCst);
    let (status, body) = access_token(bport).await;
    if revoked > 0 {
        // Only acceptable when reported: the credential is dead with a reason.
        assert_eq!(
            status, 422,
            "family revoked but the broker says {status} {body}"
        );
    } else {
        // A kill between the intent and the commit leaves a possible rotation behind: that
        // is reported (dead, rotation_interrupted), never replayed. Anything else serves.
        assert!(
            status == 200 || (status == 422 && body["reason"] == "rotation_interrupted"),
            "{status} {body}"
        );
    }
    assert!(kills >= 5 && seen > 50, "{kills} kills, {seen} requests");
    drop(b);
}

/// Seconds from `var` (for longer soak runs by hand), else `default`.
fn secs_from_env(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Two brokers on one Postgres store, three proxies: one refresh per expiry, zero reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_on_postgres_refresh_once_per_expiry() {
    let Some(pg) = PgCluster::start() else { return };
    pg.psql("create database broker").unwrap();
    let dsn = format!(
        "postgresql://postgres:{}@127.0.0.1:{}/broker",
        iron_tests::pgcluster::SUPER_PASSWORD,
        pg.port
    );
    let idp = RotatingIdp::start().await;
    idp.state.lifetime_secs.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dsn"), &dsn).unwrap();
    let store = "{ postgres = { dsn = { file = \"dsn\" } } }";
    let (port_a, port_b) = (free_port(), free_port());
    let config_a = write_config(dir.path(), &idp, port_a, store);
    let config_b = write_config(dir.path(), &idp, port_b, store);
    let (ok, _, err) = cli(
        &config_a,
        &["credentials", "set", "--id", "codex"],
        Some(rotating_idp::SEED_REFRESH),
    );
    assert!(ok, "{err}");
    let a = Broker::start(&config_a, port_a, &[]);
    let b = Broker::start(&config_b, port_b, &[]);
    let w = World::new(
        &PROXY_POLICY.replace("{BROKER_PORT}", &port_a.to_string()),
        OriginOptions::default(),
    )
    .await;
    let pa = w.proxy(proxy_env()).await;
    // The second proxy asks the second broker.
    let policy_b = w.dir.path().join("policy-b.toml");
    std::fs::write(
        &policy_b,
        std::fs::read_to_string(&w.policy_path)
            .unwrap()
            .replace(&format!(":{port_a}\""), &format!(":{port_b}\"")),
    )
    .unwrap();
    let pb = {
        let policy = Arc::new(iron_policy::Policy::load(&policy_b).unwrap());
        let ca = iron_proxy::state::load_ca(&policy, &w.dir.path().join("state")).unwrap();
        let audit = Arc::new(iron_proxy::MemoryAudit::default());
        let rt = iron_proxy::Runtime::new(
            policy.clone(),
            ca.ca.clone(),
            Arc::new(proxy_env()),
            audit.clone(),
        )
        .unwrap();
        let running = iron_proxy::start(rt.clone(), policy.proxy.listen)
            .await
            .unwrap();
        InProcess {
            running,
            ca,
            audit,
            rt,
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let pc = w.proxy(proxy_env()).await;
    let mut loops = load(&pa, w.port(), 20, &stop, &ok, &failed);
    loops.extend(load(&pb, w.port(), 20, &stop, &ok, &failed));
    loops.extend(load(&pc, w.port(), 20, &stop, &ok, &failed));
    let secs = secs_from_env("IRON_TESTS_SOAK_SECS", 8);
    let mut seen = 0;
    run_checking(&w, &idp, Duration::from_secs(secs), &mut seen).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    run_checking(&w, &idp, Duration::ZERO, &mut seen).await;
    let st = &idp.state;
    assert_eq!(
        st.reuse_events.load(Ordering::SeqCst),
        0,
        "refresh token reuse detected"
    );
    let refreshes = st.refreshes.load(Ordering::SeqCst);
    // 1 s tokens refreshed ~0.3 s early: about 1.4 refreshes a second; two uncoordinated
    // brokers would make about twice that.
    assert!(
        (secs * 6 / 10..=secs * 2).contains(&refreshes),
        "{refreshes} refreshes in {secs} s"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(seen > 100, "{seen} requests");
    let (_, list, _) = cli(&config_b, &["credentials", "list"], None);
    assert!(
        list.contains("codex") && !list.contains("rt_REAL"),
        "{list}"
    );
    drop((a, b));
}

/// A broker config whose Postgres store logs in as a role with only some privileges.
struct PgRole {
    /// A config for the superuser (admin commands).
    admin: PathBuf,
    /// A config for the limited role, listening on `port`.
    config: PathBuf,
    port: u16,
    /// Runs SQL as the superuser in database `broker`; panics on failure.
    admin_sql: Box<dyn Fn(&str)>,
}

/// Database `broker` in `pg` with credential `codex` bootstrapped by the superuser, and a
/// login role `role` (password `ROLE_pw_1`) granted `grants` on the credentials table.
fn pg_store_with_role(
    pg: &PgCluster,
    idp: &RotatingIdp,
    dir: &Path,
    role: &str,
    grants: &str,
) -> PgRole {
    pg.psql("create database broker").unwrap();
    let dsn =
        |user: &str, pw: &str| format!("postgresql://{user}:{pw}@127.0.0.1:{}/broker", pg.port);
    let admin_dsn = dsn("postgres", iron_tests::pgcluster::SUPER_PASSWORD);
    std::fs::write(dir.join("admin-dsn"), &admin_dsn).unwrap();
    let admin = write_config(
        dir,
        idp,
        1,
        "{ postgres = { dsn = { file = \"admin-dsn\" } } }",
    );
    bootstrap(&admin);
    let admin_sql = Box::new(move |sql: &str| {
        let out = Command::new("psql")
            .arg(&admin_dsn)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let pw = format!("{role}_pw_1");
    admin_sql(&format!(
        "create role {role} login password '{pw}'; grant {grants} on iron_broker_credentials to {role}"
    ));
    std::fs::write(dir.join(format!("{role}-dsn")), dsn(role, &pw)).unwrap();
    let port = free_port();
    let config = write_config(
        dir,
        idp,
        port,
        &format!("{{ postgres = {{ dsn = {{ file = \"{role}-dsn\" }} }} }}"),
    );
    PgRole {
        admin,
        config,
        port,
        admin_sql,
    }
}

/// A store the broker cannot write: the IdP is not called, the error is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_store_means_no_refresh_attempt() {
    let Some(pg) = PgCluster::start() else { return };
    let idp = RotatingIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let role = pg_store_with_role(&pg, &idp, dir.path(), "reader", "select");
    let (config, bport) = (role.config, role.port);
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable");
    assert_eq!(
        idp.state.requests.load(Ordering::SeqCst),
        0,
        "the IdP was called without a durable intent"
    );
    let log = b.kill();
    assert!(log.contains("credential store"), "{log}");
}

/// The store goes away while the IdP is rotating the refresh token, and the broker is then
/// killed: the rotated token survives in the spill directory (mode 0600), the next broker
/// writes it to the store before anything else and serves from it, and the IdP never sees
/// the old token again. Without `spill_dir` the next broker would find the intent and mark
/// the credential `rotation_interrupted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_store_missed_survives_a_kill_in_the_spill_dir() {
    let Some(pg) = PgCluster::start() else { return };
    let idp = RotatingIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spilled = spill_a_rotation(&pg, &idp, dir.path()).await;
    let (admin, config, bport, spill) = (
        &spilled.role.admin,
        &spilled.role.config,
        spilled.role.port,
        &spilled.spill,
    );
    let admin_sql = &spilled.role.admin_sql;
    let text = std::fs::read_to_string(spill).unwrap();
    assert!(
        !text.contains(rotating_idp::SEED_REFRESH),
        "the spill file holds the old refresh token"
    );

    // `revive` would replay the rotated-out token while the spill holds the rotated one.
    let (ok, _, err) = cli(config, &["credentials", "revive", "--id", "codex"], None);
    assert!(!ok && err.contains("has not taken yet"), "{err}");

    // The store is back; a new broker writes the held record first and serves its token.
    admin_sql("grant update on iron_broker_credentials to writer");
    let second = Broker::start(config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        idp.is_valid_access(body["access_token"].as_str().unwrap()),
        "{body}"
    );
    assert_eq!(
        idp.state.reuse_events.load(Ordering::SeqCst),
        0,
        "the old refresh token was replayed"
    );
    assert!(!spill.exists(), "the spill file outlived its record");
    // The held access token had expired (1 s tokens), so that token came from a refresh
    // with the rotated refresh token the spill kept.
    assert!(idp.state.refreshes.load(Ordering::SeqCst) >= 2);
    let (_, list, _) = cli(admin, &["credentials", "list"], None);
    assert!(list.contains(" ok "), "{list}");
    let log = second.kill();
    assert!(log.contains("stored the held record"), "{log}");
}

/// A Postgres store whose broker role loses UPDATE while the IdP is rotating (a 2 s answer,
/// 1 s tokens), and that broker killed once it has spilled the rotated record.
struct Spilled {
    role: PgRole,
    /// `spill/codex.spill.json` in the test directory.
    spill: PathBuf,
}

/// Sets up [`Spilled`] in `dir`: the spill file exists (0600, its directory 0700), the
/// broker is dead, the role still lacks UPDATE, and the spilled access token has expired.
async fn spill_a_rotation(pg: &PgCluster, idp: &RotatingIdp, dir: &Path) -> Spilled {
    use std::os::unix::fs::PermissionsExt as _;
    let role = pg_store_with_role(pg, idp, dir, "writer", "select, update");
    let text = std::fs::read_to_string(&role.config).unwrap().replace(
        "refresh_timeout_secs = 5\n",
        "refresh_timeout_secs = 5\nspill_dir = \"spill\"\n",
    );
    std::fs::write(&role.config, text).unwrap();
    let spill = dir.join("spill").join("codex.spill.json");
    idp.state.lifetime_secs.store(1, Ordering::SeqCst);
    idp.state.delay_ms.store(2000, Ordering::SeqCst);
    let first = Broker::start(&role.config, role.port, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while idp.state.requests.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the broker did not refresh");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (role.admin_sql)("revoke update on iron_broker_credentials from writer");
    while !spill.exists() {
        assert!(Instant::now() < deadline, "nothing was spilled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(idp.state.refreshes.load(Ordering::SeqCst), 1);
    // Killed while the store write is still being retried: the spill file was written
    // before the first store attempt. The access token in it expires meanwhile.
    drop(first.kill());
    idp.state.delay_ms.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&spill), 0o600);
    assert_eq!(mode(spill.parent().unwrap()), 0o700);
    Spilled { role, spill }
}

/// A spilled rotation that the store has moved past (an operator bootstrapped a new
/// refresh token meanwhile) is not written over it, and not deleted either: it is set
/// aside as `codex.spill.dropped-MS` (0600) for a human, and the broker goes on with the
/// new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spilled_rotation_the_store_moved_past_is_set_aside() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(pg) = PgCluster::start() else { return };
    let idp = RotatingIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spilled = spill_a_rotation(&pg, &idp, dir.path()).await;
    let held = std::fs::read_to_string(&spilled.spill).unwrap();
    // The store is back, and the operator bootstraps a new token through this config.
    (spilled.role.admin_sql)("grant update, insert on iron_broker_credentials to writer");
    let fresh = idp.new_family();
    let (ok, _, err) = cli(
        &spilled.role.config,
        &["credentials", "set", "--id", "codex"],
        Some(&fresh),
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("will drop it"),
        "no warning about the spill: {err}"
    );
    let b = Broker::start(&spilled.role.config, spilled.role.port, &[]);
    let (status, body) = access_token(spilled.role.port).await;
    assert_eq!(status, 200, "{body}");
    assert!(!spilled.spill.exists());
    let aside: Vec<PathBuf> = std::fs::read_dir(spilled.spill.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("codex.spill.dropped-"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), held);
    let mode = std::fs::metadata(&aside[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(idp.state.reuse_events.load(Ordering::SeqCst), 0);
    let log = b.kill();
    assert!(log.contains("kept in this file"), "{log}");
}

/// Bootstraps credential `codex` in a fresh file store with the IdP's seed token.
/// A broker config for `idp` with a file store in a fresh directory, its credential
/// bootstrapped: (the directory, the broker's port, the config path).
fn file_store_credential(idp: &RotatingIdp) -> (tempfile::TempDir, u16, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bport = free_port();
    let config = write_config(dir.path(), idp, bport, "{ file = \"creds\" }");
    bootstrap(&config);
    (dir, bport, config)
}

fn bootstrap(config: &Path) {
    let (ok, _, err) = cli(
        config,
        &["credentials", "set", "--id", "codex"],
        Some(rotating_idp::SEED_REFRESH),
    );
    assert!(ok, "{err}");
}

/// SIGTERM while the IdP is answering: the broker waits for the rotation, stores it, then
/// exits; the next broker serves the rotated token without calling the IdP again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_rotation_keeps_the_rotated_token() {
    let idp = RotatingIdp::start().await;
    idp.state.delay_ms.store(1500, Ordering::SeqCst);
    let (dir, bport, config) = file_store_credential(&idp);
    let b = Broker::start(&config, bport, &[]);
    // The scheduler starts a refresh within 200 ms; stop the broker while the IdP holds it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while idp.state.requests.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no refresh started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = b.child.id().to_string();
    let term = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(term.success());
    let mut b = b;
    let stopped = Instant::now();
    let status = b.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        stopped.elapsed()
    );
    assert_eq!(idp.state.refreshes.load(Ordering::SeqCst), 1);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("creds/codex.json")).unwrap())
            .unwrap();
    assert!(rec.get("in_flight").is_none(), "{rec}");
    assert_eq!(rec["generation"], 2, "the rotated token was not stored");
    drop(b);
    idp.state.delay_ms.store(0, Ordering::SeqCst);
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert!(idp.is_valid_access(body["access_token"].as_str().unwrap()));
    assert_eq!(idp.state.reuse_events.load(Ordering::SeqCst), 0);
    assert_eq!(
        idp.state.refreshes.load(Ordering::SeqCst),
        1,
        "the stored token was fresh; no second refresh"
    );
    drop(b);
}

/// Grace (REFERENCE §5 d1): a refresh that fails while the cached access token is still
/// valid serves that token, marked `stale`, until 5 s before it expires; then the failure
/// is answered. The client secret is a file: removing it fails every refresh at once,
/// without calling the IdP, and leaves the credential alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_refresh_serves_the_still_valid_token_until_it_expires() {
    let idp = RotatingIdp::start().await;
    // 20 s tokens, early window 18 s: served fresh for the first 11 s (more than half the
    // window left), refreshed by the scheduler from 2 s on.
    idp.state.lifetime_secs.store(20, Ordering::SeqCst);
    let (dir, bport, config) = file_store_credential(&idp);
    let secret = dir.path().join("client-secret.txt");
    std::fs::write(&secret, rotating_idp::CLIENT_SECRET).unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "client_secret = { env = \"BROKER_CLIENT_SECRET\" }",
        "client_secret = { file = \"client-secret.txt\" }\nearly_refresh_fraction = 0.9",
    );
    assert!(text.contains("early_refresh_fraction"), "{text}");
    std::fs::write(&config, text).unwrap();
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("stale").is_none(), "{body}");
    let first = body["access_token"].as_str().unwrap().to_string();
    let issued = Instant::now();
    std::fs::remove_file(&secret).unwrap();
    let refreshes = idp.state.refreshes.load(Ordering::SeqCst);

    // Past the fresh part (11 s), inside the grace part (until 15 s).
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(issued.elapsed())).await;
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stale"], true, "{body}");
    assert_eq!(body["access_token"].as_str().unwrap(), first);
    let expires_in = body["expires_in"].as_f64().unwrap();
    assert!((5.0..=8.5).contains(&expires_in), "{body}");
    assert!(idp.is_valid_access(&first));

    // Less than 5 s left: the failure is answered.
    tokio::time::sleep(Duration::from_millis(15_500).saturating_sub(issued.elapsed())).await;
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "source_unavailable");
    assert_eq!(
        idp.state.refreshes.load(Ordering::SeqCst),
        refreshes,
        "the IdP was called without a client secret"
    );
    let metrics = metrics_text(bport).await;
    assert!(
        metrics.contains("broker_stale_served_total{credential=\"codex\"} 1"),
        "{metrics}"
    );
    let log = b.kill();
    assert!(log.contains("grace"), "{log}");
    assert!(!log.contains(&first), "{log}");
}

/// `max_refresh_interval_secs` (REFERENCE §3): an access token that lives an hour is still
/// refreshed every 2 s, so the refresh token is used before an IdP's idle expiry; each
/// rotation is stored and no refresh token is presented twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_tokens_are_refreshed_within_the_max_refresh_interval() {
    let idp = RotatingIdp::start().await;
    idp.state.lifetime_secs.store(3600, Ordering::SeqCst);
    let (dir, bport, config) = file_store_credential(&idp);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("scopes = [", "max_refresh_interval_secs = 2\nscopes = [");
    assert!(text.contains("max_refresh_interval_secs"), "{text}");
    std::fs::write(&config, text).unwrap();
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    let first = body["access_token"].as_str().unwrap().to_string();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let refreshes = idp.state.refreshes.load(Ordering::SeqCst);
    assert!(
        (3..=5).contains(&refreshes),
        "{refreshes} refreshes in {:?}",
        started.elapsed()
    );
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["access_token"].as_str().unwrap(), first);
    assert!(idp.is_valid_access(body["access_token"].as_str().unwrap()));
    assert_eq!(idp.state.reuse_events.load(Ordering::SeqCst), 0);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("creds/codex.json")).unwrap())
            .unwrap();
    assert!(
        rec["generation"].as_u64().unwrap() >= 3,
        "each rotation stored: {rec}"
    );
    drop(b);
}

/// `upstream_proxy` (REFERENCE D19): the broker's token-endpoint calls go through a
/// corporate proxy with `CONNECT`, or SOCKS5 with the proxy's credential
/// (`upstream_proxy_auth`), and the rotation works through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_calls_go_through_the_upstream_proxy() {
    for (scheme, auth) in [("http", None), ("socks5h", Some("svc:c0rp"))] {
        let idp = RotatingIdp::start().await;
        let corp = match auth {
            Some(a) => iron_tests::corp_proxy::CorpProxy::start_with_auth(a).await,
            None => iron_tests::corp_proxy::CorpProxy::start().await,
        };
        let (_dir, bport, config) = file_store_credential(&idp);
        let auth_key = if auth.is_some() {
            "upstream_proxy_auth = { env = \"CORP_PROXY_AUTH\" }\n"
        } else {
            ""
        };
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "refresh_timeout_secs = 5\n",
            &format!(
                "refresh_timeout_secs = 5\nupstream_proxy = \"{scheme}://{}\"\n{auth_key}",
                corp.addr
            ),
        );
        assert!(text.contains("upstream_proxy"), "{text}");
        std::fs::write(&config, text).unwrap();
        let b = Broker::start(&config, bport, &[("CORP_PROXY_AUTH", auth.unwrap_or(""))]);
        let (status, body) = access_token(bport).await;
        assert_eq!(status, 200, "{scheme}: {body}");
        assert!(idp.is_valid_access(body["access_token"].as_str().unwrap()));
        let targets = corp.targets();
        let via = if scheme == "http" { "" } else { "socks5 " };
        assert!(
            targets.contains(&format!("{via}127.0.0.1:{}", idp.addr.port())),
            "{scheme}: {targets:?}"
        );
        drop(b);
    }
}

async fn metrics_text(port: u16) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-m", "10", "-H"])
        .arg(format!("Authorization: Bearer {BROKER_TOKEN}"))
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Callers arriving together while the IdP is down share one refresh cycle's failure
/// instead of each running a full cycle of retries after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_failed_cycle() {
    let idp = RotatingIdp::start().await;
    idp.state.fail_next.store(u32::MAX, Ordering::SeqCst);
    let (_dir, bport, config) = file_store_credential(&idp);
    let b = Broker::start(&config, bport, &[]);
    let callers: Vec<_> = (0..10).map(|_| tokio::spawn(access_token(bport))).collect();
    for c in callers {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 503, "{body}");
    }
    let one_cycle = idp.state.requests.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let total = idp.state.requests.load(Ordering::SeqCst);
    // One cycle retries a handful of times within refresh_timeout_secs (5 s); ten cycles
    // in a row would be ten times that.
    assert!(
        total <= 12,
        "{total} token requests for 10 callers ({one_cycle} when they returned)"
    );
    let (_, list, _) = cli(&config, &["credentials", "list"], None);
    assert!(list.contains(" ok "), "{list}");
    drop(b);
}

/// An IdP that answers 503 with `Retry-After: 30` is left alone for 30 s: the cycle
/// ends at once (the wait is past the refresh timeout), neither callers nor the scheduler
/// call it again meanwhile, the broker's own 503 passes the wait on in its `Retry-After`,
/// and the credential stays alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_retry_after_is_honoured() {
    let idp = RotatingIdp::start().await;
    idp.state.retry_after_secs.store(30, Ordering::SeqCst);
    idp.state.fail_next.store(u32::MAX, Ordering::SeqCst);
    let (_dir, bport, config) = file_store_credential(&idp);
    let b = Broker::start(&config, bport, &[]);
    let started = Instant::now();
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "idp_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the cycle waited instead of ending: {:?}",
        started.elapsed()
    );
    for _ in 0..5 {
        let (status, _) = access_token(bport).await;
        assert_eq!(status, 503);
    }
    let (_, _, head) = access_token_with_head(bport).await;
    let wait: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {head}"));
    assert!((20..=30).contains(&wait), "Retry-After {wait}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        idp.state.requests.load(Ordering::SeqCst),
        1,
        "the IdP was called again during its Retry-After"
    );
    let (_, list, _) = cli(&config, &["credentials", "list"], None);
    assert!(list.contains(" ok "), "{list}");
    drop(b);
}

/// A gateway's 502 after the IdP behind it rotated the token: an answer lost after the
/// request was sent, so it is reported, never retried with the old token (which the IdP's
/// reuse detection would punish by revoking the whole grant). So are 504 and Cloudflare's
/// 520 (the origin's answer was unusable) and 524 (the origin took the request and timed
/// out): `auth.openai.com` sits behind Cloudflare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_gateway_after_rotation_is_not_replayed() {
    for gateway in [502u16, 504, 520, 524] {
        let idp = RotatingIdp::start().await;
        idp.state.bad_gateway_next.store(1, Ordering::SeqCst);
        idp.state
            .bad_gateway_status
            .store(gateway, Ordering::SeqCst);
        let (_dir, bport, config) = file_store_credential(&idp);
        let b = Broker::start(&config, bport, &[]);
        let (status, body) = access_token(bport).await;
        assert_eq!(status, 422, "{gateway}: {body}");
        assert_eq!(body["reason"], "rotation_interrupted", "{gateway}");
        assert_eq!(
            idp.state.requests.load(Ordering::SeqCst),
            1,
            "{gateway}: replayed"
        );
        assert_eq!(
            idp.state.reuse_events.load(Ordering::SeqCst),
            0,
            "{gateway}"
        );
        assert_eq!(
            idp.state.revoked_families.load(Ordering::SeqCst),
            0,
            "{gateway}"
        );
        drop(b);
    }
}

/// The same 502 with an error page over the broker's 1 MiB limit: the status still decides
/// (before, the unread body made it a transport error, retried with the rotated-out token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_gateway_with_a_huge_body_after_rotation_is_not_replayed() {
    let idp = RotatingIdp::start().await;
    idp.state.bad_gateway_next.store(1, Ordering::SeqCst);
    idp.state.bad_gateway_big_body.store(true, Ordering::SeqCst);
    let (_dir, bport, config) = file_store_credential(&idp);
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["reason"], "rotation_interrupted");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(idp.state.requests.load(Ordering::SeqCst), 1, "replayed");
    assert_eq!(idp.state.reuse_events.load(Ordering::SeqCst), 0);
    assert_eq!(idp.state.revoked_families.load(Ordering::SeqCst), 0);
    drop(b);
}

/// A 403 without an OAuth error code (a WAF in front of the IdP) fails that refresh but
/// does not kill the credential: the next call refreshes with the same, still valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_without_an_oauth_error_keeps_the_credential() {
    let idp = RotatingIdp::start().await;
    idp.state.forbidden_next.store(1, Ordering::SeqCst);
    let (_dir, bport, config) = file_store_credential(&idp);
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_ne!(status, 200, "{body}");
    assert_ne!(status, 422, "marked dead: {body}");
    assert_eq!(idp.state.requests.load(Ordering::SeqCst), 1);
    let (_, list, _) = cli(&config, &["credentials", "list"], None);
    assert!(!list.contains("dead"), "{list}");
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        idp.is_valid_access(body["access_token"].as_str().unwrap_or_default()),
        "{body}"
    );
    assert_eq!(idp.state.reuse_events.load(Ordering::SeqCst), 0);
    drop(b);
}

/// A 2xx that rotates the refresh token but carries no usable access token: the new
/// refresh token is kept (durably) and that call fails; the next call refreshes with the
/// new token and succeeds. Before, the new token was dropped and the credential marked
/// `rotation_interrupted`, though it was in hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_without_an_access_token_keeps_the_new_refresh_token() {
    let idp = RotatingIdp::start().await;
    idp.state.empty_access_next.store(1, Ordering::SeqCst);
    let (_dir, bport, config) = file_store_credential(&idp);
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_ne!(status, 200, "{body}");
    assert_ne!(body["reason"], "rotation_interrupted", "{body}");
    assert_eq!(
        idp.state.requests.load(Ordering::SeqCst),
        1,
        "retried at once"
    );
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        idp.is_valid_access(body["access_token"].as_str().unwrap_or_default()),
        "{body}"
    );
    assert_eq!(idp.state.requests.load(Ordering::SeqCst), 2);
    assert_eq!(idp.state.reuse_events.load(Ordering::SeqCst), 0);
    assert_eq!(idp.state.revoked_families.load(Ordering::SeqCst), 0);
    drop(b);
}

/// A 2xx that is not a token response after the IdP rotated: reported as
/// `rotation_interrupted`, never retried with the old token. `revive` refuses a live
/// credential and revives a dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_success_is_reported_not_replayed_and_revive_is_checked() {
    let idp = RotatingIdp::start().await;
    idp.state.malformed_next.store(1, Ordering::SeqCst);
    let (_dir, bport, config) = file_store_credential(&idp);
    let (ok, _, err) = cli(&config, &["credentials", "revive", "--id", "codex"], None);
    assert!(!ok && err.contains("not dead"), "{err}");
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["reason"], "rotation_interrupted");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        idp.state.requests.load(Ordering::SeqCst),
        1,
        "the broker retried after a garbled success"
    );
    assert_eq!(idp.state.reuse_events.load(Ordering::SeqCst), 0);
    let (ok, _, err) = cli(&config, &["credentials", "revive", "--id", "codex"], None);
    assert!(ok, "{err}");
    assert!(err.contains("interrupted rotation"), "{err}");
    let (ok, list, _) = cli(&config, &["credentials", "list"], None);
    assert!(
        ok && list.contains("codex") && list.contains(" ok "),
        "{list}"
    );
    let log = b.kill();
    assert!(
        !log.contains("rt_REAL") && !log.contains("at_REAL"),
        "{log}"
    );
}

/// A corrupt record is reported (503, never served, IdP not called) and repaired by
/// `credentials set`; a temp file left by a crash (it holds a token) is removed by the next
/// write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_is_reported_and_repaired_by_set() {
    let idp = RotatingIdp::start().await;
    let (dir, bport, config) = file_store_credential(&idp);
    std::fs::write(
        dir.path().join("creds/codex.json"),
        b"{\"id\": \"codex\", trunc",
    )
    .unwrap();
    let leftover = dir.path().join("creds/.codex.json.tmp-1-1");
    std::fs::write(&leftover, b"{\"refresh_token\": \"rt_REALleftover\"}").unwrap();
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable");
    assert_eq!(idp.state.requests.load(Ordering::SeqCst), 0);
    let (ok, _, err) = cli(
        &config,
        &["credentials", "set", "--id", "codex"],
        Some(&idp.new_family()),
    );
    assert!(ok && err.contains("corrupt"), "{err}");
    assert!(
        !leftover.exists(),
        "a temp file with a token was left behind"
    );
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 200, "{body}");
    assert!(idp.is_valid_access(body["access_token"].as_str().unwrap()));
    let log = b.kill();
    assert!(
        !log.contains("rt_REAL") && !log.contains("at_REAL"),
        "{log}"
    );
}

/// The IdP rotates the token but its answer never arrives (timeout after the request was
/// sent): the broker does not replay the old token (no reuse), it reports
/// `rotation_interrupted`. An IdP that cannot be reached at all is retried, the credential
/// stays alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_lost_after_rotation_is_reported_not_replayed() {
    let idp = RotatingIdp::start().await;
    idp.state
        .stall_after_rotate_ms
        .store(7000, Ordering::SeqCst);
    let (_dir, bport, config) = file_store_credential(&idp);
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["reason"], "rotation_interrupted");
    assert_eq!(idp.state.requests.load(Ordering::SeqCst), 1, "replayed");
    assert_eq!(idp.state.reuse_events.load(Ordering::SeqCst), 0);
    drop(b);

    // Unreachable token endpoint (nothing listens): retried, not dead.
    let dir = tempfile::tempdir().unwrap();
    let bport = free_port();
    let config = write_config(dir.path(), &idp, bport, "{ file = \"creds\" }");
    let dead = free_port();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &idp.token_url(),
        &format!("https://127.0.0.1:{dead}/oauth/token"),
    );
    std::fs::write(&config, text).unwrap();
    bootstrap(&config);
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "idp_unavailable");
    let (_, list, _) = cli(&config, &["credentials", "list"], None);
    assert!(list.contains(" ok "), "{list}");
    drop(b);

    // An endpoint that takes the TCP connection but never finishes the TLS handshake: no
    // request was written, so it is retried as unreachable, not reported as interrupted.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bport = free_port();
    let config = write_config(dir.path(), &idp, bport, "{ file = \"creds\" }");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &idp.token_url(),
        &format!("https://{}/oauth/token", silent.local_addr().unwrap()),
    );
    std::fs::write(&config, text).unwrap();
    bootstrap(&config);
    let b = Broker::start(&config, bport, &[]);
    let (status, body) = access_token(bport).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "idp_unavailable");
    let (_, list, _) = cli(&config, &["credentials", "list"], None);
    assert!(list.contains(" ok "), "{list}");
    drop(b);
}

/// The Postgres store over TLS: with `sslmode=require` its connection is encrypted (the
/// server's `pg_stat_ssl` says so) and the server certificate is verified against the
/// broker's `upstream_ca`; without that CA the store does not open, and nothing is sent in
/// cleartext instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_connects_over_verified_tls() {
    use iron_broker::store::{Store, StoreConfig};
    let Some((pg, ca_pem)) = PgCluster::start_tls() else {
        return;
    };
    pg.psql("create database broker").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("pg-ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let dsn = format!(
        "postgresql://postgres:{}@127.0.0.1:{}/broker?sslmode=require",
        iron_tests::pgcluster::SUPER_PASSWORD,
        pg.port
    );
    let store = Store::open(&StoreConfig::Postgres {
        dsn: dsn.clone(),
        upstream_ca: vec![ca.clone()],
    })
    .await
    .unwrap_or_else(|e| panic!("store over TLS: {e}"));
    assert!(store.load("never-bootstrapped").await.unwrap().is_none());
    // A database whose commits are not flushed before they are acknowledged: the store's
    // session turns that back on (a lost commit would replay a rotated-out token).
    pg.psql("alter database broker set synchronous_commit = off")
        .unwrap();
    let unflushed = Store::open(&StoreConfig::Postgres {
        dsn: dsn.clone(),
        upstream_ca: vec![ca.clone()],
    })
    .await
    .unwrap_or_else(|e| panic!("store over TLS: {e}"));
    assert_eq!(
        unflushed.durability().await.unwrap(),
        "synchronous_commit=on"
    );
    drop(unflushed);
    let encrypted = pg
        .psql(
            "select count(*) from pg_stat_ssl s join pg_stat_activity a using (pid) \
             where a.datname = 'broker' and s.ssl",
        )
        .unwrap();
    assert_eq!(encrypted, "1");
    let refused = Store::open(&StoreConfig::Postgres {
        dsn,
        upstream_ca: vec![],
    })
    .await
    .err()
    .expect("an unverifiable server certificate is refused");
    assert!(
        !refused
            .to_string()
            .contains(iron_tests::pgcluster::SUPER_PASSWORD)
    );
    drop(store);
}
