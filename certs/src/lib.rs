//! The interception CA and the per-host leaf certificates iron-proxy presents to clients.
//!
//! - [`CertificateAuthority`]: generate (ECDSA P-256), write (`ca.crt` 0644, `ca.key` 0600,
//!   never overwriting), and load a CA from PEM, checking it is a CA and that the key fits.
//! - [`LeafCache`]: mints one ECDSA P-256 leaf per host on demand — DNS SAN for names, IP SAN
//!   for IP literals, 128-bit random serial, `notBefore` backdated by a day for clients with
//!   skewed clocks, three days of life past now — and caches a ready rustls `ServerConfig`
//!   per host in a bounded cache with per-host single-flight minting (no global lock).
//!   Cached leaves are re-minted a day before they expire (REFERENCE.md D9, D14).
//!
//! It does not decide *which* host to mint for; the proxy binds the CONNECT authority.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// File name of the CA certificate written by [`CertificateAuthority::init_dir`].
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key written by [`CertificateAuthority::init_dir`].
pub const CA_KEY_FILE: &str = "ca.key";
/// How far a leaf's `notBefore` is set in the past, for clients whose clocks lag.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(24 * 3600);
/// How long a leaf stays valid after it is minted.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(3 * 24 * 3600);
/// A cached leaf is replaced once less than this much of its life remains.
pub const LEAF_REMINT_MARGIN: Duration = Duration::from_secs(24 * 3600);
/// Validity of a generated CA: ten years.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Errors from CA handling and leaf minting. Messages name files and hosts, never keys.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A CA file could not be read or written.
    #[error("failed to access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `init_dir` found an existing file.
    #[error("{path} already exists; refusing to overwrite it")]
    Exists {
        /// The file that exists.
        path: PathBuf,
    },
    /// The CA certificate or key is not valid PEM, not a CA, or they do not belong together.
    #[error("invalid CA: {reason}")]
    InvalidCa {
        /// What is wrong.
        reason: String,
    },
    /// rcgen failed to generate or sign.
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the minted key or configuration.
    #[error("tls configuration failed")]
    Tls(#[from] rustls::Error),
}

/// An interception CA: its certificate and the issuer used to sign leaves.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new ECDSA P-256 CA named `common_name`, valid for [`CA_LIFETIME`],
    /// constrained to path length 0. Returns the CA and its key as PKCS#8 PEM.
    ///
    /// # Errors
    /// [`CertError::Generate`] if key generation or signing fails.
    pub fn generate(common_name: &str) -> Result<(Self, String), CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "iron-proxy");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let ca = Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    /// Loads a CA from PEM text. The certificate must be a CA (basicConstraints CA) whose
    /// keyUsage includes keyCertSign, within its validity period, and the key (PKCS#8, SEC1
    /// or PKCS#1 PEM) must match its public key.
    ///
    /// # Errors
    /// [`CertError::InvalidCa`] naming what is wrong.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let invalid = |reason: &str| CertError::InvalidCa {
            reason: reason.to_string(),
        };
        let key = KeyPair::from_pem(key_pem)
            .map_err(|_| invalid("the key is not a supported PEM private key"))?;
        let cert_der: CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
                .map_err(|_| invalid("the certificate is not a PEM X.509 certificate"))?;
        let (_, x509) = x509_parser::parse_x509_certificate(cert_der.as_ref())
            .map_err(|_| invalid("the certificate is not a valid X.509 certificate"))?;
        if !x509.is_ca() {
            return Err(invalid(
                "the certificate is not a CA (basicConstraints CA is not set)",
            ));
        }
        // As the reference (REFERENCE.md §2.4): a CA must be allowed to sign certificates;
        // RFC 5280 §4.2.1.3 has a CA certificate carry keyUsage with keyCertSign.
        match x509.key_usage() {
            Ok(Some(ku)) if ku.value.key_cert_sign() => {}
            Ok(Some(_)) => {
                return Err(invalid(
                    "the certificate's keyUsage does not include keyCertSign (it may not sign certificates)",
                ));
            }
            Ok(None) => {
                return Err(invalid(
                    "the certificate has no keyUsage extension (a CA needs keyUsage keyCertSign)",
                ));
            }
            Err(_) => return Err(invalid("the certificate's keyUsage extension is malformed")),
        }
        // Every leaf chained to a CA outside its validity period fails verification.
        let validity = x509.validity();
        let now = x509_parser::time::ASN1Time::now();
        if now > validity.not_after {
            return Err(CertError::InvalidCa {
                reason: format!("the certificate expired on {}", validity.not_after),
            });
        }
        if now < validity.not_before {
            return Err(CertError::InvalidCa {
                reason: format!(
                    "the certificate is not valid before {} (check the clock)",
                    validity.not_before
                ),
            });
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid("the key does not belong to the certificate"));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|_| invalid("the certificate cannot be used to sign leaves"))?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer,
        })
    }

    /// Loads a CA from a certificate file and a key file.
    ///
    /// # Errors
    /// [`CertError::Io`] when a file cannot be read; [`CertError::InvalidCa`] as in
    /// [`CertificateAuthority::from_pem`].
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| CertError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        Self::from_pem(&read(cert_path)?, &read(key_path)?)
    }

    /// Generates a CA and writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, creating
    /// `dir` if needed. Refuses to overwrite either file.
    ///
    /// # Errors
    /// [`CertError::Exists`] if either file exists; [`CertError::Io`] on write failure.
    pub fn init_dir(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(CertError::Exists { path: p.clone() });
            }
        }
        fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let (ca, key_pem) = Self::generate("iron-proxy interception CA")?;
        write_new(&key_path, key_pem.as_bytes(), 0o600)?;
        write_new(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// Loads the CA in `dir`, or creates it there when neither file exists.
    ///
    /// # Errors
    /// As [`CertificateAuthority::load`] and [`CertificateAuthority::init_dir`]; a directory
    /// holding only one of the two files is an error rather than being overwritten.
    pub fn load_or_init(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            Self::load(&cert_path, &key_path)
        } else {
            Self::init_dir(dir)
        }
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Mints a leaf for `host` (a DNS name or IP literal): ECDSA P-256, random serial,
    /// EKU serverAuth, KeyUsage digitalSignature, valid from now − [`LEAF_BACKDATE`] to
    /// now + [`LEAF_LIFETIME`]. Returns the rustls key with chain `[leaf, ca]` and its expiry.
    ///
    /// # Errors
    /// [`CertError::Generate`] or [`CertError::Tls`] when minting fails.
    pub fn mint_leaf(
        &self,
        host: &str,
        provider: &CryptoProvider,
    ) -> Result<(CertifiedKey, SystemTime), CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into()?),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let ck = CertifiedKey::from_der(
            vec![leaf.der().clone(), self.cert_der.clone()],
            key_der,
            provider,
        )?;
        Ok((ck, SystemTime::now() + LEAF_LIFETIME))
    }
}

struct CachedLeaf {
    config: Arc<ServerConfig>,
    not_after: SystemTime,
}

/// A bounded cache of per-host TLS server configurations, each holding a leaf minted by the
/// CA. Minting for one host never blocks lookups for another. All configurations share one
/// session cache and one ticketer, so TLS resumption works across hosts.
pub struct LeafCache {
    ca: Arc<CertificateAuthority>,
    provider: Arc<CryptoProvider>,
    cache: quick_cache::sync::Cache<String, Arc<CachedLeaf>>,
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
    alpn: Vec<Vec<u8>>,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("len", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache of at most `capacity` hosts, offering `alpn` protocols (e.g. `http/1.1`).
    ///
    /// # Errors
    /// [`CertError::Tls`] if the session ticketer cannot be created.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        provider: Arc<CryptoProvider>,
        capacity: usize,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Self, CertError> {
        Ok(Self {
            ca,
            provider,
            cache: quick_cache::sync::Cache::new(capacity.max(1)),
            sessions: rustls::server::ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
            alpn,
        })
    }

    /// The CA leaves are signed by.
    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// The server configuration presenting a leaf for `host` (normalized: lowercase, no
    /// brackets). Mints on a miss or when the cached leaf is within
    /// [`LEAF_REMINT_MARGIN`] of expiry; concurrent callers for one host share one mint.
    ///
    /// # Errors
    /// [`CertError`] when minting fails (for example a host that is not a valid DNS name).
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CertError> {
        self.server_config_traced(host).map(|(c, _)| c)
    }

    /// As [`LeafCache::server_config`], also saying whether the cache already held a fresh
    /// leaf (`true`) or one was minted (`false`).
    ///
    /// # Errors
    /// As [`LeafCache::server_config`].
    pub fn server_config_traced(&self, host: &str) -> Result<(Arc<ServerConfig>, bool), CertError> {
        if let Some(hit) = self.cache.get(host) {
            if hit.not_after > SystemTime::now() + LEAF_REMINT_MARGIN {
                tracing::trace!(host, "leaf cache hit");
                return Ok((hit.config.clone(), true));
            }
            self.cache.remove(host);
        }
        let leaf = self
            .cache
            .get_or_insert_with(host, || self.mint(host).map(Arc::new))?;
        Ok((leaf.config.clone(), false))
    }

    fn mint(&self, host: &str) -> Result<CachedLeaf, CertError> {
        let (ck, not_after) = self.ca.mint_leaf(host, &self.provider)?;
        tracing::debug!(host, "minted leaf certificate");
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
        config.alpn_protocols = self.alpn.clone();
        // The provider's suite order, not the client's, picks the cipher: the proxy's
        // order is chosen by measurement (iron_proxy::crypto_provider).
        config.ignore_client_order = true;
        config.session_storage = self.sessions.clone();
        config.ticketer = self.ticketer.clone();
        Ok(CachedLeaf {
            config: Arc::new(config),
            not_after,
        })
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let rng = rustls::crypto::aws_lc_rs::default_provider().secure_random;
    if rng.fill(&mut bytes).is_err() {
        // The system RNG failing is not recoverable; fall back to time-derived bytes so a
        // serial is still unique per mint.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = t.to_be_bytes();
    }
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never shortened by DER minimal encoding
    SerialNumber::from_slice(&bytes)
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    #[test]
    fn init_writes_files_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::init_dir(dir.path()).unwrap();
        let key_mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let err = CertificateAuthority::init_dir(dir.path()).unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }));
        // And it loads back.
        CertificateAuthority::load_or_init(dir.path()).unwrap();
    }

    #[test]
    fn rejects_mismatched_key_and_non_ca() {
        let (a, _) = CertificateAuthority::generate("a").unwrap();
        let (_, key_b) = CertificateAuthority::generate("b").unwrap();
        let err = CertificateAuthority::from_pem(a.cert_pem(), &key_b).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        // A leaf is not a CA.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["x.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let err = CertificateAuthority::from_pem(&leaf.pem(), &key.serialize_pem()).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    /// A CA certificate that may not sign certificates, has no keyUsage, or is outside its
    /// validity period is refused with the reason (REFERENCE.md §4: no start without
    /// CertSign); the generated CA loads.
    #[test]
    fn rejects_a_ca_without_cert_sign_or_out_of_its_validity() {
        let ca = |usages: Vec<KeyUsagePurpose>, from: i64, to: i64| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = usages;
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + time::Duration::days(from);
            params.not_after = now + time::Duration::days(to);
            let cert = params.self_signed(&key).unwrap();
            CertificateAuthority::from_pem(&cert.pem(), &key.serialize_pem())
        };
        let sign = || {
            vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ]
        };
        assert!(ca(sign(), -1, 30).is_ok());
        for (usages, from, to, expect) in [
            (
                vec![KeyUsagePurpose::DigitalSignature],
                -1,
                30,
                "keyCertSign",
            ),
            (vec![], -1, 30, "no keyUsage"),
            (sign(), -30, -1, "expired"),
            (sign(), 2, 30, "not valid before"),
        ] {
            let err = ca(usages, from, to).expect_err(expect).to_string();
            assert!(err.contains(expect), "{expect}: {err}");
        }
        let (generated, key) = CertificateAuthority::generate("g").unwrap();
        CertificateAuthority::from_pem(generated.cert_pem(), &key).unwrap();
    }

    #[test]
    fn leaf_is_cached_and_verifies_against_the_ca() {
        let (ca, _) = CertificateAuthority::generate("t").unwrap();
        let ca = Arc::new(ca);
        let cache = LeafCache::new(ca.clone(), provider(), 10, vec![b"http/1.1".to_vec()]).unwrap();
        let a = cache.server_config("api.example.test").unwrap();
        let b = cache.server_config("api.example.test").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let ip = cache.server_config("127.0.0.1").unwrap();
        assert!(!Arc::ptr_eq(&a, &ip));

        // A real rustls client trusting only the CA accepts the leaf for the IP literal.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(ip).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking());
    }
}
