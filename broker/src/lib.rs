//! Turns a secret reference from the policy into a usable credential.
//!
//! Static sources — `{ env = "VAR" }`, `{ file = "path" }`, each optionally with
//! `json_key` (DESIGN.md decision 9); token minting (OAuth2, GCP) in [`tokens`]; the
//! `iron-token-broker` daemon ([`daemon`]) with its durable [`store`]. Values are held in [`SecretValue`], which redacts `Debug`,
//! has no `Display` or `Serialize`, and is zeroized on drop.
//!
//! Sources are read lazily, on first use; a file is re-read whenever its modification time
//! or length changes, so a rotated file is picked up without a restart.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use iron_policy::{SourceKind, SourceRef};
use zeroize::Zeroizing;

pub mod cli;
pub mod daemon;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod upstream_proxy;

/// A secret value. `Debug` prints `[redacted]`; read it with [`SecretValue::expose`].
#[derive(Clone)]
pub struct SecretValue(Arc<Zeroizing<Vec<u8>>>);

impl SecretValue {
    /// Wraps `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Arc::new(Zeroizing::new(bytes)))
    }

    /// The value's bytes. Callers must not log or echo them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// True when `other` is a clone of this value (the same allocation), which implies
    /// equal bytes; a value read or minted anew is not, even with the same bytes.
    pub fn same(&self, other: &SecretValue) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue([redacted])")
    }
}

impl PartialEq for SecretValue {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for SecretValue {}

/// Why a source could not give a value. Names the variable, file or key, never a value.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The environment variable is not set.
    #[error("environment variable {var} is not set")]
    EnvMissing {
        /// Variable name.
        var: String,
    },
    /// The variable, file or JSON field is empty.
    #[error("{what} is empty")]
    Empty {
        /// `environment variable X`, `file P` or `json_key K`.
        what: String,
    },
    /// The file could not be read.
    #[error("failed to read secret file {path}")]
    File {
        /// File path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `json_key` was given and the source is not a JSON object holding that string field.
    #[error("{what}: {reason}")]
    Json {
        /// `environment variable X` or `file P`.
        what: String,
        /// What is wrong (not JSON, key missing, not a string).
        reason: String,
    },
}

impl SourceError {
    /// True when the source is absent (unset variable, missing file) rather than broken.
    pub fn is_missing(&self) -> bool {
        match self {
            Self::EnvMissing { .. } => true,
            Self::File { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            Self::Empty { .. } | Self::Json { .. } => false,
        }
    }
}

/// The process environment as the resolver sees it. Tests substitute a map instead of
/// mutating the real environment.
pub trait Env: Send + Sync {
    /// The variable `name`, if set.
    fn var(&self, name: &str) -> Option<OsString>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<OsString> {
        self.get(name).map(OsString::from)
    }
}

#[derive(Clone)]
struct FileEntry {
    stamp: FileStamp,
    bytes: SecretValue,
}

/// What says a file is unchanged: modification and status-change times, size and inode.
/// The status-change time (ctime) cannot be set by tools that keep the modification time
/// (`cp -p`, `touch -r`, `rsync -t`, `tar`), and the inode changes on a rename-replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    changed: (i64, i64),
    len: u64,
    ino: u64,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            modified: meta.modified().ok(),
            changed: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
            ino: meta.ino(),
        }
    }

    /// True when a cached read with this stamp may be reused: the stamp is unchanged and
    /// the file was last changed over [`RACY_SECS`] ago, so a second write within the
    /// clock's granularity cannot hide behind an equal stamp (git's "racy" rule).
    fn reusable(&self, now: SystemTime) -> bool {
        let changed = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(self.changed.0).unwrap_or(0));
        self.modified.is_some()
            && now
                .duration_since(changed)
                .is_ok_and(|d| d.as_secs() >= RACY_SECS)
    }
}

/// Seconds after its last change during which a file is always re-read.
const RACY_SECS: u64 = 2;

/// Resolves [`SourceRef`]s to values, caching file contents until the file changes.
pub struct SourceResolver {
    env: Arc<dyn Env>,
    files: Mutex<HashMap<PathBuf, FileEntry>>,
}

impl fmt::Debug for SourceResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceResolver").finish_non_exhaustive()
    }
}

impl SourceResolver {
    /// A resolver over `env`.
    pub fn new(env: Arc<dyn Env>) -> Self {
        Self {
            env,
            files: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the value `source` refers to. A single trailing newline (`\n` or `\r\n`) of a
    /// variable or file is removed, since editors and `echo` add one; other bytes are kept.
    /// With `json_key`, the source must be a JSON object and the key a string field.
    ///
    /// # Errors
    /// [`SourceError`] naming the variable, file or key when the value is missing, empty,
    /// unreadable or not the expected JSON.
    pub fn resolve(&self, source: &SourceRef) -> Result<SecretValue, SourceError> {
        // Names the source in errors; built only when one is reported.
        let what = || match &source.kind {
            SourceKind::Env(var) => format!("environment variable {var}"),
            SourceKind::File(path) => format!("file {}", path.display()),
        };
        let raw = match &source.kind {
            SourceKind::Env(var) => {
                let v = self
                    .env
                    .var(var)
                    .ok_or_else(|| SourceError::EnvMissing { var: var.clone() })?;
                SecretValue::new(v.into_encoded_bytes())
            }
            SourceKind::File(path) => self.read_file(path)?,
        };
        let value = match &source.json_key {
            None => {
                let kept = trim_newline(raw.expose()).len();
                if kept == raw.expose().len() {
                    raw
                } else {
                    SecretValue::new(raw.expose()[..kept].to_vec())
                }
            }
            Some(key) => pluck(raw.expose(), key, &what())?,
        };
        if value.expose().is_empty() {
            let what = match &source.json_key {
                Some(k) => format!("json_key {k} of {}", what()),
                None => what(),
            };
            return Err(SourceError::Empty { what });
        }
        Ok(value)
    }

    /// The names of environment variables `sources` read: the set a sandbox must not
    /// inherit.
    pub fn env_vars<'a>(sources: impl IntoIterator<Item = &'a SourceRef>) -> Vec<String> {
        let mut out: Vec<String> = sources
            .into_iter()
            .filter_map(|s| match &s.kind {
                SourceKind::Env(v) => Some(v.clone()),
                SourceKind::File(_) => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn read_file(&self, path: &Path) -> Result<SecretValue, SourceError> {
        let err = |source| SourceError::File {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        let stamp = FileStamp::of(&meta);
        if let Ok(files) = self.files.lock()
            && let Some(e) = files.get(path)
            && e.stamp == stamp
            && stamp.reusable(SystemTime::now())
        {
            return Ok(e.bytes.clone());
        }
        let bytes = SecretValue::new(std::fs::read(path).map_err(err)?);
        // A file rewritten in place (`echo new > file`: truncate, then write) can be read
        // between the two: empty, or a JSON document cut short. Within the racy window of
        // its change, such a read gives the last value read instead (and is not cached), so
        // a rotation does not fail the requests that land in the gap; a file still empty
        // or broken after the window is an error as before.
        if !stamp.reusable(SystemTime::now())
            && let Ok(files) = self.files.lock()
            && let Some(prev) = files.get(path)
            && looks_mid_write(prev.bytes.expose(), bytes.expose())
        {
            tracing::debug!(path = %path.display(), "file changed moments ago and reads empty or cut short; using the previous read");
            return Ok(prev.bytes.clone());
        }
        if let Ok(mut files) = self.files.lock() {
            files.insert(
                path.to_path_buf(),
                FileEntry {
                    stamp,
                    bytes: bytes.clone(),
                },
            );
        }
        Ok(bytes)
    }
}

/// True when `new` looks like a write in progress over `prev`: empty (but a newline), or
/// not JSON where `prev` was.
fn looks_mid_write(prev: &[u8], new: &[u8]) -> bool {
    if trim_newline(new).is_empty() {
        return !trim_newline(prev).is_empty();
    }
    let is_json = |b: &[u8]| serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok();
    prev.trim_ascii_start().starts_with(b"{") && is_json(prev) && !is_json(new)
}

fn trim_newline(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

fn pluck(doc: &[u8], key: &str, what: &str) -> Result<SecretValue, SourceError> {
    let json_err = |reason: String| SourceError::Json {
        what: what.to_string(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_slice(doc).map_err(|e| {
        json_err(format!(
            "not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let Some(obj) = v.as_object() else {
        return Err(json_err("not a JSON object".into()));
    };
    match obj.get(key) {
        Some(serde_json::Value::String(s)) => Ok(SecretValue::new(s.as_bytes().to_vec())),
        Some(_) => Err(json_err(format!("json_key {key} is not a string"))),
        None => Err(json_err(format!("json_key {key} is missing"))),
    }
}

/// Compares two secrets in time independent of where they differ (the length is not
/// hidden). For bearer tokens and placeholders checked against what a client sent.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iron_policy::Pos;

    fn env_ref(var: &str, key: Option<&str>) -> SourceRef {
        SourceRef {
            kind: SourceKind::Env(var.into()),
            json_key: key.map(Into::into),
            pos: Pos::default(),
        }
    }

    fn resolver(vars: &[(&str, &str)]) -> SourceResolver {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SourceResolver::new(Arc::new(map))
    }

    #[test]
    fn env_and_json_key() {
        let r = resolver(&[("A", "tok\n"), ("J", r#"{"k":"v1","n":3}"#), ("E", "")]);
        assert_eq!(r.resolve(&env_ref("A", None)).unwrap().expose(), b"tok");
        assert_eq!(r.resolve(&env_ref("J", Some("k"))).unwrap().expose(), b"v1");
        let e = r.resolve(&env_ref("J", Some("n"))).unwrap_err().to_string();
        assert_eq!(e, "environment variable J: json_key n is not a string");
        let e = r.resolve(&env_ref("J", Some("x"))).unwrap_err().to_string();
        assert_eq!(e, "environment variable J: json_key x is missing");
        let e = r.resolve(&env_ref("MISSING", None)).unwrap_err();
        assert!(e.is_missing());
        assert_eq!(
            r.resolve(&env_ref("E", None)).unwrap_err().to_string(),
            "environment variable E is empty"
        );
        assert_eq!(
            format!("{:?}", r.resolve(&env_ref("A", None)).unwrap()),
            "SecretValue([redacted])"
        );
    }

    #[test]
    fn file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "one\n").unwrap();
        let r = resolver(&[]);
        let src = SourceRef {
            kind: SourceKind::File(p.clone()),
            json_key: None,
            pos: Pos::default(),
        };
        assert_eq!(r.resolve(&src).unwrap().expose(), b"one");
        std::fs::write(&p, "second\n").unwrap();
        assert_eq!(r.resolve(&src).unwrap().expose(), b"second");
        std::fs::remove_file(&p).unwrap();
        assert!(r.resolve(&src).unwrap_err().is_missing());
    }

    #[test]
    fn a_rewrite_that_keeps_size_and_mtime_is_still_seen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "token-AAAA").unwrap();
        let before = FileStamp::of(&std::fs::metadata(&p).unwrap());
        // Past the kernel's timestamp tick, then `cp -p`/`touch -r` style: new bytes of the
        // same length with the old modification time put back.
        std::thread::sleep(Duration::from_millis(30));
        std::fs::write(&p, "token-BBBB").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(before.modified.unwrap())
            .unwrap();
        let after = FileStamp::of(&std::fs::metadata(&p).unwrap());
        assert_eq!((after.modified, after.len), (before.modified, before.len));
        assert_ne!(after, before, "the status-change time must tell them apart");
        // A file changed just now is re-read even with an equal stamp; later it is cached.
        let now = SystemTime::now();
        assert!(!after.reusable(now));
        assert!(after.reusable(now + Duration::from_secs(RACY_SECS + 1)));
        let r = resolver(&[]);
        let src = SourceRef {
            kind: SourceKind::File(p.clone()),
            json_key: None,
            pos: Pos::default(),
        };
        assert_eq!(r.resolve(&src).unwrap().expose(), b"token-BBBB");
    }

    /// A rotation by rewriting the file in place: a read between the truncate and the write
    /// (empty, or JSON cut short) gives the previous value; the new value is read as soon as
    /// it is there; a file left empty is an error once the racy window has passed.
    #[test]
    fn file_rewritten_in_place_never_reads_empty() {
        let dir = tempfile::tempdir().unwrap();
        let r = resolver(&[]);
        let raw = dir.path().join("raw");
        let json = dir.path().join("j.json");
        let src = |p: &std::path::Path, key: Option<&str>| SourceRef {
            kind: SourceKind::File(p.to_path_buf()),
            json_key: key.map(Into::into),
            pos: Pos::default(),
        };
        std::fs::write(&raw, "old-token\n").unwrap();
        std::fs::write(&json, r#"{"token": "old-json"}"#).unwrap();
        assert_eq!(r.resolve(&src(&raw, None)).unwrap().expose(), b"old-token");
        assert_eq!(
            r.resolve(&src(&json, Some("token"))).unwrap().expose(),
            b"old-json"
        );
        std::fs::write(&raw, "").unwrap();
        std::fs::write(&json, r#"{"token": "new-js"#).unwrap();
        assert_eq!(r.resolve(&src(&raw, None)).unwrap().expose(), b"old-token");
        assert_eq!(
            r.resolve(&src(&json, Some("token"))).unwrap().expose(),
            b"old-json"
        );
        std::fs::write(&raw, "new-token\n").unwrap();
        std::fs::write(&json, r#"{"token": "new-json"}"#).unwrap();
        assert_eq!(r.resolve(&src(&raw, None)).unwrap().expose(), b"new-token");
        assert_eq!(
            r.resolve(&src(&json, Some("token"))).unwrap().expose(),
            b"new-json"
        );
        // Emptied for good: an error once the change is older than the racy window.
        std::fs::write(&raw, "").unwrap();
        assert_eq!(r.resolve(&src(&raw, None)).unwrap().expose(), b"new-token");
        std::thread::sleep(Duration::from_secs(RACY_SECS + 1));
        let e = r.resolve(&src(&raw, None)).unwrap_err();
        assert!(e.to_string().ends_with("is empty"), "{e}");
    }
}
