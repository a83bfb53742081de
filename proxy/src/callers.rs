//! Caller authentication at the proxy port (REFERENCE.md D21: optional, mandatory when on).
//!
//! A policy with `[[callers]]` makes every request on the proxy port, each CONNECT and each
//! absolute-form request, carry `Proxy-Authorization` with one caller's token. The caller
//! it names is kept for the tunnel a CONNECT opens: its inner requests, the audit line's
//! `caller`, and the caller's grants ([`iron_policy::Grants`]) all come from it.

use std::sync::Arc;

use base64::Engine as _;
use http::HeaderMap;
use iron_policy::{Grants, Policy};

use crate::Runtime;
use crate::error::ProxyError;

/// A caller a CONNECT or SOCKS5 handshake authenticated: its name, and a SHA-256 digest of
/// the token it used, so each request of the tunnel can check that the caller is still in
/// the policy with that token. `Debug` shows the name only.
#[derive(Clone)]
pub struct Authenticated {
    /// The caller's name.
    pub name: Arc<str>,
    digest: [u8; 32],
}

impl std::fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Authenticated").field(&self.name).finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token).into()
}

/// A request inside a tunnel opened as `caller` (`None`: opened while the policy had no
/// callers), checked against the policy in force now: the caller's name for the request,
/// `None` when the policy has no callers (every secret is everyone's).
///
/// # Errors
/// [`ProxyError::ProxyAuthRequired`] when the policy gained callers since the tunnel
/// opened unauthenticated; [`ProxyError::CallerRevoked`] when a reload removed the caller
/// or changed its token; [`ProxyError::CallerTokenUnavailable`] when its token source
/// cannot be read now.
pub(crate) fn recheck(
    rt: &Runtime,
    policy: &Policy,
    caller: Option<&Authenticated>,
) -> Result<Option<Arc<str>>, ProxyError> {
    if policy.callers.is_empty() {
        return Ok(None);
    }
    let a = caller.ok_or(ProxyError::ProxyAuthRequired)?;
    let revoked = || ProxyError::CallerRevoked {
        caller: a.name.to_string(),
    };
    let c = policy.caller(&a.name).ok_or_else(revoked)?;
    let token = rt.sources.resolve(&c.token).map_err(|e| {
        tracing::debug!(caller = %c.name, error = %e, "caller token source unavailable");
        ProxyError::CallerTokenUnavailable
    })?;
    if !iron_broker::ct_eq(&digest(token.expose()), &a.digest) {
        return Err(revoked());
    }
    Ok(Some(a.name.clone()))
}

/// The caller whose token `headers` carry in `Proxy-Authorization`, by name; `None` when
/// the policy has no callers (the proxy port is open to every local client).
///
/// Takes `Basic base64(USER:TOKEN)` (RFC 7617; the user name is not checked: clients
/// send what `HTTPS_PROXY=http://USER:TOKEN@…` holds) or `Bearer TOKEN` (RFC 6750 §2.1),
/// schemes case-insensitive. Every caller's token is compared in constant time; the first
/// caller (in policy order) whose token equals the one sent is the one.
///
/// # Errors
/// [`ProxyError::ProxyAuthRequired`] (407) when the header is missing, malformed, or holds
/// no caller's token; [`ProxyError::CallerTokenUnavailable`] (503) when some caller's token
/// source cannot be read and no readable one matched (the caller may be that one).
pub(crate) fn authenticate(
    rt: &Runtime,
    policy: &Policy,
    headers: &HeaderMap,
) -> Result<Option<Authenticated>, ProxyError> {
    if policy.callers.is_empty() {
        return Ok(None);
    }
    let given = headers
        .get(http::header::PROXY_AUTHORIZATION)
        .and_then(|v| credential(v.as_bytes()))
        .ok_or(ProxyError::ProxyAuthRequired)?;
    caller_with_token(rt, policy, &given).map(Some)
}

/// The first caller of `policy` (which has callers) whose token is `given`, compared in
/// constant time: for `Proxy-Authorization` and SOCKS5's username/password (RFC 1929).
///
/// # Errors
/// As [`authenticate`].
pub(crate) fn caller_with_token(
    rt: &Runtime,
    policy: &Policy,
    given: &[u8],
) -> Result<Authenticated, ProxyError> {
    let mut unreadable = false;
    for caller in &policy.callers {
        match rt.sources.resolve(&caller.token) {
            Ok(token) => {
                if iron_broker::ct_eq(given, token.expose()) {
                    return Ok(Authenticated {
                        name: Arc::from(caller.name.as_str()),
                        digest: digest(given),
                    });
                }
            }
            Err(e) => {
                // At debug: any client could otherwise flood the log; /readyz and
                // /v1/callers report the source.
                tracing::debug!(caller = %caller.name, error = %e, "caller token source unavailable");
                unreadable = true;
            }
        }
    }
    Err(if unreadable {
        ProxyError::CallerTokenUnavailable
    } else {
        ProxyError::ProxyAuthRequired
    })
}

/// The token in a `Proxy-Authorization` value: a `Basic` credential's password, or a
/// `Bearer` token. `None` for another scheme, bad base64, or an empty token.
fn credential(value: &[u8]) -> Option<Vec<u8>> {
    let split = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = (&value[..split], value[split..].trim_ascii());
    let token = if scheme.eq_ignore_ascii_case(b"basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        decoded[colon + 1..].to_vec()
    } else if scheme.eq_ignore_ascii_case(b"bearer") {
        rest.to_vec()
    } else {
        return None;
    };
    (!token.is_empty()).then_some(token)
}

/// The grants of `caller` in `policy`: all for a policy without callers.
///
/// # Errors
/// [`ProxyError::ProxyAuthRequired`] for no caller when the policy has callers;
/// [`ProxyError::CallerRevoked`] when `caller` is no longer in the policy (a reload
/// removed it while its tunnel stayed open).
pub(crate) fn grants<'p>(
    policy: &'p Policy,
    caller: Option<&str>,
) -> Result<&'p Grants, ProxyError> {
    static ALL: Grants = Grants::All;
    if policy.callers.is_empty() {
        return Ok(&ALL);
    }
    match caller {
        None => Err(ProxyError::ProxyAuthRequired),
        Some(name) => {
            policy
                .caller(name)
                .map(|c| &c.grants)
                .ok_or_else(|| ProxyError::CallerRevoked {
                    caller: name.to_string(),
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_from_basic_and_bearer() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            credential(format!("Basic {}", b64("agent:t0k:en")).as_bytes()).as_deref(),
            Some(&b"t0k:en"[..])
        );
        assert_eq!(
            credential(format!("basic  {}", b64(":tok")).as_bytes()).as_deref(),
            Some(&b"tok"[..])
        );
        assert_eq!(credential(b"BEARER tok").as_deref(), Some(&b"tok"[..]));
        assert_eq!(
            credential(format!("Basic {}", b64("agent:")).as_bytes()),
            None
        );
        assert_eq!(
            credential(format!("Basic {}", b64("agent")).as_bytes()),
            None
        );
        assert_eq!(credential(b"Basic !!!"), None);
        assert_eq!(credential(b"Digest tok"), None);
        assert_eq!(credential(b"Bearer"), None);
    }
}
