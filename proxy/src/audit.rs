//! The audit log: one JSON line per request, per refused CONNECT and per passthrough tunnel,
//! on stderr (or any [`AuditSink`]). Lines carry names, hosts, paths without query, codes
//! and byte counts — never a header value, query string or secret value (decision 8).

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use smallvec::SmallVec;

/// One secret applied to a request; written as `{"name": …, "location": …}`.
#[derive(Debug, Clone)]
pub struct AppliedSecret {
    /// The secret's counters (and name), counted when the record is emitted.
    pub stats: Arc<crate::SecretStats>,
    /// Where it was applied.
    pub location: AppliedAt,
}

/// Where a secret was applied: written `header:NAME`, `query:NAME`, `path`, `stub` (a
/// token-endpoint stub answered) or `pg` (a Postgres relay session).
#[derive(Debug, Clone)]
pub enum AppliedAt {
    /// Swapped or injected into an HTTP request.
    Request(iron_policy::Location),
    /// A token-endpoint or metadata stub answered locally.
    Stub,
    /// A Postgres relay session authenticated with the secret's password.
    Pg,
    /// Made available to a WebSocket connection's text messages (`websocket_frames`)
    /// without being in its upgrade request.
    WebSocket,
    /// Not applied: its value could not be had and it fails open (`on_failure = "open"`);
    /// written `skipped:credential_unavailable`.
    Skipped,
}

impl std::fmt::Display for AppliedAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Request(l) => l.fmt(f),
            Self::Stub => f.write_str("stub"),
            Self::Pg => f.write_str("pg"),
            Self::WebSocket => f.write_str("websocket"),
            Self::Skipped => f.write_str("skipped:credential_unavailable"),
        }
    }
}

/// How many locations have their audit entry cached per secret: `stub`, `pg`, `path`, and
/// a header of [`iron_policy::COMMON_HEADERS`] named as hyper hands it over (lowercase).
pub(crate) const CACHED_LOCATIONS: usize = 3 + iron_policy::COMMON_HEADERS.len();

impl AppliedAt {
    /// The slot of this location's cached audit entry, if it has one.
    fn cache_slot(&self) -> Option<usize> {
        match self {
            Self::Stub => Some(0),
            Self::Pg => Some(1),
            Self::Request(iron_policy::Location::Path) => Some(2),
            Self::Request(iron_policy::Location::Header(Cow::Borrowed(h))) => {
                iron_policy::COMMON_HEADERS
                    .iter()
                    .position(|c| c == h)
                    .map(|i| 3 + i)
            }
            Self::Request(_) | Self::WebSocket | Self::Skipped => None,
        }
    }
}

/// `{"name":…,"location":…}`, serialized field by field.
struct Entry<'a>(&'a AppliedSecret);

impl Serialize for Entry<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("AppliedSecret", 2)?;
        st.serialize_field("name", &*self.0.stats.name)?;
        st.serialize_field("location", &format_args!("{}", self.0.location))?;
        st.end()
    }
}

/// Written as `{"name":…,"location":…}`. For the common locations the entry is serialized
/// once per secret and copied afterwards: JSON escaping of the same two strings on every
/// request was most of what a swap added to the audit writer's work.
impl Serialize for AppliedSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.cached() {
            Some(raw) => raw.serialize(s),
            None => Entry(self).serialize(s),
        }
    }
}

impl AppliedSecret {
    /// The entry's JSON, serialized on first use, for a common location; `None` otherwise.
    fn cached(&self) -> Option<&serde_json::value::RawValue> {
        self.location.cache_slot().and_then(|i| {
            self.stats.audit_entries[i]
                .get_or_init(|| {
                    serde_json::to_string(&Entry(self))
                        .ok()
                        .and_then(|j| serde_json::value::RawValue::from_string(j).ok())
                })
                .as_deref()
        })
    }
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// When the request arrived; written as an RFC 3339 UTC timestamp (`ts`). Formatted by
    /// the writer, off the request path.
    #[serde(rename = "ts", serialize_with = "rfc3339")]
    pub arrived: time::OffsetDateTime,
    /// `request`, `connect` (a refused CONNECT, or an intercepted tunnel that failed before
    /// its first request) or `tunnel` (a passthrough tunnel).
    pub kind: &'static str,
    /// The request id also returned in error envelopes.
    #[serde(serialize_with = "request_id")]
    pub request_id: crate::RequestId,
    /// Client address (`IP:PORT`).
    #[serde(serialize_with = "client_addr")]
    pub client: SocketAddr,
    /// The authenticated caller (`[[callers]]`), when the policy has callers.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "caller_name"
    )]
    pub caller: Option<std::sync::Arc<str>>,
    /// HTTP method (`CONNECT` for tunnels; `STARTUP` and `CANCEL` for Postgres relay
    /// sessions); the standard ones are not copied.
    pub method: Cow<'static, str>,
    /// Destination host.
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// `https` (intercepted), `http` (cleartext) or `tunnel`.
    pub scheme: &'static str,
    /// What the destination is to the policy: `secret` (a secret's host), `stub` (answered
    /// locally), `passthrough`, `allow` (on `[proxy].allow`), `open` (reachable only because
    /// egress is open) or `denied` (not reachable).
    pub host_class: &'static str,
    /// Path without the query.
    pub path: String,
    /// Status sent to the client (0 when none was sent).
    pub status: u16,
    /// `forwarded`, `refused`, `client_cancel`, `upstream_error` or `closed`.
    pub outcome: &'static str,
    /// The error code when the proxy refused or failed the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// Secrets swapped or injected, with where (one held inline: a request with one secret
    /// allocates nothing for this list, and frees nothing on the writer thread).
    pub secrets: SmallVec<[AppliedSecret; 1]>,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// Milliseconds from arrival to the end of the response body.
    pub duration_ms: u64,
    /// Postgres relay sessions whose role or settings are pinned: statements refused for
    /// undoing the pin (`crate::pgfilter`). Written only when not zero.
    #[serde(skip_serializing_if = "is_zero")]
    pub statements_refused: u64,
    /// Real values the origin echoed back in the response (headers, status text, body,
    /// trailers), each put back to its placeholder (`crate::echo`). Written only when not
    /// zero.
    #[serde(skip_serializing_if = "is_zero")]
    pub echoes_scrubbed: u64,
    #[serde(skip)]
    started: Option<Instant>,
}

impl AuditRecord {
    /// A record for a request that arrived now.
    pub fn new(
        kind: &'static str,
        request_id: crate::RequestId,
        client: SocketAddr,
        method: &str,
    ) -> Self {
        Self {
            arrived: time::OffsetDateTime::now_utc(),
            kind,
            request_id,
            client,
            caller: None,
            method: static_method(method)
                .map_or_else(|| Cow::Owned(method.to_string()), Cow::Borrowed),
            host: String::new(),
            port: 0,
            scheme: "https",
            host_class: "denied",
            path: String::new(),
            status: 0,
            outcome: "forwarded",
            error: None,
            secrets: SmallVec::new(),
            bytes_in: 0,
            bytes_out: 0,
            statements_refused: 0,
            echoes_scrubbed: 0,
            duration_ms: 0,
            started: Some(Instant::now()),
        }
    }

    /// Sets `duration_ms` from the arrival time.
    pub fn stop_clock(&mut self) {
        if let Some(t) = self.started {
            self.duration_ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        }
    }
}

/// `method` as a static string when it is one of the common methods.
fn static_method(method: &str) -> Option<&'static str> {
    const COMMON: [&str; 11] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "STARTUP",
        "CANCEL",
    ];
    COMMON.into_iter().find(|m| *m == method)
}

fn request_id<S: serde::Serializer>(id: &crate::RequestId, s: S) -> Result<S::Ok, S::Error> {
    let hex = id.hex();
    s.serialize_str(std::str::from_utf8(&hex).unwrap_or_default())
}

/// `IP:PORT`; an IPv4 address is written digit by digit (`Display` of a `SocketAddr` takes
/// the formatting machinery through a dozen pieces: a third of an audit line's cost).
fn client_addr<S: serde::Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    match client_text(addr) {
        Some(text) => s.serialize_str(text.as_str()),
        None => s.collect_str(addr),
    }
}

/// `addr` as `IP:PORT` on the stack (`None` only if it did not fit in 64 bytes).
fn client_text(addr: &SocketAddr) -> Option<StackText> {
    use std::fmt::Write as _;
    let mut text = StackText::default();
    let SocketAddr::V4(v4) = addr else {
        return write!(text, "{addr}").ok().map(|()| text);
    };
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            text.push(b'.');
        }
        text.push_decimal(octet.into());
    }
    text.push(b':');
    text.push_decimal(v4.port());
    Some(text)
}

/// A 64-byte text buffer on the stack; a write that does not fit fails.
struct StackText {
    buf: [u8; 64],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        Self {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl StackText {
    /// Appends an ASCII byte (dropped if full: callers stay far below the 64 bytes).
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    /// Appends `n` in decimal.
    fn push_decimal(&mut self, n: u16) {
        for &d in itoa::Buffer::new().format(n).as_bytes() {
            self.push(d);
        }
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `t` as RFC 3339 text, formatted on the stack (at most 35 bytes for a UTC time with
/// nanoseconds; empty if it cannot be formatted).
fn rfc3339<S: serde::Serializer>(t: &time::OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 64];
    s.serialize_str(rfc3339_text(t, &mut buf))
}

/// `t` as RFC 3339 text in `buf`.
fn rfc3339_text<'b>(t: &time::OffsetDateTime, buf: &'b mut [u8; 64]) -> &'b str {
    let mut out = &mut buf[..];
    // The length written is what the slice advanced by (format_into's count is not the
    // whole text for a fractional second).
    let n = match t.format_into(&mut out, &time::format_description::well_known::Rfc3339) {
        Ok(_) => 64 - out.len(),
        Err(_) => 0,
    };
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

impl AuditRecord {
    /// Appends the record as one JSON object (no newline), byte for byte what its
    /// `Serialize` gives through `serde_json::to_writer`, for the audit writer's hot path:
    /// the constant keys are copied instead of escaped, numbers go through `itoa`, and a
    /// string is escaped by serde_json only when it holds a quote, a backslash or a control
    /// character.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut ts = [0u8; 64];
        put_str(out, b"{\"ts\":", rfc3339_text(&self.arrived, &mut ts));
        put_const(out, b",\"kind\":", self.kind);
        out.extend_from_slice(b",\"request_id\":\"");
        out.extend_from_slice(&self.request_id.hex());
        out.extend_from_slice(b"\",\"client\":");
        match client_text(&self.client) {
            Some(text) => json_str(out, text.as_str()),
            None => json_str(out, &self.client.to_string()),
        }
        if let Some(c) = &self.caller {
            put_str(out, b",\"caller\":", c);
        }
        put_str(out, b",\"method\":", &self.method);
        put_str(out, b",\"host\":", &self.host);
        put_int(out, b",\"port\":", self.port);
        put_const(out, b",\"scheme\":", self.scheme);
        put_const(out, b",\"host_class\":", self.host_class);
        put_str(out, b",\"path\":", &self.path);
        put_int(out, b",\"status\":", self.status);
        put_const(out, b",\"outcome\":", self.outcome);
        if let Some(e) = self.error {
            put_const(out, b",\"error\":", e);
        }
        out.extend_from_slice(b",\"secrets\":[");
        for (i, s) in self.secrets.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match s.cached() {
                Some(raw) => out.extend_from_slice(raw.get().as_bytes()),
                None => {
                    let _ = serde_json::to_writer(&mut *out, &Entry(s));
                }
            }
        }
        put_int(out, b"],\"bytes_in\":", self.bytes_in);
        put_int(out, b",\"bytes_out\":", self.bytes_out);
        put_int(out, b",\"duration_ms\":", self.duration_ms);
        if self.statements_refused != 0 {
            put_int(out, b",\"statements_refused\":", self.statements_refused);
        }
        if self.echoes_scrubbed != 0 {
            put_int(out, b",\"echoes_scrubbed\":", self.echoes_scrubbed);
        }
        out.push(b'}');
    }
}

/// The caller's name as a JSON string (serde's `Arc` support is a feature not built here).
fn caller_name<S: serde::Serializer>(
    caller: &Option<std::sync::Arc<str>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(caller.as_deref().unwrap_or_default())
}

/// `s` as a JSON string: copied as is when nothing in it needs escaping (RFC 8259 §7: a
/// quote, a backslash, U+0000–U+001F), escaped by serde_json otherwise.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s) {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn json_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `key` (`,"name":` as JSON text), then `v` as a JSON string.
fn put_str(out: &mut Vec<u8>, key: &[u8], v: &str) {
    out.extend_from_slice(key);
    json_str(out, v);
}

/// Whether `s` holds a byte JSON must escape (a control character, `"` or `\`). Looks at
/// 16 bytes at a time without stopping early inside a block, which the compiler turns into
/// vector compares: most of a line's text is a host and a path with nothing to escape.
fn needs_escape(s: &str) -> bool {
    let bad = |b: &u8| (*b < 0x20) | (*b == b'"') | (*b == b'\\');
    let mut blocks = s.as_bytes().chunks_exact(16);
    let found = blocks
        .by_ref()
        .any(|block| block.iter().fold(false, |acc, b| acc | bad(b)));
    found || blocks.remainder().iter().any(bad)
}

/// A field whose value is one of the proxy's own constants (a kind, scheme, host class,
/// outcome or error code: lowercase words, never anything to escape), copied as is.
fn put_const(out: &mut Vec<u8>, key: &[u8], v: &'static str) {
    debug_assert!(!needs_escape(v), "audit constant {v:?} needs escaping");
    out.extend_from_slice(key);
    out.push(b'"');
    out.extend_from_slice(v.as_bytes());
    out.push(b'"');
}

/// `key` (`,"name":` as JSON text), then `n`.
fn put_int(out: &mut Vec<u8>, key: &[u8], n: impl itoa::Integer) {
    out.extend_from_slice(key);
    json_int(out, n);
}

/// Where audit records go.
pub trait AuditSink: Send + Sync {
    /// Writes one record (taken by value: a sink may hand it to another thread).
    fn emit(&self, record: AuditRecord);
    /// Returns once every record emitted so far is written (before exit).
    fn flush(&self) {}
}

/// How long the audit writer gathers lines after a write before the next one.
pub const AUDIT_BATCH: std::time::Duration = std::time::Duration::from_millis(10);

enum AuditMsg {
    Record(Box<AuditRecord>),
    Flush(std::sync::mpsc::Sender<()>),
}

/// Writes each record as one JSON line to stderr, from a dedicated thread that serializes
/// them: a request never waits on a slow stderr reader (a pipe to a log collector) unless
/// 4096 records are queued, and then it waits rather than dropping a line (and with it the
/// event loop it runs on: a stderr reader that stops reading stops the proxy). Lines are
/// gathered up to 64 KiB and written in line-aligned writes of at most 4 KiB (atomic on a
/// shared pipe); once the queue is empty the thread waits
/// [`AUDIT_BATCH`] before looking again, so under load a request costs no thread wake-up and no `write(2)` of its own (and a
/// watcher of the log's directory no event per line). A line reaches stderr within that
/// time. [`AuditSink::flush`] before exit; a SIGKILL loses at most the queued lines.
#[derive(Debug)]
pub struct StderrAudit {
    tx: std::sync::mpsc::SyncSender<AuditMsg>,
}

impl std::fmt::Debug for AuditMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditMsg")
    }
}

impl StderrAudit {
    /// Starts the writer thread.
    ///
    /// # Panics
    /// Never in practice: only if the OS cannot start a thread at startup.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<AuditMsg>(4_096);
        std::thread::Builder::new()
            .name("iron-proxy-audit".into())
            .spawn(move || {
                // Written out every WRITE_AT bytes while draining, so the buffer stays small
                // and a burst never waits for the pause.
                const WRITE_AT: usize = 64 * 1024;
                let mut buf = Vec::with_capacity(WRITE_AT + 1024);
                // Each write(2) is at most PIPE_BUF (4 KiB) and ends at a line end, so
                // on a pipe shared with other writers (the child of `run`, a supervisor)
                // no line is interleaved with theirs (POSIX: such writes are atomic). A
                // single longer line goes out alone.
                const PIPE_BUF: usize = 4096;
                let write = |buf: &mut Vec<u8>| {
                    let mut out = std::io::stderr().lock();
                    let mut rest = &buf[..];
                    while !rest.is_empty() {
                        let cut = if rest.len() <= PIPE_BUF {
                            rest.len()
                        } else {
                            match rest[..PIPE_BUF].iter().rposition(|&b| b == b'\n') {
                                Some(i) => i + 1,
                                None => rest
                                    .iter()
                                    .position(|&b| b == b'\n')
                                    .map_or(rest.len(), |i| i + 1),
                            }
                        };
                        let _ = out.write_all(&rest[..cut]);
                        rest = &rest[cut..];
                    }
                    buf.clear();
                };
                while let Ok(first) = rx.recv() {
                    let mut flushed = false;
                    let mut next = Some(first);
                    while let Some(msg) = next.take() {
                        match msg {
                            AuditMsg::Record(r) => {
                                r.write_json(&mut buf);
                                buf.push(b'\n');
                            }
                            AuditMsg::Flush(ack) => {
                                // Every record sent before the flush is in `buf` or out.
                                write(&mut buf);
                                let _ = ack.send(());
                                flushed = true;
                            }
                        }
                        if buf.len() >= WRITE_AT {
                            write(&mut buf);
                        }
                        next = rx.try_recv().ok();
                    }
                    write(&mut buf);
                    // The queue was empty: gather lines for a while before the next write.
                    if !flushed {
                        std::thread::sleep(AUDIT_BATCH);
                    }
                }
            })
            .expect("cannot start the audit writer thread");
        Self { tx }
    }
}

impl Default for StderrAudit {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditSink for StderrAudit {
    fn emit(&self, record: AuditRecord) {
        let _ = self.tx.send(AuditMsg::Record(Box::new(record)));
    }

    fn flush(&self) {
        // Bounded as a whole: a stalled stderr reader (full queue) must not hold up exit.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (ack, done) = std::sync::mpsc::channel();
        let mut msg = AuditMsg::Flush(ack);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return;
                    }
                    msg = m;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
            }
        }
        let _ = done.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

/// Keeps records in memory (for tests and the demo).
#[derive(Debug, Default)]
pub struct MemoryAudit {
    records: Mutex<Vec<AuditRecord>>,
}

impl MemoryAudit {
    /// All records so far.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl AuditSink for MemoryAudit {
    fn emit(&self, record: AuditRecord) {
        if let Ok(mut r) = self.records.lock() {
            r.push(record);
        }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if signature
fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_escape_finds_a_bad_byte_anywhere() {
        for len in 0..40 {
            let clean = "a".repeat(len);
            assert!(!needs_escape(&clean), "{len}");
            for at in 0..len {
                for bad in ['"', '\\', '\n', '\u{1f}', '\0'] {
                    let mut t: Vec<char> = clean.chars().collect();
                    t[at] = bad;
                    let t: String = t.into_iter().collect();
                    assert!(needs_escape(&t), "{t:?}");
                }
            }
        }
        assert!(!needs_escape("é/ü?x=1 ~ \u{7f}"));
    }

    #[test]
    fn the_writers_line_is_byte_for_byte_the_serialized_record() {
        let metrics = crate::metrics::Metrics::default();
        let usage = Mutex::new(std::collections::HashMap::new());
        let plain = crate::stats_for(&usage, &metrics, "GITHUB_TOKEN");
        let odd = crate::stats_for(&usage, &metrics, "TOKEN \"Q\" \\ \u{1}");
        let mut records = Vec::new();
        for (client, method, host, path) in [
            ("127.0.0.1:9", "GET", "api.github.test", "/"),
            (
                "[::1]:443",
                "PROPFIND",
                "h\"o\\st\n",
                "/p\u{0}a\u{1f}th/é/\u{2028}",
            ),
            ("10.0.0.255:65535", "STARTUP", "", ""),
        ] {
            let mut rec = AuditRecord::new(
                "request",
                crate::RequestId {
                    prefix: 0xdead_beef,
                    n: 7,
                },
                client.parse().expect("address"),
                method,
            );
            rec.host = host.into();
            rec.path = path.into();
            rec.port = 8443;
            rec.status = 502;
            rec.bytes_in = u64::MAX;
            rec.bytes_out = 12;
            rec.duration_ms = 3;
            records.push(rec.clone());
            rec.error = Some("upstream_unreachable");
            rec.outcome = "refused";
            rec.statements_refused = 2;
            rec.echoes_scrubbed = 3;
            rec.secrets = [
                (
                    plain.clone(),
                    AppliedAt::Request(iron_policy::Location::header("authorization")),
                ),
                (
                    odd.clone(),
                    AppliedAt::Request(iron_policy::Location::Query("k\"ey".into())),
                ),
                (odd.clone(), AppliedAt::Pg),
                (odd.clone(), AppliedAt::Pg),
            ]
            .into_iter()
            .map(|(stats, location)| AppliedSecret { stats, location })
            .collect();
            records.push(rec);
        }
        for rec in &records {
            let mut line = Vec::new();
            rec.write_json(&mut line);
            let want = serde_json::to_string(rec).expect("serializes");
            assert_eq!(String::from_utf8_lossy(&line), want);
        }
    }

    #[test]
    fn client_and_request_id_are_written_as_display_shows_them() {
        for client in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.2.30.4:8080",
            "127.0.0.1:9",
            "[::1]:443",
            "[fe80::1%2]:5432",
        ] {
            let addr: SocketAddr = client.parse().expect("address");
            for (prefix, n) in [
                (0, 0),
                (0xdead_beef, 7),
                (u32::MAX, u32::MAX),
                (0x0102_0304, 0x0a0b_0c0d),
            ] {
                let id = crate::RequestId { prefix, n };
                let rec = AuditRecord::new("request", id, addr, "GET");
                let line: serde_json::Value =
                    serde_json::from_str(&serde_json::to_string(&rec).expect("serializes"))
                        .expect("one JSON line");
                assert_eq!(line["client"], addr.to_string());
                assert_eq!(line["request_id"], format!("{prefix:08x}{n:08x}"));
                assert_eq!(id.to_string(), format!("{prefix:08x}{n:08x}"));
            }
        }
    }

    #[test]
    fn cached_entries_are_written_like_the_others() {
        // The second line of each secret and location comes from the per-secret cache; a
        // name that needs escaping must come out the same either way.
        let metrics = crate::metrics::Metrics::default();
        let usage = Mutex::new(std::collections::HashMap::new());
        let stats = crate::stats_for(&usage, &metrics, "TOKEN \"Q\"");
        let id = crate::RequestId { prefix: 1, n: 2 };
        let mut rec = AuditRecord::new("request", id, ([127, 0, 0, 1], 9).into(), "GET");
        rec.secrets = [
            AppliedAt::Request(iron_policy::Location::header("authorization")),
            AppliedAt::Request(iron_policy::Location::header("X-Custom")),
            AppliedAt::Request(iron_policy::Location::Path),
            AppliedAt::Request(iron_policy::Location::Query("key".into())),
            AppliedAt::Stub,
        ]
        .into_iter()
        .map(|location| AppliedSecret {
            stats: stats.clone(),
            location,
        })
        .collect();
        let want = serde_json::json!([
            {"name": "TOKEN \"Q\"", "location": "header:authorization"},
            {"name": "TOKEN \"Q\"", "location": "header:X-Custom"},
            {"name": "TOKEN \"Q\"", "location": "path"},
            {"name": "TOKEN \"Q\"", "location": "query:key"},
            {"name": "TOKEN \"Q\"", "location": "stub"},
        ]);
        for _ in 0..2 {
            let text = serde_json::to_string(&rec).expect("serializes");
            let line: serde_json::Value = serde_json::from_str(&text).expect("one JSON line");
            assert_eq!(line["secrets"], want, "{text}");
        }
        assert!(stats.audit_entries[0].get().is_some(), "stub entry cached");
        assert!(
            stats.audit_entries[3].get().is_some(),
            "authorization entry cached"
        );
    }

    #[test]
    fn applied_secrets_are_written_with_name_and_location() {
        let metrics = crate::metrics::Metrics::default();
        let usage = Mutex::new(std::collections::HashMap::new());
        let stats = crate::stats_for(&usage, &metrics, "GITHUB_TOKEN");
        let id = crate::RequestId {
            prefix: 0xdead_beef,
            n: 7,
        };
        let mut rec = AuditRecord::new("request", id, ([127, 0, 0, 1], 9).into(), "GET");
        rec.secrets = smallvec::smallvec![
            AppliedSecret {
                stats: stats.clone(),
                location: AppliedAt::Request(iron_policy::Location::Header("Authorization".into())),
            },
            AppliedSecret {
                stats,
                location: AppliedAt::Pg,
            },
        ];
        let line: serde_json::Value = serde_json::to_value(&rec).expect("serializes");
        assert_eq!(
            line["secrets"],
            serde_json::json!([
                {"name": "GITHUB_TOKEN", "location": "header:Authorization"},
                {"name": "GITHUB_TOKEN", "location": "pg"},
            ])
        );
        assert_eq!(line["client"], "127.0.0.1:9");
        assert_eq!(line["request_id"], "deadbeef00000007");
        let ts = line["ts"].as_str().expect("ts is a string");
        let parsed =
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                .expect("ts is RFC 3339");
        assert_eq!(parsed, rec.arrived);
        assert!(ts.ends_with('Z'), "{ts}");
    }
}
