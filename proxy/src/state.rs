//! The state directory (`$IRON_PROXY_HOME`, default `./.iron-proxy`): the CA created on
//! first start when the policy names none, and `ca-bundle.pem` — the proxy CA followed by
//! the system's roots — for clients whose CA variable replaces rather than extends their
//! trust store (curl's `CURL_CA_BUNDLE`, Python's `REQUESTS_CA_BUNDLE`…), so passthrough
//! hosts that present their real certificates still verify.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use iron_certs::{CA_CERT_FILE, CertificateAuthority};
use iron_policy::Policy;

/// Environment variable naming the state directory.
pub const HOME_ENV: &str = "IRON_PROXY_HOME";
/// File name of the combined CA bundle in the state directory.
pub const BUNDLE_FILE: &str = "ca-bundle.pem";
/// System root bundles looked for, in order.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The state directory: `$IRON_PROXY_HOME`, else `./.iron-proxy`.
pub fn state_dir() -> PathBuf {
    std::env::var_os(HOME_ENV).map_or_else(|| PathBuf::from(".iron-proxy"), PathBuf::from)
}

/// The interception CA and the files a sandbox is pointed at.
#[derive(Debug)]
pub struct CaFiles {
    /// The loaded CA.
    pub ca: Arc<CertificateAuthority>,
    /// The CA certificate alone (PEM).
    pub cert: PathBuf,
    /// The CA certificate followed by the system roots (PEM).
    pub bundle: PathBuf,
}

/// Loads the policy's CA, or the state directory's (creating it on first use), and writes
/// the CA bundle into the state directory.
///
/// # Errors
/// A message naming the file that could not be read, created or written.
pub fn load_ca(policy: &Policy, dir: &Path) -> Result<CaFiles, String> {
    let (ca, cert) = match &policy.proxy.ca {
        Some((cert, key)) => (
            CertificateAuthority::load(cert, key).map_err(|e| chain(&e))?,
            cert.clone(),
        ),
        None => (
            CertificateAuthority::load_or_init(dir).map_err(|e| chain(&e))?,
            dir.join(CA_CERT_FILE),
        ),
    };
    let cert = std::path::absolute(&cert).unwrap_or(cert);
    let bundle = write_bundle(&ca, dir)?;
    Ok(CaFiles {
        ca: Arc::new(ca),
        cert,
        bundle,
    })
}

fn write_bundle(ca: &CertificateAuthority, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("failed to create state directory {}: {e}", dir.display()))?;
    let mut pem = ca.cert_pem().to_string();
    if let Some(system) = SYSTEM_BUNDLES
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
    {
        if !pem.ends_with('\n') {
            pem.push('\n');
        }
        pem.push_str(&system);
    }
    let path = dir.join(BUNDLE_FILE);
    let tmp = dir.join(format!(".{BUNDLE_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, pem)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("failed to write {}: {e}", path.display()))?;
    Ok(std::path::absolute(&path).unwrap_or(path))
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::pipeline::ErrorChain(e).to_string()
}
