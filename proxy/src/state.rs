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
    let (ca, cert, key) = match &policy.proxy.ca {
        Some((cert, key)) => (
            CertificateAuthority::load(cert, key).map_err(|e| chain(&e))?,
            cert.clone(),
            key.clone(),
        ),
        None => {
            create_dir(dir)?;
            (
                CertificateAuthority::load_or_init(dir).map_err(|e| chain(&e))?,
                dir.join(CA_CERT_FILE),
                dir.join(iron_certs::CA_KEY_FILE),
            )
        }
    };
    warn_if_readable_by_others(&key);
    let cert = std::path::absolute(&cert).unwrap_or(cert);
    let bundle = write_bundle(&ca, dir)?;
    Ok(CaFiles {
        ca: Arc::new(ca),
        cert,
        bundle,
    })
}

/// Creates the state directory (and its parents) with mode 0755 whatever the umask allows
/// beyond that: its files are what sandboxes read (the CA bundle, the stub key file); the
/// secret ones in it (the CA key, `pg-*.json`) are 0600 themselves.
///
/// # Errors
/// A message naming the directory.
pub(crate) fn create_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if dir.is_dir() {
        return Ok(());
    }
    let err =
        |e: std::io::Error| format!("failed to create state directory {}: {e}", dir.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(err)?;
    // Exactly 0755: the umask may have taken more (a sandbox run as another user must read
    // the bundle) or less.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)
}

/// Writes `data` to `path` with `mode` (not the umask's default), through a temporary file
/// renamed over it.
fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            // Exactly `mode`, whatever the umask.
            use std::os::unix::fs::PermissionsExt as _;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(data)
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("failed to write {}: {e}", path.display())
        })
}

/// Logs a warning when the CA key at `path` can be read or written by other users.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the CA key can be read by other users: anyone who reads it can impersonate any host to the sandbox; chmod 600 it"
        );
    }
}

fn write_bundle(ca: &CertificateAuthority, dir: &Path) -> Result<PathBuf, String> {
    create_dir(dir)?;
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
    write_with_mode(&path, pem.as_bytes(), 0o644)?;
    Ok(std::path::absolute(&path).unwrap_or(path))
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::pipeline::ErrorChain(e).to_string()
}

/// For the first `gcp_auth` secret: writes (once) a stub service-account key file into the
/// state directory and returns the variables that point Google clients at it:
/// `GOOGLE_APPLICATION_CREDENTIALS` and `CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE` (gcloud
/// ignores the former). The file holds a freshly generated RSA key that is *not* the real
/// key; clients sign their token request with it, and the proxy answers that request with
/// a stub token and injects the real one.
///
/// Only a `gcp_auth` secret in `grants` (the sandbox's caller's) counts.
///
/// # Errors
/// A message when the key cannot be generated or the file written.
pub fn gcp_stub_env(
    policy: &Policy,
    dir: &Path,
    grants: &iron_policy::Grants,
) -> Result<Vec<(String, String)>, String> {
    let Some(secret) = policy
        .secrets
        .iter()
        .enumerate()
        .find(|&(i, s)| matches!(s.kind, iron_policy::SecretKind::Gcp(_)) && grants.allows(i))
        .map(|(_, s)| s)
    else {
        return Ok(Vec::new());
    };
    create_dir(dir)?;
    let path = dir.join(format!("gcp-stub-{}.json", secret.name));
    if !path.exists() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .map_err(|e| format!("failed to generate the stub key: {e}"))?;
        let doc = serde_json::json!({
            "type": "service_account",
            "project_id": "iron-proxy-stub",
            "private_key_id": "iron-proxy-stub",
            "private_key": key.serialize_pem(),
            "client_email": "iron-proxy-stub@iron-proxy-stub.iam.gserviceaccount.com",
            "client_id": "000000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": format!("https://{}/token", iron_policy::model::GCP_TOKEN_HOST),
        });
        // Readable by the sandbox, which may run as another user; it holds no secret.
        write_with_mode(
            &path,
            &serde_json::to_vec_pretty(&doc).unwrap_or_default(),
            0o644,
        )?;
    }
    let path = std::path::absolute(&path)
        .unwrap_or(path)
        .display()
        .to_string();
    Ok(vec![
        ("GOOGLE_APPLICATION_CREDENTIALS".into(), path.clone()),
        ("CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE".into(), path),
    ])
}
