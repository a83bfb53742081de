//! The Postgres relay for `pg_dsn` secrets.
//!
//! For each `pg_dsn` secret the proxy listens locally and hands the sandbox a DSN whose
//! password is a placeholder. A client session is: startup (SSLRequest answered `S` with a
//! leaf from the proxy CA when `client_tls`, GSSENCRequest answered `N`, CancelRequest
//! mapped to the real upstream keys), SCRAM-SHA-256 authentication *by the relay* against
//! the placeholder (RFC 5802/7677, constant-time check), then a login upstream with the real
//! DSN (TLS per `sslmode`, always verified; SCRAM-SHA-256, with channel binding over TLS;
//! MD5 or cleartext only when the DSN's `require_auth` names them), then `role`/`settings`,
//! then bytes relayed both ways without parsing, except that when the secret pins a `role`
//! or `settings` the client's Query, Parse and FunctionCall messages are checked and those
//! that would undo the pin are replaced by a statement that makes the server raise 42501
//! (`crate::pgfilter`; such sessions also need an ASCII-safe `client_encoding`). The
//! client sees BackendKeyData of the relay's own; a CancelRequest with those keys is
//! forwarded with the real ones.
//! (REFERENCE.md §2.11 and D11, D27.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{BufMut, BytesMut};
use hmac::{KeyInit, Mac};
use iron_broker::SecretValue;
use iron_policy::{PgSpec, Secret, SecretKind};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::Runtime;
use crate::audit::{AppliedAt, AppliedSecret, AuditRecord};

/// Largest startup packet accepted, in bytes (PostgreSQL's own limit is 10 000).
pub const MAX_STARTUP: usize = 10_000;
/// Largest message accepted during authentication, in bytes.
pub const MAX_AUTH_MESSAGE: usize = 64 * 1024;
/// Time allowed for the whole handshake (client auth + upstream login).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// SCRAM iteration count used for the sandbox-side verifier.
pub const SCRAM_ITERATIONS: u32 = 4096;
/// Startup parameters a client may set; others are not forwarded. `replication` is
/// refused; `options` is checked (only `-c name=value` settings, none changing the role or
/// a pinned setting) and forwarded as rebuilt.
pub const ALLOWED_PARAMS: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "extra_float_digits",
    "search_path",
    "IntervalStyle",
    "standard_conforming_strings",
    "intervalstyle",
    "datestyle",
    "timezone",
];

type HmacSha256 = hmac::Hmac<Sha256>;

/// `sslmode` of an upstream DSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it (verified when used).
    Prefer,
    /// TLS required (verified: iron-proxy never uses unverified TLS, DESIGN.md decision 6).
    Require,
}

/// A parsed upstream DSN. `Debug` never shows the password.
#[derive(Clone)]
pub struct Dsn {
    /// Host name or IP, or a Unix socket directory (an absolute path; see [`Dsn::socket_path`]).
    pub host: String,
    /// Port (default 5432).
    pub port: u16,
    /// User.
    pub user: String,
    /// Password, if any.
    pub password: Option<SecretValue>,
    /// Database (default: the user).
    pub dbname: String,
    /// TLS mode (default prefer).
    pub sslmode: SslMode,
    /// Authentication methods allowed (`require_auth`; default `scram-sha-256`).
    pub require_auth: Vec<String>,
    /// `channel_binding=require`: only SCRAM-SHA-256-PLUS over TLS is accepted (libpq's
    /// meaning). `prefer` (default) uses it whenever the upstream offers it.
    pub channel_binding_required: bool,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dsn")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("password", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl Dsn {
    /// The Unix socket of a DSN whose host is a socket directory (an absolute path, libpq's
    /// form): `HOST/.s.PGSQL.PORT`. `None` for a host name or address. libpq does not
    /// negotiate TLS over a Unix socket whatever `sslmode` says, and neither does the relay:
    /// the socket's file permissions are its protection (and SCRAM channel binding, which
    /// needs TLS, cannot be required there).
    pub fn socket_path(&self) -> Option<std::path::PathBuf> {
        self.host
            .starts_with('/')
            .then(|| Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }

    /// Parses `postgres[ql]://user:pass@host:port/db?k=v` or `key=value …` (libpq forms).
    ///
    /// # Errors
    /// A message naming the problem; never the DSN text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let mut kv: HashMap<String, String> = HashMap::new();
        if let Some(rest) = text
            .strip_prefix("postgresql://")
            .or_else(|| text.strip_prefix("postgres://"))
        {
            let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (authority, path) = main.split_once('/').unwrap_or((main, ""));
            let (userinfo, hostport) = match authority.rsplit_once('@') {
                Some((u, h)) => (Some(u), h),
                None => (None, authority),
            };
            let dec = |s: &str| {
                String::from_utf8_lossy(&iron_policy::encoding::decode_mapped(s, false).bytes)
                    .into_owned()
            };
            if let Some(u) = userinfo {
                let (user, pass) = u.split_once(':').map_or((u, None), |(a, b)| (a, Some(b)));
                kv.insert("user".into(), dec(user));
                if let Some(p) = pass {
                    kv.insert("password".into(), dec(p));
                }
            }
            let hostport = hostport.split(',').next().unwrap_or("");
            let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
                let (h, after) = h.split_once(']').ok_or("invalid IPv6 host in DSN")?;
                (h.to_string(), after.strip_prefix(':').map(str::to_string))
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p.to_string())),
                    None => (hostport.to_string(), None),
                }
            };
            if !host.is_empty() {
                kv.insert("host".into(), dec(&host));
            }
            if let Some(p) = port.filter(|p| !p.is_empty()) {
                kv.insert("port".into(), p);
            }
            if !path.is_empty() {
                kv.insert("dbname".into(), dec(path));
            }
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                kv.insert(dec(k), dec(v));
            }
        } else {
            let mut chars = text.chars().peekable();
            loop {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                let mut key = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '=' || c.is_whitespace() {
                        break;
                    }
                    key.push(c);
                    chars.next();
                }
                if key.is_empty() {
                    break;
                }
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if chars.next() != Some('=') {
                    // An unquoted password with a space lands here: name the key only when
                    // it is a libpq keyword, never echo a fragment that may be the password.
                    return Err(if KNOWN_KEYS.contains(&key.as_str()) {
                        format!("DSN key {key} has no value")
                    } else {
                        "DSN has a word that is not `key=value` (quote values containing spaces: key='a b')".to_string()
                    });
                }
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                let mut value = String::new();
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    loop {
                        match chars.next() {
                            Some('\\') => value.extend(chars.next()),
                            Some('\'') => break,
                            Some(c) => value.push(c),
                            None => {
                                return Err(if KNOWN_KEYS.contains(&key.as_str()) {
                                    format!("unterminated quote in DSN value of {key}")
                                } else {
                                    "unterminated quote in a DSN value".to_string()
                                });
                            }
                        }
                    }
                } else {
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() {
                            break;
                        }
                        value.push(c);
                        chars.next();
                    }
                }
                kv.insert(key, value);
            }
        }
        let user = kv
            .remove("user")
            .filter(|u| !u.is_empty())
            .ok_or("DSN has no user")?;
        // A server not on this machine (a host other than `localhost`, a loopback address
        // or a Unix socket directory) is reached over verified TLS unless the DSN says
        // `sslmode=disable`: libpq's default `prefer` (and `allow`) would fall back to
        // cleartext when the server — or anyone on the path — declines TLS, and the relay
        // then logs in with the real password (SCRAM without channel binding, or MD5 or the
        // password itself when `require_auth` allows them). Decision 4: never cleartext
        // unless the secret explicitly says so. The broker's store does the same.
        let host = kv.get("host").map_or("localhost", String::as_str);
        let local = host == "localhost"
            || host.starts_with('/')
            || host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let sslmode = match kv.get("sslmode").map(String::as_str) {
            None | Some("prefer" | "allow") if !local => SslMode::Require,
            None | Some("prefer" | "allow") => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
            // The value is not repeated: a password pasted into the wrong field would be.
            Some(_) => {
                return Err(
                    "unsupported sslmode (use disable, allow, prefer, require, verify-ca or verify-full)"
                        .to_string(),
                );
            }
        };
        let channel_binding_required = match kv.get("channel_binding").map(String::as_str) {
            None | Some("prefer" | "disable") => false,
            Some("require") => true,
            Some(_) => {
                return Err(
                    "unsupported channel_binding (use disable, prefer or require)".to_string(),
                );
            }
        };
        let port = match kv.get("port") {
            Some(p) => p.parse().map_err(|_| "invalid port in DSN".to_string())?,
            None => 5432,
        };
        Ok(Self {
            host: kv.remove("host").unwrap_or_else(|| "localhost".into()),
            port,
            dbname: kv.remove("dbname").unwrap_or_else(|| user.clone()),
            password: kv
                .remove("password")
                .map(|p| SecretValue::new(p.into_bytes())),
            user,
            sslmode,
            channel_binding_required,
            require_auth: kv
                .get("require_auth")
                .map(|r| {
                    r.split(',')
                        .map(|s| s.trim().to_ascii_lowercase())
                        .collect()
                })
                .unwrap_or_else(|| vec!["scram-sha-256".into()]),
        })
    }
}

/// libpq connection keywords (libpq "Parameter Key Words"): the only DSN words an error
/// message may repeat.
const KNOWN_KEYS: [&str; 24] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslnegotiation",
    "require_auth",
    "target_session_attrs",
    "gssencmode",
    "service",
];

/// The sandbox side of a `pg_dsn` secret: where it listens and the credentials it accepts.
#[derive(Clone)]
pub struct ClientSide {
    /// Listen address.
    pub listen: SocketAddr,
    /// User the sandbox must log in as.
    pub user: String,
    /// The placeholder password.
    pub password: SecretValue,
}

/// The sandbox side of `secret`: `listen`/`password` from the policy, else a loopback port
/// and a random password chosen once and kept in `dir` (`pg-NAME.json`, mode 0600), so
/// `env`, `serve` and `run` agree; the user from the policy, else the DSN's.
///
/// # Errors
/// A message when the DSN cannot be read or parsed, or the state file cannot be written.
pub fn client_side(
    rt_sources: &iron_broker::SourceResolver,
    secret: &Secret,
    spec: &PgSpec,
    dir: &Path,
) -> Result<ClientSide, String> {
    let state_path = dir.join(format!("pg-{}.json", secret.name));
    let saved: serde_json::Value = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    let mut port = saved["port"].as_u64().and_then(|p| u16::try_from(p).ok());
    let mut password = saved["password"].as_str().map(str::to_string);
    let mut dirty = false;
    if spec.listen.is_none() && port.is_none() {
        let l = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot pick a port: {e}"))?;
        port = l.local_addr().ok().map(|a| a.port());
        dirty = true;
    }
    if spec.password.is_none() && password.is_none() {
        let b: [u8; 24] = random_bytes();
        password = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b));
        dirty = true;
    }
    // The sandbox user defaults to the DSN's; it is kept in the state file too, so `env`
    // run where the real DSN is not set still prints what `serve` accepts.
    let user = match &spec.user {
        Some(u) => u.clone(),
        None => {
            let from_dsn = rt_sources
                .resolve(&spec.source)
                .map_err(|e| format!("secret {}: {e}", secret.name))
                .and_then(|dsn| {
                    Dsn::parse(&String::from_utf8_lossy(dsn.expose()))
                        .map_err(|e| format!("secret {}: {e}", secret.name))
                })
                .map(|d| d.user);
            match (from_dsn, saved["user"].as_str()) {
                (Ok(u), saved_user) => {
                    dirty |= saved_user != Some(u.as_str());
                    u
                }
                (Err(_), Some(saved_user)) => saved_user.to_string(),
                (Err(e), None) => return Err(e),
            }
        }
    };
    if dirty {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        crate::state::create_dir(dir)?;
        let doc = serde_json::json!({"port": port, "password": password, "user": user});
        let tmp = dir.join(format!(".pg-{}.{}", secret.name, std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(doc.to_string().as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &state_path))
            .map_err(|e| format!("cannot write {}: {e}", state_path.display()))?;
    }
    let listen = spec
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0))));
    let password = spec.password.clone().or(password).unwrap_or_default();
    Ok(ClientSide {
        listen,
        user,
        password: SecretValue::new(password.into_bytes()),
    })
}

/// The sandbox DSN: `postgresql://USER:PASSWORD@HOST:PORT/DB`.
pub fn sandbox_dsn(side: &ClientSide, spec: &PgSpec) -> String {
    let enc = |s: &[u8]| iron_policy::encoding::encode_component(s);
    format!(
        "postgresql://{}:{}@{}/{}",
        enc(side.user.as_bytes()),
        enc(side.password.expose()),
        side.listen,
        enc(spec.database.as_bytes())
    )
}

/// Upstream cancel targets by the relay's own (pid, key).
type CancelMap = Arc<Mutex<HashMap<(i32, i32), (UpstreamAddr, i32, i32)>>>;

/// A running relay. Dropping it stops accepting (open sessions go on);
/// [`Relay::drain`] also ends the sessions.
#[derive(Debug)]
pub struct Relay {
    /// Secret name.
    pub name: String,
    /// Listen address.
    pub addr: SocketAddr,
    /// The secret's `listen` it was started for (`None`: the port kept in the state
    /// directory, or a fresh one).
    listen: Option<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
    /// One permit per session (`max_connections` in all).
    slots: Arc<Semaphore>,
    max: u32,
    /// Turned true to close the open sessions.
    stop: tokio::sync::watch::Sender<bool>,
}

/// How long closed sessions get to write their audit records after [`Relay::drain`] has
/// told them to stop.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Relay {
    /// Stops accepting, waits up to `grace` for the open sessions to end (clients
    /// disconnecting), then closes the rest: both sockets are shut, and each session's audit
    /// record is written with `"error": "shutdown"` (`"outcome": "closed"` after login,
    /// `"refused"` during it) and its byte counts. Returns true when every session ended
    /// by itself within `grace`.
    pub async fn drain(self, grace: Duration) -> bool {
        self.task.abort();
        let all_ended = || self.slots.acquire_many(self.max);
        let by_themselves = tokio::time::timeout(grace, all_ended()).await.is_ok();
        if !by_themselves {
            let _ = self.stop.send(true);
            if tokio::time::timeout(CLOSE_WAIT, all_ended()).await.is_err() {
                tracing::warn!(secret = %self.name, "postgres sessions still open after being closed");
            }
        }
        by_themselves
    }
}

/// [`Relay::drain`] on every relay at once; true when all ended by themselves.
pub async fn drain_all(relays: Vec<Relay>, grace: Duration) -> bool {
    let mut all = true;
    let mut set = tokio::task::JoinSet::new();
    for r in relays {
        set.spawn(r.drain(grace));
    }
    while let Some(done) = set.join_next().await {
        all &= done.unwrap_or(false);
    }
    all
}

/// Completes once `stop` turns true; never when its sender is gone (a relay dropped
/// without [`Relay::drain`] leaves its sessions running).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The relays a runtime runs ([`Runtime::relays`]), and where [`start_all`] put them:
/// a reload starts, moves and retires relays to follow the policy ([`reconcile`]).
#[derive(Debug, Default)]
pub struct RelaySet {
    running: Vec<Relay>,
    /// The state directory and whether relays without a fixed `listen` take a fresh
    /// port; `None` until [`start_all`] (a runtime without relays).
    place: Option<(std::path::PathBuf, bool)>,
}

/// Starts one relay per enabled `pg_dsn` secret and keeps them in the runtime (drained at
/// shutdown with [`take_all`]); returns each one's secret name and listen address. Relays
/// follow policy reloads: new sessions use the current DSN, role and settings, and a
/// reload starts, moves or retires relays ([`reconcile`]). With `ephemeral`, a secret
/// without a fixed `listen` gets a fresh loopback port instead of the one kept in the
/// state directory (`run`, beside a `serve` holding that port). A secret whose DSN is not
/// set yet gets no relay (`/readyz` says so) until a reload finds it set.
///
/// # Errors
/// A message when a sandbox side cannot be set up or a listener cannot bind.
pub async fn start_all(
    rt: &Arc<Runtime>,
    state_dir: &Path,
    ephemeral: bool,
) -> Result<Vec<(String, SocketAddr)>, String> {
    let policy = rt.policy();
    let mut set = rt.relays.lock().await;
    set.place = Some((state_dir.to_path_buf(), ephemeral));
    for secret in &policy.secrets {
        if let Some(relay) = start_one(rt, secret, state_dir, ephemeral).await? {
            set.running.push(relay);
        }
    }
    Ok(set
        .running
        .iter()
        .map(|r| (r.name.clone(), r.addr))
        .collect())
}

/// The runtime's running relays: secret name and listen address.
pub async fn running(rt: &Runtime) -> Vec<(String, SocketAddr)> {
    rt.relays
        .lock()
        .await
        .running
        .iter()
        .map(|r| (r.name.clone(), r.addr))
        .collect()
}

/// Every relay of the runtime, taken out for [`drain_all`] at shutdown.
pub async fn take_all(rt: &Runtime) -> Vec<Relay> {
    std::mem::take(&mut rt.relays.lock().await.running)
}

/// Brings the runtime's relays in line with `policy` (a reload about to be applied):
/// starts a relay for each enabled `pg_dsn` secret that has none at its `listen`
/// (added, switched on, moved, or its DSN newly set), and takes out the relays of secrets
/// removed or moved (a switched-off secret's relay stays, refusing sessions with a
/// message), returned for the caller to drain once the policy is
/// swapped (their open sessions finish on the new policy). Returns warnings too (a DSN
/// still unset). Nothing changes without relays ([`start_all`] never ran).
///
/// # Errors
/// The messages of relays that could not start (a `listen` already taken): then none of
/// this call's relays is kept and none is taken out, so the reload can be refused whole
/// (REFERENCE.md D27: a bind failure fails the reload).
pub async fn reconcile(
    rt: &Arc<Runtime>,
    policy: &iron_policy::Policy,
) -> Result<(Vec<Relay>, Vec<String>), Vec<String>> {
    let mut set = rt.relays.lock().await;
    let Some((dir, ephemeral)) = set.place.clone() else {
        return Ok((Vec::new(), Vec::new()));
    };
    // A switched-off secret keeps its relay, which answers each session with an
    // ErrorResponse saying so (clearer than a refused connection).
    let wanted = |r: &Relay| {
        policy
            .secret(&r.name)
            .is_some_and(|s| matches!(&s.kind, SecretKind::Pg(spec) if spec.listen == r.listen))
    };
    let mut started = Vec::new();
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    for secret in policy.secrets.iter().filter(|s| s.enabled) {
        if !matches!(secret.kind, SecretKind::Pg(_))
            || set
                .running
                .iter()
                .any(|r| r.name == secret.name && wanted(r))
        {
            continue;
        }
        match start_one(rt, secret, &dir, ephemeral).await {
            Ok(Some(relay)) => started.push(relay),
            Ok(None) => warnings.push(format!(
                "secret `{}` (pg_dsn): its DSN is not set; its relay starts on a reload once it is",
                secret.name
            )),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let (keep, retired): (Vec<Relay>, Vec<Relay>) = std::mem::take(&mut set.running)
        .into_iter()
        .partition(wanted);
    set.running = keep;
    set.running.extend(started);
    if let Ok(mut v) = rt.pg_not_started.lock() {
        v.retain(|n| {
            policy.secret(n).is_some_and(|s| s.enabled) && !set.running.iter().any(|r| &r.name == n)
        });
    }
    Ok((retired, warnings))
}

/// Starts the relay of `secret` when it is an enabled `pg_dsn` secret whose DSN is set
/// (else `None`; an unset DSN is noted in [`Runtime::pg_not_started`]).
async fn start_one(
    rt: &Arc<Runtime>,
    secret: &iron_policy::Secret,
    state_dir: &Path,
    ephemeral: bool,
) -> Result<Option<Relay>, String> {
    let SecretKind::Pg(spec) = &secret.kind else {
        return Ok(None);
    };
    if !secret.enabled {
        return Ok(None);
    }
    {
        let side = match client_side(&rt.sources, secret, spec, state_dir) {
            Ok(side) => side,
            // The DSN is not set yet: no relay for it (/readyz and /v1/secrets say why).
            Err(e) if rt.sources.resolve(&spec.source).is_err() => {
                tracing::error!(secret = %secret.name, error = %e, "postgres relay not started: its DSN is missing");
                if let Ok(mut v) = rt.pg_not_started.lock()
                    && !v.contains(&secret.name)
                {
                    v.push(secret.name.clone());
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let bind = if ephemeral && spec.listen.is_none() {
            SocketAddr::from(([127, 0, 0, 1], 0))
        } else {
            side.listen
        };
        let listener = TcpListener::bind(bind).await.map_err(|e| {
            format!(
                "secret {}: cannot listen on {}: {e}",
                secret.name, side.listen
            )
        })?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let verifier = Arc::new(Verifier::new(side.password.expose()));
        let cancels: CancelMap = Arc::new(Mutex::new(HashMap::new()));
        let max =
            u32::try_from(spec.max_connections.min(Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        let slots = Arc::new(Semaphore::new(max as usize));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let accept_slots = slots.clone();
        let overflow = Arc::new(Semaphore::new(OVERFLOW_HANDSHAKES));
        let name = secret.name.clone();
        let rt2 = rt.clone();
        let user = side.user.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(secret = %name, error = %e, "postgres relay accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (rt, name, user, verifier, cancels, stop) = (
                    rt2.clone(),
                    name.clone(),
                    user.clone(),
                    verifier.clone(),
                    cancels.clone(),
                    stop_rx.clone(),
                );
                let permit = accept_slots.clone().try_acquire_owned();
                // At the cap, a connection may still be a CancelRequest, which needs no
                // session (PostgreSQL takes cancels at any load): up to OVERFLOW_HANDSHAKES
                // such connections are read; a startup among them is refused with 53300
                // after the SSL exchange, where libpq can show it.
                let overflow = match &permit {
                    Ok(_) => None,
                    Err(_) => overflow.clone().try_acquire_owned().ok(),
                };
                // The session runs on the next event loop (crate::workers).
                crate::workers::hand_off(tcp, move |mut tcp| async move {
                    if let Some(_overflow) = overflow {
                        session(
                            rt, &name, &user, &verifier, &cancels, tcp, peer, false, stop,
                        )
                        .await;
                        return;
                    }
                    let Ok(_permit) = permit else {
                        let _ =
                            send_error(&mut tcp, "53300", "too many connections for this relay")
                                .await;
                        let mut rec = AuditRecord::new("pg", rt.next_request_id(), peer, "STARTUP");
                        rec.scheme = "postgres";
                        rec.host_class = "secret";
                        rec.outcome = "refused";
                        rec.error = Some("pg_too_many_connections");
                        rec.secrets = smallvec::smallvec![AppliedSecret {
                            stats: rt.stats(&name),
                            location: AppliedAt::Pg,
                        }];
                        rec.stop_clock();
                        rt.emit(rec);
                        return;
                    };
                    session(rt, &name, &user, &verifier, &cancels, tcp, peer, true, stop).await;
                });
            }
        });
        tracing::info!(secret = %secret.name, addr = %addr, "postgres relay listening");
        Ok(Some(Relay {
            name: secret.name.clone(),
            addr,
            listen: spec.listen,
            task,
            slots,
            max,
            stop,
        }))
    }
}

/// Connections read past a relay's `max_connections`, in case they are CancelRequests.
const OVERFLOW_HANDSHAKES: usize = 16;

/// The SCRAM-SHA-256 verifier of the placeholder password.
struct Verifier {
    salt: [u8; 16],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac());
    m.update(data);
    m.finalize().into_bytes().into()
}

fn unreachable_hmac() -> HmacSha256 {
    // HMAC accepts keys of any length; this is never reached.
    <HmacSha256 as KeyInit>::new_from_slice(b"k").unwrap_or_else(|_| std::process::abort())
}

/// `N` bytes from the OS random source (through the crypto provider): the sandbox's
/// placeholder password, SCRAM salts and nonces, cancel keys. When the source fails there is
/// no safe way to make these — zeros would be a guessable password stored for good, and
/// guessable keys — so the process stops (like an allocation failure) instead.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if crate::crypto_provider().secure_random.fill(&mut b).is_err() {
        eprintln!("iron-proxy: the OS random number generator failed; stopping");
        std::process::abort();
    }
    b
}

impl Verifier {
    fn new(password: &[u8]) -> Self {
        let salt: [u8; 16] = random_bytes();
        // PBKDF2-HMAC-SHA256, one block (RFC 8018 §5.2).
        let mut block = salt.to_vec();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = hmac(password, &block);
        let mut salted = u;
        for _ in 1..SCRAM_ITERATIONS {
            u = hmac(password, &u);
            for (s, x) in salted.iter_mut().zip(u.iter()) {
                *s ^= x;
            }
        }
        let client_key = hmac(&salted, b"Client Key");
        Self {
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// Why a session ended before relaying.
struct Refusal {
    sqlstate: &'static str,
    message: String,
    code: &'static str,
}

/// The settings of a startup `options` value (libpq's `PGOPTIONS`), as the server reads it
/// (`pg_split_opts`: words split at unescaped whitespace, a backslash escaping the next byte; each
/// setting `-c name=value`, `-cname=value` or `--name=value`, a `-` in the name read as
/// `_`), names lower-cased.
///
/// # Errors
/// A message naming the word or setting refused: any other server switch; `role` and
/// `session_authorization` (a role the relay did not log in as); `client_encoding` (the
/// startup parameter is checked instead); a setting the secret pins (`pinned`, also its
/// `default_` form), which the relay applies after login.
fn options_settings(
    options: &str,
    pinned: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut open = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
                open = true;
            }
            c if c.is_ascii_whitespace() => {
                if open {
                    words.push(std::mem::take(&mut word));
                    open = false;
                }
            }
            c => {
                word.push(c);
                open = true;
            }
        }
    }
    if open {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next().ok_or("`-c` without a setting")?
        } else if let Some(rest) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            rest.to_string()
        } else {
            return Err(format!("`{w}` is not a `-c name=value` setting"));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("`{setting}` has no value"))?;
        let name = name.to_ascii_lowercase().replace('-', "_");
        let pins = |n: &str| {
            pinned.iter().any(|(p, _)| {
                let p = p.to_ascii_lowercase();
                p == n || format!("default_{p}") == n || p == format!("default_{n}")
            })
        };
        if matches!(
            name.as_str(),
            "role" | "session_authorization" | "client_encoding"
        ) || pins(&name)
        {
            return Err(format!(
                "setting `{name}` is not allowed through this relay"
            ));
        }
        out.push((name, value.to_string()));
    }
    Ok(out)
}

/// `settings` as an `options` value: `-c name=value` words, whitespace and backslashes escaped.
fn join_options(settings: &[(String, String)]) -> String {
    let escape = |s: &str| {
        let mut o = String::new();
        for c in s.chars() {
            if c == '\\' || c.is_ascii_whitespace() {
                o.push('\\');
            }
            o.push(c);
        }
        o
    };
    settings
        .iter()
        .map(|(n, v)| format!("-c {}={}", escape(n), escape(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn refuse(sqlstate: &'static str, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        sqlstate,
        message: message.into(),
        code,
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One relay session: the handshake, then the byte relay until either side closes or the
/// relay is drained (`stop`); its audit record is written at the end.
#[allow(clippy::too_many_arguments)]
async fn session(
    rt: Arc<Runtime>,
    name: &str,
    user: &str,
    verifier: &Verifier,
    cancels: &CancelMap,
    tcp: TcpStream,
    peer: SocketAddr,
    has_slot: bool,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rec = AuditRecord::new("pg", rt.next_request_id(), peer, "STARTUP");
    rec.scheme = "postgres";
    rec.host_class = "secret";
    rec.secrets = smallvec::smallvec![AppliedSecret {
        stats: rt.stats(name),
        location: AppliedAt::Pg,
    }];
    let setup = tokio::select! {
        setup = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake(&rt, name, user, verifier, cancels, tcp, has_slot, &mut rec),
        ) => setup,
        () = stopped(stop.clone()) => {
            rec.outcome = "refused";
            rec.error = Some("shutdown");
            rec.stop_clock();
            rt.emit(rec);
            return;
        }
    };
    let (client, upstream, own_keys, rules) = match setup {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => {
            // A CancelRequest is audited; a client gone before a session is not a session.
            if rec.method == "CANCEL" {
                rec.stop_clock();
                rt.emit(rec);
            }
            return;
        }
        Ok(Err(())) => {
            rec.outcome = "refused";
            rec.stop_clock();
            rt.emit(rec);
            return;
        }
        Err(_) => {
            rec.outcome = "refused";
            rec.error = Some("pg_handshake_timeout");
            rec.stop_clock();
            rt.emit(rec);
            return;
        }
    };
    let idle = Duration::from_secs(24 * 3600);
    let stopping = stop.clone();
    // A secret that pins `role` or `settings`: the client's statements are checked on the
    // way (crate::pgfilter); nothing is parsed otherwise.
    let (up, down) = match rules {
        Some(rules) => {
            let mut client = crate::pgfilter::Filtered::new(client, rules, name.into());
            let counts = crate::io::relay(&mut client, upstream, idle, stopped(stop)).await;
            if client.refused() > 0 {
                tracing::warn!(secret = %name, refused = client.refused(), "postgres session ended; statements were refused in it");
            }
            rec.statements_refused = client.refused();
            counts
        }
        None => crate::io::relay(client, upstream, idle, stopped(stop)).await,
    };
    if let Ok(mut m) = cancels.lock() {
        m.remove(&own_keys);
    }
    if *stopping.borrow() {
        rec.error = Some("shutdown");
    }
    rec.status = 0;
    rec.outcome = "closed";
    rec.bytes_in = up;
    rec.bytes_out = down;
    rec.stop_clock();
    rt.emit(rec);
}

/// The client, the upstream, the relay's own cancel keys and, when the secret pins a role
/// or settings, the statement rules for the client's messages.
type Established = (
    Box<dyn Stream>,
    Box<dyn Stream>,
    (i32, i32),
    Option<crate::pgfilter::Rules>,
);

#[allow(clippy::too_many_arguments)]
async fn handshake(
    rt: &Arc<Runtime>,
    name: &str,
    user: &str,
    verifier: &Verifier,
    cancels: &CancelMap,
    tcp: TcpStream,
    has_slot: bool,
    rec: &mut AuditRecord,
) -> Result<Option<Established>, ()> {
    let policy = rt.policy();
    // Removed or switched off (`enabled = false`) by a reload: no new sessions. The client
    // is told so after its startup packet (an error before it, during the SSLRequest, is
    // one libpq cannot show).
    let spec = match policy.secret(name).filter(|s| s.enabled).map(|s| &s.kind) {
        Some(SecretKind::Pg(spec)) => Some(spec.clone()),
        _ => None,
    };
    // The leaf offered to a TLS client names the address it connected to (the relay's
    // listen address), so verify-full works on any listen IP.
    let local_ip = tcp.local_addr().map_or_else(
        |_| "127.0.0.1".to_string(),
        |a| a.ip().to_canonical().to_string(),
    );
    let mut client: Box<dyn Stream> = Box::new(tcp);
    // startup phase
    let params = loop {
        let Ok(packet) = read_startup(&mut client).await else {
            return Ok(None);
        };
        if packet.len() < 4 {
            return Ok(None);
        }
        let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
        match code {
            80_877_103 => {
                // SSLRequest
                if spec.as_ref().is_some_and(|s| s.client_tls) {
                    if client.write_all(b"S").await.is_err() {
                        return Ok(None);
                    }
                    let host = rec.host.clone();
                    let leaf_host = if host.is_empty() {
                        local_ip.clone()
                    } else {
                        host
                    };
                    let Ok(config) = rt.leaves.server_config(&leaf_host) else {
                        return Err(());
                    };
                    let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(client).await
                    else {
                        return Ok(None);
                    };
                    client = Box::new(tls);
                } else if client.write_all(b"N").await.is_err() {
                    return Ok(None);
                }
            }
            80_877_104 => {
                // GSSENCRequest
                if client.write_all(b"N").await.is_err() {
                    return Ok(None);
                }
            }
            80_877_102 if packet.len() >= 12 => {
                // CancelRequest: forward with the real keys, if known.
                let pid = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                let key = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
                let target = cancels
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&(pid, key)).cloned());
                rec.method = "CANCEL".into();
                rec.outcome = "refused";
                rec.error = Some("pg_cancel_unknown_key");
                if target.is_some() {
                    rec.error = Some("pg_cancel_upstream_failed");
                }
                if let Some((addr, rpid, rkey)) = target
                    && let Ok(mut up) = addr.connect().await
                {
                    let mut buf = BytesMut::new();
                    postgres_protocol::message::frontend::cancel_request(rpid, rkey, &mut buf);
                    if up.write_all(&buf).await.is_ok() {
                        rec.outcome = "forwarded";
                        rec.error = None;
                    }
                }
                return Ok(None);
            }
            196_608 => break parse_params(&packet[4..]),
            _ => {
                let _ = send_error(&mut client, "0A000", "unsupported frontend protocol").await;
                return Ok(None);
            }
        }
    };
    let Some(spec) = spec else {
        fail(
            &mut client,
            refuse(
                "08006",
                "credential_unavailable",
                "this relay's secret is disabled or no longer in the policy",
            ),
            rec,
        )
        .await;
        return Err(());
    };
    if !has_slot {
        fail(
            &mut client,
            refuse(
                "53300",
                "pg_too_many_connections",
                "too many connections for this relay",
            ),
            rec,
        )
        .await;
        return Err(());
    }
    let got_user = params.get("user").cloned().unwrap_or_default();
    let got_db = params
        .get("database")
        .cloned()
        .unwrap_or_else(|| got_user.clone());
    rec.path = format!("/{got_db}");
    if params.contains_key("replication") {
        fail(
            &mut client,
            refuse(
                "0A000",
                "pg_refused_parameter",
                "the startup parameter replication is not allowed through the relay",
            ),
            rec,
        )
        .await;
        return Err(());
    }
    // `options` (libpq's PGOPTIONS): only `-c name=value` settings, none that changes the
    // role or a pinned setting; forwarded as rebuilt from what was checked.
    let mut params = params;
    if let Some(options) = params.get("options") {
        match options_settings(options, &spec.settings) {
            Ok(settings) => {
                let rebuilt = join_options(&settings);
                params.insert("options".into(), rebuilt);
            }
            Err(why) => {
                fail(
                    &mut client,
                    refuse(
                        "0A000",
                        "pg_refused_parameter",
                        format!("startup parameter options: {why}"),
                    ),
                    rec,
                )
                .await;
                return Err(());
            }
        }
    }
    if !iron_broker::ct_eq(got_user.as_bytes(), user.as_bytes()) {
        fail(
            &mut client,
            refuse(
                "28000",
                "pg_unknown_user",
                format!("role \"{got_user}\" is not allowed through this relay"),
            ),
            rec,
        )
        .await;
        return Err(());
    }
    if got_db != spec.database {
        fail(
            &mut client,
            refuse(
                "3D000",
                "pg_unknown_database",
                format!("database \"{got_db}\" is not served by this relay"),
            ),
            rec,
        )
        .await;
        return Err(());
    }
    if let Err(r) = scram_server(&mut client, verifier).await {
        fail(&mut client, r, rec).await;
        return Err(());
    }
    // upstream login
    let dsn = match rt
        .sources
        .resolve(&spec.source)
        .map_err(|e| e.to_string())
        .and_then(|v| Dsn::parse(&String::from_utf8_lossy(v.expose())))
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(secret = %name, error = %e, "upstream DSN unavailable");
            fail(
                &mut client,
                refuse(
                    "08006",
                    "credential_unavailable",
                    "the upstream DSN is unavailable",
                ),
                rec,
            )
            .await;
            return Err(());
        }
    };
    rec.host.clone_from(&dsn.host);
    rec.port = dsn.port;
    if dsn.dbname != spec.database {
        fail(
            &mut client,
            refuse(
                "3D000",
                "pg_dsn_database_mismatch",
                "the relay's database does not match its DSN",
            ),
            rec,
        )
        .await;
        return Err(());
    }
    let forwarded: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| ALLOWED_PARAMS.contains(&k.as_str()) || k.as_str() == "options")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (upstream, statuses, real_keys, addr) =
        match login_upstream(rt, &dsn, &forwarded, &spec).await {
            Ok(x) => x,
            Err(r) => {
                tracing::warn!(secret = %name, code = r.code, "upstream login failed");
                fail(&mut client, r, rec).await;
                return Err(());
            }
        };
    // With a pinned role or settings, the client's statements are checked, which needs a
    // client encoding in which a backslash byte is always a backslash (crate::pgfilter).
    let pinned = spec.role.is_some() || !spec.settings.is_empty();
    if pinned
        && let Some((_, enc)) = statuses
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("client_encoding"))
        && crate::pgfilter::unsafe_client_encoding(enc)
    {
        fail(
            &mut client,
            refuse(
                "0A000",
                "pg_refused_parameter",
                format!(
                    "client_encoding {enc} is not allowed through this relay (its role or settings are pinned); use UTF8"
                ),
            ),
            rec,
        )
        .await;
        return Err(());
    }
    let rules =
        pinned.then(|| crate::pgfilter::Rules::new(spec.settings.iter().map(|(k, _)| k.as_str())));
    // Tell the client it is in.
    let own: [u8; 8] = random_bytes();
    let own_keys = (
        i32::from_be_bytes([own[0] & 0x7f, own[1], own[2], own[3]]),
        i32::from_be_bytes([own[4], own[5], own[6], own[7]]),
    );
    let mut out = BytesMut::new();
    auth_message(&mut out, 0, &[]);
    for (k, v) in &statuses {
        let mut body = Vec::new();
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
        message(&mut out, b'S', &body);
    }
    let mut kd = Vec::new();
    kd.extend_from_slice(&own_keys.0.to_be_bytes());
    kd.extend_from_slice(&own_keys.1.to_be_bytes());
    message(&mut out, b'K', &kd);
    message(&mut out, b'Z', b"I");
    if client.write_all(&out).await.is_err() {
        return Ok(None);
    }
    // Registered once the client has its keys (it cannot cancel before): a session that ends
    // at the write above, or is dropped there (timeout, drain), leaves no entry behind.
    if let Ok(mut m) = cancels.lock() {
        m.insert(own_keys, (addr, real_keys.0, real_keys.1));
    }
    rec.status = 0;
    Ok(Some((client, upstream, own_keys, rules)))
}

async fn fail(client: &mut Box<dyn Stream>, r: Refusal, rec: &mut AuditRecord) {
    rec.error = Some(r.code);
    let _ = send_error(client, r.sqlstate, &r.message).await;
}

async fn read_startup(s: &mut Box<dyn Stream>) -> std::io::Result<Vec<u8>> {
    let len = s.read_i32().await?;
    let len = usize::try_from(len).unwrap_or(0);
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(std::io::Error::other("startup packet length out of range"));
    }
    let mut buf = vec![0u8; len - 4];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

fn parse_params(body: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut parts = body.split(|b| *b == 0);
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        if k.is_empty() {
            break;
        }
        out.insert(
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        );
    }
    out
}

/// Reads one tagged message (tag, body), refusing bodies over `cap` bytes.
async fn read_message(s: &mut Box<dyn Stream>, cap: usize) -> std::io::Result<(u8, Vec<u8>)> {
    let tag = s.read_u8().await?;
    let len = usize::try_from(s.read_i32().await?).unwrap_or(0);
    if !(4..=cap + 4).contains(&len) {
        return Err(std::io::Error::other("message length out of range"));
    }
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await?;
    Ok((tag, body))
}

fn message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    out.put_slice(body);
}

fn auth_message(out: &mut BytesMut, code: i32, data: &[u8]) {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    message(out, b'R', &body);
}

async fn send_error<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    sqlstate: &str,
    msg: &str,
) -> std::io::Result<()> {
    let mut body = Vec::new();
    for (t, v) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', msg),
    ] {
        body.push(t);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = BytesMut::new();
    message(&mut out, b'E', &body);
    w.write_all(&out).await?;
    w.flush().await
}

/// Server side of SCRAM-SHA-256 (RFC 5802 §5, RFC 7677), without channel binding.
async fn scram_server(client: &mut Box<dyn Stream>, v: &Verifier) -> Result<(), Refusal> {
    let proto = || refuse("08P01", "pg_protocol_error", "invalid SASL exchange");
    let bad_password = || refuse("28P01", "pg_auth_failed", "password authentication failed");
    let mut out = BytesMut::new();
    auth_message(&mut out, 10, b"SCRAM-SHA-256\0\0");
    client.write_all(&out).await.map_err(|_| proto())?;
    let (tag, body) = read_message(client, MAX_AUTH_MESSAGE)
        .await
        .map_err(|_| proto())?;
    if tag != b'p' {
        return Err(proto());
    }
    let nul = body.iter().position(|b| *b == 0).ok_or_else(proto)?;
    if &body[..nul] != b"SCRAM-SHA-256" || body.len() < nul + 5 {
        return Err(proto());
    }
    let first = std::str::from_utf8(&body[nul + 5..]).map_err(|_| proto())?;
    // gs2-header: "n,," or "y,," (no channel binding); "p=" would need -PLUS, not offered.
    let (gs2, bare) = if let Some(b) = first.strip_prefix("n,,") {
        ("n,,", b)
    } else if let Some(b) = first.strip_prefix("y,,") {
        ("y,,", b)
    } else {
        return Err(proto());
    };
    let cnonce = bare
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .ok_or_else(proto)?;
    let sn: [u8; 18] = random_bytes();
    let nonce = format!("{cnonce}{}", B64.encode(sn));
    let server_first = format!("r={nonce},s={},i={SCRAM_ITERATIONS}", B64.encode(v.salt));
    let mut out = BytesMut::new();
    auth_message(&mut out, 11, server_first.as_bytes());
    client.write_all(&out).await.map_err(|_| proto())?;
    let (tag, body) = read_message(client, MAX_AUTH_MESSAGE)
        .await
        .map_err(|_| proto())?;
    if tag != b'p' {
        return Err(proto());
    }
    let fin = std::str::from_utf8(&body).map_err(|_| proto())?;
    let (without_proof, proof) = fin.rsplit_once(",p=").ok_or_else(proto)?;
    let cb = without_proof
        .split(',')
        .find_map(|a| a.strip_prefix("c="))
        .ok_or_else(proto)?;
    let r = without_proof
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .ok_or_else(proto)?;
    if B64.decode(cb).ok().as_deref() != Some(gs2.as_bytes()) || r != nonce {
        return Err(proto());
    }
    let proof = B64.decode(proof).map_err(|_| proto())?;
    let auth = format!("{bare},{server_first},{without_proof}");
    let sig = hmac(&v.stored_key, auth.as_bytes());
    if proof.len() != 32 {
        return Err(bad_password());
    }
    let client_key: Vec<u8> = proof.iter().zip(sig.iter()).map(|(a, b)| a ^ b).collect();
    let stored: [u8; 32] = Sha256::digest(&client_key).into();
    if !iron_broker::ct_eq(&stored, &v.stored_key) {
        return Err(bad_password());
    }
    let server_sig = hmac(&v.server_key, auth.as_bytes());
    let mut out = BytesMut::new();
    auth_message(
        &mut out,
        12,
        format!("v={}", B64.encode(server_sig)).as_bytes(),
    );
    client.write_all(&out).await.map_err(|_| proto())?;
    Ok(())
}

type Upstream = (
    Box<dyn Stream>,
    Vec<(String, String)>,
    (i32, i32),
    UpstreamAddr,
);

/// Where a session's upstream was reached: the address dialled, or the Unix socket of a
/// DSN whose host is a socket directory. A CancelRequest goes to the same place.
#[derive(Debug, Clone)]
enum UpstreamAddr {
    Tcp(SocketAddr),
    Unix(Arc<Path>),
    /// Through the policy's `upstream_proxy` (the proxy resolves the host).
    Proxied {
        policy: Arc<iron_policy::Policy>,
        sources: Arc<iron_broker::SourceResolver>,
        host: String,
        port: u16,
    },
}

impl UpstreamAddr {
    /// A new connection to the same place (for a CancelRequest).
    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Self::Tcp(a) => Box::new(TcpStream::connect(a).await?),
            Self::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
            Self::Proxied {
                policy,
                sources,
                host,
                port,
            } => Box::new(
                crate::upstream::dial_tcp(
                    policy,
                    sources,
                    host,
                    *port,
                    policy.proxy.limits.upstream_connect_timeout,
                )
                .await
                .map_err(std::io::Error::other)?,
            ),
        })
    }
}

/// Logs in to the upstream with the real DSN; returns the stream after `ReadyForQuery`,
/// the server's ParameterStatus values, its BackendKeyData and the address dialled.
async fn login_upstream(
    rt: &Arc<Runtime>,
    dsn: &Dsn,
    params: &[(String, String)],
    spec: &PgSpec,
) -> Result<Upstream, Refusal> {
    let unreachable = |m: String| refuse("08006", "pg_upstream_unreachable", m);
    let (mut stream, addr, tls_cert_hash) = match dsn.socket_path() {
        Some(path) => {
            let timeout = rt.policy().proxy.limits.upstream_connect_timeout;
            let unix = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path))
                .await
                .map_err(|_| unreachable("connecting to the upstream socket timed out".into()))?
                .map_err(|e| {
                    tracing::warn!(socket = %path.display(), error = %e, "cannot reach the upstream's Unix socket");
                    unreachable(format!(
                        "could not connect to the upstream's Unix socket ({})",
                        e.kind()
                    ))
                })?;
            let stream: Box<dyn Stream> = Box::new(unix);
            (stream, UpstreamAddr::Unix(path.into()), None)
        }
        None => dial_tcp(rt, dsn).await?,
    };
    let mut startup: Vec<(&str, &str)> = vec![("user", &dsn.user), ("database", &dsn.dbname)];
    for (k, v) in params {
        if !spec.settings.iter().any(|(s, _)| s.eq_ignore_ascii_case(k)) {
            startup.push((k, v));
        }
    }
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(startup.iter().copied(), &mut buf)
        .map_err(|_| unreachable("bad startup".into()))?;
    stream
        .write_all(&buf)
        .await
        .map_err(|_| unreachable("upstream connection failed".into()))?;
    let password = dsn
        .password
        .clone()
        .unwrap_or_else(|| SecretValue::new(Vec::new()));
    let auth_failed = || {
        refuse(
            "08006",
            "pg_upstream_auth_failed",
            "the relay could not log in to the upstream",
        )
    };
    let allows = |m: &str| dsn.require_auth.iter().any(|a| a == m);
    let mut scram: Option<postgres_protocol::authentication::sasl::ScramSha256> = None;
    // The SASL exchange ended with the server's signature verified.
    let mut scram_done = false;
    let mut statuses = Vec::new();
    let mut keys = (0, 0);
    loop {
        let (tag, body) = read_message(&mut stream, 1024 * 1024)
            .await
            .map_err(|_| unreachable("the upstream closed the connection".into()))?;
        match tag {
            b'R' if body.len() >= 4 => {
                let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let data = &body[4..];
                let mut out = BytesMut::new();
                match code {
                    // AuthenticationOk ends the login only when what was started finished: a
                    // SASL exchange whose server signature was verified (`finish`), and with
                    // `channel_binding=require` a SCRAM-SHA-256-PLUS one (as libpq: an
                    // upstream, or an impostor, must not skip its half of the exchange).
                    0 if !scram_done && (scram.is_some() || dsn.channel_binding_required) => {
                        return Err(refuse(
                            "08006",
                            "pg_upstream_auth_incomplete",
                            "the upstream reported success before authentication completed",
                        ));
                    }
                    0 => {}
                    3 if allows("password") => {
                        postgres_protocol::message::frontend::password_message(
                            password.expose(),
                            &mut out,
                        )
                        .map_err(|_| auth_failed())?;
                    }
                    5 if allows("md5") && data.len() >= 4 => {
                        let salt = [data[0], data[1], data[2], data[3]];
                        let hash = postgres_protocol::authentication::md5_hash(
                            dsn.user.as_bytes(),
                            password.expose(),
                            salt,
                        );
                        postgres_protocol::message::frontend::password_message(
                            hash.as_bytes(),
                            &mut out,
                        )
                        .map_err(|_| auth_failed())?;
                    }
                    10 if allows("scram-sha-256") => {
                        let mechs: Vec<&[u8]> =
                            data.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                        use postgres_protocol::authentication::sasl::{
                            ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256,
                        };
                        let (mech, cb) = match &tls_cert_hash {
                            Some(h) if mechs.contains(&SCRAM_SHA_256_PLUS.as_bytes()) => (
                                SCRAM_SHA_256_PLUS,
                                ChannelBinding::tls_server_end_point(h.clone()),
                            ),
                            Some(_) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                            None => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        };
                        if !mechs.contains(&mech.as_bytes())
                            || (dsn.channel_binding_required && mech != SCRAM_SHA_256_PLUS)
                        {
                            return Err(auth_failed());
                        }
                        let s = ScramSha256::new(password.expose(), cb);
                        postgres_protocol::message::frontend::sasl_initial_response(
                            mech,
                            s.message(),
                            &mut out,
                        )
                        .map_err(|_| auth_failed())?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(auth_failed)?;
                        s.update(data).map_err(|_| auth_failed())?;
                        postgres_protocol::message::frontend::sasl_response(s.message(), &mut out)
                            .map_err(|_| auth_failed())?;
                    }
                    12 => {
                        scram
                            .as_mut()
                            .ok_or_else(auth_failed)?
                            .finish(data)
                            .map_err(|_| auth_failed())?;
                        scram_done = true;
                    }
                    _ => {
                        return Err(refuse(
                            "08006",
                            "pg_upstream_auth_refused",
                            "the upstream asked for an authentication method the DSN does not allow",
                        ));
                    }
                }
                if !out.is_empty() {
                    stream.write_all(&out).await.map_err(|_| auth_failed())?;
                }
            }
            b'S' => statuses.extend(parameter_status(&body)),
            b'K' if body.len() >= 8 => {
                keys = (
                    i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                );
            }
            b'Z' => break,
            b'E' => {
                let (code, msg) = error_fields(&body);
                tracing::warn!(sqlstate = %code, message = %msg, "upstream refused the login");
                return Err(refuse(
                    "08006",
                    "pg_upstream_auth_failed",
                    "the relay could not log in to the upstream",
                ));
            }
            _ => {}
        }
    }
    // role and settings, applied after login
    let mut sql = String::new();
    for (k, v) in &spec.settings {
        sql.push_str(&format!(
            "SELECT pg_catalog.set_config({}, {}, false);",
            literal(k),
            literal(v)
        ));
    }
    if let Some(role) = &spec.role {
        sql.push_str(&format!("SET ROLE {};", ident(role)));
    }
    if !sql.is_empty() {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::query(&sql, &mut buf).map_err(|_| auth_failed())?;
        stream.write_all(&buf).await.map_err(|_| auth_failed())?;
        loop {
            let (tag, body) = read_message(&mut stream, 1024 * 1024)
                .await
                .map_err(|_| auth_failed())?;
            match tag {
                b'E' => {
                    let (code, msg) = error_fields(&body);
                    tracing::warn!(sqlstate = %code, message = %msg, "applying role/settings failed");
                    return Err(refuse(
                        "42501",
                        "pg_settings_failed",
                        "the relay could not apply its role or settings",
                    ));
                }
                b'S' => {
                    if let Some((k, v)) = parameter_status(&body) {
                        statuses.retain(|(n, _)| *n != k);
                        statuses.push((k, v));
                    }
                }
                b'Z' => break,
                _ => {}
            }
        }
    }
    Ok((stream, statuses, keys, addr))
}

/// Dials the DSN's host over TCP (resolved and checked against the deny CIDRs like proxied
/// traffic) and negotiates TLS per `sslmode`; returns the stream, the address dialled and,
/// over TLS, the hash of the server's certificate for channel binding (RFC 5929
/// `tls-server-end-point`).
async fn dial_tcp(
    rt: &Arc<Runtime>,
    dsn: &Dsn,
) -> Result<(Box<dyn Stream>, UpstreamAddr, Option<Vec<u8>>), Refusal> {
    let unreachable = |m: String| refuse("08006", "pg_upstream_unreachable", m);
    let policy = rt.policy();
    let host = iron_policy::normalize_host(&dsn.host)
        .ok_or_else(|| unreachable("invalid upstream host".into()))?;
    let denied = || {
        refuse(
            "08006",
            "destination_address_denied",
            "the upstream address is in a denied range",
        )
    };
    let timeout = policy.proxy.limits.upstream_connect_timeout;
    let proxied = policy
        .proxy
        .upstream_proxy
        .as_ref()
        .is_some_and(|p| p.covers(&host));
    let (mut tcp, addr) = if proxied {
        // Through the `upstream_proxy` with CONNECT; a CancelRequest goes the same way.
        let tcp = crate::upstream::dial_tcp(&policy, &rt.sources, &host, dsn.port, timeout)
            .await
            .map_err(|e| match e.downcast_ref::<crate::upstream::DialError>() {
                Some(crate::upstream::DialError::Denied { .. }) => denied(),
                _ => unreachable(
                    "could not connect to the upstream through the upstream proxy".into(),
                ),
            })?;
        let addr = UpstreamAddr::Proxied {
            policy: policy.clone(),
            sources: rt.sources.clone(),
            host: host.clone(),
            port: dsn.port,
        };
        (tcp, addr)
    } else {
        let addrs = crate::upstream::resolve_checked(&policy, &host, dsn.port)
            .await
            .map_err(|e| match e {
                crate::upstream::DialError::Denied { .. } => denied(),
                crate::upstream::DialError::Resolve { .. } => {
                    unreachable("the upstream host does not resolve".into())
                }
            })?;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(&addrs[..]))
            .await
            .map_err(|_| unreachable("connecting to the upstream timed out".into()))?
            .map_err(|_| unreachable("could not connect to the upstream".into()))?;
        let addr = tcp
            .peer_addr()
            .map_err(|_| unreachable("upstream connection failed".into()))?;
        (tcp, UpstreamAddr::Tcp(addr))
    };
    let _ = tcp.set_nodelay(true);
    let mut tls_cert_hash: Option<Vec<u8>> = None;
    let stream: Box<dyn Stream> = if dsn.sslmode == SslMode::Disable {
        Box::new(tcp)
    } else {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut buf);
        tcp.write_all(&buf)
            .await
            .map_err(|_| unreachable("upstream connection failed".into()))?;
        let answer = tcp
            .read_u8()
            .await
            .map_err(|_| unreachable("upstream connection failed".into()))?;
        match (answer, dsn.sslmode) {
            (b'S', _) => {
                let config = crate::upstream::client_tls_config(&policy, crate::crypto_provider())
                    .map_err(unreachable)?;
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|_| unreachable("invalid upstream host".into()))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|_| {
                        refuse(
                            "08006",
                            "upstream_tls_error",
                            "upstream TLS verification failed",
                        )
                    })?;
                tls_cert_hash = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| iron_broker::tls::server_end_point_hash(c.as_ref()));
                Box::new(tls)
            }
            (_, SslMode::Prefer) => Box::new(tcp),
            _ => {
                return Err(refuse(
                    "08006",
                    "upstream_tls_error",
                    "the upstream does not offer TLS but the DSN requires it",
                ));
            }
        }
    };
    Ok((stream, addr, tls_cert_hash))
}

/// The (name, value) of a ParameterStatus ('S') message body.
fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|b| *b == 0);
    let (k, v) = (parts.next()?, parts.next()?);
    Some((
        String::from_utf8_lossy(k).into_owned(),
        String::from_utf8_lossy(v).into_owned(),
    ))
}

fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut msg) = (String::new(), String::new());
    for f in body.split(|b| *b == 0) {
        match f.first() {
            Some(b'C') => code = String::from_utf8_lossy(&f[1..]).into_owned(),
            Some(b'M') => msg = String::from_utf8_lossy(&f[1..]).into_owned(),
            _ => {}
        }
    }
    (code, msg)
}

/// `s` as an escape-string constant (`E'...'`), read the same whatever the session's
/// `standard_conforming_strings` (which the client may set at startup).
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_take_settings_only_and_never_the_role_or_a_pinned_one() {
        let pinned = vec![
            ("app.tenant".to_string(), "t".to_string()),
            ("transaction_read_only".to_string(), "on".to_string()),
        ];
        let ok = |o: &str| options_settings(o, &pinned).unwrap_or_else(|e| panic!("{o}: {e}"));
        assert_eq!(
            ok(r"-c statement_timeout=5s --search-path=a\ b -cwork_mem=4MB"),
            [
                ("statement_timeout".to_string(), "5s".to_string()),
                ("search_path".to_string(), "a b".to_string()),
                ("work_mem".to_string(), "4MB".to_string()),
            ]
        );
        assert_eq!(
            join_options(&ok(r"--search-path=a\ b\\c")),
            r"-c search_path=a\ b\\c"
        );
        for bad in [
            "-c role=postgres",
            "-c ROLE=postgres",
            "--session-authorization=postgres",
            "-c client_encoding=SJIS",
            "-c app.tenant=other",
            "-c default_transaction_read_only=off",
            "-e",
            "-c",
            "-c statement_timeout",
            "statement_timeout=1",
        ] {
            assert!(options_settings(bad, &pinned).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn literals_do_not_depend_on_standard_conforming_strings() {
        assert_eq!(literal(r"C:\temp"), r"E'C:\\temp'");
        assert_eq!(literal(r"it's\"), r"E'it''s\\'");
    }

    #[test]
    fn dsn_forms() {
        let d = Dsn::parse("postgresql://app%40x:p%2Fw@db.example.com:6543/appdb?sslmode=verify-full&require_auth=scram-sha-256,md5").unwrap();
        assert_eq!(
            (d.host.as_str(), d.port, d.user.as_str(), d.dbname.as_str()),
            ("db.example.com", 6543, "app@x", "appdb")
        );
        assert_eq!(d.password.unwrap().expose(), b"p/w");
        assert_eq!(d.sslmode, SslMode::Require);
        assert_eq!(d.require_auth, vec!["scram-sha-256", "md5"]);
        let d = Dsn::parse(
            "host=127.0.0.1 port=5433 user=app password='it\\'s a \\\\x' dbname=app sslmode=disable",
        )
        .unwrap();
        // libpq conninfo quoting: backslash escapes a quote or a backslash.
        assert_eq!(d.password.as_ref().unwrap().expose(), b"it's a \\x");
        assert_eq!(
            (d.host.as_str(), d.port, d.dbname.as_str()),
            ("127.0.0.1", 5433, "app")
        );
        assert_eq!(d.sslmode, SslMode::Disable);
        assert!(format!("{d:?}").contains("[redacted]"));
        assert!(Dsn::parse("host=x").is_err());
        // An unquoted password with a space: the error does not repeat the fragment.
        let e = Dsn::parse("host=x user=u password=abc s3cretpart dbname=d")
            .err()
            .unwrap_or_default();
        assert!(!e.is_empty() && !e.contains("s3cretpart"), "{e}");
    }

    /// Without `sslmode`, or with `prefer`/`allow`, a server not on this machine is reached
    /// over TLS only (no cleartext fallback a man in the middle could force); a local one
    /// keeps libpq's `prefer`; `disable` is honoured everywhere.
    #[test]
    fn a_remote_server_is_never_reached_in_cleartext_unless_disabled() {
        let mode = |dsn: &str| Dsn::parse(dsn).unwrap().sslmode;
        for remote in [
            "postgresql://u:p@db.example.com/d",
            "postgresql://u:p@10.1.2.3/d?sslmode=prefer",
            "host=db.internal user=u password=p dbname=d sslmode=allow",
            "postgresql://u:p@[2001:db8::1]/d",
        ] {
            assert_eq!(mode(remote), SslMode::Require, "{remote}");
        }
        for local in [
            "postgresql://u:p@localhost/d",
            "postgresql://u:p@127.0.0.1/d?sslmode=prefer",
            "postgresql://u:p@[::1]/d",
            "host=/run/postgresql user=u password=p dbname=d",
            "user=u password=p dbname=d",
        ] {
            assert_eq!(mode(local), SslMode::Prefer, "{local}");
        }
        assert_eq!(
            mode("postgresql://u:p@db.example.com/d?sslmode=disable"),
            SslMode::Disable
        );
    }
}
