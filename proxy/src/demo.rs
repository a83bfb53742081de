//! `iron-proxy demo`: a self-contained run of the main job. Starts a local TLS origin with
//! its own CA, writes a demo policy and a demo secret into a temporary directory, starts
//! the proxy on a free port, sends one request with the placeholder to the secret's host
//! and one to another host, and prints what the client sent, what the origin received (the
//! secret masked) and what the proxy refused.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use iron_broker::ProcessEnv;
use iron_policy::Policy;

use crate::audit::MemoryAudit;
use crate::origin::{Origin, OriginOptions};
use crate::{Runtime, client, start, state};

/// The secret's host in the demo policy.
pub const DEMO_HOST: &str = "api.demo.test";
/// A host the demo policy allows, but not for the secret.
pub const OTHER_HOST: &str = "other.demo.test";

/// Runs the demo and returns its report. The report never contains the secret value.
///
/// # Errors
/// A message saying which step failed.
pub async fn run() -> Result<String, String> {
    let dir =
        tempfile::tempdir().map_err(|e| format!("failed to create a temporary directory: {e}"))?;
    let origin = Origin::start(OriginOptions::default()).await?;
    let port = origin.addr.port();
    std::fs::write(dir.path().join("origin-ca.pem"), &origin.ca_pem)
        .map_err(|e| format!("failed to write origin CA: {e}"))?;
    let secret = format!("demo_{:032x}", rand_u128());
    std::fs::write(dir.path().join("demo-token.txt"), &secret)
        .map_err(|e| format!("failed to write demo secret: {e}"))?;
    let policy_text = format!(
        r#"version = 1

[proxy]
listen = "127.0.0.1:0"
allow = ["{OTHER_HOST}:{port}"]
allow_cidrs = ["127.0.0.1/32"]
upstream_ca = ["origin-ca.pem"]
resolve = {{ "{DEMO_HOST}" = "127.0.0.1", "{OTHER_HOST}" = "127.0.0.1" }}

[[secrets]]
name = "DEMO_TOKEN"
type = "http"
source = {{ file = "demo-token.txt" }}
match_headers = ["Authorization"]
hosts = ["{DEMO_HOST}:{port}"]
"#
    );
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, &policy_text)
        .map_err(|e| format!("failed to write demo policy: {e}"))?;
    let policy = Arc::new(Policy::load(&policy_path).map_err(|e| e.to_string())?);
    let ca = state::load_ca(&policy, &dir.path().join("state"))?;
    let audit = Arc::new(MemoryAudit::default());
    let rt = Runtime::new(
        policy.clone(),
        ca.ca.clone(),
        Arc::new(ProcessEnv),
        audit.clone(),
    )?;
    let proxy = start(rt, policy.proxy.listen)
        .await
        .map_err(|e| format!("failed to start the proxy: {e}"))?;

    let mut out = String::new();
    let _ = writeln!(out, "iron-proxy demo");
    let _ = writeln!(
        out,
        "  proxy   http://{}  (CA: a fresh one in a temporary state directory)",
        proxy.addr
    );
    let _ = writeln!(
        out,
        "  origin  https://{DEMO_HOST}:{port} and https://{OTHER_HOST}:{port} -> {} (its own test CA)",
        origin.addr
    );
    let _ = writeln!(
        out,
        "  secret  DEMO_TOKEN: placeholder `DEMO_TOKEN`, real value from demo-token.txt, hosts [{DEMO_HOST}:{port}]"
    );
    let _ = writeln!(out);

    for (n, host) in [(1, DEMO_HOST), (2, OTHER_HOST)] {
        let before = origin.records().len();
        let authority = format!("{host}:{port}");
        let mut send = client::tunnel(proxy.addr, &authority, host, ca.ca.cert_pem()).await?;
        let req = Request::get(format!("https://{authority}/user"))
            .header("host", &authority)
            .header("authorization", "Bearer DEMO_TOKEN")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = client::fetch(&mut send, req).await?;
        let _ = writeln!(
            out,
            "{n}. client sent    GET https://{authority}/user  Authorization: Bearer DEMO_TOKEN"
        );
        let _ = writeln!(
            out,
            "   client got     {} {}",
            resp.status,
            String::from_utf8_lossy(&resp.body).trim()
        );
        match origin.records().get(before) {
            Some(r) => {
                let auth = r.header("authorization").unwrap_or_default();
                let shown = auth.replace(&secret, &mask(&secret));
                let _ = writeln!(
                    out,
                    "   origin got     {} {}  Authorization: {shown}  (real secret: {})",
                    r.method,
                    r.target,
                    if auth.contains(&secret) { "yes" } else { "no" }
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "   origin got     nothing: the proxy refused to send the placeholder there"
                );
            }
        }
    }
    let _ = writeln!(out, "\naudit log:");
    for r in audit.records() {
        let _ = writeln!(out, "  {}", serde_json::to_string(&r).unwrap_or_default());
    }
    proxy.stop();
    Ok(out)
}

fn mask(secret: &str) -> String {
    format!(
        "{}…[{} bytes masked]",
        &secret[..secret.len().min(5)],
        secret.len()
    )
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    let _ = crate::crypto_provider().secure_random.fill(&mut b);
    u128::from_be_bytes(b)
}
