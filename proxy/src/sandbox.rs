//! The sandbox environment: what a process needs to use the proxy without holding a real
//! credential (DESIGN.md "Who uses it").

use std::net::SocketAddr;

use iron_policy::Policy;

use crate::state::CaFiles;

/// The variables, in output order: proxy settings (both cases), CA variables for every
/// common client, and one placeholder variable per secret (`NAME=PLACEHOLDER`).
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
) -> Vec<(String, String)> {
    let url = format!("http://{proxy}");
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
    for s in &policy.secrets {
        if !matches!(s.kind, iron_policy::SecretKind::Pg(_)) {
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
///
/// # Errors
/// A message when a secret's DSN cannot be read or its state cannot be written.
pub fn pg_env(
    policy: &Policy,
    sources: &iron_broker::SourceResolver,
    dir: &std::path::Path,
    ca: &CaFiles,
    relays: &[crate::pg::Relay],
) -> Result<Vec<(String, String)>, String> {
    let mut env = Vec::new();
    for s in &policy.secrets {
        if let iron_policy::SecretKind::Pg(spec) = &s.kind {
            let mut side = crate::pg::client_side(sources, s, spec, dir)?;
            if let Some(r) = relays.iter().find(|r| r.name == s.name) {
                side.listen = r.addr;
            }
            env.push((s.name.clone(), crate::pg::sandbox_dsn(&side, spec)));
        }
    }
    if !env.is_empty() {
        env.push(("PGSSLROOTCERT".into(), ca.cert.display().to_string()));
    }
    Ok(env)
}
