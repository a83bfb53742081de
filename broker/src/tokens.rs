//! Access tokens for `oauth_token` and `gcp_auth` secrets: minting (the four OAuth grants,
//! RFC 7523 JWT bearer, Google service accounts) and a per-secret cache.
//!
//! The cache refreshes ahead of expiry (a skew of a fifth of the token's lifetime, clamped
//! to 1 s–5 min, not a fixed 10 s — REFERENCE.md D26), runs at most one mint per secret at
//! a time (single-flight), and runs each mint on its own task, so a request that stops
//! waiting never cancels or poisons it (REFERENCE.md D1). Retryable failures (network,
//! 5xx, 429, malformed responses) are retried with jittered exponential backoff inside a
//! mint; after a failed mint the secret cools down (1 s, doubling to [`MAX_COOL_DOWN`])
//! before traffic may start another; an OAuth error code such as `invalid_grant` marks the
//! secret failed until its inputs change. A token without `expires_in` lives [`DEFAULT_LIFETIME`]. A refresh token
//! the IdP rotates is kept in memory for the next refresh. The IdP's response body is never
//! logged or returned: errors carry status codes and OAuth error codes only.
//!
//! Token-endpoint calls go through a [`TokenTransport`] supplied by the proxy, so they use
//! the same resolution, deny CIDRs, upstream roots and timeouts as proxied traffic, and
//! never follow redirects.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use iron_policy::{ClientAuth, GcpSpec, Grant, OAuthSpec, Secret, SecretKind};
use tokio::time::Instant;

use crate::{SecretValue, SourceResolver};

/// Lifetime assumed for a token whose response has no `expires_in`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Shortest lifetime taken from an `expires_in` (1 s): an IdP answering `expires_in: 0`
/// would otherwise be called for every request.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Longest lifetime taken from an `expires_in` (1 day): a huge value would overflow the
/// expiry arithmetic; the token is refreshed at the latest then.
pub const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// Google's token endpoint, used when a key file names none.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The RFC 7523 grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Largest token response read, in bytes.
pub const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;

/// The future a [`TokenTransport`] returns: the whole response, or why there is none.
pub type TransportFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Vec<u8>>, TransportError>> + Send>>;

/// Sends one token-endpoint request. Implemented by the proxy over its upstream client.
pub trait TokenTransport: Send + Sync {
    /// Sends `req` (an absolute `https` URI) and returns the whole response. Only a failure
    /// before the request could reach the endpoint (resolution, connect, TLS handshake,
    /// denied address) is an error; a request that may have been processed and got no
    /// usable answer (a reset or timeout after it was sent, a `2xx` whose body broke off)
    /// is reported as an empty `200`, which parses as [`MintError::Malformed`].
    fn send(&self, req: http::Request<Vec<u8>>) -> TransportFuture;
}

/// A token-endpoint request that got no HTTP response (DNS, connect, TLS, timeout, denied
/// address). The message names the failure, never a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// Why a mint failed. Never carries a token, secret or response body, but for the new
/// refresh token of [`MintError::RotatedWithoutAccess`], which must not be lost (its
/// `Debug` is redacted and `Display` never shows it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// The IdP answered with an OAuth error code (RFC 6749 §5.2).
    #[error("token endpoint refused the grant: {code}")]
    Rejected {
        /// The OAuth error code, e.g. `invalid_grant`.
        code: String,
    },
    /// The IdP answered with an HTTP error and no OAuth error code.
    #[error("token endpoint answered http {0}")]
    Status(u16),
    /// The endpoint answered 429 or 503 with a `Retry-After` (RFC 9110 §10.2.3): no new
    /// request is sent to it before `retry_after` has passed (at most [`MAX_RETRY_AFTER`]).
    #[error("{message}; retry after {} s", .retry_after.as_secs().max(1))]
    Throttled {
        /// What answered and how, e.g. `token endpoint answered http 429`.
        message: String,
        /// How long the endpoint asked us to wait.
        retry_after: Duration,
    },
    /// No response.
    #[error("token endpoint unreachable: {0}")]
    Transport(String),
    /// A success response that is not a usable token response.
    #[error("token endpoint sent an invalid token response")]
    Malformed,
    /// A success response with a new refresh token but no usable access token: the IdP
    /// rotated the refresh token (RFC 6749 §6), so the old one must not be sent again and
    /// this one must be kept; the next refresh uses it.
    #[error("token endpoint rotated the refresh token but sent no usable access token")]
    RotatedWithoutAccess(SecretValue),
    /// A credential input could not be read.
    #[error("{0}")]
    Source(String),
    /// A key or key file is unusable.
    #[error("{0}")]
    Key(String),
    /// A refresh with a refresh token the IdP is known to rotate got no usable answer after
    /// the request was sent ([`MintError::answer_may_be_lost`]): the IdP may have rotated
    /// it, and sending it again could trip reuse detection (RFC 9700 §4.14.2), which
    /// revokes the whole grant. Final until the configured refresh token changes.
    #[error(
        "the token endpoint's answer to a refresh was lost after the request was sent, and this IdP rotates refresh tokens: the token may have been rotated, so it is not sent again (rotation_interrupted); put a current refresh token in the source, or let iron-token-broker hold this grant"
    )]
    RotationInterrupted,
    /// The token broker answered with a definite refusal (401, 404, 422: wrong token,
    /// unknown or dead credential). Not retried within a mint, since asking again at once
    /// gets the same answer, and not kept either: the broker's operator may revive the
    /// credential, and the next request asks again.
    #[error("{0}")]
    Broker(String),
}

impl MintError {
    /// True when the failure stands until an input changes (the secret is marked failed):
    /// an OAuth refusal or an unusable input, not a broker's answer about its own state.
    pub fn is_final(&self) -> bool {
        !self.is_retryable() && !matches!(self, Self::Broker(_))
    }

    /// True when trying again later may succeed without any change.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status(s) => *s >= 500 || *s == 429 || *s == 408,
            Self::Transport(_)
            | Self::Malformed
            | Self::RotatedWithoutAccess(_)
            | Self::Throttled { .. } => true,
            Self::Rejected { code } => {
                matches!(
                    code.as_str(),
                    "temporarily_unavailable" | "server_error" | "slow_down"
                )
            }
            Self::Source(_) | Self::Key(_) | Self::Broker(_) | Self::RotationInterrupted => false,
        }
    }

    /// True when the request reached the token endpoint and its answer is unusable, so the
    /// IdP may have acted on it (rotated a refresh token): a `2xx` that is not a token
    /// response (a [`TokenTransport`] also reports an answer lost after the request was
    /// sent as an empty `200`), or a gateway's 502 or 504 (Cloudflare's 520 and 524 too:
    /// the origin took the request and its answer was unusable or late). 500, 503 and 429
    /// come from the IdP itself, before or instead of a rotation; Cloudflare's 521–523 say
    /// the origin was not reached.
    pub fn answer_may_be_lost(&self) -> bool {
        matches!(self, Self::Malformed | Self::Status(502 | 504 | 520 | 524))
    }

    /// How long the endpoint asked us to wait before the next request, when it said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Longest `Retry-After` waited within a mint (2 s); a longer one ends the mint and sets
/// the secret's cool-down instead.
pub const IN_MINT_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Longest wait taken from a `Retry-After` (10 min): a larger value (or a date far ahead)
/// is cut to this, so a misconfigured endpoint cannot park a secret for days; a policy
/// reload that changes the secret's inputs ends the wait at once.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The wait a `429`/`503` response asks for in its `Retry-After` header (RFC 9110
/// §10.2.3: delay-seconds or an HTTP-date), at most [`MAX_RETRY_AFTER`]. `None` for any
/// other status, no header, or a value that is neither form (the caller's own backoff then
/// applies). A date in the past is a zero wait.
pub fn retry_after(status: u16, headers: &http::HeaderMap) -> Option<Duration> {
    if status != 429 && status != 503 {
        return None;
    }
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than fit are "a very long time", not an error.
        Duration::from_secs(
            v.parse::<u64>()
                .unwrap_or(u64::MAX)
                .min(MAX_RETRY_AFTER.as_secs()),
        )
    } else {
        httpdate::parse_http_date(v)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// `err` turned into [`MintError::Throttled`] when the response asked for a wait.
fn throttled(err: MintError, status: u16, headers: &http::HeaderMap) -> MintError {
    with_wait(err, retry_after(status, headers))
}

/// `err` as [`MintError::Throttled`] when there is a `wait` and `err` may pass with time.
fn with_wait(err: MintError, wait: Option<Duration>) -> MintError {
    match wait {
        Some(retry_after) if err.is_retryable() => MintError::Throttled {
            message: err.to_string(),
            retry_after,
        },
        _ => err,
    }
}

/// `d` in whole seconds, rounded up, at least 1: a `Retry-After` value (RFC 9110 §10.2.3)
/// that never tells a client to come back before the wait is over.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Why the proxy cannot have a token for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token can be had now (502 `credential_unavailable`).
    #[error("credential unavailable: {reason}")]
    Unavailable {
        /// What failed (codes and names only).
        reason: String,
    },
    /// The first mint is still running past the wait (503 `credential_pending`).
    #[error("first token mint still in progress")]
    Pending,
}

/// An access token.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token.
    pub value: SecretValue,
    /// When it expires.
    pub expires_at: Instant,
    /// Its lifetime when issued.
    pub lifetime: Duration,
    /// False when the IdP sent no usable `expires_in` and `lifetime` is
    /// [`DEFAULT_LIFETIME`].
    pub lifetime_given: bool,
    /// A rotated refresh token, if the IdP sent one.
    pub refresh_token: Option<SecretValue>,
}

impl Token {
    /// When to start refreshing: a fifth of the lifetime before expiry, clamped to
    /// 100 ms–5 min (so a token living a few seconds is refreshed ahead, not after expiry).
    pub fn refresh_at(&self) -> Instant {
        let skew = (self.lifetime / 5).clamp(Duration::from_millis(100), Duration::from_secs(300));
        self.expires_at.checked_sub(skew).unwrap_or(self.expires_at)
    }
}

/// Tunables of the cache.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// How long a request waits for a mint before giving up. Default 10 s.
    pub wait: Duration,
    /// Time allowed for one token-endpoint request. Default 15 s.
    pub request_timeout: Duration,
    /// Attempts per mint for retryable failures. Default 3.
    pub attempts: u32,
    /// First backoff; doubled per attempt, with up to 50 % jitter. Default 250 ms.
    pub backoff: Duration,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            attempts: 3,
            backoff: Duration::from_millis(250),
        }
    }
}

/// Public state of one token secret, for status reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    /// Time to expiry of the cached token, if any.
    pub expires_in: Option<Duration>,
    /// Set when the secret failed terminally (until its inputs change).
    pub failed: Option<String>,
    /// The last error, if the last mint failed.
    pub last_error: Option<String>,
    /// Token-endpoint requests made for this secret.
    pub mints: u64,
}

type MintFuture = Shared<BoxFuture<'static, Result<Token, MintError>>>;

#[derive(Default)]
struct Entry {
    fingerprint: u64,
    token: Option<Token>,
    rotated_refresh: Option<SecretValue>,
    /// Keyed hash of the configured `refresh_token` input that `rotated_refresh` descends
    /// from: a change of other inputs (scopes, headers) keeps the rotated token, since the
    /// configured one may be rotated out at the IdP (reuse detection would revoke the grant).
    refresh_seed: u64,
    failed: Option<String>,
    last_error: Option<String>,
    /// After a failed mint: no new mint before this instant (requests are answered with
    /// `last_error` meanwhile), so traffic cannot drive calls to a failing IdP.
    cool_until: Option<Instant>,
    /// Failed mints in a row (the cool-down doubles with each, up to [`MAX_COOL_DOWN`]).
    failures: u32,
    inflight: Option<MintFuture>,
    /// A mint for earlier inputs descending from the same configured refresh token, still
    /// running when the inputs changed: the next mint waits for it, since it may rotate the
    /// refresh token (presenting the old one meanwhile would be reuse, RFC 9700 §4.14.2).
    prior: Option<MintFuture>,
    mints: u64,
}

/// The longest pause between failed mints of one secret.
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(60);

/// The resolved inputs of one mint.
struct Inputs {
    fields: BTreeMap<String, SecretValue>,
    headers: Vec<(String, SecretValue)>,
}

/// Per-secret access-token cache. Cheap to share (`Arc`).
pub struct TokenCache {
    transport: Arc<dyn TokenTransport>,
    sources: Arc<SourceResolver>,
    settings: TokenSettings,
    entries: Mutex<HashMap<String, Entry>>,
    hasher: std::collections::hash_map::RandomState,
    observer: std::sync::OnceLock<MintObserver>,
}

/// Called after every mint with the secret name and `ok` or the error kind (`rejected`,
/// `status`, `transport`, `malformed`, `source`, `key`). For metrics.
pub type MintObserver = Arc<dyn Fn(&str, &str) + Send + Sync>;

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A cache minting through `transport`, reading inputs with `sources`.
    pub fn new(
        transport: Arc<dyn TokenTransport>,
        sources: Arc<SourceResolver>,
        settings: TokenSettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            transport,
            sources,
            settings,
            entries: Mutex::new(HashMap::new()),
            hasher: std::collections::hash_map::RandomState::new(),
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Sets the mint observer (once; later calls are ignored).
    pub fn set_observer(&self, observer: MintObserver) {
        let _ = self.observer.set(observer);
    }

    /// The access token for `secret` (an `oauth_token` or `gcp_auth` secret), minting or
    /// refreshing as needed.
    ///
    /// # Errors
    /// [`TokenError::Unavailable`] when an input is missing, the secret failed terminally,
    /// or the mint failed; [`TokenError::Pending`] when the first mint outlasts the wait.
    pub async fn token(self: &Arc<Self>, secret: &Secret) -> Result<SecretValue, TokenError> {
        let unavailable = |reason: String| TokenError::Unavailable { reason };
        let inputs = self
            .inputs(secret)
            .map_err(|e| unavailable(e.to_string()))?;
        let fingerprint = self.fingerprint(secret, &inputs);
        let seed = self.refresh_seed(&inputs);
        let now = Instant::now();
        let (wait_on, had_token) = {
            let mut entries = self
                .entries
                .lock()
                .map_err(|_| unavailable("token cache poisoned".into()))?;
            let entry = entries.entry(secret.name.clone()).or_default();
            if entry.fingerprint != fingerprint {
                // Inputs changed (or first use): start over, clearing any failure, but keep
                // a rotated refresh token while the configured one it replaced is unchanged.
                // A mint still running for the old inputs is waited for by the next one.
                let same_seed = entry.refresh_seed == seed;
                let rotated_refresh = entry.rotated_refresh.take().filter(|_| same_seed);
                let prior = entry
                    .inflight
                    .take()
                    .or_else(|| entry.prior.take())
                    .filter(|_| same_seed);
                *entry = Entry {
                    fingerprint,
                    mints: entry.mints,
                    rotated_refresh,
                    refresh_seed: seed,
                    prior,
                    ..Entry::default()
                };
            }
            if let Some(reason) = &entry.failed {
                return Err(unavailable(reason.clone()));
            }
            // Served while more than a safety margin remains: a tenth of the lifetime, at
            // most 1 s (a token of a few seconds would otherwise never be served from cache).
            if let Some(t) = &entry.token
                && t.expires_at > now + (t.lifetime / 10).min(Duration::from_secs(1))
            {
                let value = t.value.clone();
                if now >= t.refresh_at()
                    && entry.inflight.is_none()
                    && entry.cool_until.is_none_or(|until| now >= until)
                {
                    self.start(entry, secret, inputs, fingerprint);
                }
                return Ok(value);
            }
            if entry.inflight.is_none() {
                if let Some(until) = entry.cool_until
                    && now < until
                {
                    let reason = entry
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "token mint failed".into());
                    return Err(unavailable(format!(
                        "{reason} (next attempt in {} s)",
                        until.saturating_duration_since(now).as_secs().max(1)
                    )));
                }
                self.start(entry, secret, inputs, fingerprint);
            }
            (
                entry.inflight.clone(),
                entry.token.is_some() || entry.mints > 1,
            )
        };
        let Some(fut) = wait_on else {
            return Err(unavailable("no token mint running".into()));
        };
        match tokio::time::timeout(self.settings.wait, fut).await {
            Ok(Ok(t)) => Ok(t.value),
            Ok(Err(e)) => Err(unavailable(e.to_string())),
            Err(_) if !had_token => Err(TokenError::Pending),
            Err(_) => Err(unavailable("token mint timed out".into())),
        }
    }

    /// The state of `name`'s token, if it was ever requested.
    pub fn status(&self, name: &str) -> Option<TokenStatus> {
        let entries = self.entries.lock().ok()?;
        let e = entries.get(name)?;
        let now = Instant::now();
        Some(TokenStatus {
            expires_in: e
                .token
                .as_ref()
                .map(|t| t.expires_at.saturating_duration_since(now)),
            failed: e.failed.clone(),
            last_error: e.last_error.clone(),
            mints: e.mints,
        })
    }

    fn start(
        self: &Arc<Self>,
        entry: &mut Entry,
        secret: &Secret,
        inputs: Inputs,
        fingerprint: u64,
    ) {
        entry.mints += 1;
        let this = self.clone();
        let secret = secret.clone();
        let seed = entry.refresh_seed;
        let prior = entry.prior.take();
        let handle = tokio::spawn(async move {
            // The refresh token is read when the mint starts: after a prior mint of the same
            // grant has stored the one the IdP rotated to.
            if let Some(prior) = prior {
                let _ = prior.await;
            }
            let rotated = this.rotated_refresh(&secret.name, seed);
            let result = this.mint_with_retries(&secret, &inputs, rotated).await;
            this.store(&secret.name, fingerprint, seed, &result);
            result
        });
        let fut = async move {
            handle
                .await
                .unwrap_or_else(|_| Err(MintError::Transport("token mint task ended".into())))
        }
        .boxed()
        .shared();
        entry.inflight = Some(fut);
    }

    /// The refresh token the IdP last rotated `name`'s grant to, while it descends from the
    /// configured refresh token with keyed hash `seed`.
    fn rotated_refresh(&self, name: &str, seed: u64) -> Option<SecretValue> {
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(name)?;
        entry
            .rotated_refresh
            .clone()
            .filter(|_| entry.refresh_seed == seed)
    }

    fn store(&self, name: &str, fingerprint: u64, seed: u64, result: &Result<Token, MintError>) {
        if let Some(observe) = self.observer.get() {
            let kind = match result {
                Ok(_) => "ok",
                Err(MintError::Rejected { .. }) => "rejected",
                Err(MintError::Status(_)) => "status",
                Err(MintError::Throttled { .. }) => "throttled",
                Err(MintError::Transport(_)) => "transport",
                Err(MintError::Malformed | MintError::RotatedWithoutAccess(_)) => "malformed",
                Err(MintError::RotationInterrupted) => "interrupted",
                Err(MintError::Source(_)) => "source",
                Err(MintError::Key(_)) => "key",
                Err(MintError::Broker(_)) => "broker",
            };
            observe(name, kind);
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let Some(entry) = entries.get_mut(name) else {
            return;
        };
        if entry.fingerprint != fingerprint {
            // Inputs changed while minting: the token belongs to old inputs, but a refresh
            // token the IdP rotated meanwhile replaces the configured one if that is the
            // same (the old one may be rotated out).
            let rotated = match result {
                Ok(t) => t.refresh_token.as_ref(),
                Err(MintError::RotatedWithoutAccess(rt)) => Some(rt),
                Err(_) => None,
            };
            if let Some(rt) = rotated
                && entry.refresh_seed == seed
            {
                entry.rotated_refresh = Some(rt.clone());
            }
            return;
        }
        entry.inflight = None;
        match result {
            Ok(t) => {
                if let Some(rt) = &t.refresh_token {
                    entry.rotated_refresh = Some(rt.clone());
                }
                entry.token = Some(t.clone());
                entry.last_error = None;
                entry.cool_until = None;
                entry.failures = 0;
            }
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "token mint failed");
                if let MintError::RotatedWithoutAccess(rt) = e {
                    // The IdP rotated the refresh token: the next mint uses the new one.
                    entry.rotated_refresh = Some(rt.clone());
                }
                entry.last_error = Some(e.to_string());
                if e.is_final() {
                    entry.failed = Some(e.to_string());
                    entry.token = None;
                } else if !matches!(e, MintError::Broker(_)) {
                    // A broker's refusal is asked again at once (its operator may revive the
                    // credential); the broker guards its IdP itself.
                    // The endpoint's own `Retry-After` when it gave one and asked for longer.
                    entry.failures = entry.failures.saturating_add(1);
                    let wait = cool_down(entry.failures).max(e.retry_after().unwrap_or_default());
                    entry.cool_until = Some(Instant::now() + wait);
                }
            }
        }
    }

    async fn mint_with_retries(
        &self,
        secret: &Secret,
        inputs: &Inputs,
        rotated: Option<SecretValue>,
    ) -> Result<Token, MintError> {
        let mut delay = self.settings.backoff;
        let mut attempt = 1;
        // A refresh_token grant whose IdP has rotated the token once (it sent back one that
        // differs from the configured one) rotates: an answer lost after the request was
        // sent is never replayed with the same token (the broker does the same).
        let rotating = matches!(&secret.kind, SecretKind::OAuth(o) if o.grant == Grant::RefreshToken)
            && rotated.as_ref().is_some_and(|r| {
                inputs
                    .fields
                    .get("refresh_token")
                    .is_none_or(|c| c.expose() != r.expose())
            });
        loop {
            let r = tokio::time::timeout(
                self.settings.request_timeout,
                mint(&self.transport, secret, inputs, rotated.as_ref()),
            )
            .await
            .map_or(Err(None), |r| r.map_err(Some))
            .map_err(|e| match e {
                // Our own deadline: the request may have been sent and answered.
                None if rotating => MintError::RotationInterrupted,
                None => MintError::Transport("token request timed out".into()),
                Some(e) if rotating && e.answer_may_be_lost() => {
                    tracing::error!(secret = %secret.name, error = %e, "the token endpoint's answer was lost after a rotating refresh token was sent; not sending it again");
                    MintError::RotationInterrupted
                }
                Some(e) => e,
            });
            match r {
                // Retrying would send the refresh token the IdP just rotated out; the cache
                // keeps the new one for the next mint.
                Err(e @ MintError::RotatedWithoutAccess(_)) => return Err(e),
                // A `Retry-After` of a few seconds is waited within the mint (a broker's
                // `Retry-After: 1`, a rate limiter's short pause); a longer one ends it, and
                // the cool-down after it keeps every caller away for that long.
                Err(e)
                    if e.is_retryable()
                        && attempt < self.settings.attempts
                        && e.retry_after().is_none_or(|w| w <= IN_MINT_RETRY_AFTER) =>
                {
                    tracing::debug!(secret = %secret.name, attempt, error = %e, "token mint failed; retrying");
                    let pause = delay.max(e.retry_after().unwrap_or_default());
                    tokio::time::sleep(pause + jitter(delay / 2)).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => {
                    if other.is_ok() {
                        tracing::debug!(secret = %secret.name, "minted access token");
                    }
                    return other;
                }
            }
        }
    }

    fn inputs(&self, secret: &Secret) -> Result<Inputs, MintError> {
        let read = |field: &str, src| {
            self.sources
                .resolve(src)
                .map_err(|e| MintError::Source(format!("field {field}: {e}")))
        };
        match &secret.kind {
            SecretKind::OAuth(o) => Ok(Inputs {
                fields: o
                    .fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), read(k, v)?)))
                    .collect::<Result<_, MintError>>()?,
                headers: o
                    .token_endpoint_headers
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), read(k, v)?)))
                    .collect::<Result<_, MintError>>()?,
            }),
            SecretKind::Gcp(g) => Ok(Inputs {
                fields: [("keyfile".to_string(), read("keyfile", &g.keyfile)?)].into(),
                headers: Vec::new(),
            }),
            SecretKind::Brokered(b) => Ok(Inputs {
                fields: match &b.token {
                    Some(t) => [("broker.token".to_string(), read("broker.token", t)?)].into(),
                    None => Default::default(),
                },
                headers: Vec::new(),
            }),
            SecretKind::Static(_) | SecretKind::Pg(_) => {
                Err(MintError::Source("not a token secret".into()))
            }
        }
    }

    /// A keyed hash of the configured `refresh_token` input (0 when there is none).
    fn refresh_seed(&self, inputs: &Inputs) -> u64 {
        inputs.fields.get("refresh_token").map_or(0, |v| {
            let mut h = self.hasher.build_hasher();
            h.write(v.expose());
            h.finish()
        })
    }

    /// A keyed hash of every input (names and values, length-prefixed): detects change
    /// without keeping plaintext.
    fn fingerprint(&self, secret: &Secret, inputs: &Inputs) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(secret.name.as_bytes());
        for (k, v) in inputs
            .fields
            .iter()
            .chain(inputs.headers.iter().map(|(k, v)| (k, v)))
        {
            h.write_usize(k.len());
            h.write(k.as_bytes());
            h.write_usize(v.expose().len());
            h.write(v.expose());
        }
        h.write(format!("{:?}", secret.kind).as_bytes());
        h.finish()
    }
}

/// The pause after the `failures`-th failed mint in a row: 1 s, doubling, at most
/// [`MAX_COOL_DOWN`].
fn cool_down(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(MAX_COOL_DOWN)
}

/// A random duration in `[0, max)` (`RandomState` as the entropy source).
pub(crate) fn jitter(max: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(r % ms)
}

fn text(v: &SecretValue) -> Result<&str, MintError> {
    std::str::from_utf8(v.expose())
        .map_err(|_| MintError::Source("a credential field is not UTF-8".into()))
}

/// Performs one mint for `secret` (no retries).
async fn mint(
    transport: &Arc<dyn TokenTransport>,
    secret: &Secret,
    inputs: &Inputs,
    rotated: Option<&SecretValue>,
) -> Result<Token, MintError> {
    match &secret.kind {
        SecretKind::OAuth(o) => match o.grant {
            Grant::JwtBearer => {
                let assertion = jwt_bearer_assertion(o, inputs)?;
                let mut form = vec![
                    ("grant_type", JWT_BEARER_GRANT.to_string()),
                    ("assertion", assertion),
                ];
                if !o.scopes.is_empty() {
                    form.push(("scope", o.scopes.join(" ")));
                }
                post_form(&**transport, &o.token_endpoint.url, &form, &inputs.headers).await
            }
            _ => oauth2_grant(transport, o, inputs, rotated).await,
        },
        SecretKind::Gcp(g) => {
            let key = ServiceAccountKey::parse(
                inputs
                    .fields
                    .get("keyfile")
                    .map(SecretValue::expose)
                    .unwrap_or_default(),
            )?;
            let assertion = gcp_assertion(g, &key)?;
            let form = [
                ("grant_type", JWT_BEARER_GRANT.to_string()),
                ("assertion", assertion),
            ];
            post_form(&**transport, &key.token_uri, &form, &[]).await
        }
        SecretKind::Brokered(b) => broker_token(&**transport, b, inputs).await,
        SecretKind::Static(_) | SecretKind::Pg(_) => {
            Err(MintError::Source("not a token secret".into()))
        }
    }
}

/// Asks `iron-token-broker` for the credential's access token
/// (`GET {url}/v1/credentials/{id}/access_token` → `{access_token, expires_in}`). Every
/// failure is reported as retryable: a dead credential can be revived at the broker, so
/// the proxy never caches a broker refusal as terminal.
async fn broker_token(
    transport: &dyn TokenTransport,
    b: &iron_policy::BrokeredSpec,
    inputs: &Inputs,
) -> Result<Token, MintError> {
    let mut req = http::Request::get(b.access_token_url())
        .header(http::header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(|_| MintError::Key(format!("invalid broker url {}", b.url)))?;
    if let Some(t) = inputs.fields.get("broker.token") {
        let mut v = http::HeaderValue::from_bytes(&[b"Bearer ".as_slice(), t.expose()].concat())
            .map_err(|_| MintError::Source("broker.token is not a valid header value".into()))?;
        v.set_sensitive(true);
        req.headers_mut().insert(http::header::AUTHORIZATION, v);
    }
    let resp = transport
        .send(req)
        .await
        .map_err(|e| MintError::Transport(format!("broker: {}", e.0)))?;
    #[derive(serde::Deserialize)]
    struct Ok_ {
        access_token: String,
        expires_in: f64,
    }
    #[derive(serde::Deserialize)]
    struct Err_ {
        error: Option<String>,
        reason: Option<String>,
    }
    let status = resp.status().as_u16();
    if status != 200 {
        let e: Option<Err_> = serde_json::from_slice(resp.body()).ok();
        let code = e
            .as_ref()
            .and_then(|e| e.error.as_deref())
            .map(sanitize_code)
            .unwrap_or_default();
        let reason = e
            .as_ref()
            .and_then(|e| e.reason.as_deref())
            .map(sanitize_code)
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        let message = format!("broker answered {status} {code}{reason}");
        // 408/429 and 5xx may pass; any other answer is the broker's word on the credential.
        return Err(if status >= 500 || status == 408 || status == 429 {
            throttled(MintError::Transport(message), status, resp.headers())
        } else {
            MintError::Broker(message)
        });
    }
    let ok: Ok_ = serde_json::from_slice(resp.body()).map_err(|_| MintError::Malformed)?;
    if ok.access_token.is_empty() || !ok.expires_in.is_finite() || ok.expires_in <= 0.0 {
        return Err(MintError::Malformed);
    }
    let lifetime = Duration::from_secs_f64(ok.expires_in.min(86_400.0));
    Ok(Token {
        value: SecretValue::new(ok.access_token.into_bytes()),
        expires_at: Instant::now() + lifetime,
        lifetime,
        lifetime_given: true,
        refresh_token: None,
    })
}

/// The `oauth2` crate's HTTP client over a [`TokenTransport`], adding the
/// `token_endpoint_headers` and turning 5xx/429 into retryable errors.
struct OAuthHttp {
    transport: Arc<dyn TokenTransport>,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl<'c> oauth2::AsyncHttpClient<'c> for OAuthHttp {
    type Error = HttpErr;
    type Future = Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpErr>> + Send + 'c>>;

    fn call(&'c self, mut req: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            for (k, v) in &self.headers {
                req.headers_mut().insert(k.clone(), v.clone());
            }
            let resp = self
                .transport
                .send(req)
                .await
                .map_err(|e| HttpErr::Transport(e.0))?;
            let status = resp.status().as_u16();
            if resp.status().is_server_error() || matches!(status, 408 | 429) {
                return Err(HttpErr::Status(status, retry_after(status, resp.headers())));
            }
            Ok(lenient_success(resp))
        })
    }
}

/// Makes a `2xx` JSON token response acceptable to the `oauth2` crate, which wants exactly
/// `200`, a JSON content type, a `token_type` and a numeric `expires_in`. IdPs in the wild
/// send `201`, `text/plain`, no `token_type` (RFC 6749 §5.1 requires it, some omit it) or
/// `expires_in` as a string (Azure AD v1) or a fraction: accepted as `200`, `Bearer`, and
/// whole seconds; an unusable `expires_in` (zero, negative) is dropped (default lifetime).
/// Anything else passes unchanged.
fn lenient_success(resp: oauth2::HttpResponse) -> oauth2::HttpResponse {
    if !resp.status().is_success() {
        return resp;
    }
    let Ok(serde_json::Value::Object(mut obj)) =
        serde_json::from_slice::<serde_json::Value>(resp.body())
    else {
        return resp;
    };
    if !obj.contains_key("token_type") {
        obj.insert("token_type".into(), "Bearer".into());
    }
    if let Some(v) = obj.get("expires_in") {
        match expires_in_secs(v) {
            Some(n) => obj.insert("expires_in".into(), n.into()),
            None => obj.remove("expires_in"),
        };
    }
    let (mut parts, _) = resp.into_parts();
    parts.status = http::StatusCode::OK;
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap_or_default();
    http::Response::from_parts(parts, body)
}

#[derive(Debug, thiserror::Error)]
enum HttpErr {
    #[error("{0}")]
    Transport(String),
    #[error("http {0}")]
    Status(u16, Option<Duration>),
}

/// refresh_token, client_credentials and password grants through the `oauth2` crate.
async fn oauth2_grant(
    transport: &Arc<dyn TokenTransport>,
    o: &OAuthSpec,
    inputs: &Inputs,
    rotated: Option<&SecretValue>,
) -> Result<Token, MintError> {
    use oauth2::basic::BasicClient;
    use oauth2::{
        AuthType, ClientId, ClientSecret, RefreshToken, RequestTokenError, ResourceOwnerPassword,
        ResourceOwnerUsername, Scope, TokenResponse, TokenUrl,
    };

    let field = |k: &str| -> Result<String, MintError> {
        inputs
            .fields
            .get(k)
            .ok_or_else(|| MintError::Source(format!("field {k} is missing")))
            .and_then(|v| text(v).map(str::to_string))
    };
    let token_url = TokenUrl::new(o.token_endpoint.url.clone())
        .map_err(|_| MintError::Key("invalid token endpoint".into()))?;
    let mut client = BasicClient::new(ClientId::new(field("client_id")?))
        .set_token_uri(token_url)
        .set_auth_type(match o.client_auth {
            ClientAuth::Post => AuthType::RequestBody,
            ClientAuth::Basic => AuthType::BasicAuth,
        });
    if inputs.fields.contains_key("client_secret") {
        client = client.set_client_secret(ClientSecret::new(field("client_secret")?));
    }
    let headers: Vec<(http::HeaderName, http::HeaderValue)> = inputs
        .headers
        .iter()
        .map(|(k, v)| {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| MintError::Key(format!("invalid header name {k}")))?;
            let mut value = http::HeaderValue::from_bytes(v.expose()).map_err(|_| {
                MintError::Source(format!(
                    "token endpoint header {k} is not a valid header value"
                ))
            })?;
            value.set_sensitive(true);
            Ok((name, value))
        })
        .collect::<Result<_, MintError>>()?;
    let http_client = OAuthHttp {
        transport: transport.clone(),
        headers,
    };
    let scopes = o.scopes.iter().cloned().map(Scope::new);
    let result = match o.grant {
        Grant::RefreshToken => {
            let rt = match rotated {
                Some(r) => text(r)?.to_string(),
                None => field("refresh_token")?,
            };
            client
                .exchange_refresh_token(&RefreshToken::new(rt))
                .add_scopes(scopes)
                .request_async(&http_client)
                .await
        }
        Grant::ClientCredentials => {
            client
                .exchange_client_credentials()
                .add_scopes(scopes)
                .request_async(&http_client)
                .await
        }
        Grant::Password => {
            let user = ResourceOwnerUsername::new(field("username")?);
            let pass = ResourceOwnerPassword::new(field("password")?);
            client
                .exchange_password(&user, &pass)
                .add_scopes(scopes)
                .request_async(&http_client)
                .await
        }
        Grant::JwtBearer => {
            return Err(MintError::Key(
                "jwt_bearer is not an oauth2-crate grant".into(),
            ));
        }
    };
    match result {
        Ok(tok) => {
            let lifetime_given = tok.expires_in().is_some();
            let lifetime = tok
                .expires_in()
                .unwrap_or(DEFAULT_LIFETIME)
                .clamp(MIN_LIFETIME, MAX_LIFETIME);
            if !usable_token(tok.access_token().secret()) {
                return Err(tok.refresh_token().map_or(MintError::Malformed, |r| {
                    MintError::RotatedWithoutAccess(SecretValue::new(
                        r.secret().as_bytes().to_vec(),
                    ))
                }));
            }
            Ok(Token {
                value: SecretValue::new(tok.access_token().secret().as_bytes().to_vec()),
                expires_at: Instant::now() + lifetime,
                lifetime,
                lifetime_given,
                refresh_token: tok
                    .refresh_token()
                    .map(|r| SecretValue::new(r.secret().as_bytes().to_vec())),
            })
        }
        Err(RequestTokenError::ServerResponse(e)) => Err(MintError::Rejected {
            code: sanitize_code(e.error().as_ref()),
        }),
        Err(RequestTokenError::Request(HttpErr::Status(s, wait))) => {
            Err(with_wait(MintError::Status(s), wait))
        }
        Err(RequestTokenError::Request(HttpErr::Transport(t))) => Err(MintError::Transport(t)),
        Err(RequestTokenError::Parse(..) | RequestTokenError::Other(_)) => {
            Err(MintError::Malformed)
        }
    }
}

/// POSTs a form to a token endpoint and parses the token response (RFC 6749 §5.1/§5.2).
pub(crate) async fn post_form(
    transport: &dyn TokenTransport,
    url: &str,
    form: &[(&str, String)],
    headers: &[(String, SecretValue)],
) -> Result<Token, MintError> {
    let body = form
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut req = http::Request::post(url)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json")
        .body(body.into_bytes())
        .map_err(|_| MintError::Key(format!("invalid token endpoint {url}")))?;
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| MintError::Key(format!("invalid header name {k}")))?;
        let mut value = http::HeaderValue::from_bytes(v.expose()).map_err(|_| {
            MintError::Source(format!(
                "token endpoint header {k} is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        req.headers_mut().insert(name, value);
    }
    let resp = transport
        .send(req)
        .await
        .map_err(|e| MintError::Transport(e.0))?;
    let status = resp.status().as_u16();
    parse_token_response(status, resp.body()).map_err(|e| throttled(e, status, resp.headers()))
}

/// Parses a token endpoint response.
///
/// # Errors
/// [`MintError::Rejected`] for an OAuth error body, [`MintError::Status`] for another HTTP
/// error, [`MintError::Malformed`] for a 2xx that is not a token response,
/// [`MintError::RotatedWithoutAccess`] for one with a new refresh token but no usable
/// access token.
pub fn parse_token_response(status: u16, body: &[u8]) -> Result<Token, MintError> {
    #[derive(serde::Deserialize)]
    struct Resp {
        access_token: Option<String>,
        expires_in: Option<serde_json::Value>,
        refresh_token: Option<String>,
        error: Option<String>,
    }
    let parsed: Option<Resp> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        // 408, 429 and 5xx say "later", whatever the body: an IdP's rate-limit answer often
        // carries an `error` field (`too_many_requests`), which is not a refusal of the grant.
        return match parsed.and_then(|r| r.error) {
            Some(code) if status < 500 && status != 408 && status != 429 => {
                Err(MintError::Rejected {
                    code: sanitize_code(&code),
                })
            }
            _ => Err(MintError::Status(status)),
        };
    }
    let r = parsed.ok_or(MintError::Malformed)?;
    let refresh_token = r
        .refresh_token
        .filter(|t| !t.is_empty())
        .map(|t| SecretValue::new(t.into_bytes()));
    let Some(token) = r.access_token.filter(|t| usable_token(t)) else {
        return Err(refresh_token.map_or(MintError::Malformed, MintError::RotatedWithoutAccess));
    };
    let given = r
        .expires_in
        .as_ref()
        .and_then(expires_in_secs)
        .map(Duration::from_secs);
    let lifetime = given
        .unwrap_or(DEFAULT_LIFETIME)
        .clamp(MIN_LIFETIME, MAX_LIFETIME);
    Ok(Token {
        value: SecretValue::new(token.into_bytes()),
        expires_at: Instant::now() + lifetime,
        lifetime,
        lifetime_given: given.is_some(),
        refresh_token,
    })
}

/// An IdP's `error` value as it may be shown (admin API, logs, the broker's `reason`): OAuth
/// error codes (RFC 6749 §5.2 and its extensions) are lower-case words joined by `_`, at
/// most 40 bytes; anything else — digits, capitals, punctuation, a client secret an IdP
/// echoed into the field — becomes `unrecognized_error`.
pub fn sanitize_code(code: &str) -> String {
    if !code.is_empty()
        && code.len() <= 40
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        code.to_string()
    } else {
        "unrecognized_error".to_string()
    }
}

/// `expires_in` in whole seconds when it is a positive finite number or a string holding
/// one (RFC 6749 §5.1 says an integer; IdPs also send `3600.5` or `"3600"`); `None` for
/// anything else (zero, negative, not a number), which means the default lifetime.
fn expires_in_secs(v: &serde_json::Value) -> Option<u64> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (n.is_finite() && n >= 1.0).then(|| n.min(MAX_LIFETIME.as_secs_f64()) as u64)
}

/// An access token the proxy can put in a header: not empty, no control characters
/// (CR, LF, NUL would make an invalid or split header; such a token is an unusable answer).
fn usable_token(t: &str) -> bool {
    !t.is_empty() && http::HeaderValue::from_str(t).is_ok()
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn jti() -> String {
    let a = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let b = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{a:016x}{b:016x}")
}

/// The RFC 7523 §2.1 assertion: RS256, `iss`, `sub`, `aud` (the `audience`, else the token
/// endpoint URL), `iat`, `exp` (+5 min), `jti`; `kid` from `private_key_id`.
fn jwt_bearer_assertion(o: &OAuthSpec, inputs: &Inputs) -> Result<String, MintError> {
    let get = |k: &str| inputs.fields.get(k).map(text).transpose();
    let key = inputs
        .fields
        .get("private_key")
        .ok_or_else(|| MintError::Source("field private_key is missing".into()))?;
    let encoding = jsonwebtoken::EncodingKey::from_rsa_pem(key.expose())
        .map_err(|_| MintError::Key("field private_key is not an RSA private key in PEM".into()))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = get("private_key_id")?.map(str::to_string);
    let iat = now_secs();
    let claims = serde_json::json!({
        "iss": get("issuer")?.unwrap_or_default(),
        "sub": get("subject")?.unwrap_or_default(),
        "aud": o.audience.clone().unwrap_or_else(|| o.token_endpoint.url.clone()),
        "iat": iat,
        "exp": iat + 300,
        "jti": jti(),
    });
    jsonwebtoken::encode(&header, &claims, &encoding)
        .map_err(|_| MintError::Key("failed to sign the JWT assertion".into()))
}

/// The fields of a Google service-account key file that minting uses.
#[derive(Clone)]
pub struct ServiceAccountKey {
    /// `client_email`.
    pub client_email: String,
    /// `private_key` (PEM).
    pub private_key: SecretValue,
    /// `private_key_id`, if any.
    pub private_key_id: Option<String>,
    /// `token_uri`, default [`GOOGLE_TOKEN_URI`].
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl ServiceAccountKey {
    /// Parses a service-account key file and checks its RSA key.
    ///
    /// # Errors
    /// [`MintError::Key`] naming the missing or invalid field.
    pub fn parse(json: &[u8]) -> Result<Self, MintError> {
        #[derive(serde::Deserialize)]
        struct Raw {
            client_email: Option<String>,
            private_key: Option<String>,
            private_key_id: Option<String>,
            token_uri: Option<String>,
        }
        let raw: Raw = serde_json::from_slice(json)
            .map_err(|_| MintError::Key("keyfile is not a service-account JSON document".into()))?;
        let token_uri = raw
            .token_uri
            .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_string());
        // The signed assertion is good for an hour of access tokens: never in cleartext.
        if !token_uri.starts_with("https://") {
            return Err(MintError::Key(
                "keyfile token_uri must be an https:// URL".into(),
            ));
        }
        let client_email = raw
            .client_email
            .filter(|e| !e.is_empty())
            .ok_or_else(|| MintError::Key("keyfile has no client_email".into()))?;
        let private_key = raw
            .private_key
            .ok_or_else(|| MintError::Key("keyfile has no private_key".into()))?;
        jsonwebtoken::EncodingKey::from_rsa_pem(private_key.as_bytes()).map_err(|_| {
            MintError::Key("keyfile private_key is not an RSA private key in PEM".into())
        })?;
        Ok(Self {
            client_email,
            private_key: SecretValue::new(private_key.into_bytes()),
            private_key_id: raw.private_key_id,
            token_uri,
        })
    }
}

/// Google's service-account assertion: RS256, `iss` = client email, `scope`, `aud` = token
/// URI, `iat`, `exp` (+1 h), `sub` for domain-wide delegation.
fn gcp_assertion(g: &GcpSpec, key: &ServiceAccountKey) -> Result<String, MintError> {
    let encoding =
        jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.expose()).map_err(|_| {
            MintError::Key("keyfile private_key is not an RSA private key in PEM".into())
        })?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid.clone_from(&key.private_key_id);
    let iat = now_secs();
    let mut claims = serde_json::json!({
        "iss": key.client_email,
        "scope": g.scopes.join(" "),
        "aud": key.token_uri,
        "iat": iat,
        "exp": iat + 3600,
    });
    if let Some(sub) = &g.subject {
        claims["sub"] = serde_json::Value::String(sub.clone());
    }
    jsonwebtoken::encode(&header, &claims, &encoding)
        .map_err(|_| MintError::Key("failed to sign the JWT assertion".into()))
}

/// Checks what can be checked without contacting the IdP: every input is readable, RSA
/// keys parse, a GCP key file has its fields. Returns one message per problem.
pub fn validate_inputs(secret: &Secret, sources: &SourceResolver) -> Vec<String> {
    let mut out = Vec::new();
    match &secret.kind {
        SecretKind::OAuth(o) => {
            if o.grant == Grant::JwtBearer
                && let Some(src) = o.fields.get("private_key")
                && let Ok(v) = sources.resolve(src)
                && jsonwebtoken::EncodingKey::from_rsa_pem(v.expose()).is_err()
            {
                out.push("field private_key is not an RSA private key in PEM".to_string());
            }
        }
        SecretKind::Gcp(g) => {
            if let Ok(v) = sources.resolve(&g.keyfile)
                && let Err(e) = ServiceAccountKey::parse(v.expose())
            {
                out.push(e.to_string());
            }
        }
        SecretKind::Static(_) | SecretKind::Pg(_) | SecretKind::Brokered(_) => {}
    }
    out
}

#[cfg(test)]
mod tests;
