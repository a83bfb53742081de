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
        env.push((s.name.clone(), s.placeholder.clone()));
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
