//! iron-proxy: an egress, credential-injecting, TLS-intercepting forward proxy.
//!
//! Sandboxed code holds placeholders and sends its traffic through the proxy; the proxy
//! intercepts TLS with its own CA and swaps each placeholder for the real credential, only
//! on the way to the hosts that credential is meant for (DESIGN.md). This crate is the
//! listener, CONNECT handling, TLS interception, the request pipeline, the upstream client,
//! the audit log, metrics, the admin API, hot reload and the command line. Policy parsing
//! and the placeholder plan live in `iron-policy`, certificates in `iron-certs`, secret
//! sources and token minting in `iron-broker`.
//!
//! Modules:
//! - [`server`]: accept loop, CONNECT, tunnels, interception, graceful drain.
//! - [`pipeline`]: the per-request phases bind → plan → resolve → rewrite → forward → audit.
//! - [`upstream`]: policy-checked resolution, the pooled verified client, error mapping.
//! - [`loader`]: loading and fully validating a policy (check, serve, reload).
//! - [`admin`]: the admin API (health, readiness, metrics, secrets, reload, probe).
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: `ProxyError` and the error envelope.
//! - [`audit`]: the JSON audit line.
//! - [`state`]: the state directory, CA bootstrap and CA bundle.
//! - [`sandbox`]: the sandbox environment (`env`, `run`).
//! - [`origin`], [`client`]: a recording local TLS origin and a minimal proxy client (used
//!   by `demo` and the tests).
//! - [`cli`]: the `iron-proxy` command line.
//! - [`ws`]: WebSocket text messages rewritten as they are relayed (`websocket_frames`).

pub mod admin;
pub mod audit;
pub mod body;
pub mod callers;
pub mod cli;
pub mod client;
pub mod demo;
pub mod echo;
pub mod error;
pub mod io;
pub mod loader;
pub mod metrics;
pub mod origin;
pub mod pg;
mod pgfilter;
pub mod pipeline;
pub mod sandbox;
pub mod server;
mod socks;
pub mod state;
pub mod upstream;
pub mod watch;
pub mod workers;
pub mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use iron_broker::{Env, SecretValue, SourceResolver};
use iron_certs::{CertificateAuthority, LeafCache};
use iron_policy::{Diagnostic, Policy, ProxySettings};
use tokio::net::TcpListener;

pub use audit::{AuditRecord, AuditSink, MemoryAudit, StderrAudit};
pub use error::ProxyError;

/// The policy in force and what is built from it. Swapped whole on reload; a request keeps
/// the `Active` it started with.
pub struct Active {
    /// The policy.
    pub policy: Arc<Policy>,
    /// The pooled upstream clients built for it (resolution, deny CIDRs, roots): one per
    /// event loop, so pooled connections stay on the thread that uses them.
    clients: Vec<upstream::UpstreamClient>,
    /// What `clients` were built from: a reload with an equal key keeps them.
    transport: upstream::TransportKey,
    /// Usage counters of each secret, by index into `policy.secrets` (shared with the
    /// runtime's map, so they survive reloads).
    stats: Vec<Arc<SecretStats>>,
    /// Values of `env` sourced static secrets, by secret index, read on first use: the
    /// process environment does not change while it runs.
    env_values: Vec<OnceLock<SecretValue>>,
    /// Each secret's rate limiter, by secret index (`None` without `rate_limit`); shared
    /// with its [`SecretStats`], so a reload that keeps the limit keeps the count.
    limiters: Vec<Option<Arc<Limiter>>>,
    /// Each secret's value in its echoable forms, by secret index, made on first use and
    /// again when the value changes ([`Active::add_echoes`]).
    echo_forms: Vec<Mutex<Option<echo::Forms>>>,
}

/// A secret's request rate limiter (GCRA, `governor`).
pub type Limiter = governor::DefaultDirectRateLimiter;

impl Active {
    /// The policy in force with clients built for it, one per event loop
    /// ([`workers::count`]), and each secret's usage counters from `stats` (by name).
    pub fn new(
        policy: Arc<Policy>,
        tls: &rustls::ClientConfig,
        stats: impl Fn(&str) -> Arc<SecretStats>,
        metrics: &metrics::Metrics,
        sources: &Arc<SourceResolver>,
    ) -> Self {
        Self::reusing(policy, tls, stats, metrics, sources, None)
    }

    /// As [`Active::new`], keeping `previous`'s upstream clients (and their pooled
    /// connections) when they were built from the same [`upstream::TransportKey`].
    pub fn reusing(
        policy: Arc<Policy>,
        tls: &rustls::ClientConfig,
        stats: impl Fn(&str) -> Arc<SecretStats>,
        metrics: &metrics::Metrics,
        sources: &Arc<SourceResolver>,
        previous: Option<&Active>,
    ) -> Self {
        let transport = upstream::TransportKey::of(&policy);
        let clients = match previous {
            Some(p) if p.transport == transport => p.clients.clone(),
            _ => (0..workers::count())
                .map(|_| {
                    upstream::build_client(&policy, tls.clone(), metrics.upstream.clone(), sources)
                })
                .collect(),
        };
        let stats: Vec<Arc<SecretStats>> = policy.secrets.iter().map(|s| stats(&s.name)).collect();
        let env_values = policy.secrets.iter().map(|_| OnceLock::new()).collect();
        let echo_forms = policy.secrets.iter().map(|_| Mutex::new(None)).collect();
        let limiters = policy
            .secrets
            .iter()
            .zip(&stats)
            .map(|(s, st)| s.rate_limit.map(|limit| st.limiter(limit)))
            .collect();
        Self {
            policy,
            clients,
            transport,
            stats,
            env_values,
            limiters,
            echo_forms,
        }
    }

    /// Adds `value`, the value secret `index` put into a request, to `echoes` in its
    /// echoable forms ([`echo::Echoes::add_value`], with the secret's placeholder and
    /// `scrub_response_body`). The forms are made once per value and kept for the next
    /// request that sends it; a changed value (a new token, an edited file) makes them
    /// anew.
    ///
    /// # Panics
    /// When `index` is not a secret of this policy.
    pub fn add_echoes(&self, echoes: &mut echo::Echoes, index: usize, value: &SecretValue) {
        // Held only to copy the forms out (a few reference counts) or make them.
        let mut slot = self.echo_forms[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*slot {
            Some(forms) if forms.is_of(value) => echoes.add_made(forms),
            _ => {
                let secret = &self.policy.secrets[index];
                let forms =
                    echo::Forms::new(value, &secret.placeholder, secret.scrub_response_body);
                echoes.add_made(&forms);
                *slot = Some(forms);
            }
        }
    }

    /// Takes one request from secret `index`'s rate limit, if it has one.
    ///
    /// # Errors
    /// Over the limit: how long until a request would be allowed; the refusal is counted
    /// in the secret's usage (`rate_limited`).
    pub fn check_rate(&self, index: usize) -> Result<(), std::time::Duration> {
        use governor::clock::Clock as _;
        let Some(limiter) = self.limiters.get(index).and_then(Option::as_ref) else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            self.stats[index]
                .rate_limited
                .fetch_add(1, Ordering::Relaxed);
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        })
    }

    /// The pooled upstream client of the calling thread's event loop.
    pub fn client(&self) -> &upstream::UpstreamClient {
        let i = workers::index().min(self.clients.len().saturating_sub(1));
        &self.clients[i]
    }

    /// The usage counters of secret `index` (into `policy.secrets`).
    ///
    /// # Panics
    /// When `index` is not a secret of this policy.
    pub fn stats(&self, index: usize) -> &Arc<SecretStats> {
        &self.stats[index]
    }

    /// The value of static secret `index` from `source`: for an `env` source the value
    /// read on first use and borrowed from this policy's cache (the environment is fixed
    /// for the life of the process), for a file source a fresh read (the resolver re-reads
    /// a file when it changes).
    ///
    /// # Errors
    /// The resolver's [`iron_broker::SourceError`] when the value is missing or unusable;
    /// failures are not cached.
    pub fn static_value(
        &self,
        sources: &SourceResolver,
        index: usize,
        source: &iron_policy::SourceRef,
    ) -> Result<std::borrow::Cow<'_, SecretValue>, iron_broker::SourceError> {
        if !matches!(source.kind, iron_policy::SourceKind::Env(_)) {
            return sources.resolve(source).map(std::borrow::Cow::Owned);
        }
        let cell = &self.env_values[index];
        if let Some(v) = cell.get() {
            return Ok(std::borrow::Cow::Borrowed(v));
        }
        let v = sources.resolve(source)?;
        Ok(std::borrow::Cow::Borrowed(cell.get_or_init(|| v)))
    }
}

/// One secret's counters: its `iron_proxy_injections` counter and its usage for
/// `/v1/secrets`. Kept by name for the life of the process (across reloads); audit records
/// hold it so counting an applied secret takes no map look-up and no lock (two atomic
/// operations: the counter, which is also the usage's `invocations`, and the time).
#[derive(Debug)]
pub struct SecretStats {
    /// The secret's name.
    pub name: Arc<str>,
    injections: prometheus_client::metrics::counter::Counter,
    /// Arrival of the last request counted, in Unix nanoseconds; 0 for none.
    last_used_ns: std::sync::atomic::AtomicI64,
    /// Failures: count and the last reason (the rare path).
    failures: Mutex<(u64, Option<String>)>,
    /// Requests refused by the secret's rate limit.
    rate_limited: AtomicU64,
    /// The rate limiter and the limit it was built for, kept while reloads keep the limit.
    limiter: Mutex<Option<(iron_policy::RateLimit, Arc<Limiter>)>>,
    /// The audit line's entry for this secret at each common location, serialized once
    /// (by the audit writer) and copied into every later line ([`audit::AppliedAt`]).
    pub(crate) audit_entries:
        [std::sync::OnceLock<Option<Box<serde_json::value::RawValue>>>; audit::CACHED_LOCATIONS],
}

impl SecretStats {
    /// Counts one request the secret was applied to, which arrived at `at`.
    pub fn applied(&self, at: time::OffsetDateTime) {
        self.injections.inc();
        let ns = i64::try_from(at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        self.last_used_ns.store(ns.max(1), Ordering::Relaxed);
    }

    /// Counts one request refused because the secret could not be had, for `reason`.
    pub fn failed(&self, reason: &str) {
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.0 += 1;
        f.1 = Some(reason.to_string());
    }

    /// The rate limiter for `limit`: the one already in use when the limit is unchanged
    /// (so a reload does not reset the count), else a new, full one.
    fn limiter(&self, limit: iron_policy::RateLimit) -> Arc<Limiter> {
        let mut slot = self
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((l, limiter)) = slot.as_ref()
            && *l == limit
        {
            return limiter.clone();
        }
        let quota = governor::Quota::per_minute(limit.per_minute).allow_burst(limit.burst);
        let limiter = Arc::new(governor::RateLimiter::direct(quota));
        *slot = Some((limit, limiter.clone()));
        limiter
    }

    /// A copy of the usage counters.
    pub fn usage(&self) -> SecretUsage {
        let (errors, last_error) = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        let ns = self.last_used_ns.load(Ordering::Relaxed);
        SecretUsage {
            invocations: self.injections.get(),
            errors,
            last_error,
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            last_used: (ns != 0)
                .then(|| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)).ok())
                .flatten(),
        }
    }
}

/// Per-secret usage counters for `/v1/secrets` (seed: status counters per tool).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SecretUsage {
    /// Requests the secret was applied to.
    pub invocations: u64,
    /// Requests refused because the secret could not be had.
    pub errors: u64,
    /// The last such failure (names and codes only).
    pub last_error: Option<String>,
    /// Requests refused by the secret's `rate_limit` (429 `rate_limited`).
    pub rate_limited: u64,
    /// When the secret was last applied (arrival of the request); shown as RFC 3339.
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_used: Option<time::OffsetDateTime>,
}

/// The counters of the secret named `name` in `usage`, created (with its injections
/// counter) on first use.
fn stats_for(
    usage: &Mutex<HashMap<String, Arc<SecretStats>>>,
    metrics: &metrics::Metrics,
    name: &str,
) -> Arc<SecretStats> {
    let mut usage = usage
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = usage.get(name) {
        return s.clone();
    }
    let stats = Arc::new(SecretStats {
        name: name.into(),
        injections: metrics
            .injections
            .get_or_create(&metrics::SecretLabel {
                secret: name.to_string(),
            })
            .clone(),
        last_used_ns: std::sync::atomic::AtomicI64::new(0),
        failures: Mutex::new((0, None)),
        rate_limited: AtomicU64::new(0),
        limiter: Mutex::new(None),
        audit_entries: [const { std::sync::OnceLock::new() }; audit::CACHED_LOCATIONS],
    });
    usage.insert(name.to_string(), stats.clone());
    stats
}

/// What a successful reload changed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadSummary {
    /// Secret names now in force.
    pub secrets: Vec<String>,
    /// Names added by this reload.
    pub added: Vec<String>,
    /// Names removed by this reload.
    pub removed: Vec<String>,
    /// Files read.
    pub files: Vec<String>,
    /// Warnings (`FILE:LINE:COL: warning: …`), including settings that need a restart.
    pub warnings: Vec<String>,
}

/// Everything a running proxy shares across connections.
pub struct Runtime {
    active: Arc<ArcSwap<Active>>,
    /// Leaf certificates for intercepted hosts.
    pub leaves: LeafCache,
    /// Secret sources.
    pub sources: Arc<SourceResolver>,
    /// Access tokens of `oauth_token` and `gcp_auth` secrets.
    pub tokens: Arc<iron_broker::tokens::TokenCache>,
    /// Where audit records go (see [`Runtime::emit`]).
    pub audit: Arc<dyn AuditSink>,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Per-secret counters, by secret name; see [`Runtime::stats`].
    usage: Arc<Mutex<HashMap<String, Arc<SecretStats>>>>,
    /// Set once the proxy listener is bound.
    pub listening: std::sync::atomic::AtomicBool,
    /// `pg_dsn` secrets whose relay could not be started (their DSN was absent at start):
    /// `/readyz` reports them until a restart starts the relay.
    pub pg_not_started: Mutex<Vec<String>>,
    /// The Postgres relays running ([`pg::start_all`], [`pg::reconcile`] on reload).
    pub relays: tokio::sync::Mutex<pg::RelaySet>,
    env: Arc<dyn Env>,
    /// `[proxy]` as the process started with it: listeners, connection cap, leaf cache and
    /// CA apply on restart, so a reload compares against these, not the last reload's.
    boot: ProxySettings,
    reload_lock: tokio::sync::Mutex<()>,
    id_prefix: u32,
    ids: AtomicU64,
    /// Set when a drain's grace period is over and open connections are being closed.
    closing: std::sync::atomic::AtomicBool,
}

/// A request id: displayed as 16 hex digits, the process's random prefix then a counter
/// (the `request_id` of audit lines and error envelopes). Copied, never allocated; text
/// only when written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestId {
    prefix: u32,
    n: u32,
}

impl RequestId {
    /// The id as 16 lowercase hex digits (the prefix's 8, then the counter's 8).
    pub fn hex(&self) -> [u8; 16] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        let bits = (u64::from(self.prefix) << 32) | u64::from(self.n);
        for (i, d) in out.iter_mut().enumerate() {
            *d = DIGITS[((bits >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = self.hex();
        f.write_str(std::str::from_utf8(&hex).unwrap_or_default())
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

/// The one crypto provider of the process (DESIGN.md decision 10): aws-lc-rs's defaults,
/// with the AES-128-GCM suites ahead of AES-256-GCM (TLS 1.3's mandatory suite,
/// RFC 8446 §9.1; the order browsers offer). Both legs of an intercepted request encrypt
/// every body byte once more than a tunnel does, and AES-128 does that with 10 rounds
/// instead of 14 (bench/README.md). Nothing is removed: a peer that insists on AES-256
/// or ChaCha20 still gets it.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite as C;
        !matches!(
            s.suite(),
            C::TLS13_AES_128_GCM_SHA256
                | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// RFC 3339 text of `t`, or `None`.
pub(crate) fn rfc3339(t: Option<time::OffsetDateTime>) -> Option<String> {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
}

fn rfc3339_opt<S: serde::Serializer>(
    t: &Option<time::OffsetDateTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&rfc3339(*t), s)
}

impl Runtime {
    /// Builds the runtime for `policy`, intercepting with `ca`, reading secret sources from
    /// `env`, writing audit records to `audit`.
    ///
    /// # Errors
    /// A message when an `upstream_ca` file is unusable or TLS setup fails.
    pub fn new(
        policy: Arc<Policy>,
        ca: Arc<CertificateAuthority>,
        env: Arc<dyn Env>,
        audit: Arc<dyn AuditSink>,
    ) -> Result<Arc<Self>, String> {
        let provider = crypto_provider();
        let leaves = LeafCache::new(
            ca,
            provider.clone(),
            policy.proxy.limits.leaf_cache_size,
            // HTTP/2 first (gRPC needs it), HTTP/1.1 for the rest (RFC 7301).
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )
        .map_err(|e| format!("failed to set up leaf certificates: {e}"))?;
        let tls = upstream::client_tls_config(&policy, provider)?;
        let metrics = Arc::new(metrics::Metrics::default());
        let usage = Arc::new(Mutex::new(HashMap::new()));
        let boot = policy.proxy.clone();
        let sources = Arc::new(SourceResolver::new(env.clone()));
        let active = Arc::new(ArcSwap::from_pointee(Active::new(
            policy,
            &tls,
            |name| stats_for(&usage, &metrics, name),
            &metrics,
            &sources,
        )));
        let tokens = iron_broker::tokens::TokenCache::new(
            Arc::new(upstream::ClientTransport::new(active.clone())),
            sources.clone(),
            iron_broker::tokens::TokenSettings::default(),
        );
        let m = metrics.clone();
        tokens.set_observer(Arc::new(move |secret: &str, result: &str| {
            m.token_mints
                .get_or_create(&metrics::SecretResult {
                    secret: secret.to_string(),
                    result: result.to_string(),
                })
                .inc();
        }));
        let seed = std::collections::hash_map::RandomState::new();
        let id_prefix = std::hash::BuildHasher::hash_one(&seed, std::process::id()) as u32;
        Ok(Arc::new(Self {
            active,
            leaves,
            sources,
            tokens,
            audit,
            metrics,
            usage,
            listening: std::sync::atomic::AtomicBool::new(false),
            pg_not_started: Mutex::new(Vec::new()),
            relays: tokio::sync::Mutex::new(pg::RelaySet::default()),
            env,
            boot,
            reload_lock: tokio::sync::Mutex::new(()),
            id_prefix,
            ids: AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The policy and client in force now.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.active.load().policy.clone()
    }

    /// A new request id, unique within the process (see [`RequestId`]).
    pub fn next_request_id(&self) -> RequestId {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        RequestId {
            prefix: self.id_prefix,
            n: n as u32,
        }
    }

    /// True once a drain's grace period is over and the connections still open are being
    /// closed: a request cut then is written `closed` with `"error": "shutdown"`.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Emits an audit record: counts it in the metrics and the secret usage, then writes it.
    pub fn emit(&self, rec: AuditRecord) {
        self.metrics.observe(&rec);
        // A secret left out (on_failure = open) was not applied; its failure is counted.
        for s in rec
            .secrets
            .iter()
            .filter(|s| !matches!(s.location, audit::AppliedAt::Skipped))
        {
            s.stats.applied(rec.arrived);
        }
        self.audit.emit(rec);
    }

    /// The counters of the secret named `name`, created on first use.
    pub fn stats(&self, name: &str) -> Arc<SecretStats> {
        stats_for(&self.usage, &self.metrics, name)
    }

    /// Records that `secret` could not be had for a request, for `reason`.
    pub fn secret_failed(&self, secret: &str, reason: &str) {
        self.stats(secret).failed(reason);
    }

    /// Reloads the policy from its file(s): loads and validates everything first, then
    /// swaps atomically. Requests in flight finish on the policy they started with. An
    /// invalid policy is refused and the running one stays (DESIGN.md decision 13).
    /// Changing the CA is refused (it needs a restart); a changed `listen`, `admin_listen`
    /// or `max_connections` is accepted with a warning that it applies on restart.
    ///
    /// # Errors
    /// Every diagnostic (errors and warnings) when the new policy is invalid.
    pub async fn reload(self: &Arc<Self>) -> Result<ReloadSummary, Vec<Diagnostic>> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let old = self.policy();
        let path: PathBuf = old.path.clone();
        let env = self.env.clone();
        let (policy, mut diags) = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || loader::load_for_serving(&path, env))
                .await
                .unwrap_or_else(|_| (None, Vec::new()))
        };
        let refuse = |mut diags: Vec<Diagnostic>, metrics: &metrics::Metrics| {
            metrics::Metrics::count(&metrics.reloads, "invalid");
            if diags.is_empty() {
                diags.push(Diagnostic {
                    file: path.clone(),
                    line: 1,
                    col: 1,
                    severity: iron_policy::Severity::Error,
                    message: "reload failed".into(),
                });
            }
            tracing::warn!(
                errors = diags.len(),
                "policy reload refused; the running policy stays"
            );
            for d in &diags {
                tracing::warn!("{d}");
            }
            Err(diags)
        };
        let Some(policy) = policy.filter(|_| !loader::has_errors(&diags)) else {
            return refuse(diags, &self.metrics);
        };
        let at1 = |severity, message: String| Diagnostic {
            file: path.clone(),
            line: 1,
            col: 1,
            severity,
            message,
        };
        // An absent source is only a warning at startup, but a reload must not turn a secret
        // that works now into one that does not (a typo in a variable name or path).
        let mut broken = false;
        for s in policy.secrets.iter().filter(|s| s.enabled && !s.optional) {
            let Some(prev) = old.secret(&s.name) else {
                continue;
            };
            let works_now = prev.enabled
                && prev
                    .sources()
                    .iter()
                    .all(|(_, src)| self.sources.resolve(src).is_ok());
            if !works_now {
                continue;
            }
            for (field, src) in s.sources() {
                if let Err(e) = self.sources.resolve(src)
                    && e.is_missing()
                {
                    broken = true;
                    diags.push(iron_policy::Diagnostic {
                        file: s.file.clone(),
                        line: src.pos.line,
                        col: src.pos.col,
                        severity: iron_policy::Severity::Error,
                        message: format!(
                            "secret `{}`: {}{e}; the running policy's source for it works, so this reload is refused",
                            s.name,
                            if field == "source" { String::new() } else { format!("field {field}: ") }
                        ),
                    });
                }
            }
        }
        if broken {
            return refuse(diags, &self.metrics);
        }
        let boot = &self.boot;
        if policy.proxy.ca != boot.ca {
            diags.push(at1(
                iron_policy::Severity::Error,
                "[proxy] ca_cert/ca_key changed: changing the CA needs a restart".into(),
            ));
            return refuse(diags, &self.metrics);
        }
        // The admin listener keeps its boot address until a restart, but reads the token
        // from the current policy: a reload may not leave a non-loopback listener open.
        if let Some(a) = boot.admin_listen.filter(|a| !a.ip().is_loopback())
            && policy.proxy.admin_token.is_none()
        {
            diags.push(at1(
                iron_policy::Severity::Error,
                format!("[proxy] admin_token removed: the running admin API listens on {a} (not loopback) until a restart, so it must keep requiring a token"),
            ));
            return refuse(diags, &self.metrics);
        }
        for (changed, key) in [
            (policy.proxy.listen != boot.listen, "listen"),
            (
                policy.proxy.admin_listen != boot.admin_listen,
                "admin_listen",
            ),
            (
                policy.proxy.limits.max_connections != boot.limits.max_connections,
                "limits.max_connections",
            ),
            (
                policy.proxy.limits.leaf_cache_size != boot.limits.leaf_cache_size,
                "limits.leaf_cache_size",
            ),
        ] {
            // Said on every reload until a restart applies it.
            if changed {
                diags.push(at1(
                    iron_policy::Severity::Warning,
                    format!("[proxy] {key} differs from the running process's: it takes effect on restart"),
                ));
            }
        }
        let tls = match upstream::client_tls_config(&policy, crypto_provider()) {
            Ok(t) => t,
            Err(e) => {
                diags.push(at1(iron_policy::Severity::Error, format!("[proxy] {e}")));
                return refuse(diags, &self.metrics);
            }
        };
        // Postgres relays follow the policy: new, switched-on and moved ones start now (a
        // `listen` that cannot be bound refuses the whole reload), removed ones stop
        // accepting once the policy is swapped, their open sessions drained.
        let retired = match pg::reconcile(self, &policy).await {
            Ok((retired, warnings)) => {
                diags.extend(
                    warnings
                        .into_iter()
                        .map(|w| at1(iron_policy::Severity::Warning, w)),
                );
                retired
            }
            Err(errors) => {
                diags.extend(
                    errors
                        .into_iter()
                        .map(|e| at1(iron_policy::Severity::Error, e)),
                );
                return refuse(diags, &self.metrics);
            }
        };
        let policy = Arc::new(policy);
        let next = Active::reusing(
            policy.clone(),
            &tls,
            |name| self.stats(name),
            &self.metrics,
            &self.sources,
            Some(&self.active.load()),
        );
        let names =
            |p: &Policy| -> Vec<String> { p.secrets.iter().map(|s| s.name.clone()).collect() };
        let (new_names, old_names) = (names(&policy), names(&old));
        let summary = ReloadSummary {
            added: new_names
                .iter()
                .filter(|n| !old_names.contains(n))
                .cloned()
                .collect(),
            removed: old_names
                .iter()
                .filter(|n| !new_names.contains(n))
                .cloned()
                .collect(),
            secrets: new_names,
            files: policy
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect(),
            warnings: diags.iter().map(ToString::to_string).collect(),
        };
        self.active.store(Arc::new(next));
        if !retired.is_empty() {
            let grace = policy.proxy.limits.shutdown_grace;
            tokio::spawn(pg::drain_all(retired, grace));
        }
        metrics::Metrics::count(&self.metrics.reloads, "ok");
        tracing::info!(
            secrets = summary.secrets.len(),
            added = ?summary.added,
            removed = ?summary.removed,
            "policy reloaded"
        );
        // Said here too, so a reload by file change or SIGHUP (nobody reads the summary)
        // still tells the operator what did not apply.
        for w in &summary.warnings {
            tracing::warn!("reload: {w}");
        }
        Ok(summary)
    }
}

/// Where a listener is in its shutdown; connections watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// Not accepting; each connection finishes its request in flight, then closes.
    Draining,
    /// The grace period is over: connections, tunnels and upgraded connections still open
    /// are closed now, and their requests' audit records written.
    Closing,
}

/// How long connections closed at the end of a drain get to write their audit records.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A running proxy listener.
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    rt: Arc<Runtime>,
    shutdown: tokio::sync::watch::Sender<Phase>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting connections at once (open connections finish on their own).
    pub fn stop(&self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }

    /// Stops accepting, asks open connections to finish their current request and close,
    /// and waits up to `grace` for them. Connections still open then (a stalled upload, a
    /// long response, a tunnel) are closed, and each request cut is written to the audit
    /// log as `closed` (`upgraded` for a WebSocket) with `"error": "shutdown"` (waiting at
    /// most 2 s more for that).
    /// Returns true when everything drained within `grace`.
    pub async fn drain(mut self, grace: std::time::Duration) -> bool {
        // No longer accepting: `/readyz` says so, so a load balancer stops sending.
        self.rt.listening.store(false, Ordering::Relaxed);
        let _ = self.shutdown.send(Phase::Draining);
        let Some(mut task) = self.task.take() else {
            return true;
        };
        if tokio::time::timeout(grace, &mut task).await.is_ok() {
            return true;
        }
        self.rt.closing.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(Phase::Closing);
        if tokio::time::timeout(CLOSE_WAIT, &mut task).await.is_err() {
            tracing::warn!("connections still open after being closed");
            task.abort();
        }
        false
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `addr` and serves the proxy on it in a background task.
///
/// # Errors
/// The bind error.
pub async fn start(rt: Arc<Runtime>, addr: SocketAddr) -> std::io::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (shutdown, rx) = tokio::sync::watch::channel(Phase::Running);
    rt.listening.store(true, Ordering::Relaxed);
    let task = tokio::spawn(server::serve(rt.clone(), listener, rx));
    Ok(Running {
        addr,
        rt,
        shutdown,
        task: Some(task),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forms kept per secret follow its value: a token minted anew (another value) is
    /// scrubbed from the next response, and the old one no longer is.
    #[test]
    fn echo_forms_follow_a_changed_value() {
        let policy = Policy::parse(
            "version = 1\n[proxy]\nlisten = \"127.0.0.1:0\"\n\
             [[secrets]]\nname = \"TOKEN\"\ntype = \"http\"\n\
             source = { env = \"UNUSED_TOKEN_VAR\" }\nhosts = [\"api.example.com\"]\n",
            std::path::Path::new("test.toml"),
        )
        .unwrap();
        let tls = upstream::client_tls_config(&policy, crypto_provider()).unwrap();
        let metrics = metrics::Metrics::default();
        let usage = Mutex::new(HashMap::new());
        let active = Active::new(
            Arc::new(policy),
            &tls,
            |name| stats_for(&usage, &metrics, name),
            &metrics,
            &Arc::new(SourceResolver::new(Arc::new(
                HashMap::<String, String>::new(),
            ))),
        );
        let scrubbed = |value: &SecretValue, body: &[u8]| {
            let mut echoes = echo::Echoes::new();
            active.add_echoes(&mut echoes, 0, value);
            echoes
                .scrub(body, echo::Scope::Body, false)
                .map(|(out, _)| String::from_utf8(out).unwrap())
        };
        let old = SecretValue::new(b"first-token-value".to_vec());
        let new = SecretValue::new(b"second-token-value".to_vec());
        let body = b"got first-token-value and second-token-value";
        assert_eq!(
            scrubbed(&old, body).as_deref(),
            Some("got TOKEN and second-token-value")
        );
        // The same bytes in a new allocation (a file read again) use the kept forms.
        let again = SecretValue::new(b"first-token-value".to_vec());
        assert_eq!(
            scrubbed(&again, body).as_deref(),
            Some("got TOKEN and second-token-value")
        );
        assert_eq!(
            scrubbed(&new, body).as_deref(),
            Some("got first-token-value and TOKEN")
        );
    }

    #[test]
    fn secret_stats_count_uses_and_failures_and_share_the_metric() {
        let metrics = metrics::Metrics::default();
        let usage = Mutex::new(HashMap::new());
        let stats = stats_for(&usage, &metrics, "GITHUB_TOKEN");
        assert!(Arc::ptr_eq(
            &stats,
            &stats_for(&usage, &metrics, "GITHUB_TOKEN")
        ));
        assert_eq!(stats.usage().invocations, 0);
        assert_eq!(stats.usage().last_used, None);
        let first = time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789)
            .expect("valid time");
        let second = first + time::Duration::seconds(5);
        stats.applied(first);
        stats.applied(second);
        stats.failed("environment variable GH is not set");
        let u = stats.usage();
        assert_eq!(u.invocations, 2);
        assert_eq!(u.last_used, Some(second));
        assert_eq!(u.errors, 1);
        assert_eq!(
            u.last_error.as_deref(),
            Some("environment variable GH is not set")
        );
        assert!(
            metrics
                .encode()
                .contains("iron_proxy_injections_total{secret=\"GITHUB_TOKEN\"} 2"),
            "{}",
            metrics.encode()
        );
    }
}
