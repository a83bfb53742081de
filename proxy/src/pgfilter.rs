//! The statement filter of the Postgres relay, used only for sessions whose `pg_dsn` secret
//! pins a `role` or `settings` (applied after login and not overridable by the client).
//!
//! [`Filtered`] wraps the client stream handed to [`crate::io::relay`]: reads are frontend
//! messages, writes pass through. Every message streams through untouched except Query
//! (`Q`), Parse (`P`) and FunctionCall (`F`), which are buffered whole (at most
//! [`MAX_BUFFERED`] bytes; a larger one ends the session) and checked by [`Rules`]. A refused
//! message is not answered by the relay (that would break the protocol state, pipelining
//! and the transaction status): it is replaced by one that makes the real server raise
//! SQLSTATE 42501 in its place, a `Q` (for `Q` and `F`) or a `P` of the same statement name
//! (for `P`) whose text is a `DO` block raising `iron-proxy: <reason>`. The reason is fixed
//! text; the client's SQL is never logged or echoed.
//!
//! The SQL check is a small lexer (PostgreSQL's `scan.l` rules for quotes, dollar quotes,
//! comments, string continuation and prefixes) and, per statement, a look at the leading
//! keywords and at every identifier. It refuses: `SET`/`RESET` of the role, the session
//! authorization, `client_encoding` or a pinned setting; `RESET ALL`; `DISCARD ALL`; `DO`;
//! `CREATE FUNCTION|PROCEDURE|LANGUAGE`; `SET`/`RESET` clauses of `ALTER
//! FUNCTION|PROCEDURE|ROUTINE` on those names; `set_config` unless called with a plain
//! string literal naming another setting; the functions that run SQL text
//! (`query_to_xml`…, `ts_stat`, `ts_rewrite`, and tablefunc's `crosstab*`/`connectby` and
//! `dblink*` when installed); writes through `pg_settings`; `U&` escapes;
//! and any string, dollar-quoted body or comment that contains `set_config`. A text with a
//! backslash is checked twice, with and without `standard_conforming_strings`, since the
//! client may turn it off. `client_encoding` is locked because in the client-only encodings
//! (SJIS, BIG5, GBK, …) a backslash byte can be the second byte of a character, which the
//! server does not read as an escape but the lexer would.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};

/// Largest Query, Parse or FunctionCall message checked while filtering, in bytes (body).
/// A larger one is read through without being kept and refused like a statement (42501):
/// checking takes time and memory on the event loop in proportion to the text, so one
/// client's 64 MiB of `;` must not stall every session. Bulk data belongs in COPY, which is
/// not checked.
pub const MAX_BUFFERED: usize = 1024 * 1024;

/// Why a statement was refused. [`Reason::text`] is what the client and the log see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// SET/RESET ROLE, SESSION AUTHORIZATION, `set_config('role', …)`.
    Role,
    /// Changing a setting the secret pins.
    Setting,
    /// `RESET ALL`, `DISCARD ALL`.
    SessionReset,
    /// `DO`, `CREATE FUNCTION|PROCEDURE|LANGUAGE`, functions that run SQL text.
    Code,
    /// `set_config` not called with a literal setting name, or `set_config` in a string,
    /// dollar-quoted body or comment.
    SetConfig,
    /// `U&'…'` or `U&"…"`.
    Unicode,
    /// Changing `client_encoding` (`SET NAMES`, …).
    Encoding,
    /// The FunctionCall message.
    FunctionCall,
    /// Writing to `pg_settings` (its update rule calls `set_config`).
    SettingsView,
    /// A Query, Parse or FunctionCall larger than [`MAX_BUFFERED`].
    TooLarge,
}

impl Reason {
    /// The fixed text naming what is refused.
    pub fn text(self) -> &'static str {
        match self {
            Self::Role => "changing the role is not allowed on this connection",
            Self::Setting => "changing a pinned setting is not allowed on this connection",
            Self::SessionReset => "resetting the session is not allowed on this connection",
            Self::Code => {
                "procedural code and functions that run SQL text are not allowed on this connection"
            }
            Self::SetConfig => {
                "set_config is allowed only with a literal setting name on this connection"
            }
            Self::Unicode => "Unicode escapes (U&) are not allowed on this connection",
            Self::Encoding => "changing client_encoding is not allowed on this connection",
            Self::FunctionCall => "the FunctionCall message is not allowed on this connection",
            Self::SettingsView => {
                "changing settings through pg_settings is not allowed on this connection"
            }
            Self::TooLarge => {
                "statements over 1 MiB are not allowed on this connection (use COPY for bulk data)"
            }
        }
    }
}

/// The SQL that replaces a refused statement: the server raises 42501 with `reason`.
pub fn refusal_sql(reason: Reason) -> String {
    format!(
        "DO $iron$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'iron-proxy: {}'; END$iron$",
        reason.text()
    )
}

/// The client encodings (as the server names them) in which an ASCII byte, a backslash in
/// particular, can be part of a multibyte character. All server encodings are safe.
pub fn unsafe_client_encoding(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    matches!(
        n.as_str(),
        "sjis"
            | "shiftjis"
            | "mskanji"
            | "win932"
            | "windows932"
            | "shiftjis2004"
            | "big5"
            | "win950"
            | "windows950"
            | "gbk"
            | "win936"
            | "windows936"
            | "uhc"
            | "win949"
            | "windows949"
            | "gb18030"
            | "johab"
    )
}

/// What a session pins: the statement check.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Pinned setting names, lower case.
    pinned: Vec<Vec<u8>>,
}

impl Rules {
    /// Rules for a session pinning the settings named `settings` (the role, if pinned, is
    /// protected either way).
    pub fn new<'a>(settings: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            pinned: settings
                .into_iter()
                .map(|s| s.as_bytes().to_ascii_lowercase())
                .collect(),
        }
    }

    /// Why `sql` (one Query's or Parse's text, any number of statements) is refused, or
    /// `None` to pass it.
    pub fn check(&self, sql: &[u8]) -> Option<Reason> {
        let r = self.check_lexed(sql, false);
        if r.is_some() || !sql.contains(&b'\\') {
            return r;
        }
        self.check_lexed(sql, true)
    }

    fn check_lexed(&self, sql: &[u8], backslash_quotes: bool) -> Option<Reason> {
        let toks = match lex(sql, backslash_quotes) {
            Ok(t) => t,
            Err(r) => return Some(r),
        };
        toks.split(|t| *t == Tok::Punct(b';'))
            .find_map(|stmt| self.check_statement(stmt))
    }

    fn check_statement(&self, t: &[Tok]) -> Option<Reason> {
        if t.is_empty() {
            return None;
        }
        let mut writes = false;
        let mut settings_view = false;
        for (i, tok) in t.iter().enumerate() {
            let Tok::Ident { name, quoted } = tok else {
                continue;
            };
            match name.as_slice() {
                b"set_config" => {
                    if let Some(r) = self.check_set_config(&t[i + 1..]) {
                        return Some(r);
                    }
                }
                b"query_to_xml"
                | b"query_to_xmlschema"
                | b"query_to_xml_and_xmlschema"
                | b"ts_stat"
                | b"ts_rewrite"
                | b"connectby" => return Some(Reason::Code),
                // Extensions' functions that run SQL text (tablefunc, dblink), if installed.
                n if n.starts_with(b"crosstab") || n.starts_with(b"dblink") => {
                    return Some(Reason::Code);
                }
                b"pg_settings" => settings_view = true,
                b"update" | b"insert" | b"merge" | b"delete" | b"create" | b"alter" | b"rule"
                    if !quoted =>
                {
                    writes = true;
                }
                _ => {}
            }
        }
        if settings_view && writes {
            return Some(Reason::SettingsView);
        }
        if let Some(r) = self.check_transaction_modes(t) {
            return Some(r);
        }
        match kw(t, 0)? {
            b"set" => self.check_set(&t[1..], true),
            b"reset" => self.check_set(&t[1..], false),
            b"discard" if kw(t, 1) == Some(b"all") => Some(Reason::SessionReset),
            b"do" => Some(Reason::Code),
            b"create" => {
                let mut i = 1;
                while matches!(
                    kw(t, i),
                    Some(b"or" | b"replace" | b"temp" | b"temporary" | b"trusted" | b"procedural")
                ) {
                    i += 1;
                }
                matches!(kw(t, i), Some(b"function" | b"procedure" | b"language"))
                    .then_some(Reason::Code)
            }
            b"alter" if matches!(kw(t, 1), Some(b"function" | b"procedure" | b"routine")) => {
                (2..t.len()).find_map(|i| match kw(t, i) {
                    Some(b"set") => self.check_set(&t[i + 1..], true),
                    Some(b"reset") => self.check_set(&t[i + 1..], false),
                    _ => None,
                })
            }
            _ => None,
        }
    }

    /// Transaction modes (`BEGIN`, `START TRANSACTION`, `SET TRANSACTION`, `SET SESSION
    /// CHARACTERISTICS AS TRANSACTION`) override the pinned `default_transaction_*`
    /// settings (`BEGIN READ WRITE` under `default_transaction_read_only = on`).
    fn check_transaction_modes(&self, t: &[Tok]) -> Option<Reason> {
        let modes = matches!(
            (kw(t, 0), kw(t, 1), kw(t, 2)),
            (Some(b"begin"), ..)
                | (Some(b"start"), Some(b"transaction"), _)
                | (
                    Some(b"set"),
                    Some(b"session" | b"local"),
                    Some(b"transaction" | b"characteristics"),
                )
                | (Some(b"set"), Some(b"transaction" | b"characteristics"), _)
        );
        if !modes {
            return None;
        }
        let pinned = |what: &str| {
            self.pinned.iter().any(|p| {
                p.as_slice() == format!("default_transaction_{what}").as_bytes()
                    || p.as_slice() == format!("transaction_{what}").as_bytes()
            })
        };
        let has = |a: &[u8]| (0..t.len()).any(|i| kw(t, i) == Some(a));
        let read_write =
            (0..t.len()).any(|i| kw(t, i) == Some(b"read") && kw(t, i + 1) == Some(b"write"));
        ((pinned("read_only") && read_write)
            || (pinned("isolation") && has(b"isolation"))
            || (pinned("deferrable") && has(b"deferrable")))
        .then_some(Reason::Setting)
    }

    /// `SET …` (`set`) or `RESET …` after the keyword: the target with and without a
    /// leading SESSION/LOCAL (either reading is checked).
    fn check_set(&self, t: &[Tok], set: bool) -> Option<Reason> {
        self.check_target(t, set).or_else(|| {
            matches!(kw(t, 0), Some(b"session" | b"local"))
                .then(|| self.check_target(&t[1..], set))
                .flatten()
        })
    }

    fn check_target(&self, t: &[Tok], set: bool) -> Option<Reason> {
        let name: Vec<u8> = match (kw(t, 0), kw(t, 1)) {
            (Some(b"session"), Some(b"authorization")) => return Some(Reason::Role),
            (Some(b"all"), _) if !set => return Some(Reason::SessionReset),
            (Some(b"time"), Some(b"zone")) => b"timezone".to_vec(),
            (Some(b"xml"), Some(b"option")) => b"xmloption".to_vec(),
            (Some(b"names"), _) => b"client_encoding".to_vec(),
            (Some(b"schema"), _) => b"search_path".to_vec(),
            _ => dotted_name(t)?,
        };
        self.check_name(&name)
    }

    /// Why setting the GUC `name` (lower case) is refused.
    fn check_name(&self, name: &[u8]) -> Option<Reason> {
        // The old names PostgreSQL still maps to current ones (guc.c map_old_guc_names).
        let name = match name {
            b"sort_mem" => b"work_mem".as_slice(),
            b"vacuum_mem" => b"maintenance_work_mem".as_slice(),
            n => n,
        };
        // `transaction_X` is the running transaction's `default_transaction_X`: pinning the
        // default pins it too (`SET transaction_read_only = off` inside BEGIN).
        let default_of = |n: &[u8]| {
            n.strip_prefix(b"transaction_".as_slice())
                .map(|rest| [b"default_transaction_".as_slice(), rest].concat())
        };
        match name {
            b"role" | b"session_authorization" => Some(Reason::Role),
            b"client_encoding" => Some(Reason::Encoding),
            n if self.pinned.iter().any(|p| p == n) => Some(Reason::Setting),
            n if default_of(n).is_some_and(|d| self.pinned.contains(&d)) => Some(Reason::Setting),
            _ => None,
        }
    }

    /// The tokens after an identifier `set_config`: `( 'plain literal' ,` naming a setting
    /// that is not protected, or refused.
    fn check_set_config(&self, after: &[Tok]) -> Option<Reason> {
        match after {
            [
                Tok::Punct(b'('),
                Tok::Str {
                    kind: StrKind::Plain,
                    value,
                    backslash: false,
                },
                Tok::Punct(b','),
                ..,
            ] => self.check_name(&value.to_ascii_lowercase()),
            _ => Some(Reason::SetConfig),
        }
    }
}

/// The unquoted keyword at `i`, lower case.
fn kw(t: &[Tok], i: usize) -> Option<&[u8]> {
    match t.get(i)? {
        Tok::Ident {
            name,
            quoted: false,
        } => Some(name),
        _ => None,
    }
}

/// `ident(.ident)*` at the start of `t`, joined with dots, lower case (GUC names are
/// case-insensitive, quoted or not).
fn dotted_name(t: &[Tok]) -> Option<Vec<u8>> {
    let Some(Tok::Ident { name, .. }) = t.first() else {
        return None;
    };
    let mut out = name.clone();
    let mut i = 1;
    while let (Some(Tok::Punct(b'.')), Some(Tok::Ident { name, .. })) = (t.get(i), t.get(i + 1)) {
        out.push(b'.');
        out.extend_from_slice(name);
        i += 2;
    }
    Some(out)
}

/// The largest `$n` in `sql` (0 for none).
pub fn max_param(sql: &[u8]) -> u32 {
    lex(sql, false)
        .unwrap_or_default()
        .iter()
        .filter_map(|t| match t {
            Tok::Param(n) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrKind {
    /// `'…'` (and `N'…'`).
    Plain,
    /// `E'…'`.
    Escape,
    /// `B'…'`, `X'…'`.
    Bits,
    /// `$tag$…$tag$`.
    Dollar,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// An identifier or keyword, lower case (ASCII).
    Ident { name: Vec<u8>, quoted: bool },
    /// A string constant: its value with `''` undone (escapes not decoded), and whether its
    /// text had a backslash.
    Str {
        kind: StrKind,
        value: Vec<u8>,
        backslash: bool,
    },
    /// `$n`.
    Param(u32),
    /// A number (digits).
    Number,
    /// Any other single byte (operators, punctuation, `;`).
    Punct(u8),
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_cont(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Refuses a text (string, dollar body, comment) that mentions `set_config`.
fn mention(text: &[u8]) -> Result<(), Reason> {
    if text
        .windows(10)
        .any(|w| w.eq_ignore_ascii_case(b"set_config"))
    {
        Err(Reason::SetConfig)
    } else {
        Ok(())
    }
}

/// Splits `s` into tokens as PostgreSQL's scanner would (`backslash_quotes`: with
/// `standard_conforming_strings` off). An error for what refuses the whole text: `U&`, or
/// `set_config` inside a string, dollar-quoted body or comment. An unterminated quote or
/// comment runs to the end (the server refuses it).
fn lex(s: &[u8], backslash_quotes: bool) -> Result<Vec<Tok>, Reason> {
    let mut out = Vec::new();
    let n = s.len();
    let at = |i: usize| s.get(i).copied().unwrap_or(0);
    let mut i = 0;
    while i < n {
        let c = s[i];
        if c == b'-' && at(i + 1) == b'-' {
            let end = s[i..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
                .map_or(n, |p| i + p);
            mention(&s[i..end])?;
            i = end;
            continue;
        }
        if c == b'/' && at(i + 1) == b'*' {
            let start = i;
            let mut depth = 0usize;
            while i < n {
                if s[i] == b'/' && at(i + 1) == b'*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == b'*' && at(i + 1) == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            mention(&s[start..i.min(n)])?;
            continue;
        }
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b) {
            i += 1;
            continue;
        }
        if matches!(c, b'u' | b'U') && at(i + 1) == b'&' && matches!(at(i + 2), b'\'' | b'"') {
            return Err(Reason::Unicode);
        }
        if at(i + 1) == b'\'' {
            let kind = match c {
                b'e' | b'E' => Some(StrKind::Escape),
                b'b' | b'B' | b'x' | b'X' => Some(StrKind::Bits),
                _ => None,
            };
            if let Some(kind) = kind {
                let (tok, next) = string(s, i + 2, kind, backslash_quotes);
                push_str(&mut out, tok)?;
                i = next;
                continue;
            }
        }
        if c == b'\'' {
            let (tok, next) = string(s, i + 1, StrKind::Plain, backslash_quotes);
            push_str(&mut out, tok)?;
            i = next;
            continue;
        }
        if c == b'"' {
            let mut name = Vec::new();
            let mut j = i + 1;
            while j < n {
                if s[j] == b'"' {
                    if at(j + 1) == b'"' {
                        name.push(b'"');
                        j += 2;
                        continue;
                    }
                    break;
                }
                name.push(s[j]);
                j += 1;
            }
            name.make_ascii_lowercase();
            out.push(Tok::Ident { name, quoted: true });
            i = j + 1;
            continue;
        }
        if c == b'$' {
            if at(i + 1).is_ascii_digit() {
                let mut j = i + 1;
                let mut v: u32 = 0;
                while j < n && s[j].is_ascii_digit() {
                    v = v.saturating_mul(10).saturating_add(u32::from(s[j] - b'0'));
                    j += 1;
                }
                out.push(Tok::Param(v));
                i = j;
                continue;
            }
            // `$tag$` or `$$`
            let mut j = i + 1;
            if j < n && ident_start(s[j]) {
                j += 1;
                while j < n && (ident_start(s[j]) || s[j].is_ascii_digit()) {
                    j += 1;
                }
            }
            if at(j) == b'$' {
                let delim = &s[i..=j];
                let body_start = j + 1;
                let (body_end, next) = match s[body_start..]
                    .windows(delim.len())
                    .position(|w| w == delim)
                {
                    Some(p) => (body_start + p, body_start + p + delim.len()),
                    None => (n, n),
                };
                let value = s[body_start..body_end].to_vec();
                push_str(
                    &mut out,
                    Tok::Str {
                        kind: StrKind::Dollar,
                        value,
                        backslash: false,
                    },
                )?;
                i = next;
                continue;
            }
            out.push(Tok::Punct(b'$'));
            i += 1;
            continue;
        }
        if ident_start(c) {
            let mut j = i;
            while j < n && ident_cont(s[j]) {
                j += 1;
            }
            out.push(Tok::Ident {
                name: s[i..j].to_ascii_lowercase(),
                quoted: false,
            });
            i = j;
            continue;
        }
        if c.is_ascii_digit() {
            while i < n && s[i].is_ascii_digit() {
                i += 1;
            }
            out.push(Tok::Number);
            continue;
        }
        out.push(Tok::Punct(c));
        i += 1;
    }
    Ok(out)
}

fn push_str(out: &mut Vec<Tok>, tok: Tok) -> Result<(), Reason> {
    if let Tok::Str {
        value, backslash, ..
    } = &tok
    {
        mention(value)?;
        if *backslash {
            mention(&unescape(value))?;
        }
    }
    out.push(tok);
    Ok(())
}

/// `value` with backslash escapes decoded as in `E'…'` (`\n`, octal, `\x`, `\u`, `\U`,
/// any other character as itself), for the `set_config` search.
fn unescape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] != b'\\' || i + 1 >= value.len() {
            out.push(value[i]);
            i += 1;
            continue;
        }
        let c = value[i + 1];
        let digits = |from: usize, max: usize, radix: u32| {
            let mut v: u32 = 0;
            let mut k = from;
            while k < value.len() && k - from < max {
                match char::from(value[k]).to_digit(radix) {
                    Some(d) => v = v.saturating_mul(radix).saturating_add(d),
                    None => break,
                }
                k += 1;
            }
            (v, k)
        };
        let (v, next) = match c {
            b'0'..=b'7' => digits(i + 1, 3, 8),
            b'x' => digits(i + 2, 2, 16),
            b'u' => digits(i + 2, 4, 16),
            b'U' => digits(i + 2, 8, 16),
            b'b' => (8, i + 2),
            b'f' => (12, i + 2),
            b'n' => (10, i + 2),
            b'r' => (13, i + 2),
            b't' => (9, i + 2),
            _ => (u32::from(c), i + 2),
        };
        match char::from_u32(v) {
            Some(ch) => {
                let mut b = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
            }
            None => out.push(c),
        }
        i = next.max(i + 2);
    }
    out
}

/// A quoted string of `kind` whose text starts at `start` (after the opening quote),
/// including continuations (`'a'` newline `'b'`); returns the token and where the scan goes
/// on.
fn string(s: &[u8], start: usize, kind: StrKind, backslash_quotes: bool) -> (Tok, usize) {
    let n = s.len();
    let escapes = kind == StrKind::Escape || (kind == StrKind::Plain && backslash_quotes);
    let doubling = kind != StrKind::Bits;
    let mut value = Vec::new();
    let mut backslash = false;
    let mut j = start;
    loop {
        if j >= n {
            break;
        }
        let c = s[j];
        if c == b'\\' {
            backslash = true;
            if escapes {
                value.extend_from_slice(&s[j..(j + 2).min(n)]);
                j += 2;
                continue;
            }
        }
        if c == b'\'' {
            if doubling && s.get(j + 1) == Some(&b'\'') {
                value.push(b'\'');
                j += 2;
                continue;
            }
            // A closing quote; a continuation reopens the same string.
            match continuation(s, j + 1) {
                Some(k) => {
                    j = k + 1;
                    continue;
                }
                None => {
                    j += 1;
                    break;
                }
            }
        }
        value.push(c);
        j += 1;
    }
    (
        Tok::Str {
            kind,
            value,
            backslash,
        },
        j.min(n),
    )
}

/// After a closing quote at `j - 1`: the position of the quote that continues the string,
/// if any. PostgreSQL's `scan.l` `quotecontinue`: horizontal whitespace and `--` comments,
/// then a newline, then any whitespace and `--` comments each ended by a newline, then the
/// quote. (A `--` comment before the newline also continues the string: missing it let a
/// statement hide in what looked like a string.)
fn continuation(s: &[u8], mut j: usize) -> Option<usize> {
    let n = s.len();
    let comment_at = |j: usize| j + 1 < n && s[j] == b'-' && s[j + 1] == b'-';
    loop {
        while j < n && matches!(s[j], b' ' | b'\t' | 0x0b | 0x0c) {
            j += 1;
        }
        if comment_at(j) {
            while j < n && !matches!(s[j], b'\n' | b'\r') {
                j += 1;
            }
            continue;
        }
        break;
    }
    if j >= n || !matches!(s[j], b'\n' | b'\r') {
        return None;
    }
    loop {
        while j < n && matches!(s[j], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            j += 1;
        }
        if comment_at(j) {
            let nl = s[j..].iter().position(|&b| b == b'\n' || b == b'\r')?;
            j += nl;
            continue;
        }
        break;
    }
    (s.get(j) == Some(&b'\'')).then_some(j)
}

/// The bytes of `body` before its first NUL (what the server reads as a string field).
fn c_str(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = body.iter().position(|&b| b == 0)?;
    Some((&body[..nul], &body[nul + 1..]))
}

/// Appends a message `tag` with `body` to `out`.
fn put_message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}

/// The Parse message that replaces a refused one: same statement name, the refusal `DO`,
/// and the client's parameter types with unspecified ones (0) made `text` and the list
/// padded with `text` to the largest `$n` of the refused SQL. (A `DO` with an unspecified
/// parameter type fails at Parse with 42P18; with types the server accepts it, reports
/// them in ParameterDescription, so a driver that prepares first binds its values, and
/// raises the refusal at Execute.)
fn parse_replacement(name: &[u8], sql: &[u8], params: &[u8], reason: Reason) -> Vec<u8> {
    const TEXT: u32 = 25;
    const UNKNOWN: u32 = 705;
    let mut types: Vec<u32> = Vec::new();
    if params.len() >= 2 {
        let count = usize::from(u16::from_be_bytes([params[0], params[1]]));
        types = params[2..]
            .chunks_exact(4)
            .take(count)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .map(|t| if t == 0 || t == UNKNOWN { TEXT } else { t })
            .collect();
    }
    let wanted = usize::try_from(max_param(sql)).unwrap_or(usize::MAX);
    if wanted <= usize::from(u16::MAX) && types.len() < wanted {
        types.resize(wanted, TEXT);
    }
    let mut body = Vec::new();
    body.extend_from_slice(name);
    body.push(0);
    body.extend_from_slice(refusal_sql(reason).as_bytes());
    body.push(0);
    body.extend_from_slice(&u16::try_from(types.len()).unwrap_or(0).to_be_bytes());
    for t in types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    let mut out = Vec::new();
    put_message(&mut out, b'P', &body);
    out
}

/// Where the frame parser is.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading a message header (`have` of its 5 bytes).
    Header,
    /// Passing `n` more body bytes through.
    Stream(usize),
    /// Buffering a Q/P/F body (`need` more bytes).
    Buffer { tag: u8, need: usize },
    /// Reading past a Q/P/F body over [`MAX_BUFFERED`] (`need` more bytes), keeping only
    /// its first [`KEPT_PREFIX`] bytes (a Parse's statement name); then refused.
    Discard { tag: u8, need: usize },
}

/// Bytes kept of a message too large to check: enough for a Parse's statement name.
const KEPT_PREFIX: usize = 1024;

/// A client stream whose frontend messages are checked (see the module documentation);
/// writes pass through.
pub struct Filtered<S> {
    inner: S,
    rules: Rules,
    secret: Arc<str>,
    state: State,
    header: [u8; 5],
    header_len: usize,
    body: Vec<u8>,
    /// Bytes ready for the reader, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    scratch: Vec<u8>,
    refused: u64,
}

impl<S> Filtered<S> {
    /// Filters the messages read from `inner` (positioned after startup) with `rules`;
    /// refusals are logged with `secret`'s name.
    pub fn new(inner: S, rules: Rules, secret: Arc<str>) -> Self {
        Self {
            inner,
            rules,
            secret,
            state: State::Header,
            header: [0; 5],
            header_len: 0,
            body: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            scratch: vec![0; 16 * 1024],
            refused: 0,
        }
    }

    /// Statements refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Parses `data` (read from the client) into messages, appending what goes on to
    /// `out`.
    fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match self.state {
                State::Header => {
                    let k = (5 - self.header_len).min(data.len());
                    self.header[self.header_len..self.header_len + k].copy_from_slice(&data[..k]);
                    self.header_len += k;
                    data = &data[k..];
                    if self.header_len < 5 {
                        continue;
                    }
                    self.header_len = 0;
                    let [tag, a, b, c, d] = self.header;
                    let len = i32::from_be_bytes([a, b, c, d]);
                    let body = usize::try_from(len)
                        .ok()
                        .and_then(|l| l.checked_sub(4))
                        .ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "bad message length")
                        })?;
                    if matches!(tag, b'Q' | b'P' | b'F') {
                        self.body.clear();
                        if body > MAX_BUFFERED {
                            self.state = State::Discard { tag, need: body };
                            continue;
                        }
                        self.body.reserve(body.min(64 * 1024));
                        self.state = State::Buffer { tag, need: body };
                        if body == 0 {
                            self.finish(tag);
                        }
                    } else {
                        self.out.extend_from_slice(&self.header);
                        self.state = if body == 0 {
                            State::Header
                        } else {
                            State::Stream(body)
                        };
                    }
                }
                State::Stream(rest) => {
                    let k = rest.min(data.len());
                    self.out.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    self.state = if k == rest {
                        State::Header
                    } else {
                        State::Stream(rest - k)
                    };
                }
                State::Discard { tag, need } => {
                    let k = need.min(data.len());
                    let keep = KEPT_PREFIX.saturating_sub(self.body.len()).min(k);
                    self.body.extend_from_slice(&data[..keep]);
                    data = &data[k..];
                    if k == need {
                        self.refuse_oversized(tag);
                    } else {
                        self.state = State::Discard {
                            tag,
                            need: need - k,
                        };
                    }
                }
                State::Buffer { tag, need } => {
                    let k = need.min(data.len());
                    self.body.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if k == need {
                        self.finish(tag);
                    } else {
                        self.state = State::Buffer {
                            tag,
                            need: need - k,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// An over-large Q/P/F has been read through: queues its refusal (a Parse keeps its
    /// statement name, with no parameters; a Bind that supplies some then fails too).
    fn refuse_oversized(&mut self, tag: u8) {
        self.state = State::Header;
        self.refused += 1;
        let reason = Reason::TooLarge;
        tracing::warn!(secret = %self.secret, reason = reason.text(), "postgres relay refused a statement");
        let name = (tag == b'P')
            .then(|| c_str(&self.body).map(|(name, _)| name.to_vec()))
            .flatten();
        match name {
            Some(name) => {
                let p = parse_replacement(&name, b"", &[0, 0], reason);
                self.out.extend_from_slice(&p);
            }
            None => {
                let mut q = refusal_sql(reason).into_bytes();
                q.push(0);
                put_message(&mut self.out, b'Q', &q);
            }
        }
        self.body.clear();
    }

    /// A whole Q/P/F body is in `body`: checks it and queues it or its replacement.
    fn finish(&mut self, tag: u8) {
        self.state = State::Header;
        let body = std::mem::take(&mut self.body);
        let verdict = match tag {
            b'F' => Some(Reason::FunctionCall),
            b'Q' => c_str(&body).and_then(|(sql, _)| self.rules.check(sql)),
            // Parse: statement name, query, parameter types. A malformed one is passed on
            // (the server refuses it before running anything).
            _ => c_str(&body)
                .and_then(|(_, rest)| c_str(rest))
                .and_then(|(sql, _)| self.rules.check(sql)),
        };
        match verdict {
            None => put_message(&mut self.out, tag, &body),
            Some(reason) => {
                self.refused += 1;
                tracing::warn!(secret = %self.secret, reason = reason.text(), "postgres relay refused a statement");
                let parse = (tag == b'P')
                    .then(|| {
                        let (name, rest) = c_str(&body)?;
                        let (sql, params) = c_str(rest)?;
                        Some(parse_replacement(name, sql, params, reason))
                    })
                    .flatten();
                match parse {
                    Some(p) => self.out.extend_from_slice(&p),
                    None => {
                        let mut q = refusal_sql(reason).into_bytes();
                        q.push(0);
                        put_message(&mut self.out, b'Q', &q);
                    }
                }
            }
        }
        // Keep a small buffer for the next statement, not a huge one.
        if body.capacity() <= 1024 * 1024 {
            self.body = body;
            self.body.clear();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Filtered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.out_pos < this.out.len() {
                let k = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + k]);
                this.out_pos += k;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            // The body of a message that is not checked: straight into the reader's buffer.
            if let State::Stream(rest) = this.state {
                let want = rest.min(buf.remaining());
                let mut sub = ReadBuf::new(buf.initialize_unfilled_to(want));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sub))?;
                let k = sub.filled().len();
                buf.advance(k);
                if k > 0 {
                    this.state = if k == rest {
                        State::Header
                    } else {
                        State::Stream(rest - k)
                    };
                }
                return Poll::Ready(Ok(()));
            }
            let mut scratch = std::mem::take(&mut this.scratch);
            let mut rb = ReadBuf::new(&mut scratch);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let k = rb.filled().len();
            let fed = match polled {
                Poll::Ready(Ok(())) if k > 0 => this.feed(&scratch[..k]),
                _ => Ok(()),
            };
            this.scratch = scratch;
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of input (a message cut short is dropped).
                Poll::Ready(Ok(())) if k == 0 => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => fed?,
            }
        }
    }
}

crate::io::write_through!(Filtered);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    fn rules() -> Rules {
        Rules::new(["app.tenant", "search_path"])
    }

    fn check(sql: &str) -> Option<Reason> {
        rules().check(sql.as_bytes())
    }

    fn expect(reason: Option<Reason>, cases: &[&str]) {
        for sql in cases {
            assert_eq!(check(sql), reason, "{sql}");
        }
    }

    #[test]
    fn role_changes_are_refused_in_every_spelling() {
        expect(
            Some(Reason::Role),
            &[
                "SET ROLE app",
                "set role app",
                "SeT RoLe app",
                "SET SESSION ROLE app",
                "set local role app",
                "SET ROLE NONE",
                "RESET ROLE",
                "reset role",
                "SET role = 'app'",
                "SET \"ROLE\" TO app",
                "set \"role\" = default",
                "SET SESSION AUTHORIZATION app",
                "SET LOCAL SESSION AUTHORIZATION DEFAULT",
                "RESET SESSION AUTHORIZATION",
                "set session_authorization = 'app'",
                "/* c */ SET ROLE app",
                "-- c\nRESET ROLE",
                "  \n\tset/**/role app",
                "/* a /* nested */ still comment */ reset role",
                // multi-statement: one bad statement refuses the text
                "select 1; set role app",
                "select 1;reset role;select 2",
                "select 'a;b'; reset role",
                "select 'it''s'; reset role",
                "select $$;$$; reset role",
                "select $a$x$a$; reset role",
                "select \"a;\"\"\"; reset role",
                "select 1 /* ; */ ; reset role",
                "select 1 -- ;\n; reset role",
                "select a$b$; reset role",
                "select $1; reset role",
                "select B'1'''; reset role",
                "select E'\\''; reset role; --'",
                // standard_conforming_strings off: `\'` does not end the string
                "select 'a\\' , ' ; reset role; -- '",
                "select set_config('role', 'app', false)",
                "select set_config('ROLE', 'app', false)",
                "select pg_catalog.set_config('role', 'app', false)",
                "select \"set_config\"('role', 'app', false)",
                "select SET_CONFIG ( 'role' , 'app', false)",
                "select set_config/**/('role','app',false)",
                "select set_config('ro'\n'le', 'app', false)",
                "select set_config('ro'  \n -- c\n  'le', 'app', false)",
                "select set_config('session_authorization', 'app', false)",
                "alter function f() set role = app",
                "ALTER PROCEDURE p() SET SESSION AUTHORIZATION app",
            ],
        );
    }

    #[test]
    fn pinned_settings_are_refused() {
        expect(
            Some(Reason::Setting),
            &[
                "SET app.tenant = 'x'",
                "set APP.TENANT to x",
                "set \"app\".\"tenant\" = 'x'",
                "set \"App.Tenant\" = 'x'",
                "SET app . tenant = 'x'",
                "set /* c */ app./* c */tenant = 1",
                "SET LOCAL app.tenant = 'x'",
                "SET SESSION app.tenant TO 'x'",
                "RESET app.tenant",
                "SET search_path = public",
                "SET SCHEMA 'x'",
                "select set_config('app.tenant', 'x', false)",
                "select set_config('APP.TENANT', 'x', true)",
                "ALTER ROUTINE f SET app.tenant TO 'x'",
                "begin; set local app.tenant = 'x'; commit",
            ],
        );
    }

    #[test]
    fn session_resets_code_and_encoding_are_refused() {
        expect(
            Some(Reason::SessionReset),
            &[
                "RESET ALL",
                "reset all",
                "DISCARD ALL",
                "discard   all",
                "alter procedure p() reset all",
            ],
        );
        expect(
            Some(Reason::Code),
            &[
                "DO $$BEGIN EXECUTE 'RESET ' || 'ROLE'; END$$",
                "do 'begin null; end'",
                "DO LANGUAGE plpgsql $x$ begin null; end $x$",
                "CREATE FUNCTION f() returns int language sql as 'select 1'",
                "create or replace function f() returns int language sql as 'select 1'",
                "CREATE PROCEDURE p() language sql as ''",
                "CREATE TRUSTED LANGUAGE x",
                "create or replace procedural language x",
                "select query_to_xml('select 1', true, false, '')",
                "select pg_catalog.\"query_to_xml\"('select 1', true, false, '')",
                "select * from crosstab('select 1') as t(a text)",
                "select dblink_exec('dbname=app', 'reset role')",
                "select * from connectby('t', 'a', 'b', '1', 0) as t(a text, b text, l int)",
                "select ts_stat('select 1')",
                "select ts_rewrite('a'::tsquery, 'select 1')",
            ],
        );
        expect(
            Some(Reason::Encoding),
            &[
                "SET NAMES 'SJIS'",
                "set client_encoding to 'sjis'",
                "RESET client_encoding",
                "select set_config('client_encoding', 'SJIS', false)",
            ],
        );
        expect(
            Some(Reason::SettingsView),
            &[
                "update pg_settings set setting = 'x' where name = 'search_path'",
                "create view v as select * from pg_settings",
                "with u as (update pg_catalog.pg_settings set setting = 'x') select 1",
            ],
        );
    }

    #[test]
    fn set_config_needs_a_literal_name() {
        expect(
            Some(Reason::SetConfig),
            &[
                "select set_config($1, $2, false)",
                "select set_config('ro' || 'le', 'x', false)",
                "select set_config(E'role', 'x', false)",
                "select set_config(E'\\x72ole', 'x', false)",
                "select set_config($$role$$, 'x', false)",
                "select set_config(lower('ROLE'), 'x', false)",
                "select set_config('ro\\le', 'x', false)",
                "select set_config(setting_name => 'role', new_value => 'x', is_local => false)",
                "select set_config",
                "select 1 as set_config",
                "select 'set_config'",
                "select 'SET_CONFIG(''role'')'",
                "select 1 -- set_config",
                "select 1 /* Set_Config */",
                "select $x$SET_CONFIG$x$",
                "select E'set\\_config'",
                "select E'set\\137config'",
                "select E'\\x73et_config'",
                "select E'set\\u005fconfig'",
                "prepare p as select set_config($1, 'x', false)",
            ],
        );
        expect(
            Some(Reason::Unicode),
            &[
                "select U&'\\0072ole'",
                "select u&\"x\"",
                "SET U&\"\\0072ole\" TO app",
                "select 1; select U&'x' UESCAPE '!'",
            ],
        );
    }

    #[test]
    fn transaction_modes_and_old_names_of_pinned_settings_are_refused() {
        let rules = Rules::new([
            "default_transaction_read_only",
            "work_mem",
            "default_transaction_isolation",
        ]);
        for sql in [
            "BEGIN READ WRITE",
            "begin transaction isolation level read committed",
            "START TRANSACTION READ WRITE",
            "SET TRANSACTION READ WRITE",
            "set local transaction read write",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SET default_transaction_read_only = off",
            "SET sort_mem = '1GB'",
            "select set_config('SORT_MEM', '1GB', false)",
            "SET transaction_read_only = off",
            "set local transaction_read_only to off",
            "select set_config('transaction_read_only', 'off', true)",
        ] {
            assert_eq!(rules.check(sql.as_bytes()), Some(Reason::Setting), "{sql}");
        }
        for sql in [
            "BEGIN",
            "start transaction",
            "begin read only",
            "commit",
            "SET TRANSACTION DEFERRABLE",
        ] {
            assert_eq!(rules.check(sql.as_bytes()), None, "{sql}");
        }
        // Without those pins, transaction modes are the client's business.
        assert_eq!(check("BEGIN READ WRITE ISOLATION LEVEL SERIALIZABLE"), None);
    }

    #[test]
    fn ordinary_statements_pass() {
        expect(
            None,
            &[
                "select 1",
                "",
                ";;",
                "SET app.other = 'x'",
                "SET statement_timeout = '5s'",
                "set local statement_timeout = 0",
                "SET TIME ZONE 'UTC'",
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                "RESET statement_timeout",
                "SHOW role",
                "SHOW app.tenant",
                "DISCARD PLANS",
                "DISCARD TEMP",
                "discard sequences",
                "select set_config('statement_timeout', '5s', false)",
                "select pg_catalog.set_config('application_name', 'x', false)",
                "select current_user, current_setting('app.tenant')",
                "update users set role = 'admin' where id = 1",
                "select * from pg_settings where name = 'role'",
                "create table t (id int, role text)",
                "ALTER FUNCTION f() SET statement_timeout = 0",
                "begin; select 1; commit",
                "select E'\\'; reset role; --'",
                "select $a$ x $b$; reset role; $a$",
                "select '; reset role'",
                "select \"; reset role\"",
                "select 1 /* ; reset role */",
                "/* /* */ set role x */ select 1",
                "select 1 -- ; reset role",
                "select xu&'a'",
                "select $1::int + 1, $2::text",
                "copy t from stdin",
            ],
        );
    }

    #[test]
    fn encodings_and_params() {
        for e in [
            "SJIS",
            "SHIFT_JIS_2004",
            "BIG5",
            "GBK",
            "UHC",
            "GB18030",
            "JOHAB",
        ] {
            assert!(unsafe_client_encoding(e), "{e}");
        }
        for e in ["UTF8", "SQL_ASCII", "LATIN1", "EUC_JP", "WIN1252"] {
            assert!(!unsafe_client_encoding(e), "{e}");
        }
        assert_eq!(max_param(b"select $1, $12, '$40'"), 12);
        assert_eq!(max_param(b"select 1"), 0);
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_message(&mut out, tag, body);
        out
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        message(b'Q', &body)
    }

    fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        body.extend_from_slice(&u16::try_from(types.len()).unwrap().to_be_bytes());
        for t in types {
            body.extend_from_slice(&t.to_be_bytes());
        }
        message(b'P', &body)
    }

    /// A reader handing out its bytes at most `chunk` at a time.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let k = self
                .chunk
                .min(buf.remaining())
                .min(self.data.len() - self.pos);
            let pos = self.pos;
            buf.put_slice(&self.data[pos..pos + k]);
            self.pos += k;
            Poll::Ready(Ok(()))
        }
    }

    async fn filter(input: &[u8], chunk: usize, out_buf: usize) -> io::Result<Vec<u8>> {
        let mut f = Filtered::new(
            Chunked {
                data: input.to_vec(),
                pos: 0,
                chunk,
            },
            rules(),
            "DATABASE_URL".into(),
        );
        let mut out = Vec::new();
        let mut buf = vec![0u8; out_buf];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn messages_are_passed_or_replaced_whatever_the_read_sizes() {
        let copy: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let mut input = Vec::new();
        input.extend(query("select 1"));
        input.extend(query("reset role"));
        input.extend(parse("s1", "select set_config($1, $2, false)", &[0]));
        let bind = message(b'B', b"\0s1\0\0\0\0\x02\0\0\0\x04role\0\0\0\x01x\0\0");
        input.extend(&bind);
        input.extend(message(b'd', &copy));
        input.extend(message(b'c', b""));
        input.extend(message(b'F', b"\0\0\x08\x1c\0\0"));
        input.extend(parse("", "select $1::int", &[23]));
        input.extend(message(b'S', b""));
        let mut expected = Vec::new();
        expected.extend(query("select 1"));
        expected.extend(query(&refusal_sql(Reason::Role)));
        expected.extend(parse("s1", &refusal_sql(Reason::SetConfig), &[25, 25]));
        expected.extend(&bind);
        expected.extend(message(b'd', &copy));
        expected.extend(message(b'c', b""));
        expected.extend(query(&refusal_sql(Reason::FunctionCall)));
        expected.extend(parse("", "select $1::int", &[23]));
        expected.extend(message(b'S', b""));
        for (chunk, out_buf) in [
            (1, 16 * 1024),
            (7, 3),
            (4096, 16 * 1024),
            (1 << 22, 1 << 16),
        ] {
            let got = filter(&input, chunk, out_buf).await.unwrap();
            assert!(got == expected, "chunk {chunk}, read buffer {out_buf}");
        }
    }

    #[test]
    fn a_comment_before_the_newline_continues_a_string_as_the_server_reads_it() {
        // scan.l quotecontinue: `'' --c\n'...'` is one string; a lexer that closed it
        // would see the rest as another string and miss the statement after it.
        let sql = "select E'' --\n'\\'x' || '\\' ; RESET ROLE; --'";
        assert_eq!(check(sql), Some(Reason::Role), "{sql}");
        let sql = "select E'' -- a\n -- b\n'\\'x' ; SET app.tenant = $$t-99$$; --'";
        assert_eq!(check(sql), Some(Reason::Setting), "{sql}");
        // Still one harmless string when nothing hides in it.
        assert_eq!(check("select 'a' -- c\n'b'"), None);
    }

    #[tokio::test]
    async fn an_oversized_statement_is_read_through_and_refused() {
        let big = "x".repeat(MAX_BUFFERED + 10);
        let mut input = query(&format!("select '{big}'"));
        input.extend(parse("big", &format!("select '{big}' where $1"), &[25]));
        input.extend(query("select 1"));
        let mut expected = query(&refusal_sql(Reason::TooLarge));
        expected.extend(parse("big", &refusal_sql(Reason::TooLarge), &[]));
        expected.extend(query("select 1"));
        for chunk in [4096, 1 << 22] {
            let got = filter(&input, chunk, 16 * 1024).await.unwrap();
            assert!(got == expected, "chunk {chunk}");
        }
        // A bad length ends the session.
        let err = filter(b"X\0\0\0\x02", 1024, 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn the_refusal_text_is_fixed_and_quotable() {
        for r in [
            Reason::Role,
            Reason::Setting,
            Reason::SessionReset,
            Reason::Code,
            Reason::SetConfig,
            Reason::Unicode,
            Reason::Encoding,
            Reason::FunctionCall,
            Reason::SettingsView,
            Reason::TooLarge,
        ] {
            assert!(!r.text().contains('\'') && !r.text().contains('$'), "{r:?}");
            // The replacement lexes as one statement, which the filter itself would refuse.
            assert!(check(&refusal_sql(r)).is_some());
            if r != Reason::SetConfig {
                assert_eq!(
                    lex(refusal_sql(r).as_bytes(), false).map(|t| t.len()),
                    Ok(2)
                );
            }
        }
    }
}
