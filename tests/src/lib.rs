//! End-to-end harness for iron-proxy: a recording TLS origin with its own CA, the proxy
//! started in-process (with an in-memory environment and audit sink) or as a separate
//! process, and helpers that drive real clients (curl, git) through it.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test harness: a failed setup step is a failed test

pub mod corp_proxy;
pub mod idp;
pub mod pgcluster;
pub mod rotating_idp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use iron_policy::Policy;
use iron_proxy::origin::{Origin, OriginOptions};
use iron_proxy::state::CaFiles;
use iron_proxy::{MemoryAudit, Running, Runtime};
use tempfile::TempDir;

/// The real values of the standard policy's secrets. Tests assert these reach the origin
/// and never appear anywhere else.
pub const REAL_GITHUB: &str = "ghp_REALgithubSECRET0123456789";
/// Real value of `MAPS_KEY` (has characters that need percent-encoding).
pub const REAL_MAPS: &str = "maps real/key+1";
/// Real value of `INJECT_KEY`.
pub const REAL_INJECT: &str = "inj_REALinjectedSECRET42";
/// Real value of `BASIC_PW`.
pub const REAL_BASIC: &str = "pw_REALbasicSECRET77";

/// Every real value, for leak checks.
pub const ALL_REAL: &[&str] = &[REAL_GITHUB, REAL_MAPS, REAL_INJECT, REAL_BASIC];

/// The standard policy. `{PORT}` is the origin's port.
pub const STANDARD_POLICY: &str = r#"version = 1

[proxy]
listen = "127.0.0.1:0"
allow = ["other.test:{PORT}", "plain.test:{PORT}"]
allow_cidrs = ["127.0.0.1/32"]
upstream_ca = ["origin-ca.pem"]
passthrough = ["pass.test:{PORT}"]
resolve = { "api.github.test" = "127.0.0.1", "other.test" = "127.0.0.1", "maps.test" = "127.0.0.1", "inject.test" = "127.0.0.1", "basic.test" = "127.0.0.1", "plain.test" = "127.0.0.1", "pass.test" = "127.0.0.1", "private.test" = "10.1.2.3" }

[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = { env = "REAL_GITHUB_TOKEN" }
hosts = ["api.github.test:{PORT}"]

[[secrets]]
name = "MAPS_KEY"
type = "http"
source = { env = "REAL_MAPS_KEY" }
match_headers = []
match_query = ["key"]
match_path = true
hosts = ["maps.test:{PORT}"]

[[secrets]]
name = "INJECT_KEY"
type = "http"
mode = "inject"
source = { env = "REAL_INJECT_KEY" }
inject_header = "X-Api-Key"
inject_formatter = "Token {value}"
hosts = ["inject.test:{PORT}"]

[[secrets]]
name = "BASIC_PW"
type = "http"
mode = "inject"
source = { file = "basic.json", json_key = "password" }
inject_header = "Authorization"
inject_formatter = 'Basic {{base64 "robot:" .Value}}'
hosts = ["basic.test:{PORT}"]
"#;

/// The environment the standard policy's `env` sources read.
pub fn standard_env() -> HashMap<String, String> {
    [
        ("REAL_GITHUB_TOKEN", REAL_GITHUB),
        ("REAL_MAPS_KEY", REAL_MAPS),
        ("REAL_INJECT_KEY", REAL_INJECT),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A test world: a temporary directory, an origin, and the policy written for it.
pub struct World {
    /// Holds the policy, the origin CA, secret files, the proxy state directory.
    pub dir: TempDir,
    /// The recording origin.
    pub origin: Origin,
    /// The policy file.
    pub policy_path: PathBuf,
}

impl World {
    /// Starts an origin and writes `policy` (with `{PORT}` replaced) plus the origin CA and
    /// the standard secret files into a fresh directory.
    pub async fn new(policy: &str, opts: OriginOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("iron-e2e")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let origin = Origin::start(opts).await.expect("origin");
        std::fs::write(dir.path().join("origin-ca.pem"), &origin.ca_pem).expect("write ca");
        std::fs::write(
            dir.path().join("basic.json"),
            format!("{{\"password\": \"{REAL_BASIC}\"}}"),
        )
        .expect("write basic.json");
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(
            &policy_path,
            policy.replace("{PORT}", &origin.addr.port().to_string()),
        )
        .expect("write policy");
        Self {
            dir,
            origin,
            policy_path,
        }
    }

    /// The origin's port.
    pub fn port(&self) -> u16 {
        self.origin.addr.port()
    }

    /// curl `GET https://api.github.test:PORT/user` with `Authorization: Bearer
    /// GITHUB_TOKEN` (the placeholder) through the proxy at `proxy_url` (`http://…`,
    /// `socks5h://…`), trusting `ca`, with `extra` arguments.
    pub async fn github_get(&self, proxy_url: &str, ca: &Path, extra: &[&str]) -> Curl {
        let url = format!("https://api.github.test:{}/user", self.port());
        let mut args = vec![url.as_str(), "-H", "Authorization: Bearer GITHUB_TOKEN"];
        args.extend_from_slice(extra);
        curl_via_url(proxy_url, ca, &args).await
    }

    /// The `Authorization` the origin's latest request carried (to compare with
    /// `Bearer {REAL_GITHUB}`).
    pub fn last_authorization(&self) -> Option<String> {
        self.origin
            .records()
            .pop()
            .and_then(|r| r.header("authorization"))
    }

    /// Starts the proxy in-process with `env` as its environment.
    pub async fn proxy(&self, env: HashMap<String, String>) -> InProcess {
        let policy = Arc::new(Policy::load(&self.policy_path).expect("policy"));
        let ca = iron_proxy::state::load_ca(&policy, &self.dir.path().join("state")).expect("ca");
        let audit = Arc::new(MemoryAudit::default());
        let rt = Runtime::new(policy.clone(), ca.ca.clone(), Arc::new(env), audit.clone())
            .expect("runtime");
        let running = iron_proxy::start(rt.clone(), policy.proxy.listen)
            .await
            .expect("start");
        InProcess {
            running,
            ca,
            audit,
            rt,
        }
    }
}

/// A proxy running in the test process.
pub struct InProcess {
    /// The listener.
    pub running: Running,
    /// Its CA files.
    pub ca: CaFiles,
    /// Its audit records.
    pub audit: Arc<MemoryAudit>,
    /// The runtime (for reloads and the admin API).
    pub rt: Arc<Runtime>,
}

impl InProcess {
    /// The proxy address.
    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    /// Runs curl through this proxy, trusting the proxy CA.
    pub async fn curl(&self, args: &[&str]) -> Curl {
        curl_via(self.addr(), &self.ca.cert, args).await
    }
}

/// What curl did.
#[derive(Debug)]
pub struct Curl {
    /// curl's exit code.
    pub exit: i32,
    /// HTTP status of the last response (0 if none).
    pub status: u16,
    /// Response body.
    pub body: String,
    /// curl's stderr.
    pub stderr: String,
}

impl Curl {
    /// The `error` field of a proxy error envelope in the body.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
    }
}

/// True when `prog` is on PATH.
pub fn have(prog: &str) -> bool {
    std::process::Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `curl -sS --proxy http://PROXY --cacert CA ARGS…`, capturing the status.
pub async fn curl_via(proxy: SocketAddr, ca: &Path, args: &[&str]) -> Curl {
    curl_via_url(&format!("http://{proxy}"), ca, args).await
}

/// [`curl_via`] with a proxy URL (`socks5h://…`, `http://NAME:TOKEN@…`).
pub async fn curl_via_url(proxy: &str, ca: &Path, args: &[&str]) -> Curl {
    let out = tokio::process::Command::new("curl")
        .arg("-sS")
        .arg("--proxy")
        .arg(proxy)
        .arg("--cacert")
        .arg(ca)
        .arg("-w")
        .arg("\n%{http_code}")
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .await
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Curl {
        exit: out.status.code().unwrap_or(-1),
        status: status.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A proxy running as a separate process (`iron-proxy serve`), with stderr captured.
pub struct Spawned {
    /// The child.
    pub child: std::process::Child,
    /// The address it reported listening on.
    pub addr: SocketAddr,
    /// Its CA certificate file.
    pub ca: PathBuf,
    stderr: Arc<std::sync::Mutex<String>>,
}

impl Spawned {
    /// Runs `BIN serve --policy POLICY` with `IRON_PROXY_HOME` in `home`, the given extra
    /// environment, and waits for its "listening" line.
    pub fn start(
        bin: &Path,
        policy: &Path,
        home: &Path,
        env: &HashMap<String, String>,
        log: &str,
    ) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--policy"])
            .arg(policy)
            .env("IRON_PROXY_HOME", home)
            .env("IRON_PROXY_LOG", log)
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn iron-proxy");
        let stderr = child.stderr.take().expect("stderr");
        let captured = Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = captured.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("iron-proxy listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                let mut s = sink.lock().expect("lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("proxy did not start: {}", captured.lock().expect("lock")));
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .and_then(|a| a.parse().ok())
            .expect("listening address");
        Self {
            child,
            addr,
            ca: home.join("ca.crt"),
            stderr: captured,
        }
    }

    /// Peak resident set size so far, in bytes (`VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Stops the process (SIGTERM via `kill`) and returns everything it wrote to stderr.
    pub fn stop(mut self) -> String {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        std::thread::sleep(std::time::Duration::from_millis(100));
        self.stderr.lock().expect("lock").clone()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
