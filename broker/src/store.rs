//! Durable credential state for `iron-token-broker` (DESIGN.md decision 12).
//!
//! One [`Record`] per credential holds the refresh token, the last access token and the
//! rotation bookkeeping. Two backends:
//!
//! - **file** (`{ file = "DIR" }`): `DIR/ID.json`, mode 0600, written as temp file + fsync +
//!   rename + fsync of the directory, so a crash at any point leaves either the old or the new
//!   record, never a torn one. A refresh holds an exclusive `flock` on `DIR/ID.lock`; the
//!   kernel drops it when the holder dies. For brokers on one machine.
//! - **postgres** (`{ postgres = { dsn = … } }`): table `iron_broker_credentials`, one row per
//!   credential with a lease (`lease_owner`, `lease_until`) and a fencing token (`fence`,
//!   incremented on every acquisition and every admin write). A write is accepted only with
//!   the current fence, so a broker whose lease was taken over cannot overwrite newer state.
//!   For several brokers on several machines.
//!
//! A refresh is: [`Store::acquire`] the lease → write the record with `in_flight` set (the
//! intent, durable before the IdP is called) → call the IdP → write the new refresh token
//! with `in_flight` cleared → [`Store::release`]. A record found with `in_flight` set by a
//! holder that is gone means a rotation may have happened whose result was lost.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether a credential can be refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CredState {
    /// Usable.
    #[default]
    Ok,
    /// Needs a human: re-bootstrap (`credentials set`) or `credentials revive`.
    Dead,
}

/// A refresh that was started and not finished: written before the IdP is called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The broker instance that started it (`host:pid:random`).
    pub owner: String,
    /// When, in Unix ms.
    pub started_at_ms: u64,
}

/// One credential's durable state. `Debug` never shows a token.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Credential id.
    pub id: String,
    /// The current refresh token.
    pub refresh_token: String,
    /// The last access token issued, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Its expiry, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Its lifetime when issued, ms.
    #[serde(default)]
    pub lifetime_ms: u64,
    /// Last successful refresh, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_ms: Option<u64>,
    /// Incremented on every successful refresh and every admin write.
    #[serde(default)]
    pub generation: u64,
    /// Usable or dead.
    #[serde(default)]
    pub state: CredState,
    /// Why dead: `invalid_grant` (or another OAuth error code), `rotation_interrupted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<String>,
    /// Set while a refresh is between "about to call the IdP" and "result stored".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    /// Last write, Unix ms.
    #[serde(default)]
    pub updated_at_ms: u64,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("dead_reason", &self.dead_reason)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("generation", &self.generation)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Record {
    /// A freshly bootstrapped credential holding `refresh_token`.
    pub fn bootstrap(id: &str, refresh_token: String, generation: u64) -> Self {
        Self {
            id: id.to_string(),
            refresh_token,
            generation,
            updated_at_ms: now_ms(),
            ..Self::default()
        }
    }

    /// Milliseconds of life left in the stored access token (0 when none or expired).
    pub fn remaining_ms(&self, now: u64) -> u64 {
        match (&self.access_token, self.expires_at_ms) {
            (Some(_), Some(exp)) => exp.saturating_sub(now),
            _ => 0,
        }
    }
}

/// Where credential state lives (from the broker config). `Debug` never shows the DSN (it
/// may hold the database password).
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// A directory of `ID.json` files.
    File(PathBuf),
    /// A Postgres DSN (the value, already resolved from its secret reference) and the extra
    /// roots (`upstream_ca` PEM files) its server certificate may chain to.
    Postgres {
        /// The DSN.
        dsn: String,
        /// Extra roots besides the web PKI's.
        upstream_ca: Vec<PathBuf>,
    },
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(dir) => f.debug_tuple("File").field(dir).finish(),
            Self::Postgres { upstream_ca, .. } => f
                .debug_struct("Postgres")
                .field("dsn", &"<redacted>")
                .field("upstream_ca", upstream_ca)
                .finish(),
        }
    }
}

/// Store failures. Messages name the store and the operation, never a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// I/O or database failure.
    #[error("credential store: {0}")]
    Io(String),
    /// A stored record cannot be parsed.
    #[error("credential store: record {id} is corrupt: {reason}")]
    Corrupt {
        /// Credential id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The lease was lost (another broker or an admin write took over): the write was
    /// refused.
    #[error("credential store: lease on {0} lost (fenced)")]
    Fenced(String),
}

/// Exclusive right to refresh one credential, with the record as read under it.
#[derive(Debug)]
pub struct Lease {
    /// Credential id.
    pub id: String,
    /// The record at acquisition.
    pub record: Record,
    fence: i64,
    /// The held `flock` (file store); released when dropped.
    _lock: Option<std::fs::File>,
}

/// A credential store.
pub enum Store {
    /// Directory backend.
    File(FileStore),
    /// Postgres backend.
    Postgres(PgStore),
}

impl Store {
    /// Opens the store: creates the directory (0700) or connects and creates the schema.
    ///
    /// # Errors
    /// [`StoreError::Io`] naming what failed.
    pub async fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        match cfg {
            StoreConfig::File(dir) => Ok(Self::File(FileStore::open(dir)?)),
            StoreConfig::Postgres { dsn, upstream_ca } => {
                Ok(Self::Postgres(PgStore::open(dsn, upstream_ca).await?))
            }
        }
    }

    /// Reads a credential's record; `None` when it was never bootstrapped.
    ///
    /// # Errors
    /// [`StoreError::Io`], [`StoreError::Corrupt`].
    pub async fn load(&self, id: &str) -> Result<Option<Record>, StoreError> {
        match self {
            Self::File(f) => f.load(id),
            Self::Postgres(p) => p.load(id).await,
        }
    }

    /// How the store makes a write durable, for the start-up log: `fsync` (file), or the
    /// store session's `synchronous_commit` (postgres, e.g. `synchronous_commit=on`; a role
    /// or database set to `off` is overridden to `on` on each connection).
    ///
    /// # Errors
    /// As [`Store::load`].
    pub async fn durability(&self) -> Result<String, StoreError> {
        match self {
            Self::File(_) => Ok("fsync".to_string()),
            Self::Postgres(p) => p
                .synchronous_commit()
                .await
                .map(|v| format!("synchronous_commit={v}")),
        }
    }

    /// Every record, by id.
    ///
    /// # Errors
    /// As [`Store::load`].
    pub async fn list(&self) -> Result<Vec<Record>, StoreError> {
        match self {
            Self::File(f) => f.list(),
            Self::Postgres(p) => p.list().await,
        }
    }

    /// An admin write (bootstrap, revive): replaces the record unconditionally, waiting up to
    /// `wait` for a refresh in progress on this machine (file) or fencing it off (postgres:
    /// the refresher's next write is refused).
    ///
    /// # Errors
    /// As [`Store::load`]; [`StoreError::Io`] when the lock is not free within `wait`.
    pub async fn put(&self, rec: &Record, wait: Duration) -> Result<(), StoreError> {
        match self {
            Self::File(f) => {
                let lock = f.lock_blocking(&rec.id, wait).await?;
                let r = f.write(rec);
                drop(lock);
                r
            }
            Self::Postgres(p) => p.put(rec).await,
        }
    }

    /// Takes the refresh lease on `id` for `ttl`; `Ok(None)` when another holder has it or
    /// the credential does not exist.
    ///
    /// # Errors
    /// As [`Store::load`].
    pub async fn acquire(
        &self,
        id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        match self {
            Self::File(f) => f.acquire(id),
            Self::Postgres(p) => p.acquire(id, owner, ttl, None).await,
        }
    }

    /// [`Store::acquire`], also taking a lease still held by `dead_owner`, a broker the
    /// caller knows is gone (it held the spill directory the caller now holds: see
    /// [`Spilled::holder`]). A file store's lease is a `flock`, which the kernel already
    /// dropped with that broker.
    ///
    /// # Errors
    /// As [`Store::load`].
    pub async fn acquire_from_dead(
        &self,
        id: &str,
        owner: &str,
        ttl: Duration,
        dead_owner: &str,
    ) -> Result<Option<Lease>, StoreError> {
        match self {
            Self::File(f) => f.acquire(id),
            Self::Postgres(p) => p.acquire(id, owner, ttl, Some(dead_owner)).await,
        }
    }

    /// Durably writes `rec` under `lease`.
    ///
    /// # Errors
    /// [`StoreError::Fenced`] when the lease was lost; [`StoreError::Io`].
    pub async fn write(&self, lease: &Lease, rec: &Record) -> Result<(), StoreError> {
        match self {
            Self::File(f) => f.write(rec),
            Self::Postgres(p) => p.write(lease, rec).await,
        }
    }

    /// Gives the lease back.
    pub async fn release(&self, lease: Lease) {
        match self {
            Self::File(_) => drop(lease),
            Self::Postgres(p) => p.release(&lease).await,
        }
    }
}

/// Crash-test hook: when `IRON_TOKEN_BROKER_CRASH_AT` equals `point`, the process aborts
/// there (as a SIGKILL would stop it). Points: `after_intent`, `after_idp`,
/// `after_tmp_write`, `after_commit`.
pub fn crash_point(point: &str) {
    if std::env::var("IRON_TOKEN_BROKER_CRASH_AT").is_ok_and(|v| v == point) {
        eprintln!("iron-token-broker: crash point {point} reached; aborting");
        std::process::abort();
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !id.starts_with('.')
}

/// The directory backend.
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::Io(format!("invalid credential id {id:?}")));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    fn load(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let path = self.path(id)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                id: id.to_string(),
                reason: format!("line {} column {}", e.line(), e.column()),
            })
    }

    fn list(&self) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| StoreError::Io(format!("cannot list {}: {e}", self.dir.display())))?;
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .filter(|id| valid_id(id))
            .collect();
        ids.sort();
        for id in ids {
            if let Some(r) = self.load(&id)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn lock_file(&self, id: &str) -> Result<std::fs::File, StoreError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.path(id)?;
        let path = self.dir.join(format!("{id}.lock"));
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", path.display())))
    }

    fn acquire(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        let file = self.lock_file(id)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Io(format!("cannot lock {id}: {e}")));
            }
        }
        let Some(record) = self.load(id)? else {
            return Ok(None);
        };
        Ok(Some(Lease {
            id: id.to_string(),
            record,
            fence: 0,
            _lock: Some(file),
        }))
    }

    async fn lock_blocking(&self, id: &str, wait: Duration) -> Result<std::fs::File, StoreError> {
        let file = self.lock_file(id)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock)
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Io(format!(
                        "credential {id} is being refreshed; try again"
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::Io(format!("cannot lock {id}: {e}")));
                }
            }
        }
    }

    /// Temp file (0600) + fsync + rename + fsync of the directory.
    fn write(&self, rec: &Record) -> Result<(), StoreError> {
        let path = self.path(&rec.id)?;
        let body = serde_json::to_vec_pretty(rec).map_err(|e| StoreError::Io(e.to_string()))?;
        write_atomic(&path, &rec.id, &body)
    }
}

/// Writes `body` (and a newline) to `path` so that a crash at any point leaves either the
/// old file or the new one: a temp file `.NAME.tmp-PID-MS` (mode 0600) in the same
/// directory, fsync, rename over `path`, fsync of the directory. Temp files of the same
/// name left by a crash are removed first (they may hold a token); the caller holds
/// whatever lock makes it the only writer of `path`.
///
/// # Errors
/// [`StoreError::Io`] naming the step and `id`.
fn write_atomic(path: &Path, id: &str, body: &[u8]) -> Result<(), StoreError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |what: &str, e: std::io::Error| StoreError::Io(format!("{what} for {id}: {e}"));
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StoreError::Io(format!("invalid file name for {id}")))?;
    let prefix = format!(".{name}.tmp-");
    let ours = |n: &str| {
        // Exactly `.NAME.tmp-PID-MS`: another id may itself contain `.json.tmp-`.
        n.strip_prefix(&prefix)
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(pid, ms)| {
                !pid.is_empty()
                    && !ms.is_empty()
                    && pid.bytes().all(|b| b.is_ascii_digit())
                    && ms.bytes().all(|b| b.is_ascii_digit())
            })
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_str().is_some_and(ours) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let tmp = dir.join(format!("{prefix}{}-{}", std::process::id(), now_ms()));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("cannot create temp file", e))?;
    let written = f
        .write_all(body)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("cannot write temp file", e));
    }
    drop(f);
    crash_point("after_tmp_write");
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("cannot rename temp file", e));
    }
    sync_dir(dir).map_err(|e| io("cannot fsync the directory", e))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Hex SHA-256 of a refresh token: how a spill file names the token its refresh started
/// from without holding it.
pub fn token_digest(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A record the store could not take, kept on local disk until it can
/// (`spill_dir/ID.spill.json`, mode 0600). It may hold the only copy of a rotated refresh
/// token (the IdP answered while the store was down), so a broker killed before the store
/// came back finds it at its next start instead of marking the credential
/// `rotation_interrupted`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spilled {
    /// [`token_digest`] of the refresh token stored when the refresh began: the held record
    /// applies only while the store still holds that token.
    pub base_sha256: String,
    /// The stored generation when the refresh began: a higher one in the store means an
    /// admin write (`revive`, `set`) since, which a held non-rotation must not undo.
    pub base_generation: u64,
    /// The intent (`in_flight`) the held record settles, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settles: Option<InFlight>,
    /// The broker (its lease owner name) that wrote this file. A broker that holds the
    /// spill directory after it knows that one is gone, and may take its store lease.
    pub holder: String,
    /// The record to write.
    pub record: Record,
}

impl std::fmt::Debug for Spilled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spilled")
            .field("settles", &self.settles)
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// The broker's spill directory (config `spill_dir`): one [`Spilled`] file per credential
/// whose record is waiting for the store. One broker per directory: it holds an exclusive
/// `flock` on `DIR/.lock` while it runs.
pub struct SpillDir {
    dir: PathBuf,
    _lock: std::fs::File,
}

impl SpillDir {
    /// Creates the directory (0700) if missing and locks it.
    ///
    /// # Errors
    /// [`StoreError::Io`] when it cannot be created or another broker holds it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let io = |what: &str, e: std::io::Error| {
            StoreError::Io(format!("spill_dir {}: {what}: {e}", dir.display()))
        };
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("cannot create", e))?;
        // Its files hold refresh tokens: an existing directory is narrowed to its owner.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("cannot set mode 0700", e))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(".lock"))
            .map_err(|e| io("cannot open .lock", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Io(format!(
                    "spill_dir {} is in use by another broker; give each broker its own",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("cannot lock", e)),
        }
        // Temp files left by a save cut short hold a token; no live writer owns one now.
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.contains(".spill.json.tmp-"))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Renames the spill of `id` to `ID.spill.dropped-MS` (kept for a human, read by
    /// nothing); `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn set_aside(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        let path = self.path(id)?;
        let aside = self.dir.join(format!("{id}.spill.dropped-{}", now_ms()));
        match std::fs::rename(&path, &aside) {
            Ok(()) => {
                sync_dir(&self.dir).map_err(|e| {
                    StoreError::Io(format!("cannot fsync {}: {e}", self.dir.display()))
                })?;
                Ok(Some(aside))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io(format!(
                "cannot rename {}: {e}",
                path.display()
            ))),
        }
    }

    fn path(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::Io(format!("invalid credential id {id:?}")));
        }
        Ok(self.dir.join(format!("{id}.spill.json")))
    }

    /// True when `id` has a spill file.
    pub fn holds(&self, id: &str) -> bool {
        self.path(id).is_ok_and(|p| p.exists())
    }

    /// Durably writes `s` (replacing an earlier spill of the same credential).
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn save(&self, s: &Spilled) -> Result<(), StoreError> {
        let path = self.path(&s.record.id)?;
        let body = serde_json::to_vec_pretty(s).map_err(|e| StoreError::Io(e.to_string()))?;
        write_atomic(&path, &s.record.id, &body)
    }

    /// The spilled record of `id`, if any.
    ///
    /// # Errors
    /// [`StoreError::Io`]; [`StoreError::Corrupt`] when the file does not parse (it is left
    /// in place for a human).
    pub fn load(&self, id: &str) -> Result<Option<Spilled>, StoreError> {
        let path = self.path(id)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let s: Spilled = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            id: id.to_string(),
            reason: format!(
                "{}: line {} column {}",
                path.display(),
                e.line(),
                e.column()
            ),
        })?;
        if s.record.id != id {
            return Err(StoreError::Corrupt {
                id: id.to_string(),
                reason: format!("{} holds credential {:?}", path.display(), s.record.id),
            });
        }
        Ok(Some(s))
    }

    /// Removes the spill of `id` (written to the store, or superseded there); no error
    /// when there is none.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let path = self.path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir)
                .map_err(|e| StoreError::Io(format!("cannot fsync {}: {e}", self.dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io(format!(
                "cannot remove {}: {e}",
                path.display()
            ))),
        }
    }

    /// Ids with a spill file, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".spill.json"))
                    .filter(|id| valid_id(id))
                    .map(str::to_string)
            })
            .collect();
        ids.sort();
        ids
    }
}

/// The Postgres backend (tokio-postgres; one connection, re-opened when it drops). Every
/// connect and statement is bounded by [`PG_TIMEOUT`]; on a timeout the connection is
/// dropped and the next call opens a new one.
pub struct PgStore {
    /// Boxed: a parsed config is large, and the store enum holds this inline.
    config: Box<tokio_postgres::Config>,
    /// TLS to the server, when [`store_uses_tls`] says so.
    tls: Option<StoreTls>,
    client: tokio::sync::Mutex<Option<std::sync::Arc<tokio_postgres::Client>>>,
}

/// Whether the store connects over TLS, and with which `sslmode`. The connection carries
/// refresh tokens: a server that is not on this machine (a host other than a Unix socket,
/// `localhost` or a loopback address) is reached over verified TLS unless the DSN says
/// `sslmode=disable` (`prefer` is taken as `require`, so a server without TLS is refused
/// rather than used in cleartext); a local one over TLS only with `sslmode=require`
/// (`prefer` stays cleartext there, like before). The certificate is always verified
/// against the web PKI roots plus `upstream_ca`, for the DSN's host name.
fn store_uses_tls(config: &tokio_postgres::Config) -> Option<tokio_postgres::config::SslMode> {
    use tokio_postgres::config::{Host, SslMode};
    let remote = config.get_hosts().iter().any(|h| match h {
        Host::Tcp(name) => {
            name != "localhost"
                && !name
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Host::Unix(_) => false,
    });
    match config.get_ssl_mode() {
        SslMode::Disable => None,
        SslMode::Require => Some(SslMode::Require),
        _ if remote => Some(SslMode::Require),
        _ => None,
    }
}

/// tokio-postgres TLS for the store: rustls with the process's crypto provider, server
/// certificate verified for the host being connected to (RFC 6125 via webpki); SCRAM channel
/// binding `tls-server-end-point` ([`crate::tls::server_end_point_hash`]).
#[derive(Clone)]
struct StoreTls {
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl StoreTls {
    fn new(upstream_ca: &[PathBuf]) -> Result<Self, StoreError> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = crate::tls::client_config_all_hosts(upstream_ca, provider)
            .map_err(|e| StoreError::Io(format!("postgres: {e}")))?;
        Ok(Self {
            config: std::sync::Arc::new(config),
        })
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for StoreTls
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = StoreTlsStream<S>;
    type TlsConnect = StoreTlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::io::Result<StoreTlsConnect> {
        let host = domain.trim_matches(|c| c == '[' || c == ']').to_string();
        let name = rustls_pki_types::ServerName::try_from(host)
            .map_err(|_| std::io::Error::other(format!("invalid server name {domain}")))?;
        Ok(StoreTlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One TLS connect of [`StoreTls`].
struct StoreTlsConnect {
    config: std::sync::Arc<rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
}

type TlsFuture<S> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<StoreTlsStream<S>>> + Send>>;

impl<S> tokio_postgres::tls::TlsConnect<S> for StoreTlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = StoreTlsStream<S>;
    type Error = std::io::Error;
    type Future = TlsFuture<S>;

    fn connect(self, stream: S) -> TlsFuture<S> {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(StoreTlsStream)
        })
    }
}

/// A TLS connection of the store.
struct StoreTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::TlsStream for StoreTlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        {
            Some(cert) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(
                crate::tls::server_end_point_hash(cert.as_ref()),
            ),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for StoreTlsStream<S>
{
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for StoreTlsStream<S>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Bound on one Postgres connect or statement of the credential store.
pub const PG_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on cancelling a statement that overran [`PG_TIMEOUT`].
pub const PG_CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest one store call can take: a new connection, its statement, and the cancel
/// of that statement, each at its bound.
pub const PG_CALL_WORST: Duration =
    Duration::from_secs(PG_TIMEOUT.as_secs() * 2 + PG_CANCEL_TIMEOUT.as_secs());

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS iron_broker_credentials (
    id text PRIMARY KEY,
    record text NOT NULL,
    fence bigint NOT NULL DEFAULT 0,
    lease_owner text,
    lease_until timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
)";

impl PgStore {
    async fn open(dsn: &str, upstream_ca: &[PathBuf]) -> Result<Self, StoreError> {
        // tokio-postgres errors never include the password of the DSN.
        let mut config: tokio_postgres::Config = dsn
            .parse()
            .map_err(|e| StoreError::Io(format!("postgres: invalid DSN: {e}")))?;
        let tls = match store_uses_tls(&config) {
            Some(mode) => {
                config.ssl_mode(mode);
                Some(StoreTls::new(upstream_ca)?)
            }
            None => None,
        };
        let s = Self {
            config: Box::new(config),
            tls,
            client: tokio::sync::Mutex::new(None),
        };
        let c = s.client().await?;
        // A broker role may lack CREATE: only create the table when it is missing, and
        // serialize creation when several brokers start at once.
        let exists: bool = s
            .timed(
                &c,
                c.query_one(
                    "SELECT to_regclass('iron_broker_credentials') IS NOT NULL",
                    &[],
                ),
            )
            .await?
            .get(0);
        if !exists {
            let ddl = format!(
                "SELECT pg_advisory_lock(7311); {SCHEMA}; SELECT pg_advisory_unlock(7311);"
            );
            s.timed(&c, c.batch_execute(&ddl)).await?;
        }
        Ok(s)
    }

    async fn client(&self) -> Result<std::sync::Arc<tokio_postgres::Client>, StoreError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let late = |_| StoreError::Io("postgres: no connection within 10 s".into());
        let client = match &self.tls {
            Some(tls) => {
                let (client, conn) =
                    tokio::time::timeout(PG_TIMEOUT, self.config.connect(tls.clone()))
                        .await
                        .map_err(late)?
                        .map_err(pg_err)?;
                tokio::spawn(watch_connection(conn));
                client
            }
            None => {
                let (client, conn) =
                    tokio::time::timeout(PG_TIMEOUT, self.config.connect(tokio_postgres::NoTls))
                        .await
                        .map_err(late)?
                        .map_err(pg_err)?;
                tokio::spawn(watch_connection(conn));
                client
            }
        };
        let client = std::sync::Arc::new(client);
        // A commit the server has not flushed is lost in its crash: with the intent or a
        // rotated refresh token, that means replaying a rotated-out token. A role or
        // database set to `off` is overridden for this session (stronger settings kept).
        let setting = self
            .timed(&client, client.query_one("SHOW synchronous_commit", &[]))
            .await?;
        if setting.get::<_, String>(0) == "off" {
            tracing::warn!(
                "the credential store's role or database has synchronous_commit=off; the broker's session sets it on"
            );
            self.timed(&client, client.batch_execute("SET synchronous_commit = on"))
                .await?;
        }
        *guard = Some(client.clone());
        Ok(client)
    }

    async fn synchronous_commit(&self) -> Result<String, StoreError> {
        let c = self.client().await?;
        let row = self
            .timed(&c, c.query_one("SHOW synchronous_commit", &[]))
            .await?;
        Ok(row.get(0))
    }

    /// Runs one statement of `c` under [`PG_TIMEOUT`]. On a timeout the statement is
    /// cancelled on the server (so it does not commit later, bounded to 2 s) and the
    /// connection is dropped if it is still the current one.
    async fn timed<T>(
        &self,
        c: &std::sync::Arc<tokio_postgres::Client>,
        fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(PG_TIMEOUT, fut).await {
            Ok(r) => r.map_err(pg_err),
            Err(_) => {
                let cancel = c.cancel_token();
                let cancelled = async {
                    match &self.tls {
                        Some(tls) => cancel.cancel_query(tls.clone()).await,
                        None => cancel.cancel_query(tokio_postgres::NoTls).await,
                    }
                };
                let _ = tokio::time::timeout(PG_CANCEL_TIMEOUT, cancelled).await;
                let mut slot = self.client.lock().await;
                if slot
                    .as_ref()
                    .is_some_and(|cur| std::sync::Arc::ptr_eq(cur, c))
                {
                    *slot = None;
                }
                Err(StoreError::Io("postgres: no answer within 10 s".into()))
            }
        }
    }

    async fn load(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let c = self.client().await?;
        let row = self
            .timed(
                &c,
                c.query_opt(
                    "SELECT record FROM iron_broker_credentials WHERE id = $1",
                    &[&id],
                ),
            )
            .await?;
        row.map(|r| parse_row(id, r.get(0))).transpose()
    }

    async fn list(&self) -> Result<Vec<Record>, StoreError> {
        let c = self.client().await?;
        let rows = self
            .timed(
                &c,
                c.query(
                    "SELECT id, record FROM iron_broker_credentials ORDER BY id",
                    &[],
                ),
            )
            .await?;
        rows.into_iter()
            .map(|r| parse_row(r.get(0), r.get(1)))
            .collect()
    }

    async fn put(&self, rec: &Record) -> Result<(), StoreError> {
        let c = self.client().await?;
        let body = serde_json::to_string(rec).map_err(|e| StoreError::Io(e.to_string()))?;
        self.timed(
            &c,
            c.execute(
                "INSERT INTO iron_broker_credentials (id, record) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record,
               fence = iron_broker_credentials.fence + 1, lease_owner = NULL,
               lease_until = NULL, updated_at = now()",
                &[&rec.id, &body],
            ),
        )
        .await?;
        Ok(())
    }

    async fn acquire(
        &self,
        id: &str,
        owner: &str,
        ttl: Duration,
        dead_owner: Option<&str>,
    ) -> Result<Option<Lease>, StoreError> {
        let c = self.client().await?;
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let row = self
            .timed(
                &c,
                c.query_opt(
                    "UPDATE iron_broker_credentials
                 SET fence = fence + 1, lease_owner = $2,
                     lease_until = now() + $3::bigint * interval '1 millisecond'
                 WHERE id = $1
                   AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $4)
                 RETURNING fence, record",
                    &[&id, &owner, &ms, &dead_owner],
                ),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(Lease {
            id: id.to_string(),
            fence: row.get(0),
            record: parse_row(id, row.get(1))?,
            _lock: None,
        }))
    }

    async fn write(&self, lease: &Lease, rec: &Record) -> Result<(), StoreError> {
        let c = self.client().await?;
        let body = serde_json::to_string(rec).map_err(|e| StoreError::Io(e.to_string()))?;
        let n = self
            .timed(
                &c,
                c.execute(
                    "UPDATE iron_broker_credentials SET record = $3, updated_at = now()
                 WHERE id = $1 AND fence = $2",
                    &[&lease.id, &lease.fence, &body],
                ),
            )
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Fenced(lease.id.clone()))
        }
    }

    async fn release(&self, lease: &Lease) {
        let Ok(c) = self.client().await else { return };
        // A release that fails leaves the lease to expire on its own.
        let _ = self
            .timed(
                &c,
                c.execute(
                    "UPDATE iron_broker_credentials SET lease_owner = NULL, lease_until = NULL
                 WHERE id = $1 AND fence = $2",
                    &[&lease.id, &lease.fence],
                ),
            )
            .await;
    }
}

fn parse_row(id: &str, text: &str) -> Result<Record, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        reason: format!("line {} column {}", e.line(), e.column()),
    })
}

/// Drives a store connection until it ends, logging why.
async fn watch_connection<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = conn.await {
        tracing::warn!(error = %e, "credential store connection ended");
    }
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // tokio-postgres errors never include the password of the DSN.
    match e.as_db_error() {
        Some(db) => StoreError::Io(format!(
            "postgres: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        )),
        None => StoreError::Io(format!("postgres: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_remote_store_is_reached_over_tls_unless_sslmode_disable() {
        use tokio_postgres::config::SslMode;
        let mode = |dsn: &str| store_uses_tls(&dsn.parse().expect("dsn"));
        assert_eq!(
            mode("postgresql://u:p@db.internal:5432/b"),
            Some(SslMode::Require)
        );
        assert_eq!(
            mode("postgresql://u:p@10.1.2.3/b?sslmode=prefer"),
            Some(SslMode::Require)
        );
        assert_eq!(mode("postgresql://u:p@10.1.2.3/b?sslmode=disable"), None);
        for local in [
            "postgresql://u:p@127.0.0.1:5432/b",
            "postgresql://u:p@localhost/b",
            "postgresql://u:p@[::1]:5432/b",
            "host=/var/run/postgresql dbname=b",
        ] {
            assert_eq!(mode(local), None, "{local}");
        }
        assert_eq!(
            mode("postgresql://u:p@127.0.0.1/b?sslmode=require"),
            Some(SslMode::Require)
        );
    }

    use super::*;

    #[tokio::test]
    async fn file_store_round_trip_mode_and_lock() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig::File(dir.path().join("creds")))
            .await
            .unwrap();
        assert!(store.load("a").await.unwrap().is_none());
        let rec = Record::bootstrap("a", "rt_secret".into(), 1);
        store.put(&rec, Duration::from_secs(1)).await.unwrap();
        assert_eq!(store.load("a").await.unwrap(), Some(rec.clone()));
        let mode = std::fs::metadata(dir.path().join("creds/a.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // One lease at a time; a second acquirer is told to wait.
        let lease = store
            .acquire("a", "me", Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(
            store
                .acquire("a", "other", Duration::from_secs(5))
                .await
                .unwrap()
                .is_none()
        );
        assert!(store.put(&rec, Duration::from_millis(100)).await.is_err());
        store.release(lease).await;
        assert!(
            store
                .acquire("a", "other", Duration::from_secs(5))
                .await
                .unwrap()
                .is_some()
        );
        assert!(!format!("{rec:?}").contains("rt_secret"));
        // A leftover temp file (a crash between write and rename) is ignored.
        std::fs::write(dir.path().join("creds/.a.json.tmp-1-1"), b"{garbage").unwrap();
        assert_eq!(store.list().await.unwrap().len(), 1);
        assert!(store.load("../x").await.is_err());
    }

    #[test]
    fn spill_dir_round_trip_lock_and_leftovers() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spill");
        let spill = SpillDir::open(&dir).unwrap();
        // One broker per directory.
        let Err(StoreError::Io(msg)) = SpillDir::open(&dir) else {
            panic!("a second broker opened the same spill_dir");
        };
        assert!(msg.contains("in use by another broker"), "{msg}");
        assert!(spill.load("a").unwrap().is_none());
        let s = Spilled {
            base_sha256: token_digest("rt_old"),
            base_generation: 1,
            settles: Some(InFlight {
                owner: "h:1:2".into(),
                started_at_ms: 5,
            }),
            holder: "h:1:2".into(),
            record: Record::bootstrap("a", "rt_rotated_secret".into(), 2),
        };
        // A temp file left by a crash mid-save holds a token: the next save removes it.
        let leftover = dir.join(".a.spill.json.tmp-1-1");
        std::fs::write(&leftover, b"{rt_partial").unwrap();
        spill.save(&s).unwrap();
        assert!(!leftover.exists());
        assert_eq!(spill.load("a").unwrap(), Some(s.clone()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("a.spill.json")), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(spill.ids(), vec!["a".to_string()]);
        assert!(!format!("{s:?}").contains("rt_rotated_secret"));
        // A file naming another credential is not taken for this one.
        std::fs::copy(dir.join("a.spill.json"), dir.join("b.spill.json")).unwrap();
        assert!(matches!(spill.load("b"), Err(StoreError::Corrupt { .. })));
        spill.remove("a").unwrap();
        spill.remove("a").unwrap();
        assert!(spill.load("a").unwrap().is_none());
        // A dropped rotation is set aside for a human, out of the way of `load` and `ids`.
        spill.save(&s).unwrap();
        let aside = spill.set_aside("a").unwrap().unwrap();
        assert!(aside.exists() && spill.load("a").unwrap().is_none());
        assert_eq!(spill.set_aside("a").unwrap(), None);
        assert_eq!(spill.ids(), vec!["b".to_string()]);
        drop(spill);
        // The lock goes with the broker; a reopened directory is narrowed to 0700 and
        // loses temp files a cut-short save left.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&leftover, b"{rt_partial").unwrap();
        assert!(SpillDir::open(&dir).is_ok());
        assert_eq!(mode(&dir), 0o700);
        assert!(!leftover.exists());
    }
}
