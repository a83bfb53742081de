//! End-to-end: the Postgres relay against a real PostgreSQL 15 cluster (SCRAM auth), with
//! psql and tokio-postgres as clients.

#![allow(clippy::expect_used)] // setup helpers: a failed step is a failed test

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iron_policy::Policy;
use iron_proxy::{MemoryAudit, Runtime};
use iron_tests::pgcluster::PgCluster;
use iron_tests::{Spawned, have};

const APP_PASSWORD: &str = "app_REALpassword_77";

struct Relay {
    _dir: tempfile::TempDir,
    dsn: String,
    ca: std::path::PathBuf,
    audit: Arc<MemoryAudit>,
    /// Holds the relays too (`Runtime::relays`).
    rt: Arc<Runtime>,
}

fn cluster() -> Option<PgCluster> {
    let c = PgCluster::start()?;
    c.psql(&format!("create role app login password '{APP_PASSWORD}'"))
        .expect("role");
    c.psql("create database app owner app").expect("db");
    Some(c)
}

async fn relay(c: &PgCluster, extra: &str, upstream_port: u16) -> Relay {
    let _ = c;
    let real =
        format!("postgresql://app:{APP_PASSWORD}@127.0.0.1:{upstream_port}/app?sslmode=disable");
    relay_with(extra, "", None, &real).await
}

/// A relay for `real_dsn`; `proxy_extra` is added to `[proxy]`, `upstream_ca` (PEM) is
/// written as `upstream-ca.pem` next to the policy.
async fn relay_with(
    extra: &str,
    proxy_extra: &str,
    upstream_ca: Option<&str>,
    real_dsn: &str,
) -> Relay {
    let dir = tempfile::tempdir().expect("tmp");
    if let Some(pem) = upstream_ca {
        std::fs::write(dir.path().join("upstream-ca.pem"), pem).expect("upstream ca");
    }
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(
        &policy_path,
        format!(
            "version = 1\n[proxy]\nlisten = \"127.0.0.1:0\"\nallow_cidrs = [\"127.0.0.1/32\"]\n{proxy_extra}\n\n[[secrets]]\nname = \"DATABASE_URL\"\ntype = \"pg_dsn\"\ndatabase = \"app\"\nsource = {{ env = \"REAL_DATABASE_URL\" }}\n{extra}\n"
        ),
    )
    .expect("policy");
    let env: HashMap<String, String> =
        [("REAL_DATABASE_URL".to_string(), real_dsn.to_string())].into();
    let policy = Arc::new(Policy::load(&policy_path).expect("policy"));
    let state = dir.path().join("state");
    let ca = iron_proxy::state::load_ca(&policy, &state).expect("ca");
    let audit = Arc::new(MemoryAudit::default());
    let rt = Runtime::new(policy.clone(), ca.ca.clone(), Arc::new(env), audit.clone()).expect("rt");
    let relays = iron_proxy::pg::start_all(&rt, &state, false)
        .await
        .expect("relays");
    let penv = iron_proxy::sandbox::pg_env(&policy, &rt.sources, &state, &ca, &relays, None)
        .expect("pg env");
    let dsn = penv
        .iter()
        .find(|(k, _)| k == "DATABASE_URL")
        .expect("DATABASE_URL")
        .1
        .clone();
    Relay {
        _dir: dir,
        dsn,
        ca: ca.cert.clone(),
        audit,
        rt,
    }
}

fn psql(dsn: &str, sql: &str) -> (bool, String, String) {
    let out = std::process::Command::new("psql")
        .arg(dsn)
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Runs `select pg_sleep(60)` on `client`, cancels it with the client's cancel token
/// 300 ms later, and returns the SQLSTATE the query ended with and how long after the
/// cancel it ended (panics when it has not within 5 s).
async fn cancel_a_sleeping_query(client: tokio_postgres::Client) -> (Option<String>, Duration) {
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let res = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("the query did not end after the cancel")
        .expect("join");
    let sqlstate = res.err().map(|e| {
        e.code()
            .map_or_else(|| e.to_string(), |c| c.code().to_string())
    });
    (sqlstate, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_tokio_postgres_through_the_relay() {
    let Some(c) = cluster() else {
        return eprintln!("postgres not installed; skipped");
    };
    let r = relay(&c, "settings = { \"app.tenant\" = \"t-42\" }", c.port).await;
    assert!(!r.dsn.contains(APP_PASSWORD));
    // psql (sslmode=prefer by default: TLS to the relay with the proxy's leaf).
    let (ok, out, err) = psql(
        &r.dsn,
        "select current_user, current_setting('app.tenant'), ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out, "app|t-42|f",
        "upstream leg is plain (sslmode=disable in the DSN)"
    );
    // A reload of the same policy: the relay is running, so nothing is said about it.
    let summary = r.rt.reload().await.expect("reload");
    assert!(
        !summary
            .warnings
            .iter()
            .any(|w| w.contains("starts on restart")),
        "{:?}",
        summary.warnings
    );
    // verify-full against the relay with the proxy CA.
    let (ok, out, err) = psql(
        &format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            r.dsn,
            r.ca.display()
        ),
        "select 1",
    );
    assert!(ok && out == "1", "{err}");
    // A 50 MB result over TLS to the relay arrives whole (no record left in a TLS buffer).
    let (ok, out, err) = psql(
        &format!("{}?sslmode=require", r.dsn),
        "select repeat('x', 1000) || i from generate_series(1, 50000) i",
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 50_000);
    assert!(
        lines[49_999].ends_with("x50000"),
        "{}",
        &lines[49_999][990..]
    );
    // The placeholder does not work against the upstream directly.
    let placeholder = r
        .dsn
        .split(':')
        .nth(2)
        .and_then(|s| s.split('@').next())
        .expect("password")
        .to_string();
    let direct = format!(
        "postgresql://app:{placeholder}@127.0.0.1:{}/app?sslmode=disable",
        c.port
    );
    let (ok, _, err) = psql(&direct, "select 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );

    // tokio-postgres: extended protocol, transactions, COPY, a 100 MB result.
    let client = connect(&r.dsn).await.expect("connect");
    let row = client
        .query_one("select $1::int + 1, $2::text", &[&41i32, &"x"])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    client
        .batch_execute("create table t (id int, v text)")
        .await
        .expect("create");
    let mut tx_client = connect(&r.dsn).await.expect("connect");
    let tx = tx_client.transaction().await.expect("tx");
    tx.execute("insert into t values (1, 'rolled back')", &[])
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");
    use futures_util::SinkExt as _;
    let sink = client.copy_in("copy t from stdin").await.expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"2\ttwo\n3\tthree\n"))
        .await
        .expect("send");
    assert_eq!(sink.finish().await.expect("finish"), 2);
    use futures_util::StreamExt as _;
    let out = client
        .copy_out("copy (select * from t order by id) to stdout")
        .await
        .expect("copy out");
    let chunks: Vec<_> = out.collect().await;
    let text: Vec<u8> = chunks
        .into_iter()
        .flat_map(|c| c.expect("chunk").to_vec())
        .collect();
    assert_eq!(text, b"2\ttwo\n3\tthree\n");
    let rows = client
        .query(
            "select repeat('x', 1000) from generate_series(1, 100000)",
            &[],
        )
        .await
        .expect("large result");
    assert_eq!(rows.len(), 100_000);
    drop(client);
    drop(tx_client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = r.audit.records();
    let big = audit.iter().map(|a| a.bytes_out).max().unwrap_or(0);
    assert!(big > 100_000_000, "audit bytes_out {big}");
    assert!(audit.iter().all(|a| a.kind == "pg"));
    let all = serde_json::to_string(&audit).expect("json");
    assert!(!all.contains(APP_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_cancel_upstream_down_and_concurrency() {
    let Some(c) = cluster() else { return };
    let r = relay(&c, "", c.port).await;
    let code = |e: tokio_postgres::Error| {
        e.code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| e.to_string())
    };
    let bad_pw = r
        .dsn
        .replacen("postgresql://app:", "postgresql://app:wrong", 1);
    assert_eq!(
        connect(&bad_pw).await.err().map(code).as_deref(),
        Some("28P01")
    );
    let bad_user = r
        .dsn
        .replacen("postgresql://app:", "postgresql://mallory:", 1);
    assert_eq!(
        connect(&bad_user).await.err().map(code).as_deref(),
        Some("28000")
    );
    let bad_db = format!("{}other", r.dsn.trim_end_matches("app"));
    assert_eq!(
        connect(&bad_db).await.err().map(code).as_deref(),
        Some("3D000")
    );
    let opts = format!("{}?options=-crole%3Dpostgres", r.dsn);
    assert_eq!(
        connect(&opts).await.err().map(code).as_deref(),
        Some("0A000")
    );
    // Other settings in `options` (PGOPTIONS) reach the server.
    let opts = format!("{}?options=-c%20statement_timeout%3D1234", r.dsn);
    let client = connect(&opts).await.expect("options with a setting");
    let row = client
        .query_one("show statement_timeout", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "1234ms");
    drop(client);

    // Cancel of pg_sleep returns within a second.
    let client = connect(&r.dsn).await.expect("connect");
    let (sqlstate, took) = cancel_a_sleeping_query(client).await;
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    assert_eq!(sqlstate.as_deref(), Some("57014"));
    // The cancel is audited (the CancelRequest arrives on its own connection).
    let deadline = Instant::now() + Duration::from_secs(2);
    while !r
        .audit
        .records()
        .iter()
        .any(|a| a.method == "CANCEL" && a.outcome == "forwarded")
    {
        assert!(Instant::now() < deadline, "no audit record for the cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 50 concurrent sessions.
    let mut tasks = Vec::new();
    for i in 0..50i32 {
        let dsn = r.dsn.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&dsn).await.expect("connect");
            let row = c
                .query_one("select $1::int * 2", &[&i])
                .await
                .expect("query");
            row.get::<_, i32>(0)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.expect("join"), i32::try_from(i).expect("i") * 2);
    }

    // The upstream down: a clean 08006, not a hang.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let r2 = relay(&c, "", dead_port).await;
    let started = Instant::now();
    assert_eq!(
        connect(&r2.dsn).await.err().map(code).as_deref(),
        Some("08006")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verify_full_with_channel_binding() {
    let Some((c, ca_pem)) = PgCluster::start_tls() else {
        return;
    };
    c.psql(&format!("create role app login password '{APP_PASSWORD}'"))
        .expect("role");
    c.psql("create database app owner app").expect("db");
    // verify-full with the test CA as upstream_ca: the upstream leg is TLS, SCRAM with
    // channel binding (SCRAM-SHA-256-PLUS) is chosen.
    let real = format!(
        "postgresql://app:{APP_PASSWORD}@127.0.0.1:{}/app?sslmode=verify-full&channel_binding=require",
        c.port
    );
    let r = relay_with(
        "",
        "upstream_ca = [\"upstream-ca.pem\"]",
        Some(&ca_pem),
        &real,
    )
    .await;
    let (ok, out, err) = psql(
        &format!("{}?sslmode=disable", r.dsn),
        "select ssl, current_user from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "t|app", "the upstream leg is TLS");

    // Without the test CA the upstream certificate does not verify: a clean 08006 error.
    let r2 = relay_with("", "", None, &real).await;
    let (ok, _, err) = psql(&format!("{}?sslmode=disable", r2.dsn), "select 1");
    assert!(!ok, "connected without a verifiable upstream certificate");
    assert!(!err.contains(APP_PASSWORD), "{err}");
    assert!(err.contains("upstream"), "{err}");
    let audit = serde_json::to_string(&r2.audit.records()).expect("json");
    assert!(!audit.contains(APP_PASSWORD));
}

/// A policy file (in a fresh directory) with one `pg_dsn` secret `DATABASE_URL` whose real
/// DSN comes from `REAL_DSN`, and that DSN for the cluster `c`: for tests of the binary.
fn binary_policy(c: &PgCluster) -> (tempfile::TempDir, std::path::PathBuf, String) {
    binary_policy_with(c, "")
}

/// [`binary_policy`] with `limits` as the `[proxy.limits]` table's body.
fn binary_policy_with(
    c: &PgCluster,
    limits: &str,
) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("version = 1\n[proxy]\nlisten = \"127.0.0.1:0\"\nallow_cidrs = [\"127.0.0.1/32\"]\n[proxy.limits]\n{limits}\n\n[[secrets]]\nname = \"DATABASE_URL\"\ntype = \"pg_dsn\"\ndatabase = \"app\"\nsource = {{ env = \"REAL_DSN\" }}\n"),
    )
    .expect("policy");
    let real = format!(
        "postgresql://app:{APP_PASSWORD}@127.0.0.1:{}/app?sslmode=disable",
        c.port
    );
    (dir, policy, real)
}

/// The acceptance path with the real binary: `run` gives the child a `DATABASE_URL` whose
/// password is the placeholder; psql in the child reaches the upstream as its user; the real
/// password is nowhere in the child's environment or the proxy's output.
#[test]
fn run_gives_the_sandbox_a_working_placeholder_dsn() {
    let Some(c) = cluster() else { return };
    let (dir, policy, real) = binary_policy(&c);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iron-proxy-e2e"))
        .args(["run", "--policy"])
        .arg(&policy)
        .args([
            "--",
            "sh",
            "-c",
            "psql \"$DATABASE_URL\" -XAtc 'select current_user' && env",
        ])
        .env("REAL_DSN", &real)
        .env("IRON_PROXY_HOME", dir.path().join("state"))
        .output()
        .expect("run");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().next(), Some("app"), "{stdout}");
    assert!(
        stdout.contains("DATABASE_URL=postgresql://app:"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(APP_PASSWORD) && !stdout.contains("REAL_DSN"),
        "{stdout}"
    );
    assert!(!stderr.contains(APP_PASSWORD), "{stderr}");
    // The child's session is audited before `run` exits.
    assert!(
        stderr.lines().any(|l| l.contains("\"kind\":\"pg\"")
            && l.contains("\"method\":\"STARTUP\"")
            && l.contains("\"outcome\":\"closed\"")),
        "{stderr}"
    );
}

/// `serve` in one shell, `env` in another (without the real DSN in its environment, same
/// state directory): the URL `env` prints is the one `serve` accepts, and psql with it
/// logs in as the upstream user.
#[test]
fn env_and_a_running_serve_agree() {
    let Some(c) = cluster() else { return };
    if !have("psql") {
        return;
    }
    let (dir, policy, real) = binary_policy(&c);
    let home = dir.path().join("state");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_iron-proxy-e2e"));
    let env: HashMap<String, String> = [("REAL_DSN".to_string(), real)].into_iter().collect();
    let serve = Spawned::start(&bin, &policy, &home, &env, "info");
    let url = env_dsn(&bin, &policy, &home);
    assert!(
        url.starts_with("postgresql://app:") && !url.contains(APP_PASSWORD),
        "{url}"
    );
    let (ok, out, err) = psql(&url, "select current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "app");
    let log = serve.stop();
    assert!(!log.contains(APP_PASSWORD), "{log}");
}

/// The `DATABASE_URL` that `iron-proxy env` prints for `policy` and state directory `home`
/// (run without the real DSN in its environment).
fn env_dsn(bin: &std::path::Path, policy: &std::path::Path, home: &std::path::Path) -> String {
    let out = std::process::Command::new(bin)
        .args(["env", "--policy"])
        .arg(policy)
        .env("IRON_PROXY_HOME", home)
        .env_remove("REAL_DSN")
        .output()
        .expect("env");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("export DATABASE_URL=")
                .or_else(|| l.strip_prefix("DATABASE_URL="))
        })
        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        .unwrap_or_else(|| panic!("no DATABASE_URL in {stdout}"))
}

/// SIGTERM with two Postgres sessions open: the proxy waits out the grace period,
/// closes the session (the client sees its connection end), writes the session's audit
/// line (`closed`, `"error": "shutdown"`, the bytes it relayed) and exits. A session ended
/// by its client during the grace period is written as an ordinary `closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_open_sessions_and_writes_their_audit_lines() {
    let Some(c) = cluster() else { return };
    let (dir, policy, real) = binary_policy_with(&c, "shutdown_grace_secs = 3");
    let home = dir.path().join("state");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_iron-proxy-e2e"));
    let env: HashMap<String, String> = [("REAL_DSN".to_string(), real)].into_iter().collect();
    let serve = Spawned::start(&bin, &policy, &home, &env, "info");
    let url = env_dsn(&bin, &policy, &home);
    let held = connect(&url).await.expect("session through the relay");
    let one: i32 = held.query_one("select 1", &[]).await.expect("query").get(0);
    assert_eq!(one, 1);
    let quitting = connect(&url).await.expect("second session");
    quitting.simple_query("select 2").await.expect("query");
    let stopping = tokio::task::spawn_blocking(move || serve.stop());
    // Well inside the grace period: this client leaves by itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(quitting);
    let log = stopping.await.expect("stop");
    // The held session was closed under it.
    assert!(held.simple_query("select 3").await.is_err());
    assert!(held.is_closed());
    let sessions: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "pg" && v["method"] == "STARTUP")
        .collect();
    // In the order they ended: the client that left, then the one closed at the deadline.
    assert_eq!(sessions.len(), 2, "{log}");
    assert_eq!(sessions[0]["error"], serde_json::Value::Null, "{log}");
    assert_eq!(sessions[1]["error"], "shutdown", "{log}");
    for s in &sessions {
        assert_eq!(s["outcome"], "closed", "{s}");
        assert!(s["bytes_in"].as_u64().unwrap_or(0) > 0, "{s}");
        assert!(s["bytes_out"].as_u64().unwrap_or(0) > 0, "{s}");
    }
    assert!(!log.contains(APP_PASSWORD), "{log}");
}

/// A secret pinning `role` and `settings`: the client cannot undo them, by the simple or
/// the extended protocol, and the connection stays usable after each refusal (the server
/// raises 42501 in place of the refused statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_role_and_settings_cannot_be_undone_by_the_client() {
    use tokio_postgres::error::SqlState;
    let Some(c) = cluster() else { return };
    c.psql("create role app_ro nologin").expect("role");
    c.psql("grant app_ro to app").expect("grant");
    let r = relay(
        &c,
        "role = \"app_ro\"\nsettings = { \"app.tenant\" = \"t-42\" }",
        c.port,
    )
    .await;
    let client = connect(&r.dsn).await.expect("connect");
    async fn who(client: &tokio_postgres::Client) -> (String, String) {
        let row = client
            .query_one(
                "select current_user::text, current_setting('app.tenant')",
                &[],
            )
            .await
            .expect("who");
        (row.get(0), row.get(1))
    }
    let pinned = ("app_ro".to_string(), "t-42".to_string());
    assert_eq!(who(&client).await, pinned);
    for sql in [
        "RESET ROLE",
        "SET ROLE app",
        "set local role app",
        "SET SESSION AUTHORIZATION app",
        "SET app.tenant = 'other'",
        "set \"APP\".tenant to 'other'",
        "RESET app.tenant",
        "select set_config('role', 'app', false)",
        "select pg_catalog.set_config('app.tenant', 'other', false)",
        "select 1; set role app; select 2",
        "select 'x'; reset /* c */ role",
        "DISCARD ALL",
        "RESET ALL",
        "DO $$BEGIN EXECUTE 'RESET ' || 'ROLE'; END$$",
        "select query_to_xml('select set_con'||'fig(''ro''||''le'',''app'',false)', true, false, '')",
        "SET NAMES 'SJIS'",
    ] {
        let e = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e:?}"
        );
        let msg = e.as_db_error().map(|d| d.message().to_string());
        assert!(
            msg.as_deref()
                .is_some_and(|m| m.starts_with("iron-proxy: ")),
            "{sql}: {msg:?}"
        );
        assert_eq!(who(&client).await, pinned, "after {sql}");
    }
    // The extended protocol: Parse of a refused statement is replaced; the driver binds
    // its values to the replacement and gets 42501 at Execute.
    let e = client
        .query("select set_config($1, $2, false)", &[&"role", &"app"])
        .await
        .expect_err("set_config by parameters");
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
    let e = client
        .execute("SET ROLE app", &[])
        .await
        .expect_err("extended SET ROLE");
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
    let e = client
        .prepare("select set_config('app.tenant', $1, false)")
        .await
        .expect("prepare of the replacement");
    let e = client
        .query(&e, &[&"other"])
        .await
        .expect_err("execute of the replacement");
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
    assert_eq!(who(&client).await, pinned);
    // Other settings pass, by set_config and by SET.
    let row = client
        .query_one("select set_config('statement_timeout', '5s', false)", &[])
        .await
        .expect("set_config of another setting");
    assert_eq!(row.get::<_, String>(0), "5s");
    client
        .batch_execute("SET statement_timeout = '6s'; select 1; select 2")
        .await
        .expect("SET of another setting, clean multi-statement");
    let row = client
        .query_one("show statement_timeout", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "6s");
    // Inside an explicit transaction: the refusal aborts it like any error; the pin stays.
    let mut tx_client = connect(&r.dsn).await.expect("connect");
    {
        let tx = tx_client.transaction().await.expect("tx");
        let row = tx
            .query_one("select current_user::text", &[])
            .await
            .expect("in tx");
        assert_eq!(row.get::<_, String>(0), "app_ro");
        let e = tx.batch_execute("RESET ROLE").await.expect_err("in tx");
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
        tx.rollback().await.expect("rollback");
    }
    {
        let tx = tx_client.transaction().await.expect("tx");
        tx.batch_execute("set local statement_timeout = '1s'")
            .await
            .expect("SET LOCAL of another setting");
        tx.commit().await.expect("commit");
    }
    assert_eq!(who(&tx_client).await, pinned);
    // COPY streams through the filter untouched (CopyData is never buffered whole).
    client
        .batch_execute("create temp table t (id int, v text)")
        .await
        .expect("temp table");
    use futures_util::SinkExt as _;
    let mut data = Vec::new();
    for i in 0..50_000 {
        data.extend_from_slice(format!("{i}\t{}\n", "x".repeat(40)).as_bytes());
    }
    let sink = client.copy_in("copy t from stdin").await.expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await.expect("send");
    assert_eq!(sink.finish().await.expect("finish"), 50_000);
    // 100 autocommit queries, with parameters, keep the role and the setting.
    for i in 0..100i32 {
        let row = client
            .query_one(
                "select current_user::text, current_setting('app.tenant'), $1::int",
                &[&i],
            )
            .await
            .expect("query");
        assert_eq!(
            (
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, i32>(2)
            ),
            (pinned.0.clone(), pinned.1.clone(), i)
        );
    }
    // psql: a refusal, then the session still answers (simple protocol, one connection).
    let (ok, _, err) = psql(&r.dsn, "reset role");
    assert!(
        !ok && err.contains("iron-proxy: changing the role"),
        "{err}"
    );
    let (ok, out, err) = psql(&r.dsn, "select current_user, current_setting('app.tenant')");
    assert!(ok, "{err}");
    assert_eq!(out, "app_ro|t-42");
    // A client encoding in which a backslash byte may belong to a character is refused.
    let out = std::process::Command::new("psql")
        .arg(&r.dsn)
        .args(["-X", "-Atc", "select 1"])
        .env("PGCLIENTENCODING", "SJIS")
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("client_encoding"),
        "{err}"
    );
    drop(client);
    drop(tx_client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = serde_json::to_string(&r.audit.records()).expect("json");
    assert!(!audit.contains(APP_PASSWORD));
    // The session's audit line counts what was refused in it.
    assert!(
        r.audit.records().iter().any(|a| a.statements_refused >= 16),
        "{audit}"
    );
}

/// At `max_connections` a CancelRequest still gets through, and a new session is told
/// 53300 (as an ErrorResponse after the startup packet, which libpq can show); a relay
/// switched off by a reload says so instead of closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_at_the_connection_cap_and_a_disabled_relay_answer_properly() {
    let Some(c) = cluster() else { return };
    let r = relay(&c, "max_connections = 1", c.port).await;
    let code = |e: tokio_postgres::Error| {
        e.code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| e.to_string())
    };
    let client = connect(&r.dsn).await.expect("connect");
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        connect(&r.dsn).await.err().map(code).as_deref(),
        Some("53300")
    );
    let (ok, _, stderr) = psql(&r.dsn, "select 1");
    assert!(!ok && stderr.contains("too many connections"), "{stderr}");
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let res = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("the cancel did not get through at the cap")
        .expect("join");
    assert_eq!(res.err().map(code).as_deref(), Some("57014"));

    // Switched off by a reload: an ErrorResponse naming why, not a dropped connection.
    let path = r.rt.active().policy.path.clone();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("max_connections = 1", "enabled = false"),
    )
    .unwrap();
    r.rt.reload().await.expect("reload");
    let (ok, _, stderr) = psql(&r.dsn, "select 1");
    assert!(!ok && stderr.contains("disabled"), "{stderr}");
}

/// A fake upstream that answers the relay's login with AuthenticationOk too early: after
/// offering SCRAM and reading the client-first message (`skip_final`), or at once, before
/// any authentication (`!skip_final`). Returns its port.
async fn premature_ok_upstream(skip_final: bool) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The startup message (no SSLRequest: the DSN says sslmode=disable).
                let Ok(len) = tcp.read_i32().await else {
                    return;
                };
                let mut body = vec![0u8; usize::try_from(len).unwrap_or(4).saturating_sub(4)];
                if tcp.read_exact(&mut body).await.is_err() {
                    return;
                }
                let r = |code: i32, data: &[u8]| {
                    let mut m = vec![b'R'];
                    m.extend_from_slice(
                        &(8 + i32::try_from(data.len()).unwrap_or(0)).to_be_bytes(),
                    );
                    m.extend_from_slice(&code.to_be_bytes());
                    m.extend_from_slice(data);
                    m
                };
                if skip_final {
                    let _ = tcp.write_all(&r(10, b"SCRAM-SHA-256\0\0")).await;
                    // The SASLInitialResponse.
                    let mut tag = [0u8; 1];
                    if tcp.read_exact(&mut tag).await.is_err() {
                        return;
                    }
                    let Ok(len) = tcp.read_i32().await else {
                        return;
                    };
                    let mut body = vec![0u8; usize::try_from(len).unwrap_or(4).saturating_sub(4)];
                    let _ = tcp.read_exact(&mut body).await;
                }
                let mut ok = r(0, b"");
                ok.extend_from_slice(b"K\0\0\0\x0c\0\0\0\x01\0\0\0\x02Z\0\0\0\x05I");
                let _ = tcp.write_all(&ok).await;
                let mut rest = Vec::new();
                let _ = tcp.read_to_end(&mut rest).await;
            });
        }
    });
    port
}

/// An upstream (or an impostor) that reports success before its SCRAM exchange finished,
/// or without the channel binding the DSN requires, does not get the session: the client
/// gets 08006 and the audit line names `pg_upstream_auth_incomplete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_skipping_its_half_of_the_login_is_refused() {
    for (skip_final, query) in [(true, ""), (false, "&channel_binding=require")] {
        let port = premature_ok_upstream(skip_final).await;
        let real =
            format!("postgresql://app:{APP_PASSWORD}@127.0.0.1:{port}/app?sslmode=disable{query}");
        let r = relay_with("", "", None, &real).await;
        let err = connect(&r.dsn).await.expect_err("the session was opened");
        assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err}");
        let deadline = Instant::now() + Duration::from_secs(2);
        while !r
            .audit
            .records()
            .iter()
            .any(|a| a.error == Some("pg_upstream_auth_incomplete"))
        {
            assert!(Instant::now() < deadline, "{:?}", r.audit.records());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `upstream_proxy` (REFERENCE D19): the relay reaches Postgres through the corporate
/// proxy with `CONNECT`, and a CancelRequest goes the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_dials_through_the_upstream_proxy() {
    let Some(c) = cluster() else { return };
    let corp = iron_tests::corp_proxy::CorpProxy::start().await;
    let real = format!(
        "postgresql://app:{APP_PASSWORD}@db.corp.test:{}/app?sslmode=disable",
        c.port
    );
    let r = relay_with(
        "",
        &format!("upstream_proxy = \"http://{}\"", corp.addr),
        None,
        &real,
    )
    .await;
    let (ok, out, err) = psql(&r.dsn, "select current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "app");
    // The name went to the proxy as it is (it does not resolve here).
    let target = format!("db.corp.test:{}", c.port);
    assert_eq!(corp.targets(), std::slice::from_ref(&target));
    let client = connect(&r.dsn).await.expect("connect");
    let (sqlstate, _) = cancel_a_sleeping_query(client).await;
    assert_eq!(sqlstate.as_deref(), Some("57014"));
    assert_eq!(
        corp.targets().len(),
        3,
        "login and cancel through the proxy"
    );
}

/// A DSN whose host is a Unix socket directory (libpq's form, key-value and URI with `%2F`)
/// is reached over that socket: the session works, the server sees no client address (it
/// was not TCP), a cancel reaches the same socket, and a missing socket is a clean 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_upstream_works_like_tcp() {
    let Some(c) = cluster() else {
        return eprintln!("postgres not installed; skipped");
    };
    let dir = c.dir();
    let kv = format!(
        "host={} port={} user=app password={APP_PASSWORD} dbname=app",
        dir.display(),
        c.port
    );
    let uri = format!(
        "postgresql://app:{APP_PASSWORD}@{}:{}/app",
        dir.display().to_string().replace('/', "%2F"),
        c.port
    );
    for real in [kv, uri] {
        let r = relay_with("", "", None, &real).await;
        let client = connect(&r.dsn).await.expect("connect over the socket");
        let row = client
            .query_one(
                "select current_user::text, inet_server_addr() is null, $1::int + 1",
                &[&41i32],
            )
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), "app");
        assert!(
            row.get::<_, bool>(1),
            "the upstream leg is not a Unix socket"
        );
        assert_eq!(row.get::<_, i32>(2), 42);

        let (sqlstate, _) = cancel_a_sleeping_query(client).await;
        assert_eq!(
            sqlstate.as_deref(),
            Some("57014"),
            "the cancel reached the server"
        );
    }

    let missing = format!(
        "host={}/nowhere port={} user=app password={APP_PASSWORD} dbname=app",
        dir.display(),
        c.port
    );
    let r = relay_with("", "", None, &missing).await;
    let Err(err) = connect(&r.dsn).await else {
        panic!("connected through a relay whose upstream socket does not exist");
    };
    let db = err.as_db_error().expect("an error from the relay");
    assert_eq!(db.code().code(), "08006");
    assert!(
        db.message().contains("Unix socket") && !db.message().contains("nowhere"),
        "{}",
        db.message()
    );
}
