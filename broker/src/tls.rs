//! TLS client roots shared by the proxy's upstream client and the broker daemon's
//! token-endpoint client: the web PKI roots plus operator-supplied CA files.

use std::path::PathBuf;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// The web PKI roots (`webpki-roots`) plus every certificate in the PEM files `extra`
/// (`upstream_ca`).
///
/// # Errors
/// A message naming the file when one cannot be read, holds no certificate, or holds an
/// unusable one.
pub fn roots_with(extra: &[PathBuf]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra {
        for c in read_certs(path)? {
            roots.add(c).map_err(|e| {
                format!(
                    "unusable certificate in upstream_ca {}: {e}",
                    path.display()
                )
            })?;
        }
    }
    Ok(roots)
}

/// The certificates of one `upstream_ca` PEM file, in file order.
///
/// # Errors
/// A message naming the file when it cannot be read, is not PEM or holds no certificate.
pub fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("failed to read upstream_ca {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid PEM in upstream_ca {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "upstream_ca {} holds no certificate",
            path.display()
        ));
    }
    Ok(certs)
}
