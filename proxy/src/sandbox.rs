//! The sandbox environment: what a process needs to use the proxy without holding a real
//! credential (DESIGN.md "Who uses it").

use std::net::SocketAddr;

use iron_policy::{Grants, Policy};

use crate::state::CaFiles;

/// The caller a sandbox runs as (`[[callers]]`): its name and token go in the proxy URL
/// (`http://NAME:TOKEN@HOST:PORT`, percent-encoded, RFC 3986 §3.2.1), and only the secrets
/// it is granted get a variable. `Debug` never shows the token.
pub struct SandboxCaller {
    /// The caller's name.
    pub name: String,
    /// What it may use.
    pub grants: Grants,
    token: String,
}

impl std::fmt::Debug for SandboxCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCaller")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The caller `name` of `policy`, with its token read from its source: `None` when the
/// policy has no callers and no name was given.
///
/// # Errors
/// A message when the policy has callers and `name` is `None` (a sandbox without a token
/// would get 407 on every request) or names none of them, when `name` is given but the
/// policy has no callers, or when the token cannot be read or is not UTF-8 text.
pub fn sandbox_caller(
    policy: &Policy,
    sources: &iron_broker::SourceResolver,
    name: Option<&str>,
) -> Result<Option<SandboxCaller>, String> {
    let names = || {
        policy
            .callers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let caller = match (name, policy.callers.is_empty()) {
        (None, true) => return Ok(None),
        (None, false) => {
            return Err(format!(
                "the policy has [[callers]]: pass --caller NAME (one of: {})",
                names()
            ));
        }
        (Some(n), true) => return Err(format!("--caller {n}: the policy has no [[callers]]")),
        (Some(n), false) => policy
            .caller(n)
            .ok_or_else(|| format!("--caller {n}: no such caller (the policy has: {})", names()))?,
    };
    let token = sources
        .resolve(&caller.token)
        .map_err(|e| format!("caller `{}`: token: {e}", caller.name))?;
    let token = String::from_utf8(token.expose().to_vec())
        .map_err(|_| format!("caller `{}`: the token is not UTF-8 text", caller.name))?;
    Ok(Some(SandboxCaller {
        name: caller.name.clone(),
        grants: caller.grants.clone(),
        token,
    }))
}

/// What a sandbox running as `caller` may use: everything without one.
pub fn grants(caller: Option<&SandboxCaller>) -> &Grants {
    static ALL: Grants = Grants::All;
    caller.map_or(&ALL, |c| &c.grants)
}

/// The proxy URL the sandbox gets: `http://ADDR`, with `NAME:TOKEN@` for a caller.
fn proxy_url(proxy: SocketAddr, caller: Option<&SandboxCaller>) -> String {
    use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
    // RFC 3986 §3.2.1 userinfo: unreserved, sub-delims and ':' (not in the user name) stay;
    // the rest is encoded.
    const USERINFO: &AsciiSet = &CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'/')
        .add(b':')
        .add(b'<')
        .add(b'>')
        .add(b'?')
        .add(b'@')
        .add(b'[')
        .add(b'\\')
        .add(b']')
        .add(b'^')
        .add(b'`')
        .add(b'{')
        .add(b'|')
        .add(b'}');
    match caller {
        None => format!("http://{proxy}"),
        Some(c) => format!(
            "http://{}:{}@{proxy}",
            utf8_percent_encode(&c.name, USERINFO),
            utf8_percent_encode(&c.token, USERINFO)
        ),
    }
}

/// The variables, in output order: proxy settings (both cases; with the caller's name and
/// token when there is one), CA variables for every common client, and one placeholder
/// variable per secret (`NAME=PLACEHOLDER`; for a caller, per granted secret).
///
/// Clients differ in which CA variable they read: curl `CURL_CA_BUNDLE`/`SSL_CERT_FILE`,
/// git `GIT_SSL_CAINFO`, Python requests `REQUESTS_CA_BUNDLE`, httpx and urllib
/// `SSL_CERT_FILE`, Node `NODE_EXTRA_CA_CERTS` (added to its roots, so it gets the CA
/// alone), gcloud `CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE`, cargo `CARGO_HTTP_CAINFO`, Deno
/// `DENO_CERT`. The replacing ones get the bundle (proxy CA + system roots). `extra` (for
/// example the `gcp_auth` stub key file variables) is appended.
pub fn sandbox_env(
    policy: &Policy,
    proxy: SocketAddr,
    ca: &CaFiles,
    extra: &[(String, String)],
    caller: Option<&SandboxCaller>,
) -> Vec<(String, String)> {
    let url = proxy_url(proxy, caller);
    let bundle = ca.bundle.display().to_string();
    let cert = ca.cert.display().to_string();
    let mut env: Vec<(String, String)> = Vec::new();
    for k in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        env.push((k.into(), url.clone()));
    }
    for k in ["NO_PROXY", "no_proxy"] {
        env.push((k.into(), "localhost,127.0.0.1,::1".into()));
    }
    for k in [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
        "CARGO_HTTP_CAINFO",
        "DENO_CERT",
    ] {
        env.push((k.into(), bundle.clone()));
    }
    env.push(("NODE_EXTRA_CA_CERTS".into(), cert));
    env.push(("NODE_USE_ENV_PROXY".into(), "1".into()));
    for (i, s) in policy.secrets.iter().enumerate() {
        if !matches!(s.kind, iron_policy::SecretKind::Pg(_)) && grants(caller).allows(i) {
            env.push((s.name.clone(), s.placeholder.clone()));
        }
    }
    env.extend(extra.iter().cloned());
    env
}

/// Formats variables as POSIX shell `export` lines, single-quoting values.
pub fn export_lines(env: &[(String, String)]) -> String {
    let mut out = String::new();
    for (k, v) in env {
        out.push_str("export ");
        out.push_str(k);
        out.push_str("='");
        out.push_str(&v.replace('\'', r"'\''"));
        out.push_str("'\n");
    }
    out
}

/// For each `pg_dsn` secret, `NAME=postgresql://USER:PLACEHOLDER@HOST:PORT/DB` (the relay's
/// address and the sandbox-side credentials kept in the state directory; the address of a
/// running relay in `relays` when it has one for the secret), plus
/// `PGSSLROOTCERT` naming the proxy CA so `sslmode=verify-full` works against the relay.
/// For a caller, only the secrets it is granted (the relay's own password is the grant
/// there: a sandbox never given the DSN cannot log in).
///
/// # Errors
/// A message when a secret's DSN cannot be read or its state cannot be written.
pub fn pg_env(
    policy: &Policy,
    sources: &iron_broker::SourceResolver,
    dir: &std::path::Path,
    ca: &CaFiles,
    relays: &[(String, SocketAddr)],
    caller: Option<&SandboxCaller>,
) -> Result<Vec<(String, String)>, String> {
    let mut env = Vec::new();
    for (i, s) in policy.secrets.iter().enumerate() {
        if let iron_policy::SecretKind::Pg(spec) = &s.kind
            && grants(caller).allows(i)
        {
            let mut side = crate::pg::client_side(sources, s, spec, dir)?;
            if let Some((_, addr)) = relays.iter().find(|(name, _)| *name == s.name) {
                side.listen = *addr;
            }
            env.push((s.name.clone(), crate::pg::sandbox_dsn(&side, spec)));
        }
    }
    if !env.is_empty() {
        env.push(("PGSSLROOTCERT".into(), ca.cert.display().to_string()));
    }
    Ok(env)
}
