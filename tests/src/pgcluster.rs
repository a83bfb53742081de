//! An ephemeral PostgreSQL 15 cluster for tests: `initdb` with SCRAM-SHA-256 auth in a
//! temporary directory, `postgres` on a random loopback port, both run as the `postgres`
//! user through `runuser` (Postgres refuses to run as root). Stopped (SIGINT, fast
//! shutdown) and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the Debian packages put the server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The superuser's password.
pub const SUPER_PASSWORD: &str = "super_REALpw_1";

/// A running cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
}

fn as_postgres(bin: &str) -> Command {
    let mut c = if nix_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join(bin));
        c
    } else {
        Command::new(Path::new(PG_BIN).join(bin))
    };
    c.env("LC_ALL", "C.UTF-8");
    c
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl PgCluster {
    /// Starts a cluster with `ssl = on`, serving a leaf for `127.0.0.1` issued by a fresh
    /// test CA; returns the cluster and the CA certificate (PEM). `None` as [`Self::start`].
    pub fn start_tls() -> Option<(Self, String)> {
        let (ca_pem, leaf_pem, key_pem) = test_pki();
        Self::start_inner(Some((leaf_pem, key_pem))).map(|c| (c, ca_pem))
    }

    /// Starts a cluster, or `None` when the server binaries are not installed (a panic
    /// instead when `IRON_TESTS_REQUIRE_PG` is set).
    pub fn start() -> Option<Self> {
        Self::start_inner(None)
    }

    fn start_inner(tls: Option<(String, String)>) -> Option<Self> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            // CI installs the server and sets this, so a missing install fails there
            // instead of skipping silently.
            assert!(
                std::env::var_os("IRON_TESTS_REQUIRE_PG").is_none(),
                "IRON_TESTS_REQUIRE_PG is set but {PG_BIN}/initdb is missing"
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("iron-pg")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let data = dir.path().join("data");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, SUPER_PASSWORD).expect("pwfile");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let out = as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pw.display()))
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut extra: Vec<String> = Vec::new();
        if let Some((cert, key)) = tls {
            let (cert_path, key_path) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_path, cert).expect("server.crt");
            std::fs::write(&key_path, key).expect("server.key");
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&cert_path)
                .arg(&key_path)
                .status();
            let _ = Command::new("chmod").arg("0600").arg(&key_path).status();
            for kv in [
                "ssl=on".to_string(),
                format!("ssl_cert_file={}", cert_path.display()),
                format!("ssl_key_file={}", key_path.display()),
            ] {
                extra.push("-c".into());
                extra.push(kv);
            }
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
            l.local_addr().expect("addr").port()
        };
        let child = as_postgres("postgres")
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
            ])
            .arg(dir.path())
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ])
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        let c = Self { dir, port, child };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && c.psql("select 1").is_ok()
            {
                return Some(c);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres did not start");
    }

    /// Runs SQL as the superuser with psql; returns stdout.
    ///
    /// # Errors
    /// psql's stderr.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .arg(format!(
                "postgresql://postgres@127.0.0.1:{}/postgres",
                self.port
            ))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", SUPER_PASSWORD)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The data directory's parent.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // runuser does not forward SIGINT: signal the postmaster itself (fast shutdown),
        // then reap runuser; SIGKILL both after 10 s.
        let pid_file = self.dir.path().join("data/postmaster.pid");
        let postmaster = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| self.child.id().to_string());
        let _ = Command::new("kill").args(["-INT", &postmaster]).status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", &postmaster]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a leaf for `127.0.0.1` (ECDSA P-256): `(ca_pem, leaf_pem, leaf_key_pem)`.
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "iron-tests postgres CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("leaf params");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}
