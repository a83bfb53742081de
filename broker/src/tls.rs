//! Upstream TLS clients, one definition for all of them: the proxy's upstream client (and
//! its Postgres relay's upstream leg), the broker daemon's token-endpoint client and its
//! Postgres store. Roots are the web PKI's plus operator-supplied `upstream_ca` files (each
//! trusted for every host or for some);
//! verification is [`UpstreamVerifier`]; channel binding data is
//! [`server_end_point_hash`].

use std::sync::Arc;

use iron_policy::UpstreamCa;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// The certificates of one `upstream_ca` PEM file, in file order.
///
/// # Errors
/// A message naming the file when it cannot be read, is not PEM or holds no certificate.
fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
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

/// The rustls client configuration for upstreams (proxied origins, token endpoints, the
/// Postgres relay's upstream leg, the broker's store): TLS 1.2+ with `provider`, verified by
/// [`UpstreamVerifier`] over the web PKI roots plus the `upstream_ca` entries (each file
/// read once). ALPN is left to the caller.
///
/// # Errors
/// A message naming the `upstream_ca` file that cannot be read, holds no certificate or an
/// unusable one, or the provider's refusal.
pub fn client_config(
    upstream_ca: &[UpstreamCa],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ClientConfig, String> {
    let scope = |roots: RootCertStore, pinned| {
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("tls configuration failed: {e}"))?;
        Ok::<_, String>(Scope { webpki, pinned })
    };
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut pinned = Vec::new();
    let mut scoped = Vec::new();
    for ca in upstream_ca {
        let certs = read_certs(&ca.file)?;
        let mut own = RootCertStore::empty();
        let store = if ca.hosts.is_empty() {
            &mut roots
        } else {
            &mut own
        };
        for c in &certs {
            store.add(c.clone()).map_err(|e| {
                format!(
                    "unusable certificate in upstream_ca {}: {e}",
                    ca.file.display()
                )
            })?;
        }
        if ca.hosts.is_empty() {
            pinned.extend(certs);
        } else {
            scoped.push((ca.clone(), scope(own, certs)?));
        }
    }
    let everywhere = scope(roots, pinned)?;
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls configuration failed: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(UpstreamVerifier { everywhere, scoped }))
            .with_no_client_auth(),
    )
}

/// [`client_config`] with every file of `upstream_ca` trusted for every host (the broker
/// daemon's `upstream_ca`, which lists its own token endpoints and store).
///
/// # Errors
/// As [`client_config`].
pub fn client_config_all_hosts(
    upstream_ca: &[std::path::PathBuf],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ClientConfig, String> {
    let cas: Vec<UpstreamCa> = upstream_ca
        .iter()
        .cloned()
        .map(UpstreamCa::everywhere)
        .collect();
    client_config(&cas, provider)
}

/// Upstream certificate verification: webpki path validation (RFC 5280 via rustls-webpki)
/// to the web PKI roots and the `upstream_ca` files trusted for every host; failing that,
/// to each file scoped (`{ file, hosts }`) to a pattern the server name matches — a scoped
/// CA never vouches for any other host. Plus one case webpki refuses that operators rely
/// on: a server presenting a self-signed certificate that is itself listed in an
/// `upstream_ca` file trusted for it. Such certificates usually carry `CA:TRUE`
/// (`openssl req -x509`'s default), which webpki rejects as an end-entity
/// (`CaUsedAsEndEntity`). A presented certificate byte-identical to such a one is accepted
/// when it names the server (subjectAltName) and `now` is within its validity period; the
/// handshake signature is still checked against its key. Anything else gets webpki's
/// verdict for the roots trusted for every host.
#[derive(Debug)]
pub struct UpstreamVerifier {
    everywhere: Scope,
    scoped: Vec<(UpstreamCa, Scope)>,
}

/// Roots a server certificate may chain to, and the self-signed certificates accepted as
/// they are.
#[derive(Debug)]
struct Scope {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl Scope {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::client::danger::ServerCertVerifier as _;
        let verdict = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            Err(e)
                if self
                    .pinned
                    .iter()
                    .any(|p| p.as_ref() == end_entity.as_ref()) =>
            {
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                if !valid_at(end_entity, now.as_secs()) {
                    return Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::Expired,
                    ));
                }
                tracing::debug!(error = %e, "upstream certificate accepted: it is listed in upstream_ca");
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verdict =
            self.everywhere
                .verify(end_entity, intermediates, server_name, ocsp_response, now);
        if verdict.is_ok() || self.scoped.is_empty() {
            return verdict;
        }
        let host = match server_name {
            rustls_pki_types::ServerName::DnsName(n) => n.as_ref().to_ascii_lowercase(),
            rustls_pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            _ => return verdict,
        };
        let host = host.strip_suffix('.').unwrap_or(&host);
        self.scoped
            .iter()
            .filter(|(ca, _)| ca.trusted_for(host))
            .find_map(|(_, scope)| {
                scope
                    .verify(end_entity, intermediates, server_name, ocsp_response, now)
                    .ok()
            })
            .map_or(verdict, Ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.everywhere
            .webpki
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.everywhere
            .webpki
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.everywhere.webpki.supported_verify_schemes()
    }
}

/// True when `now_secs` (Unix seconds) is within the validity period (notBefore..=notAfter,
/// RFC 5280 §4.1.2.5) of the DER certificate `der`; false when it is outside or `der` does
/// not parse.
pub fn valid_at(der: &[u8], now_secs: u64) -> bool {
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok(now) = i64::try_from(now_secs) else {
        return false;
    };
    let v = x509.validity();
    v.not_before.timestamp() <= now && now <= v.not_after.timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_at_checks_both_ends_of_the_validity_period() {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let at = |y: i32| {
            time::Date::from_calendar_date(y, time::Month::June, 1)
                .unwrap()
                .midnight()
                .assume_utc()
                .unix_timestamp() as u64
        };
        assert!(valid_at(&der, at(2026)));
        assert!(!valid_at(&der, at(2019)));
        assert!(!valid_at(&der, at(2031)));
        assert!(!valid_at(b"not a certificate", at(2026)));
    }

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
