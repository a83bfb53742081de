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

/// The `tls-server-end-point` channel binding data of a server certificate (RFC 5929
/// §4.1), as PostgreSQL computes it for SCRAM-SHA-256-PLUS: the certificate hashed with the
/// hash of its signature algorithm, SHA-256 when that is MD5 or SHA-1 — and for algorithms
/// with no hash of their own (Ed25519) or a certificate that does not parse.
pub fn server_end_point_hash(cert_der: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    // Signature algorithm OIDs (RFC 4055 §5, RFC 5758 §3.2) hashed with SHA-384 / SHA-512.
    const SHA384: [&str; 2] = ["1.2.840.113549.1.1.12", "1.2.840.10045.4.3.3"];
    const SHA512: [&str; 2] = ["1.2.840.113549.1.1.13", "1.2.840.10045.4.3.4"];
    let oid = x509_parser::parse_x509_certificate(cert_der)
        .map(|(_, c)| c.signature_algorithm.algorithm.to_id_string())
        .unwrap_or_default();
    if SHA384.contains(&oid.as_str()) {
        sha2::Sha384::digest(cert_der).to_vec()
    } else if SHA512.contains(&oid.as_str()) {
        sha2::Sha512::digest(cert_der).to_vec()
    } else {
        sha2::Sha256::digest(cert_der).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        use sha2::Digest as _;
        let cert = |alg: &'static rcgen::SignatureAlgorithm| {
            let key = rcgen::KeyPair::generate_for(alg).expect("key");
            rcgen::CertificateParams::new(vec!["db.test".to_string()])
                .expect("params")
                .self_signed(&key)
                .expect("cert")
                .der()
                .to_vec()
        };
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            server_end_point_hash(&p256),
            sha2::Sha256::digest(&p256).to_vec()
        );
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            server_end_point_hash(&p384),
            sha2::Sha384::digest(&p384).to_vec()
        );
        assert_eq!(server_end_point_hash(b"junk").len(), 32);
    }
}
