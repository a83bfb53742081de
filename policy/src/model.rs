//! The validated policy and its loader.
//!
//! [`Policy::parse`] is a pure function of the file text and the policy's path: it checks
//! everything that can be checked without I/O and reports every problem at once, each with
//! file, line and column. Whether a secret's source is present is checked separately (by
//! `iron-broker`), because that needs the environment and the file system.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use crate::capability::{Capability, PathPattern, RateLimit};
use crate::error::{Diagnostic, PolicyErrors, Severity, line_col};
use crate::host::{HostPattern, PortSpec, PublicSuffix};
use crate::matcher::PlaceholderMatcher;
use crate::raw::{
    RawCaller, RawCapability, RawFragment, RawLimits, RawPolicy, RawProxy, RawRateLimit, RawSecret,
    RawSource,
};

/// A 1-based line and column in the policy file, kept so later checks (source presence)
/// can point at the right place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

/// What may leave through the proxy (DESIGN.md decision 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Only hosts named by a secret's `hosts`, `[proxy].allow` or `[proxy].passthrough`.
    Allowlist,
    /// Any host (deny CIDRs still apply).
    Open,
}

impl std::fmt::Display for Egress {
    /// As written in the policy: `allowlist` or `open`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Allowlist => "allowlist",
            Self::Open => "open",
        })
    }
}

/// Limits and timeouts of DESIGN.md decision 11. Each has a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line plus headers) read from a client, in bytes.
    /// Default 65 536.
    pub max_header_bytes: usize,
    /// Most headers accepted in one request. Default 128.
    pub max_headers: usize,
    /// Time allowed for a client to send the CONNECT request or a request head.
    /// Default 10 s.
    pub client_header_timeout: Duration,
    /// Time allowed for the client-side TLS handshake. Default 10 s.
    pub tls_handshake_timeout: Duration,
    /// Idle keep-alive time on both legs, and the idle timeout of a relayed tunnel or
    /// upgraded connection. Default 90 s.
    pub idle_timeout: Duration,
    /// Time allowed to connect (TCP + TLS) to an upstream. Default 10 s.
    pub upstream_connect_timeout: Duration,
    /// Time allowed for an upstream to send response headers. Default 120 s.
    pub upstream_response_header_timeout: Duration,
    /// Most leaf certificates kept in the cache. Default 1000.
    pub leaf_cache_size: usize,
    /// Most concurrent client connections; further connections wait in the accept queue.
    /// Default 4096.
    pub max_connections: usize,
    /// On SIGTERM, how long requests in flight may take to finish. Default 30 s.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 128,
            client_header_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_response_header_timeout: Duration::from_secs(120),
            leaf_cache_size: 1000,
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// The `[proxy]` table, validated. Relative paths are already resolved against the policy
/// file's directory.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Forward-proxy listen address. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Admin API listen address, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin API requires (mandatory when `admin_listen` is not loopback).
    pub admin_token: Option<SourceRef>,
    /// Interception CA certificate and key (PEM). `None`: the state directory's CA.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Egress mode.
    pub egress: Egress,
    /// Hosts reachable without a secret.
    pub allow: Vec<HostPattern>,
    /// Hosts tunnelled without interception.
    pub passthrough: Vec<HostPattern>,
    /// Exceptions to the built-in deny CIDRs.
    pub allow_cidrs: Vec<IpNet>,
    /// Extra PEM roots for verifying upstreams, each trusted for every host or only for
    /// some.
    pub upstream_ca: Vec<UpstreamCa>,
    /// Static name → address overrides (like `curl --resolve`), names normalized.
    pub resolve: HashMap<String, IpAddr>,
    /// An HTTP proxy every upstream dial goes through with `CONNECT` (a corporate egress
    /// proxy, REFERENCE D19), except to the hosts of its `no_proxy`.
    pub upstream_proxy: Option<UpstreamProxy>,
    /// Limits and timeouts.
    pub limits: Limits,
}

/// How the upstream dials reach the `upstream_proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyScheme {
    /// `http://`: HTTP `CONNECT` (RFC 9110 §9.3.6).
    Http,
    /// `socks5://` (names resolved here, addresses sent) or `socks5h://` (names sent for
    /// the proxy to resolve): SOCKS5 CONNECT (RFC 1928).
    Socks5 {
        /// `socks5h`: the proxy resolves host names.
        remote_dns: bool,
    },
}

/// `upstream_proxy = "http://HOST:PORT"` (or `socks5://`, `socks5h://`), `no_proxy = [host
/// patterns]` and `upstream_proxy_auth`: the proxy the upstream dials are tunnelled
/// through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamProxy {
    /// HTTP CONNECT or SOCKS5.
    pub scheme: ProxyScheme,
    /// `host:port` of the proxy (`[v6]:port` for an IPv6 literal); port 80 (`http`) or
    /// 1080 (`socks5`) when the URL names none.
    pub authority: String,
    /// Hosts dialed directly (host patterns; a pattern without a port matches every port
    /// here).
    pub no_proxy: Vec<HostPattern>,
    /// `USER:PASSWORD` for the proxy, as a secret reference: sent as `Proxy-Authorization:
    /// Basic` on each CONNECT, or as SOCKS5 username/password (RFC 1929).
    pub auth: Option<SourceRef>,
}

impl UpstreamProxy {
    /// Parses `url` ([`upstream_proxy_url`]) and the `no_proxy` host patterns, with no
    /// credential.
    ///
    /// # Errors
    /// A message naming the bad URL or pattern.
    pub fn parse(url: &str, no_proxy: &[String]) -> Result<Self, String> {
        let (scheme, authority) = upstream_proxy_url(url)?;
        Ok(Self {
            scheme,
            authority,
            no_proxy: no_proxy
                .iter()
                .map(|p| HostPattern::parse(p).map_err(|e| format!("`no_proxy`: {e}")))
                .collect::<Result<_, _>>()?,
            auth: None,
        })
    }

    /// True when `host` (normalized) is dialed through the proxy, not in `no_proxy`.
    pub fn covers(&self, host: &str) -> bool {
        !self.no_proxy.iter().any(|p| p.matches_host(host))
    }
}

/// Where a secret's value comes from (DESIGN.md decision 9). Never the value itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// An environment variable of the proxy process.
    Env(String),
    /// A file, resolved against the policy's directory.
    File(PathBuf),
}

/// A secret reference: `{ env = "VAR" }` or `{ file = "path" }`, optionally with
/// `json_key = "field"` to pluck one top-level string field of a JSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRef {
    /// The source.
    pub kind: SourceKind,
    /// The JSON field to read, if the source holds a JSON document.
    pub json_key: Option<String>,
    /// Where the reference is written in the policy.
    pub pos: Pos,
}

impl SourceRef {
    /// The kind of source as a word: `env` or `file`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            SourceKind::Env(_) => "env",
            SourceKind::File(_) => "file",
        }
    }

    /// The reference's name: the variable name or the file path. Safe to show.
    pub fn reference(&self) -> String {
        match &self.kind {
            SourceKind::Env(v) => v.clone(),
            SourceKind::File(p) => p.display().to_string(),
        }
    }
}

/// Which request headers a replace-mode secret scans (`match_headers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSelector {
    entries: Vec<HeaderRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HeaderRule {
    All,
    Exact(String),
    Prefix(String),
    /// `^x-[a-z0-9-]*(api-key|apikey|secret|token|auth|key)$`, the reference's pattern.
    XCredential,
    /// `/regex/`: header names the expression matches (unanchored, case-insensitive).
    Regex(HeaderRegex),
}

/// A compiled `/regex/` selector, compared by its source text.
#[derive(Debug, Clone)]
struct HeaderRegex(regex_lite::Regex);

impl PartialEq for HeaderRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for HeaderRegex {}

/// Most memory one `/regex/` selector may compile to (bytes): a pattern that would take more
/// is refused at load rather than slowing every request.
const HEADER_REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Header names scanned when `match_headers` is omitted: the reference's
/// DEFAULT_MATCH_HEADERS (REFERENCE.md §1), without `Proxy-Authorization`, which is
/// hop-by-hop and never reaches an origin.
pub const DEFAULT_MATCH_HEADERS: &[&str] = &[
    "Authorization",
    "Api-Key",
    "Anthropic-Api-Key",
    "Auth-Token",
    "Jwt",
    "Cookie",
    "Apikey",
    "AccessKey",
    "Api-Access-Key",
    "Api-Signature",
    "FX-ACCESS-*",
    "X-CB-ACCESS-*",
];

impl HeaderSelector {
    /// The default selector: [`DEFAULT_MATCH_HEADERS`] plus any `x-…(api-key|apikey|secret|
    /// token|auth|key)` header.
    pub fn default_set() -> Self {
        let mut entries: Vec<HeaderRule> = DEFAULT_MATCH_HEADERS
            .iter()
            .filter_map(|h| HeaderRule::parse(h).ok())
            .collect();
        entries.push(HeaderRule::XCredential);
        Self { entries }
    }

    /// An explicit list. `"*"` selects every header, `Prefix-*` every header starting with
    /// `Prefix-`, `/regex/` every header whose name the regular expression matches
    /// (unanchored, as the reference's Go `MatchString`; write `^…$` to anchor), anything
    /// else is an exact name. Case-insensitive. A header matched by several entries is
    /// swapped once. An empty list selects nothing (REFERENCE.md D13).
    ///
    /// # Errors
    /// The offending entry's message when it is not a header name or one of those forms,
    /// or its regular expression does not compile (syntax, or over 256 KiB compiled).
    pub fn parse(list: &[&str]) -> Result<Self, String> {
        let entries = list
            .iter()
            .map(|s| HeaderRule::parse(s))
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// True when some header may be selected (the list is not empty).
    pub fn selects_any(&self) -> bool {
        !self.entries.is_empty()
    }

    /// True when the header `name` (any case) is selected.
    pub fn selects(&self, name: &str) -> bool {
        // Names from an HTTP library are lowercase already: copy only when not.
        let lower = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(name.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(name)
        };
        self.entries.iter().any(|r| r.selects(&lower))
    }

    /// True when no header is selected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl HeaderRule {
    fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::All);
        }
        if let Some(pattern) = s
            .strip_prefix('/')
            .and_then(|r| r.strip_suffix('/'))
            .filter(|p| !p.is_empty())
        {
            return regex_lite::RegexBuilder::new(pattern)
                .case_insensitive(true)
                .size_limit(HEADER_REGEX_SIZE_LIMIT)
                .build()
                .map(|r| Self::Regex(HeaderRegex(r)))
                .map_err(|e| format!("`{s}` is not a valid regular expression: {e}"));
        }
        let (body, prefix) = match s.strip_suffix('*') {
            Some(b) => (b, true),
            None => (s, false),
        };
        if body.is_empty() || !body.bytes().all(is_token_char) {
            return Err(format!(
                "`{s}` is not a header name, `Prefix-*`, `/regex/` or `*`"
            ));
        }
        let lower = body.to_ascii_lowercase();
        Ok(if prefix {
            Self::Prefix(lower)
        } else {
            Self::Exact(lower)
        })
    }

    fn selects(&self, lower: &str) -> bool {
        match self {
            Self::All => true,
            Self::Exact(n) => n == lower,
            Self::Prefix(p) => lower.starts_with(p.as_str()),
            Self::Regex(r) => r.0.is_match(lower),
            Self::XCredential => {
                let Some(rest) = lower.strip_prefix("x-") else {
                    return false;
                };
                rest.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && ["api-key", "apikey", "secret", "token", "auth", "key"]
                        .iter()
                        .any(|s| rest.ends_with(s))
            }
        }
    }
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where an inject-mode secret puts its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectTarget {
    /// Set this header (overwriting any existing one, whatever its casing; the configured
    /// casing is kept).
    Header(String),
    /// Set this query parameter (replacing existing ones of that name, or appending).
    Query(String),
}

impl InjectTarget {
    /// True when both set the same thing: header names compared case-insensitively
    /// (RFC 9110 §5.1), query parameter names exactly.
    pub fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Header(a), Self::Header(b)) => a.eq_ignore_ascii_case(b),
            (Self::Query(a), Self::Query(b)) => a == b,
            _ => false,
        }
    }
}

/// An `inject_formatter`: text with the value spliced in.
///
/// Forms accepted: `{value}` (alias `{token}`), Go-template `{{.Value}}`, and
/// `{{base64 "user:" .Value}}` (standard base64 of the concatenated arguments), so
/// `Bearer {value}` and `Basic {{base64 "user:" .Value}}` are both expressible
/// (REFERENCE.md §2.1, Centaur's template forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectFormatter {
    parts: Vec<FmtPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FmtPart {
    Literal(String),
    Value,
    Base64(Vec<FmtPart>),
}

impl InjectFormatter {
    /// The identity formatter: the value alone.
    pub fn value_only() -> Self {
        Self {
            parts: vec![FmtPart::Value],
        }
    }

    /// Parses a formatter.
    ///
    /// # Errors
    /// A message when a `{…}` or `{{…}}` is not one of the accepted forms, a quote is not
    /// closed, or the value is never used.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("{{") {
                let Some(end) = after.find("}}") else {
                    return Err("`{{` is not closed by `}}`".into());
                };
                flush(&mut lit, &mut parts);
                parts.push(parse_action(after[..end].trim())?);
                rest = &after[end + 2..];
            } else if let Some(after) = rest.strip_prefix('{') {
                let Some(end) = after.find('}') else {
                    return Err("`{` is not closed by `}`".into());
                };
                match &after[..end] {
                    "value" | "token" => {
                        flush(&mut lit, &mut parts);
                        parts.push(FmtPart::Value);
                    }
                    other => {
                        return Err(format!(
                            "unknown placeholder `{{{other}}}`; use `{{value}}`, `{{{{.Value}}}}` or `{{{{base64 \"user:\" .Value}}}}`"
                        ));
                    }
                }
                rest = &after[end + 1..];
            } else {
                let mut chars = rest.chars();
                if let Some(c) = chars.next() {
                    lit.push(c);
                }
                rest = chars.as_str();
            }
        }
        flush(&mut lit, &mut parts);
        if !uses_value(&parts) {
            return Err("the formatter never uses the value".into());
        }
        Ok(Self { parts })
    }

    /// Renders the formatter with `value` spliced in.
    pub fn render(&self, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(value.len() + 16);
        render_parts(&self.parts, value, &mut out);
        out
    }
}

fn flush(lit: &mut String, parts: &mut Vec<FmtPart>) {
    if !lit.is_empty() {
        parts.push(FmtPart::Literal(std::mem::take(lit)));
    }
}

fn uses_value(parts: &[FmtPart]) -> bool {
    parts.iter().any(|p| match p {
        FmtPart::Value => true,
        FmtPart::Base64(inner) => uses_value(inner),
        FmtPart::Literal(_) => false,
    })
}

fn parse_action(action: &str) -> Result<FmtPart, String> {
    if action == ".Value" {
        return Ok(FmtPart::Value);
    }
    let Some(args) = action.strip_prefix("base64") else {
        return Err(format!(
            "unknown template action `{action}`; use `.Value` or `base64 …`"
        ));
    };
    let mut inner = Vec::new();
    let mut rest = args.trim_start();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix(".Value") {
            inner.push(FmtPart::Value);
            rest = r.trim_start();
        } else if let Some(r) = rest.strip_prefix('"') {
            let mut s = String::new();
            let mut chars = r.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            s.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => s.push(c),
                }
            }
            let Some(end) = end else {
                return Err("a quoted string in `base64` is not closed".into());
            };
            inner.push(FmtPart::Literal(s));
            rest = r[end + 1..].trim_start();
        } else {
            return Err(format!(
                "`base64` takes quoted strings and `.Value`, found `{rest}`"
            ));
        }
    }
    if inner.is_empty() {
        return Err("`base64` needs at least one argument".into());
    }
    Ok(FmtPart::Base64(inner))
}

fn render_parts(parts: &[FmtPart], value: &[u8], out: &mut Vec<u8>) {
    use base64::Engine as _;
    for p in parts {
        match p {
            FmtPart::Literal(s) => out.extend_from_slice(s.as_bytes()),
            FmtPart::Value => out.extend_from_slice(value),
            FmtPart::Base64(inner) => {
                let mut raw = Vec::new();
                render_parts(inner, value, &mut raw);
                out.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(&raw)
                        .as_bytes(),
                );
            }
        }
    }
}

/// How an `http` secret is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpMode {
    /// Swap the placeholder where it appears in the named locations.
    Replace {
        /// Headers scanned.
        headers: HeaderSelector,
        /// Query parameter names whose values are scanned.
        query: Vec<String>,
        /// Whether the path is scanned.
        path: bool,
    },
    /// Set a header or query parameter on every request to the secret's hosts.
    Inject {
        /// Where the value goes.
        target: InjectTarget,
        /// How the value is written.
        formatter: InjectFormatter,
    },
}

/// An OAuth 2.0 grant (RFC 6749 §4.3, §4.4, §6; RFC 7523 §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `refresh_token`: fields `client_id`, `refresh_token` [, `client_secret`].
    RefreshToken,
    /// `client_credentials`: fields `client_id`, `client_secret`.
    ClientCredentials,
    /// `password`: fields `client_id`, `username`, `password` [, `client_secret`].
    Password,
    /// `jwt_bearer`: fields `issuer`, `subject`, `private_key` (RSA PEM) [, `private_key_id`].
    JwtBearer,
}

impl Grant {
    /// The grant's name as written in the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RefreshToken => "refresh_token",
            Self::ClientCredentials => "client_credentials",
            Self::Password => "password",
            Self::JwtBearer => "jwt_bearer",
        }
    }

    fn fields(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Self::RefreshToken => (&["client_id", "refresh_token"], &["client_secret"]),
            Self::ClientCredentials => (&["client_id", "client_secret"], &[]),
            Self::Password => (&["client_id", "username", "password"], &["client_secret"]),
            Self::JwtBearer => (&["issuer", "subject", "private_key"], &["private_key_id"]),
        }
    }
}

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (default).
    Post,
    /// HTTP Basic with `client_id:client_secret`.
    Basic,
}

/// A token endpoint: an `https` URL, with its parts for stub matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEndpoint {
    /// The URL as written.
    pub url: String,
    /// Host, normalized.
    pub host: String,
    /// Port (443 when not written).
    pub port: u16,
    /// Path (`/` when empty).
    pub path: String,
}

impl TokenEndpoint {
    /// Parses an `https://host[:port]/path` URL.
    ///
    /// # Errors
    /// A message when the URL is not absolute `https` with a valid host.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("token endpoint `{url}` must be an https:// URL"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = path.split('?').next().unwrap_or("/");
        let path = if path.is_empty() { "/" } else { path };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                Ok(p) if p > 0 => (h, p),
                _ => return Err(format!("token endpoint `{url}` has an invalid port")),
            },
            _ => (authority, 443),
        };
        if authority.contains('@') {
            return Err(format!("token endpoint `{url}` must not contain userinfo"));
        }
        let host = crate::host::normalize_host(host)
            .ok_or_else(|| format!("token endpoint `{url}` has an invalid host"))?;
        Ok(Self {
            url: url.to_string(),
            host,
            port,
            path: path.to_string(),
        })
    }
}

/// The authority of a URL's text after `scheme://`: up to the first `/`, `?`, `#` or `\`
/// (where an HTTP client ends it).
fn url_authority(rest: &str) -> &str {
    rest.find(['/', '?', '#', '\\'])
        .map_or(rest, |i| &rest[..i])
}

/// One `upstream_ca` entry: a PEM file of extra roots (or self-signed server
/// certificates) for verifying upstream TLS servers, and the hosts it is trusted for.
/// Written as a path (`"corp-ca.pem"`: every host) or as a table
/// (`{ file = "corp-ca.pem", hosts = ["*.corp.internal"] }`: only servers whose name matches
/// one of `hosts`, so the CA's key cannot impersonate a secret's public API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCa {
    /// The PEM file, resolved against the policy's directory.
    pub file: PathBuf,
    /// The server names it is trusted for (host patterns without a port); empty: every
    /// host.
    pub hosts: Vec<HostPattern>,
}

impl UpstreamCa {
    /// An entry trusted for every host (the path form; the broker's `upstream_ca`).
    pub fn everywhere(file: PathBuf) -> Self {
        Self {
            file,
            hosts: Vec::new(),
        }
    }

    /// True when the entry is trusted for a server named `host` (normalized, as
    /// [`crate::normalize_host`] gives it).
    pub fn trusted_for(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches_host(host))
    }
}

/// `type = "oauth_token"` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSpec {
    /// The grant.
    pub grant: Grant,
    /// Where tokens are requested.
    pub token_endpoint: TokenEndpoint,
    /// Requested scopes (space-joined in the request).
    pub scopes: Vec<String>,
    /// Grant fields by name, each a secret reference.
    pub fields: std::collections::BTreeMap<String, SourceRef>,
    /// Extra headers sent on the token POST only, casing kept.
    pub token_endpoint_headers: Vec<(String, SourceRef)>,
    /// JWT `aud` for `jwt_bearer` (default: the token endpoint URL).
    pub audience: Option<String>,
    /// Client authentication method.
    pub client_auth: ClientAuth,
}

/// The default scope of `gcp_auth`.
pub const GCP_DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The default hosts of `gcp_auth`.
pub const GCP_DEFAULT_HOST: &str = "*.googleapis.com";
/// Google's token endpoint, stubbed for sandboxes that hold a `gcp_auth` stub key file.
pub const GCP_TOKEN_HOST: &str = "oauth2.googleapis.com";

/// `type = "gcp_auth"` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpSpec {
    /// The service-account key file (JSON), as a secret reference.
    pub keyfile: SourceRef,
    /// Requested scopes.
    pub scopes: Vec<String>,
    /// Domain-wide delegation subject.
    pub subject: Option<String>,
}

/// `type = "pg_dsn"` settings: a local Postgres listener whose sandbox-side password is a
/// placeholder, relayed to the upstream named by the real DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSpec {
    /// The upstream DSN (URL or key=value form), as a secret reference.
    pub source: SourceRef,
    /// The database; must equal the DSN's `dbname`.
    pub database: String,
    /// Relay listen address; `None`: a loopback port chosen once and kept in the state
    /// directory.
    pub listen: Option<SocketAddr>,
    /// The sandbox-side user name; `None`: the DSN's user.
    pub user: Option<String>,
    /// The sandbox-side (placeholder) password; `None`: generated once and kept in the
    /// state directory.
    pub password: Option<String>,
    /// `SET ROLE` after login.
    pub role: Option<String>,
    /// `set_config(name, value, false)` after login, in name order; the client cannot
    /// override them at startup.
    pub settings: Vec<(String, String)>,
    /// Offer TLS to clients (a leaf from the proxy CA). Default true.
    pub client_tls: bool,
    /// Most concurrent sessions. Default 64.
    pub max_connections: usize,
}

/// Where a secret's value comes from, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretKind {
    /// `type = "http"`: a static value from `source`.
    Static(SourceRef),
    /// `type = "oauth_token"`: an access token minted with a grant.
    OAuth(OAuthSpec),
    /// `type = "gcp_auth"`: an access token minted from a service-account key.
    Gcp(GcpSpec),
    /// `type = "pg_dsn"`: a Postgres relay.
    Pg(PgSpec),
    /// `type = "brokered_token"`: an access token served by `iron-token-broker`.
    Brokered(BrokeredSpec),
}

/// `type = "brokered_token"` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokeredSpec {
    /// The broker's credential id (default: the secret's name).
    pub credential: String,
    /// The broker's base URL: `https://…`, or `http://` on a loopback address.
    pub url: String,
    /// Bearer token for the broker, as a secret reference.
    pub token: Option<SourceRef>,
}

impl BrokeredSpec {
    /// `GET` URL of the access token: `{url}/v1/credentials/{credential}/access_token`.
    pub fn access_token_url(&self) -> String {
        format!(
            "{}/v1/credentials/{}/access_token",
            self.url.trim_end_matches('/'),
            self.credential
        )
    }
}

/// A request the proxy answers itself so sandbox SDKs holding stub credentials can finish
/// their token dance (REFERENCE.md §2.8, §2.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stub {
    /// A POST to an `oauth_token` secret's token endpoint.
    OAuthToken,
    /// A POST to `https://oauth2.googleapis.com/token`.
    GcpToken,
    /// A GET of the metadata server's service-account token.
    GcpMetadata,
}

/// One `[[secrets]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// The secret's name; also the sandbox environment variable holding the placeholder.
    pub name: String,
    /// The text the sandbox holds in place of the value. Default: the name.
    pub placeholder: String,
    /// Hosts the value may be sent to.
    pub hosts: Vec<HostPattern>,
    /// A missing source is a warning rather than an error.
    pub optional: bool,
    /// `enabled = false` switches the secret off without deleting it (the seed's tool
    /// `enabled` flag): its sources are not checked, a request carrying its placeholder is
    /// refused with 502 `credential_unavailable`, the admin API shows it `disabled`. Default
    /// true.
    pub enabled: bool,
    /// The value may be sent over cleartext HTTP (DESIGN.md decision 4). Default false.
    pub allow_plaintext: bool,
    /// Response bodies of requests that carried the value are scanned, and each echo of it
    /// put back to the placeholder (REFERENCE.md D18). Default true; `false` for a host whose
    /// responses are large downloads that never reflect a credential (response headers are
    /// scrubbed either way).
    pub scrub_response_body: bool,
    /// WebSocket connections to the secret's hosts get the placeholder swapped in the
    /// client's text messages and the value put back in the server's (REFERENCE.md D22; the
    /// proxy's `ws` module says which frames). The upgrade request then goes without
    /// `Sec-WebSocket-Extensions`, so messages are not compressed. Default false: frames
    /// are relayed as bytes.
    pub websocket_frames: bool,
    /// `on_failure = "open"` (REFERENCE.md D15; default `"closed"`): when the value cannot
    /// be had (a source missing, a token that cannot be minted, the secret disabled), a
    /// request it would be injected into goes on without it, its audit entry
    /// `skipped:credential_unavailable`, instead of 502 `credential_unavailable`. Only for
    /// injecting secrets (`mode = "inject"`, token types), and only for requests that do
    /// not carry its placeholder: a placeholder is never forwarded.
    pub fail_open: bool,
    /// How the value is applied to requests. Token types always inject.
    pub mode: HttpMode,
    /// Method and path prefixes the secret may be applied to; empty: every request to its
    /// hosts. A request to one of its hosts that carries its placeholder (or, for an
    /// injecting secret, any request to its hosts) and matches none is refused with 403
    /// `capability_not_allowed`.
    pub capabilities: Vec<Capability>,
    /// Requests a minute the secret may be applied to; over it, 429 `rate_limited`.
    pub rate_limit: Option<RateLimit>,
    /// Where the value comes from.
    pub kind: SecretKind,
    /// Where the entry's `name` is written.
    pub pos: Pos,
    /// The file the entry is written in (the main policy or a drop-in fragment).
    pub file: PathBuf,
}

impl Secret {
    /// The type as written in the policy: `http`, `oauth_token` or `gcp_auth`.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            SecretKind::Static(_) => "http",
            SecretKind::OAuth(_) => "oauth_token",
            SecretKind::Gcp(_) => "gcp_auth",
            SecretKind::Pg(_) => "pg_dsn",
            SecretKind::Brokered(_) => "brokered_token",
        }
    }

    /// Every secret reference this secret reads, with the field it belongs to.
    pub fn sources(&self) -> Vec<(&str, &SourceRef)> {
        match &self.kind {
            SecretKind::Static(s) => vec![("source", s)],
            SecretKind::OAuth(o) => o
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v))
                .chain(
                    o.token_endpoint_headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v)),
                )
                .collect(),
            SecretKind::Gcp(g) => vec![("keyfile", &g.keyfile)],
            SecretKind::Pg(p) => vec![("source", &p.source)],
            SecretKind::Brokered(b) => b.token.iter().map(|t| ("broker.token", t)).collect(),
        }
    }

    /// True when this secret may be used on `host:port` over a connection that is (or is
    /// not) TLS. Cleartext is checked separately, so it can be refused with its own code.
    pub fn allows_host(&self, host: &str, port: u16, tls: bool) -> bool {
        self.hosts.iter().any(|h| h.matches(host, port, tls))
    }

    /// The [`HostPattern::specificity`] of the most specific of this secret's `hosts` that
    /// matches `host:port`, or `None` when none does.
    pub fn host_specificity(
        &self,
        host: &str,
        port: u16,
        tls: bool,
    ) -> Option<(bool, usize, bool)> {
        self.hosts
            .iter()
            .filter(|h| h.matches(host, port, tls))
            .map(HostPattern::specificity)
            .max()
    }

    /// The header or query parameter this secret injects, when it injects one.
    pub fn inject_target(&self) -> Option<&InjectTarget> {
        match &self.mode {
            HttpMode::Inject { target, .. } => Some(target),
            HttpMode::Replace { .. } => None,
        }
    }

    /// True when the secret may be applied to a request with `method` and raw `path`: it
    /// has no capabilities, or one of them matches ([`Capability::matches`]).
    pub fn allows_request(&self, method: &str, path: &str) -> bool {
        self.capabilities.is_empty() || self.capabilities.iter().any(|c| c.matches(method, path))
    }
}

/// One `[[callers]]` entry: a client of the proxy port, known by its proxy credential
/// (REFERENCE.md D21: optional mandatory caller authentication at the front door), and the
/// secrets it is granted (the seeds' access grants).
///
/// When the policy has any caller, every request on the proxy port (each CONNECT, each
/// absolute-form request) must carry `Proxy-Authorization` with one caller's token:
/// `Basic` (RFC 7617; the user name is not checked, the password is the token: what
/// clients send for `HTTPS_PROXY=http://NAME:TOKEN@HOST:PORT`) or `Bearer TOKEN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's name: the audit log's `caller`, and the user name `iron-proxy env`
    /// puts in the proxy URL. Printable ASCII without `:` or whitespace, 1–64 bytes.
    pub name: String,
    /// The caller's proxy token, as a secret reference (read like any source, never
    /// printed by `check` or the admin API).
    pub token: SourceRef,
    /// The secrets this caller's requests may use.
    pub grants: Grants,
    /// Where the entry's `name` is written.
    pub pos: Pos,
}

/// The secrets a [`Caller`] may use: `secrets = ["*"]` for all, else the named ones.
/// A request that carries the placeholder of a secret it is not granted is refused with
/// 403 `secret_not_granted`; a token endpoint stub of one is refused the same way; a
/// secret that injects (no placeholder) is not applied for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grants {
    /// Every secret, also those added later (`secrets = ["*"]`), and the answer for a
    /// policy without callers.
    All,
    /// By index into [`Policy::secrets`]: `true` for a granted secret.
    Only(Vec<bool>),
}

impl Grants {
    /// True when secret `index` (into [`Policy::secrets`]) is granted.
    pub fn allows(&self, index: usize) -> bool {
        match self {
            Self::All => true,
            Self::Only(granted) => granted.get(index).copied().unwrap_or(false),
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[proxy]`.
    pub proxy: ProxySettings,
    /// `[[secrets]]`, in file order.
    pub secrets: Vec<Secret>,
    /// `[[callers]]`, in file order; empty: the proxy port takes requests without
    /// `Proxy-Authorization`, and every secret is usable by every client.
    pub callers: Vec<Caller>,
    /// Warnings found while loading (catch-all patterns, short placeholders, shadowing…).
    pub warnings: Vec<Diagnostic>,
    /// Every file read: the policy, then its drop-in fragments in load order.
    pub files: Vec<PathBuf>,
    /// Directories whose changes may change the policy (the policy's, and each include
    /// pattern's), for file watching.
    pub watch_dirs: Vec<PathBuf>,
    pub(crate) matcher: PlaceholderMatcher,
}

/// The scheme and `host:port` of `upstream_proxy = "http://HOST[:PORT]"`,
/// `"socks5://HOST[:PORT]"` or `"socks5h://HOST[:PORT]"` (the policy's, and the broker's).
///
/// # Errors
/// A message naming what is wrong: another scheme (`https://` proxies are not supported:
/// the link to the proxy is cleartext), credentials in the URL (a secret in the policy
/// file: use `upstream_proxy_auth`), a path, no host, a bad port.
pub fn upstream_proxy_url(url: &str) -> Result<(ProxyScheme, String), String> {
    let (scheme, rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
        (ProxyScheme::Http, rest, 80)
    } else if let Some(rest) = url.strip_prefix("socks5h://") {
        (ProxyScheme::Socks5 { remote_dns: true }, rest, 1080)
    } else if let Some(rest) = url.strip_prefix("socks5://") {
        (ProxyScheme::Socks5 { remote_dns: false }, rest, 1080)
    } else {
        return Err(format!(
            "`{url}` is not an http://, socks5:// or socks5h:// URL (the link to the proxy is cleartext)"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        return Err(
            "credentials in the URL are not taken (they would sit in the policy file; use `upstream_proxy_auth`)".into(),
        );
    }
    if rest.contains(['/', '?', '#']) {
        return Err(format!("`{url}` has a path; give only SCHEME://HOST:PORT"));
    }
    let pattern = HostPattern::parse(rest).map_err(|e| format!("`{url}`: {e}"))?;
    let (host, port) = match pattern.port() {
        crate::PortSpec::Port(p) => (rest[..rest.len() - p.to_string().len() - 1].to_string(), p),
        crate::PortSpec::Default => (rest.to_string(), default_port),
        crate::PortSpec::Any => return Err(format!("`{url}`: give a port, not `*`")),
    };
    if host.starts_with("*.") {
        return Err(format!("`{url}` is a pattern, not a host"));
    }
    Ok((scheme, format!("{host}:{port}")))
}

/// Addresses the proxy never dials unless `allow_cidrs` makes an exception (DESIGN.md
/// decision 5): unspecified, loopback, RFC 1918, CGNAT, link-local (incl. cloud metadata
/// 169.254.169.254), multicast, broadcast, "this network", ULA, IPv6 link-local, the
/// AWS IPv6 metadata address, NAT64 (`64:ff9b::/96`), IPv4-compatible (`::/96`, RFC 4291
/// §2.5.5.1, which holds `::` and `::1`), and IPv4-mapped forms (checked after unmapping).
pub const DEFAULT_DENY_CIDRS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
    "fd00:ec2::254/128",
    "64:ff9b::/96",
];

/// [`DEFAULT_DENY_CIDRS`] parsed once (every upstream dial checks its address against them).
static DEFAULT_DENY_NETS: std::sync::LazyLock<Vec<IpNet>> = std::sync::LazyLock::new(|| {
    DEFAULT_DENY_CIDRS
        .iter()
        .filter_map(|c| c.parse::<IpNet>().ok())
        .collect()
});

impl Policy {
    /// Reads and parses the policy at `path`.
    ///
    /// # Errors
    /// [`PolicyErrors`] with one diagnostic when the file cannot be read, else every
    /// problem [`Policy::parse`] finds.
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyErrors {
            diagnostics: vec![Diagnostic {
                file: path.to_path_buf(),
                line: 1,
                col: 1,
                severity: Severity::Error,
                message: format!("failed to read policy file: {e}"),
            }],
        })?;
        Self::parse(&text, path)
    }

    /// Parses policy `text` read from `path` (used for messages and to resolve relative
    /// paths against its directory). Pure: no I/O.
    ///
    /// # Errors
    /// [`PolicyErrors`] listing every error (and the warnings) found.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut cx = Cx {
            text,
            file: path.to_path_buf(),
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            diags: Vec::new(),
        };
        let raw: RawPolicy = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let offset = e.span().map_or(0, |s| s.start);
                cx.error(offset, e.message().trim().to_string());
                return Err(cx.into_errors());
            }
        };
        match &raw.version {
            None => cx.error(0, "missing `version = 1`".into()),
            Some(v) if *v.get_ref() != 1 => cx.error(
                v.span().start,
                format!("unsupported policy version {}; expected 1", v.get_ref()),
            ),
            Some(_) => {}
        }
        let proxy = match &raw.proxy {
            Some(p) => cx.proxy(p.get_ref()),
            None => cx.proxy(&RawProxy::default()),
        };
        let mut secrets: Vec<Secret> = Vec::new();
        cx.secrets(&raw.secrets, &mut secrets);
        let mut files = vec![path.to_path_buf()];
        let mut watch_dirs = vec![cx.base.clone()];
        let mut diags = std::mem::take(&mut cx.diags);
        for pattern in &raw.include {
            let full = cx.path(pattern.get_ref());
            if let Some(dir) = full.parent()
                && !watch_dirs.iter().any(|d| d == dir)
            {
                watch_dirs.push(dir.to_path_buf());
            }
            let mut matched: Vec<PathBuf> = match glob::glob(&full.to_string_lossy()) {
                Ok(paths) => paths.filter_map(Result::ok).collect(),
                Err(e) => {
                    cx.error(
                        pattern.span().start,
                        format!("invalid include pattern: {}", e.msg),
                    );
                    continue;
                }
            };
            matched.sort();
            if matched.is_empty() {
                cx.warn(
                    pattern.span().start,
                    format!(
                        "include pattern `{}` matches no file: no drop-in secrets come from it",
                        pattern.get_ref()
                    ),
                );
            }
            for frag in matched {
                if files.contains(&frag) {
                    continue;
                }
                match std::fs::read_to_string(&frag) {
                    Ok(t) => {
                        let mut fcx = Cx {
                            text: &t,
                            file: frag.clone(),
                            base: frag.parent().map(Path::to_path_buf).unwrap_or_default(),
                            diags: Vec::new(),
                        };
                        fcx.fragment(&mut secrets);
                        diags.append(&mut fcx.diags);
                    }
                    Err(e) => cx.error(
                        pattern.span().start,
                        format!("failed to read included file {}: {e}", frag.display()),
                    ),
                }
                files.push(frag);
            }
        }
        let mut placeholders: HashMap<&str, &str> = HashMap::new();
        for secret in &secrets {
            if let Some(other) = placeholders.insert(&secret.placeholder, &secret.name) {
                diags.push(Diagnostic {
                    file: secret.file.clone(),
                    line: secret.pos.line,
                    col: secret.pos.col,
                    severity: Severity::Error,
                    message: format!(
                        "secret `{}` reuses placeholder `{}` of secret `{other}`",
                        secret.name, secret.placeholder
                    ),
                });
            }
        }
        // A broker reached over http:// carries its bearer token in cleartext: only to a
        // loopback address, also after `resolve` (which the dial follows).
        for secret in &secrets {
            if let SecretKind::Brokered(b) = &secret.kind
                && let Some(rest) = b.url.strip_prefix("http://")
            {
                let authority = url_authority(rest);
                let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
                if let Some(ip) = proxy.resolve.get(&host.to_ascii_lowercase())
                    && !ip.is_loopback()
                {
                    diags.push(Diagnostic {
                        file: secret.file.clone(),
                        line: secret.pos.line,
                        col: secret.pos.col,
                        severity: Severity::Error,
                        message: format!(
                            "secret `{}`: broker url is http:// but `resolve` maps {host} to {ip}, not a loopback address: the broker token would cross the network in cleartext (use https://)",
                            secret.name
                        ),
                    });
                }
            }
        }
        // Two secrets injecting one header or query parameter on hosts both match, equally
        // specific: a request there gets the first one's credential only.
        for (j, later) in secrets.iter().enumerate() {
            let Some(target) = later.inject_target() else {
                continue;
            };
            let tie = secrets[..j].iter().find_map(|first| {
                let t = first.inject_target()?;
                if !t.same(target) {
                    return None;
                }
                let p = later.hosts.iter().find(|p| {
                    first
                        .hosts
                        .iter()
                        .any(|q| q.overlaps(p) && q.specificity() == p.specificity())
                })?;
                Some((first, p))
            });
            if let Some((first, pattern)) = tie {
                let what = match target {
                    InjectTarget::Header(h) => format!("header `{h}`"),
                    InjectTarget::Query(q) => format!("query parameter `{q}`"),
                };
                diags.push(Diagnostic {
                    file: later.file.clone(),
                    line: later.pos.line,
                    col: later.pos.col,
                    severity: Severity::Warning,
                    message: format!(
                        "secret `{}` injects {what} on `{pattern}` as secret `{}` does, with a host pattern as specific: requests there get `{}`'s credential only (name a more specific host to choose)",
                        later.name, first.name, first.name
                    ),
                });
            }
        }
        // Two token secrets with one token endpoint: its stub answers with the first one's
        // placeholder, so an SDK configured for the second gets the wrong placeholder.
        let mut endpoints: HashMap<(&str, u16, &str), &str> = HashMap::new();
        for secret in &secrets {
            if let SecretKind::OAuth(o) = &secret.kind {
                let key = (
                    o.token_endpoint.host.as_str(),
                    o.token_endpoint.port,
                    o.token_endpoint.path.as_str(),
                );
                if let Some(first) = endpoints.insert(key, &secret.name) {
                    diags.push(Diagnostic {
                        file: secret.file.clone(),
                        line: secret.pos.line,
                        col: secret.pos.col,
                        severity: Severity::Warning,
                        message: format!(
                            "secret `{}` has the token endpoint of secret `{first}`: a sandbox SDK's token request there is answered with `{first}`'s placeholder",
                            secret.name
                        ),
                    });
                    endpoints.insert(key, first);
                }
            }
        }
        // A secret's host under a passthrough pattern is intercepted anyway
        // (`Policy::is_passthrough`); say so, since clients there may pin certificates.
        for secret in &secrets {
            for h in &secret.hosts {
                if let Some(p) = proxy.passthrough.iter().find(|p| p.overlaps(h)) {
                    diags.push(Diagnostic {
                        file: secret.file.clone(),
                        line: secret.pos.line,
                        col: secret.pos.col,
                        severity: Severity::Warning,
                        message: format!(
                            "secret `{}`: host `{h}` is also covered by passthrough `{p}`: it is intercepted all the same (a secret's host is never passed through, or its placeholder would reach the host unswapped), so a client there that pins certificates fails",
                            secret.name
                        ),
                    });
                }
            }
        }
        let callers = cx.callers(&raw.callers, &secrets);
        diags.append(&mut cx.diags);
        diags.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        if diags.iter().any(|d| d.severity == Severity::Error) {
            return Err(PolicyErrors { diagnostics: diags });
        }
        let matcher = PlaceholderMatcher::new(&secrets).map_err(|message| PolicyErrors {
            diagnostics: vec![Diagnostic {
                file: path.to_path_buf(),
                line: 1,
                col: 1,
                severity: Severity::Error,
                message,
            }],
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            proxy,
            secrets,
            callers,
            warnings: diags,
            files,
            watch_dirs,
            matcher,
        })
    }

    /// The secret named `name`.
    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| s.name == name)
    }

    /// The caller named `name`.
    pub fn caller(&self, name: &str) -> Option<&Caller> {
        self.callers.iter().find(|c| c.name == name)
    }

    /// The stub, if any, that answers a request to `host:port` `path` (see [`Stub`]), with
    /// the index of the secret it belongs to.
    pub fn stub_for(
        &self,
        host: &str,
        port: u16,
        tls: bool,
        method: &str,
        path: &str,
    ) -> Option<(usize, Stub)> {
        self.stub_for_grants(host, port, tls, method, path, &Grants::All)
    }

    /// [`Policy::stub_for`] for a caller with `grants`: the first matching stub of a
    /// granted secret (several `gcp_auth` secrets share the Google stubs; `oauth_token`
    /// secrets may share a token endpoint), else the first matching one, which the caller
    /// is then refused.
    pub fn stub_for_grants(
        &self,
        host: &str,
        port: u16,
        tls: bool,
        method: &str,
        path: &str,
        grants: &Grants,
    ) -> Option<(usize, Stub)> {
        let mut first = None;
        for (i, s) in self.secrets.iter().enumerate() {
            let stub = match &s.kind {
                SecretKind::OAuth(o) => {
                    let ep = &o.token_endpoint;
                    (tls && method == "POST"
                        && ep.host == host
                        && ep.port == port
                        && ep.path == path)
                        .then_some(Stub::OAuthToken)
                }
                SecretKind::Gcp(_) => {
                    let metadata = matches!(
                        host,
                        "metadata.google.internal" | "metadata" | "169.254.169.254"
                    );
                    if tls
                        && method == "POST"
                        && host == GCP_TOKEN_HOST
                        && port == 443
                        && path == "/token"
                    {
                        Some(Stub::GcpToken)
                    } else if metadata && method == "GET" && is_metadata_token_path(path) {
                        Some(Stub::GcpMetadata)
                    } else {
                        None
                    }
                }
                SecretKind::Static(_) | SecretKind::Pg(_) | SecretKind::Brokered(_) => None,
            };
            if let Some(stub) = stub {
                if grants.allows(i) {
                    return Some((i, stub));
                }
                first.get_or_insert((i, stub));
            }
        }
        first
    }

    /// True when a CONNECT to `host:port` is answered by stubs alone and must not dial out.
    pub fn is_stub_host(&self, host: &str, port: u16) -> bool {
        self.secrets.iter().any(|s| match &s.kind {
            SecretKind::OAuth(o) => o.token_endpoint.host == host && o.token_endpoint.port == port,
            SecretKind::Gcp(_) => host == GCP_TOKEN_HOST && port == 443,
            SecretKind::Static(_) | SecretKind::Pg(_) | SecretKind::Brokered(_) => false,
        })
    }

    /// True when `host:port` is tunnelled without interception: a `passthrough` pattern
    /// covers it and no secret is bound to it. A secret's host is always intercepted, also
    /// under a wider passthrough pattern: passed through, the sandbox's placeholder would
    /// reach the host unswapped and unseen (REFERENCE.md §5 c1).
    pub fn is_passthrough(&self, host: &str, port: u16) -> bool {
        self.proxy
            .passthrough
            .iter()
            .any(|p| p.matches(host, port, true))
            && !self.secrets.iter().any(|s| s.allows_host(host, port, true))
    }

    /// The egress decision for a CONNECT (DESIGN.md decision 5): true when a tunnel to
    /// `host:port` may be opened — a destination requests may be forwarded to
    /// ([`Policy::allows_forward`]), or a token-endpoint host whose stubs are answered
    /// locally. `tls` picks the default port of patterns without one.
    pub fn allows_destination(&self, host: &str, port: u16, tls: bool) -> bool {
        self.allows_forward(host, port, tls) || (tls && self.is_stub_host(host, port))
    }

    /// The egress decision for a request that would be forwarded (DESIGN.md decision 5):
    /// true when `host:port` is allowed, passthrough or one of a secret's hosts. A
    /// token-endpoint host is not allowed by being one: only its stub (the token path) is
    /// answered, locally; anything else on it needs an `allow` entry like any host.
    pub fn allows_forward(&self, host: &str, port: u16, tls: bool) -> bool {
        match self.proxy.egress {
            Egress::Open => true,
            Egress::Allowlist => {
                self.proxy.allow.iter().any(|p| p.matches(host, port, tls))
                    || self.is_passthrough(host, port)
                    || self.secrets.iter().any(|s| s.allows_host(host, port, tls))
            }
        }
    }

    /// What `host:port` is to the policy, for metrics and audit: `secret`, `stub`,
    /// `passthrough`, `allow`, `open` or `denied` (first that applies).
    pub fn host_class(&self, host: &str, port: u16, tls: bool) -> &'static str {
        if self.secrets.iter().any(|s| s.allows_host(host, port, tls)) {
            "secret"
        } else if tls && self.is_stub_host(host, port) {
            "stub"
        } else if self.is_passthrough(host, port) {
            "passthrough"
        } else if self.proxy.allow.iter().any(|p| p.matches(host, port, tls)) {
            "allow"
        } else if self.proxy.egress == Egress::Open {
            "open"
        } else {
            "denied"
        }
    }

    /// True when the resolved address `ip` falls in a deny CIDR and in no `allow_cidrs`
    /// exception. IPv4-mapped IPv6 addresses are unmapped first.
    pub fn is_address_denied(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.proxy.allow_cidrs.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        DEFAULT_DENY_NETS.iter().any(|n| n.contains(&ip))
    }
}

fn is_metadata_token_path(path: &str) -> bool {
    path.strip_prefix("/computeMetadata/v1/instance/service-accounts/")
        .and_then(|rest| rest.strip_suffix("/token"))
        .is_some_and(|account| !account.is_empty() && !account.contains('/'))
}

struct Cx<'a> {
    text: &'a str,
    file: PathBuf,
    base: PathBuf,
    diags: Vec<Diagnostic>,
}

impl Cx<'_> {
    fn push(&mut self, offset: usize, severity: Severity, message: String) {
        let (line, col) = line_col(self.text, offset);
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line,
            col,
            severity,
            message,
        });
    }

    fn error(&mut self, offset: usize, message: String) {
        self.push(offset, Severity::Error, message);
    }

    fn warn(&mut self, offset: usize, message: String) {
        self.push(offset, Severity::Warning, message);
    }

    fn pos(&self, offset: usize) -> Pos {
        let (line, col) = line_col(self.text, offset);
        Pos { line, col }
    }

    /// Validates the `[[callers]]` entries against the final secret list (drop-ins
    /// included): names unique and usable as a proxy URL's user name, a token source each,
    /// and grants naming known secrets (or `"*"`).
    fn callers(&mut self, raw: &[Spanned<RawCaller>], secrets: &[Secret]) -> Vec<Caller> {
        let mut out: Vec<Caller> = Vec::new();
        for c in raw {
            let at = c.span().start;
            let c = c.get_ref();
            let Some(name) = &c.name else {
                self.error(at, "caller: missing `name`".into());
                continue;
            };
            let name_at = name.span().start;
            let name = name.get_ref();
            if name.is_empty()
                || name.len() > 64
                || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            {
                self.error(
                    name_at,
                    format!("caller `{name}`: a name is 1–64 printable ASCII characters without `:` or spaces (it is the proxy URL's user name)"),
                );
                continue;
            }
            if out.iter().any(|o| &o.name == name) {
                self.error(name_at, format!("duplicate caller name `{name}`"));
                continue;
            }
            let token = match &c.token {
                Some(t) => self.source(t, &format!("caller {name}: token")),
                None => {
                    self.error(
                        name_at,
                        format!("caller `{name}`: missing `token` (a secret reference: {{ env = \"VAR\" }} or {{ file = \"path\" }})"),
                    );
                    None
                }
            };
            let grants = match &c.secrets {
                None => {
                    self.error(
                        name_at,
                        format!("caller `{name}`: missing `secrets` (the secrets it may use; [\"*\"] for all)"),
                    );
                    None
                }
                Some(list) if list.get_ref().iter().any(|s| s.get_ref() == "*") => {
                    if list.get_ref().len() > 1 {
                        self.error(
                            list.span().start,
                            format!("caller `{name}`: `\"*\"` grants every secret; list nothing beside it"),
                        );
                    }
                    Some(Grants::All)
                }
                Some(list) => {
                    let mut granted = vec![false; secrets.len()];
                    for s in list.get_ref() {
                        match secrets.iter().position(|x| &x.name == s.get_ref()) {
                            Some(i) => granted[i] = true,
                            None => self.error(
                                s.span().start,
                                format!("caller `{name}`: no secret named `{}`", s.get_ref()),
                            ),
                        }
                    }
                    Some(Grants::Only(granted))
                }
            };
            if let (Some(token), Some(grants)) = (token, grants) {
                out.push(Caller {
                    name: name.clone(),
                    token,
                    grants,
                    pos: self.pos(name_at),
                });
            }
        }
        out
    }

    /// Validates `raw` secrets into `out`. A name already in `out` from another file is
    /// replaced (drop-in shadowing, reported as a warning); twice in one file is an error.
    fn secrets(&mut self, raw: &[Spanned<RawSecret>], out: &mut Vec<Secret>) {
        let mut here = HashSet::new();
        for s in raw {
            let Some(secret) = self.secret(s) else {
                continue;
            };
            if !here.insert(secret.name.clone()) {
                self.error(
                    s.span().start,
                    format!("duplicate secret name `{}`", secret.name),
                );
                continue;
            }
            match out.iter_mut().find(|o| o.name == secret.name) {
                Some(old) => {
                    let at = s.span().start;
                    self.warn(
                        at,
                        format!(
                            "secret `{}` here replaces the one at {}:{}:{}",
                            secret.name,
                            old.file.display(),
                            old.pos.line,
                            old.pos.col
                        ),
                    );
                    *old = secret;
                }
                None => out.push(secret),
            }
        }
    }

    /// Parses this context's text as a drop-in fragment: `[[secrets]]` only.
    fn fragment(&mut self, out: &mut Vec<Secret>) {
        let raw: RawFragment = match toml::from_str(self.text) {
            Ok(r) => r,
            Err(e) => {
                let offset = e.span().map_or(0, |s| s.start);
                self.error(offset, e.message().trim().to_string());
                return;
            }
        };
        if let Some(v) = raw.version.as_ref().filter(|v| *v.get_ref() != 1) {
            self.error(
                v.span().start,
                format!("unsupported policy version {}; expected 1", v.get_ref()),
            );
        }
        self.secrets(&raw.secrets, out);
    }

    fn into_errors(mut self) -> PolicyErrors {
        self.diags.sort_by_key(|d| (d.line, d.col));
        PolicyErrors {
            diagnostics: self.diags,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn addr(&mut self, v: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match v.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    v.span().start,
                    format!("`{key}` must be an IP:PORT address like `127.0.0.1:8080`"),
                );
                None
            }
        }
    }

    fn patterns(&mut self, list: &[Spanned<String>], key: &str) -> Vec<HostPattern> {
        let mut out = Vec::new();
        for v in list {
            match HostPattern::parse(v.get_ref()) {
                Ok(p) => {
                    if let Some(section) = p.covered_public_suffix() {
                        let (what, section) = match section {
                            PublicSuffix::Icann => ("names anyone may register", "ICANN"),
                            PublicSuffix::Private => ("sites of different owners", "private"),
                        };
                        let message = format!(
                            "`{key}`: `{p}` covers a whole public suffix ({section} section of the public suffix list): it matches {what}"
                        );
                        // A secret sent to anyone's registrable name is a leak by design.
                        if key == "hosts" && section == "ICANN" {
                            self.error(v.span().start, message);
                        } else {
                            self.warn(v.span().start, message);
                        }
                    }
                    out.push(p);
                }
                Err(e) => self.error(v.span().start, format!("`{key}`: {e}")),
            }
        }
        out
    }

    /// One `upstream_ca` entry: `"file.pem"` or `{ file = "file.pem", hosts = [...] }`.
    fn upstream_ca(&mut self, v: &Spanned<toml::Value>) -> Option<UpstreamCa> {
        let at = v.span().start;
        const SHAPE: &str = "`upstream_ca` entries are a PEM path or { file = \"ca.pem\", hosts = [\"*.corp.internal\"] }";
        let table = match v.get_ref() {
            toml::Value::String(path) => return Some(UpstreamCa::everywhere(self.path(path))),
            toml::Value::Table(t) => t,
            _ => {
                self.error(at, SHAPE.to_string());
                return None;
            }
        };
        if let Some(k) = table
            .keys()
            .find(|k| !["file", "hosts"].contains(&k.as_str()))
        {
            self.error(at, format!("`upstream_ca`: unknown key `{k}`; {SHAPE}"));
            return None;
        }
        let file = table.get("file").and_then(toml::Value::as_str);
        let hosts = table.get("hosts").and_then(toml::Value::as_array);
        let (Some(file), Some(hosts)) = (file, hosts) else {
            self.error(at, format!("`upstream_ca`: {SHAPE}"));
            return None;
        };
        if hosts.is_empty() {
            self.error(
                at,
                format!("`upstream_ca` {file}: `hosts` is empty (write the path alone to trust it for every host)"),
            );
            return None;
        }
        let mut patterns = Vec::new();
        for h in hosts {
            let parsed = h
                .as_str()
                .ok_or_else(|| "hosts are strings".to_string())
                .and_then(HostPattern::parse)
                .and_then(|p| match p.port() {
                    PortSpec::Default => Ok(p),
                    _ => Err(format!(
                        "`{p}`: a CA is trusted for host names, without a port"
                    )),
                });
            match parsed {
                Ok(p) => patterns.push(p),
                Err(e) => {
                    self.error(at, format!("`upstream_ca` {file}: `hosts`: {e}"));
                    return None;
                }
            }
        }
        Some(UpstreamCa {
            file: self.path(file),
            hosts: patterns,
        })
    }

    fn proxy(&mut self, raw: &RawProxy) -> ProxySettings {
        let default_listen = SocketAddr::from(([127, 0, 0, 1], 8080));
        let listen = raw
            .listen
            .as_ref()
            .and_then(|v| self.addr(v, "listen"))
            .unwrap_or(default_listen);
        let admin_listen = raw
            .admin_listen
            .as_ref()
            .and_then(|v| self.addr(v, "admin_listen"));
        let admin_token = raw
            .admin_token
            .as_ref()
            .and_then(|t| self.source(t, "admin_token"));
        if let (Some(a), None) = (&admin_listen, &admin_token)
            && !a.ip().is_loopback()
        {
            let at = raw.admin_listen.as_ref().map_or(0, |v| v.span().start);
            self.error(
                    at,
                    "`admin_listen` is not a loopback address: set `admin_token` (a secret reference) so the admin API requires a bearer token".into(),
                );
        }
        let ca = match (&raw.ca_cert, &raw.ca_key) {
            (Some(c), Some(k)) => Some((self.path(c.get_ref()), self.path(k.get_ref()))),
            (None, None) => None,
            (Some(v), None) | (None, Some(v)) => {
                self.error(
                    v.span().start,
                    "`ca_cert` and `ca_key` must be given together".into(),
                );
                None
            }
        };
        let egress = match raw
            .egress
            .as_ref()
            .map(|e| (e.get_ref().as_str(), e.span()))
        {
            None | Some(("allowlist", _)) => Egress::Allowlist,
            Some(("open", span)) => {
                self.warn(
                    span.start,
                    "`egress = \"open\"` lets the sandbox reach any public host".into(),
                );
                Egress::Open
            }
            Some((other, span)) => {
                self.error(
                    span.start,
                    format!("`egress` must be \"allowlist\" or \"open\", not \"{other}\""),
                );
                Egress::Allowlist
            }
        };
        let allow = self.patterns(&raw.allow, "allow");
        let passthrough = self.patterns(&raw.passthrough, "passthrough");
        let mut allow_cidrs = Vec::new();
        for c in &raw.allow_cidrs {
            match c.get_ref().parse::<IpNet>() {
                Ok(n) => allow_cidrs.push(n),
                Err(_) => self.error(
                    c.span().start,
                    format!(
                        "`allow_cidrs`: `{}` is not a CIDR like 10.0.0.0/8",
                        c.get_ref()
                    ),
                ),
            }
        }
        let upstream_ca = raw
            .upstream_ca
            .iter()
            .filter_map(|v| self.upstream_ca(v))
            .collect();
        let mut resolve = HashMap::new();
        for (name, ip) in &raw.resolve {
            let Some(host) = crate::host::normalize_host(name) else {
                self.error(
                    ip.span().start,
                    format!("`resolve`: `{name}` is not a host name"),
                );
                continue;
            };
            match ip.get_ref().parse::<IpAddr>() {
                Ok(a) => {
                    resolve.insert(host, a);
                }
                Err(_) => self.error(
                    ip.span().start,
                    format!("`resolve.{name}` must be an IP address"),
                ),
            }
        }
        let limits = match &raw.limits {
            Some(l) => self.limits(l.get_ref()),
            None => Limits::default(),
        };
        let no_proxy = self.patterns(&raw.no_proxy, "no_proxy");
        let auth = raw
            .upstream_proxy_auth
            .as_ref()
            .and_then(|a| self.source(a, "upstream_proxy_auth"));
        let upstream_proxy = match &raw.upstream_proxy {
            Some(u) => match upstream_proxy_url(u.get_ref()) {
                Ok((scheme, authority)) => Some(UpstreamProxy {
                    scheme,
                    authority,
                    no_proxy,
                    auth,
                }),
                Err(e) => {
                    self.error(u.span().start, format!("`upstream_proxy`: {e}"));
                    None
                }
            },
            None => {
                if let Some(first) = raw.no_proxy.first() {
                    self.warn(
                        first.span().start,
                        "`no_proxy` has no effect without `upstream_proxy`".to_string(),
                    );
                }
                if let Some(a) = &raw.upstream_proxy_auth {
                    self.warn(
                        a.span().start,
                        "`upstream_proxy_auth` has no effect without `upstream_proxy`".to_string(),
                    );
                }
                None
            }
        };
        ProxySettings {
            listen,
            admin_listen,
            admin_token,
            ca,
            egress,
            allow,
            passthrough,
            allow_cidrs,
            upstream_ca,
            resolve,
            upstream_proxy,
            limits,
        }
    }

    fn limits(&mut self, raw: &RawLimits) -> Limits {
        let mut l = Limits::default();
        let mut num = |v: &Option<Spanned<u64>>, key: &str, out: &mut usize| {
            if let Some(v) = v {
                if *v.get_ref() == 0 {
                    self.error(v.span().start, format!("`limits.{key}` must be positive"));
                } else {
                    *out = usize::try_from(*v.get_ref()).unwrap_or(usize::MAX);
                }
            }
        };
        num(
            &raw.max_header_bytes,
            "max_header_bytes",
            &mut l.max_header_bytes,
        );
        num(&raw.max_headers, "max_headers", &mut l.max_headers);
        num(
            &raw.leaf_cache_size,
            "leaf_cache_size",
            &mut l.leaf_cache_size,
        );
        num(
            &raw.max_connections,
            "max_connections",
            &mut l.max_connections,
        );
        let mut secs = |v: &Option<Spanned<u64>>, key: &str, out: &mut Duration| {
            if let Some(v) = v {
                if *v.get_ref() == 0 {
                    self.error(v.span().start, format!("`limits.{key}` must be positive"));
                } else {
                    *out = Duration::from_secs(*v.get_ref());
                }
            }
        };
        secs(
            &raw.client_header_timeout_secs,
            "client_header_timeout_secs",
            &mut l.client_header_timeout,
        );
        secs(
            &raw.tls_handshake_timeout_secs,
            "tls_handshake_timeout_secs",
            &mut l.tls_handshake_timeout,
        );
        secs(
            &raw.idle_timeout_secs,
            "idle_timeout_secs",
            &mut l.idle_timeout,
        );
        secs(
            &raw.upstream_connect_timeout_secs,
            "upstream_connect_timeout_secs",
            &mut l.upstream_connect_timeout,
        );
        secs(
            &raw.shutdown_grace_secs,
            "shutdown_grace_secs",
            &mut l.shutdown_grace,
        );
        secs(
            &raw.upstream_response_header_timeout_secs,
            "upstream_response_header_timeout_secs",
            &mut l.upstream_response_header_timeout,
        );
        l
    }

    fn secret(&mut self, entry: &Spanned<RawSecret>) -> Option<Secret> {
        let at = entry.span().start;
        let raw = entry.get_ref();
        let errors_before = self.error_count();
        let Some(name) = &raw.name else {
            self.error(at, "secret has no `name`".into());
            return None;
        };
        let name_at = name.span().start;
        let name_s = name.get_ref().clone();
        if !is_env_name(&name_s) {
            self.error(
                name_at,
                format!("secret name `{name_s}` must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            );
        }
        let ty = match raw
            .kind
            .as_ref()
            .map(|k| (k.get_ref().as_str(), k.span().start))
        {
            Some(("http", _)) => "http",
            Some(("oauth_token", _)) => "oauth_token",
            Some(("gcp_auth", _)) => "gcp_auth",
            Some(("pg_dsn", _)) => "pg_dsn",
            Some(("brokered_token", _)) => "brokered_token",
            None => {
                self.error(name_at, format!("secret `{name_s}` has no `type`"));
                return None;
            }
            Some((other, at)) => {
                self.error(
                    at,
                    format!("secret `{name_s}`: unknown type `{other}`; expected \"http\", \"oauth_token\", \"gcp_auth\", \"pg_dsn\" or \"brokered_token\""),
                );
                return None;
            }
        };
        self.reject_keys(raw, ty, &name_s);
        let (placeholder, placeholder_at) = match &raw.placeholder {
            Some(p) => (p.get_ref().clone(), p.span().start),
            None => (name_s.clone(), name_at),
        };
        if let Err(e) = check_placeholder(&placeholder) {
            self.error(placeholder_at, format!("secret `{name_s}`: {e}"));
        }
        if placeholder.len() < 8 {
            self.warn(
                name_at,
                format!("secret `{name_s}`: placeholder `{placeholder}` is short; it may appear in requests by accident and be refused"),
            );
        }
        let hosts = match &raw.hosts {
            Some(h) if h.get_ref().is_empty() => {
                self.error(
                    h.span().start,
                    format!("secret `{name_s}`: `hosts` is empty"),
                );
                Vec::new()
            }
            Some(h) => self.patterns(h.get_ref(), "hosts"),
            None if ty == "gcp_auth" => HostPattern::parse(GCP_DEFAULT_HOST).into_iter().collect(),
            None if ty == "pg_dsn" => Vec::new(),
            None => {
                self.error(name_at, format!("secret `{name_s}` has no `hosts`"));
                Vec::new()
            }
        };
        let (mode, kind) = match ty {
            "http" => {
                let source = match &raw.source {
                    Some(s) => self.source(s, &name_s),
                    None => {
                        self.error(name_at, format!("secret `{name_s}` has no `source`"));
                        None
                    }
                };
                (
                    self.http_mode(raw, &name_s, name_at),
                    source.map(SecretKind::Static),
                )
            }
            "pg_dsn" => (
                Some(HttpMode::Replace {
                    headers: HeaderSelector {
                        entries: Vec::new(),
                    },
                    query: Vec::new(),
                    path: false,
                }),
                self.pg(raw, &name_s, name_at).map(SecretKind::Pg),
            ),
            "oauth_token" => (
                self.token_mode(raw, &name_s),
                self.oauth(raw, &name_s, name_at).map(SecretKind::OAuth),
            ),
            "brokered_token" => (
                self.token_mode(raw, &name_s),
                self.brokered(raw, &name_s, name_at)
                    .map(SecretKind::Brokered),
            ),
            _ => (
                self.token_mode(raw, &name_s),
                self.gcp(raw, &name_s, name_at).map(SecretKind::Gcp),
            ),
        };
        let capabilities = raw
            .capabilities
            .as_ref()
            .map(|c| self.capabilities(c, &name_s))
            .unwrap_or_default();
        let rate_limit = raw
            .rate_limit
            .as_ref()
            .and_then(|r| self.rate_limit(r, &name_s));
        let fail_open = match raw
            .on_failure
            .as_ref()
            .map(|o| (o.get_ref().as_str(), o.span().start))
        {
            None | Some(("closed", _)) => false,
            Some(("open", at)) => {
                if matches!(mode, Some(HttpMode::Inject { .. })) && ty != "pg_dsn" {
                    true
                } else {
                    self.error(
                        at,
                        format!("secret `{name_s}`: `on_failure = \"open\"` needs a secret that injects (`mode = \"inject\"` or a token type): a request carrying a placeholder is never forwarded without its value"),
                    );
                    false
                }
            }
            Some((other, at)) => {
                self.error(
                    at,
                    format!("secret `{name_s}`: `on_failure` is `closed` or `open`, not `{other}`"),
                );
                false
            }
        };
        if self.error_count() > errors_before {
            return None;
        }
        Some(Secret {
            name: name_s,
            placeholder,
            hosts,
            optional: raw.optional.unwrap_or(false),
            enabled: raw.enabled.unwrap_or(true),
            allow_plaintext: raw.allow_plaintext.unwrap_or(false),
            scrub_response_body: raw.scrub_response_body.unwrap_or(true),
            websocket_frames: raw.websocket_frames.unwrap_or(false),
            fail_open,
            mode: mode?,
            capabilities,
            rate_limit,
            kind: kind?,
            pos: self.pos(name_at),
            file: self.file.clone(),
        })
    }

    /// The validated `capabilities` list: each entry needs a `path` ([`PathPattern`]) and
    /// may name a `method` (upper-cased; `"*"` or none for any).
    fn capabilities(
        &mut self,
        raw: &Spanned<Vec<Spanned<RawCapability>>>,
        name: &str,
    ) -> Vec<Capability> {
        if raw.get_ref().is_empty() {
            self.error(
                raw.span().start,
                format!("secret `{name}`: `capabilities` is empty; remove it to allow every request to the secret's hosts"),
            );
        }
        let mut out = Vec::new();
        for entry in raw.get_ref() {
            let at = entry.span().start;
            let c = entry.get_ref();
            let method = match &c.method {
                None => None,
                Some(m) if m.get_ref() == "*" => None,
                Some(m) => {
                    let upper = m.get_ref().to_ascii_uppercase();
                    if upper.is_empty()
                        || !upper.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
                    {
                        self.error(
                            m.span().start,
                            format!("secret `{name}`: capability method `{}` is not an HTTP method (or \"*\")", m.get_ref()),
                        );
                        continue;
                    }
                    Some(upper)
                }
            };
            let Some(path) = &c.path else {
                self.error(
                    at,
                    format!("secret `{name}`: capability has no `path` (use \"/\" for every path)"),
                );
                continue;
            };
            match PathPattern::parse(path.get_ref()) {
                Ok(p) => out.push(Capability {
                    name: c.name.clone(),
                    method,
                    path: p,
                }),
                Err(e) => self.error(path.span().start, format!("secret `{name}`: {e}")),
            }
        }
        out
    }

    /// The validated `rate_limit`: `requests_per_minute` in 1..=1 000 000 and `burst`
    /// (default: the same) in 1..=1 000 000.
    fn rate_limit(&mut self, raw: &Spanned<RawRateLimit>, name: &str) -> Option<RateLimit> {
        let r = raw.get_ref();
        let mut number = |v: &Option<Spanned<i64>>, key: &str| -> Option<Option<NonZeroU32>> {
            let Some(v) = v else {
                return Some(None);
            };
            match u32::try_from(*v.get_ref())
                .ok()
                .filter(|n| (1..=1_000_000).contains(n))
                .and_then(NonZeroU32::new)
            {
                Some(n) => Some(Some(n)),
                None => {
                    self.error(
                        v.span().start,
                        format!(
                            "secret `{name}`: rate_limit `{key}` must be from 1 to 1000000, not {}",
                            v.get_ref()
                        ),
                    );
                    None
                }
            }
        };
        let per_minute = number(&r.requests_per_minute, "requests_per_minute")?;
        let burst = number(&r.burst, "burst")?;
        let Some(per_minute) = per_minute else {
            self.error(
                raw.span().start,
                format!("secret `{name}`: rate_limit needs `requests_per_minute`"),
            );
            return None;
        };
        Some(RateLimit {
            per_minute,
            burst: burst.unwrap_or(per_minute),
        })
    }

    /// Reports keys that do not belong to the secret's type.
    fn reject_keys(&mut self, raw: &RawSecret, ty: &str, name: &str) {
        fn at<T>(v: &Option<Spanned<T>>) -> Option<usize> {
            v.as_ref().map(|v| v.span().start)
        }
        let present = [
            ("source", at(&raw.source)),
            ("mode", at(&raw.mode)),
            ("match_headers", at(&raw.match_headers)),
            ("match_query", at(&raw.match_query)),
            ("match_path", at(&raw.match_path)),
            ("inject_query_param", at(&raw.inject_query_param)),
            ("grant", at(&raw.grant)),
            ("token_endpoint", at(&raw.token_endpoint)),
            ("scopes", at(&raw.scopes)),
            ("fields", at(&raw.fields)),
            ("token_endpoint_headers", at(&raw.token_endpoint_headers)),
            ("audience", at(&raw.audience)),
            ("client_auth", at(&raw.client_auth)),
            ("keyfile", at(&raw.keyfile)),
            ("subject", at(&raw.subject)),
            ("database", at(&raw.database)),
            ("listen", at(&raw.listen)),
            ("user", at(&raw.user)),
            ("password", at(&raw.password)),
            ("role", at(&raw.role)),
            ("settings", at(&raw.settings)),
            ("client_tls", at(&raw.client_tls)),
            ("max_connections", at(&raw.max_connections)),
            ("credential", at(&raw.credential)),
            ("broker", at(&raw.broker)),
            (
                "capabilities",
                if ty == "pg_dsn" {
                    at(&raw.capabilities)
                } else {
                    None
                },
            ),
            (
                "rate_limit",
                if ty == "pg_dsn" {
                    at(&raw.rate_limit)
                } else {
                    None
                },
            ),
            ("hosts", if ty == "pg_dsn" { at(&raw.hosts) } else { None }),
            (
                "inject_header",
                if ty == "pg_dsn" {
                    at(&raw.inject_header)
                } else {
                    None
                },
            ),
            (
                "inject_formatter",
                if ty == "pg_dsn" {
                    at(&raw.inject_formatter)
                } else {
                    None
                },
            ),
            (
                "placeholder",
                if ty == "pg_dsn" {
                    at(&raw.placeholder)
                } else {
                    None
                },
            ),
        ];
        let allowed: &[&str] = match ty {
            "http" => &[
                "source",
                "mode",
                "match_headers",
                "match_query",
                "match_path",
                "inject_query_param",
            ],
            "pg_dsn" => &[
                "source",
                "database",
                "listen",
                "user",
                "password",
                "role",
                "settings",
                "client_tls",
                "max_connections",
            ],
            "oauth_token" => &[
                "grant",
                "token_endpoint",
                "scopes",
                "fields",
                "token_endpoint_headers",
                "audience",
                "client_auth",
            ],
            "brokered_token" => &["credential", "broker"],
            _ => &["keyfile", "scopes", "subject"],
        };
        for (key, pos) in present {
            if let Some(pos) = pos
                && !allowed.contains(&key)
            {
                self.error(
                    pos,
                    format!("secret `{name}`: `{key}` is not valid for type `{ty}`"),
                );
            }
        }
    }

    /// Token types inject `inject_header` (default `Authorization`) with `inject_formatter`
    /// (default `Bearer {value}`).
    fn token_mode(&mut self, raw: &RawSecret, name: &str) -> Option<HttpMode> {
        let header = match &raw.inject_header {
            Some(h) if h.get_ref().is_empty() || !h.get_ref().bytes().all(is_token_char) => {
                self.error(
                    h.span().start,
                    format!("secret `{name}`: `inject_header` is not a header name"),
                );
                return None;
            }
            Some(h) => h.get_ref().clone(),
            None => "Authorization".to_string(),
        };
        let formatter = match &raw.inject_formatter {
            None => InjectFormatter::parse("Bearer {value}").ok()?,
            Some(f) => match InjectFormatter::parse(f.get_ref()) {
                Ok(f) => f,
                Err(e) => {
                    self.error(
                        f.span().start,
                        format!("secret `{name}`: `inject_formatter`: {e}"),
                    );
                    return None;
                }
            },
        };
        Some(HttpMode::Inject {
            target: InjectTarget::Header(header),
            formatter,
        })
    }

    fn oauth(&mut self, raw: &RawSecret, name: &str, name_at: usize) -> Option<OAuthSpec> {
        let grant = match raw
            .grant
            .as_ref()
            .map(|g| (g.get_ref().as_str(), g.span().start))
        {
            Some(("refresh_token", _)) => Grant::RefreshToken,
            Some(("client_credentials", _)) => Grant::ClientCredentials,
            Some(("password", _)) => Grant::Password,
            Some(("jwt_bearer", _)) => Grant::JwtBearer,
            Some((other, at)) => {
                self.error(at, format!("secret `{name}`: unknown grant `{other}`; expected refresh_token, client_credentials, password or jwt_bearer"));
                return None;
            }
            None => {
                self.error(
                    name_at,
                    format!("secret `{name}`: oauth_token needs `grant`"),
                );
                return None;
            }
        };
        let token_endpoint = match &raw.token_endpoint {
            Some(u) => match TokenEndpoint::parse(u.get_ref()) {
                Ok(e) => Some(e),
                Err(e) => {
                    self.error(u.span().start, format!("secret `{name}`: {e}"));
                    None
                }
            },
            None => {
                self.error(
                    name_at,
                    format!("secret `{name}`: oauth_token needs `token_endpoint`"),
                );
                None
            }
        };
        let (required, optional) = grant.fields();
        let mut fields = std::collections::BTreeMap::new();
        let fields_at = raw.fields.as_ref().map_or(name_at, |f| f.span().start);
        if let Some(f) = &raw.fields {
            for (k, v) in f.get_ref() {
                if !required.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
                    self.error(
                        v.span().start,
                        format!(
                            "secret `{name}`: field `{k}` is not used by grant {}; it takes {}",
                            grant.as_str(),
                            required
                                .iter()
                                .chain(optional)
                                .copied()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    continue;
                }
                if let Some(src) = self.source(v, name) {
                    fields.insert(k.clone(), src);
                }
            }
        }
        for r in required {
            if !fields.contains_key(*r)
                && raw
                    .fields
                    .as_ref()
                    .is_none_or(|f| !f.get_ref().contains_key(*r))
            {
                self.error(
                    fields_at,
                    format!(
                        "secret `{name}`: grant {} needs field `{r}`",
                        grant.as_str()
                    ),
                );
            }
        }
        let mut token_endpoint_headers = Vec::new();
        if let Some(h) = &raw.token_endpoint_headers {
            for (k, v) in h.get_ref() {
                if k.is_empty() || !k.bytes().all(is_token_char) {
                    self.error(
                        v.span().start,
                        format!("secret `{name}`: `{k}` is not a header name"),
                    );
                    continue;
                }
                if let Some(src) = self.source(v, name) {
                    token_endpoint_headers.push((k.clone(), src));
                }
            }
        }
        let audience = raw.audience.as_ref().map(|a| a.get_ref().clone());
        if let (Some(a), false) = (&raw.audience, grant == Grant::JwtBearer) {
            self.error(
                a.span().start,
                format!("secret `{name}`: `audience` is only used by grant jwt_bearer"),
            );
        }
        let client_auth = match raw
            .client_auth
            .as_ref()
            .map(|c| (c.get_ref().as_str(), c.span().start))
        {
            None | Some(("client_secret_post", _)) => ClientAuth::Post,
            Some(("client_secret_basic", _)) => ClientAuth::Basic,
            Some((other, at)) => {
                self.error(at, format!("secret `{name}`: `client_auth` must be client_secret_post or client_secret_basic, not `{other}`"));
                ClientAuth::Post
            }
        };
        Some(OAuthSpec {
            grant,
            token_endpoint: token_endpoint?,
            scopes: raw
                .scopes
                .as_ref()
                .map(|s| s.get_ref().clone())
                .unwrap_or_default(),
            fields,
            token_endpoint_headers,
            audience,
            client_auth,
        })
    }

    fn pg(&mut self, raw: &RawSecret, name: &str, name_at: usize) -> Option<PgSpec> {
        let source = match &raw.source {
            Some(s) => self.source(s, name),
            None => {
                self.error(
                    name_at,
                    format!("secret `{name}` has no `source` (the upstream DSN)"),
                );
                None
            }
        };
        let database = match &raw.database {
            Some(d) if !d.get_ref().is_empty() => Some(d.get_ref().clone()),
            Some(d) => {
                self.error(
                    d.span().start,
                    format!("secret `{name}`: `database` is empty"),
                );
                None
            }
            None => {
                self.error(name_at, format!("secret `{name}`: pg_dsn needs `database`"));
                None
            }
        };
        let listen = raw.listen.as_ref().and_then(|l| self.addr(l, "listen"));
        if let Some(pw) = &raw.password
            && (pw.get_ref().len() < 16
                || !pw
                    .get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)))
        {
            self.error(pw.span().start, format!("secret `{name}`: `password` (the sandbox-side placeholder) must be 16+ characters of [A-Za-z0-9-_.~]"));
        }
        // PostgreSQL cuts identifiers to 63 bytes (60–63 on a character boundary), so a
        // client's longer name could land on a pinned one the relay compared in full. A
        // pinned name under 60 bytes cannot be reached that way.
        if let Some(settings) = &raw.settings {
            for k in settings.get_ref().keys() {
                if k.is_empty() || k.len() >= 60 {
                    self.error(
                        settings.span().start,
                        format!("secret `{name}`: setting name `{k}` must be 1 to 59 bytes (PostgreSQL truncates identifiers at 63, which would let a client reach a pinned name with a longer one)"),
                    );
                }
            }
        }
        let max_connections = match &raw.max_connections {
            Some(m) if *m.get_ref() == 0 => {
                self.error(
                    m.span().start,
                    format!("secret `{name}`: `max_connections` must be positive"),
                );
                64
            }
            Some(m) => usize::try_from(*m.get_ref()).unwrap_or(usize::MAX),
            None => 64,
        };
        Some(PgSpec {
            source: source?,
            database: database?,
            listen,
            user: raw.user.as_ref().map(|u| u.get_ref().clone()),
            password: raw.password.as_ref().map(|p| p.get_ref().clone()),
            role: raw.role.as_ref().map(|r| r.get_ref().clone()),
            settings: raw
                .settings
                .as_ref()
                .map(|s| {
                    s.get_ref()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            client_tls: raw.client_tls.as_ref().is_none_or(|c| *c.get_ref()),
            max_connections,
        })
    }

    fn brokered(&mut self, raw: &RawSecret, name: &str, name_at: usize) -> Option<BrokeredSpec> {
        let Some(b) = &raw.broker else {
            self.error(
                name_at,
                format!("secret `{name}`: brokered_token needs `broker = {{ url = \"…\" }}`"),
            );
            return None;
        };
        let b = b.get_ref();
        let url = b.url.get_ref().trim_end_matches('/').to_string();
        let authority = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .map(url_authority);
        // `http://localhost:80@evil.example` names the host after the `@`: the loopback
        // check below would read `localhost` while the dial goes to `evil.example`.
        if authority.is_some_and(|a| a.contains('@')) {
            self.error(
                b.url.span().start,
                format!("secret `{name}`: broker url must not contain userinfo (`user@`)"),
            );
            return None;
        }
        // The credential path is appended to the url: after a `?` or `#` it would be a
        // query or fragment, and every token request would miss the broker's route.
        if url.contains(['?', '#', '\\']) {
            self.error(
                b.url.span().start,
                format!(
                    "secret `{name}`: broker url must be scheme://host[:port][/path], without `?`, `#` or `\\` (the proxy appends /v1/credentials/…)"
                ),
            );
            return None;
        }
        let loopback_http = url.strip_prefix("http://").is_some_and(|rest| {
            let authority = url_authority(rest);
            let host = authority
                .rsplit_once(':')
                .map_or(authority, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if !(url.starts_with("https://") || loopback_http) {
            self.error(
                b.url.span().start,
                format!(
                    "secret `{name}`: broker url must be https://, or http:// on a loopback address"
                ),
            );
        }
        let token = b.token.as_ref().and_then(|t| self.source(t, name));
        let credential = match &raw.credential {
            Some(c)
                if c.get_ref().is_empty()
                    || !c
                        .get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
            {
                self.error(
                    c.span().start,
                    format!("secret `{name}`: `credential` must be [A-Za-z0-9-_.]+"),
                );
                return None;
            }
            Some(c) => c.get_ref().clone(),
            None => name.to_string(),
        };
        Some(BrokeredSpec {
            credential,
            url,
            token,
        })
    }

    fn gcp(&mut self, raw: &RawSecret, name: &str, name_at: usize) -> Option<GcpSpec> {
        let keyfile = match &raw.keyfile {
            Some(k) => self.source(k, name),
            None => {
                self.error(
                    name_at,
                    format!("secret `{name}`: gcp_auth needs `keyfile`"),
                );
                None
            }
        };
        let scopes = match &raw.scopes {
            Some(s) if s.get_ref().is_empty() => {
                self.error(
                    s.span().start,
                    format!("secret `{name}`: `scopes` is empty"),
                );
                Vec::new()
            }
            Some(s) => s.get_ref().clone(),
            None => vec![GCP_DEFAULT_SCOPE.to_string()],
        };
        Some(GcpSpec {
            keyfile: keyfile?,
            scopes,
            subject: raw.subject.as_ref().map(|s| s.get_ref().clone()),
        })
    }

    fn error_count(&self) -> usize {
        self.diags
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }

    fn source(&mut self, s: &Spanned<RawSource>, name: &str) -> Option<SourceRef> {
        let at = s.span().start;
        let raw = s.get_ref();
        let kind = match (&raw.env, &raw.file) {
            (Some(v), None) if is_env_name(v) => SourceKind::Env(v.clone()),
            (Some(v), None) => {
                self.error(
                    at,
                    format!("secret `{name}`: `source.env` `{v}` is not a variable name"),
                );
                return None;
            }
            (None, Some(f)) if !f.is_empty() => SourceKind::File(self.path(f)),
            (None, Some(_)) => {
                self.error(at, format!("secret `{name}`: `source.file` is empty"));
                return None;
            }
            _ => {
                self.error(
                    at,
                    format!("secret `{name}`: `source` needs exactly one of `env` or `file`"),
                );
                return None;
            }
        };
        if raw.json_key.as_deref() == Some("") {
            self.error(at, format!("secret `{name}`: `source.json_key` is empty"));
        }
        Some(SourceRef {
            kind,
            json_key: raw.json_key.clone(),
            pos: self.pos(at),
        })
    }

    fn http_mode(&mut self, raw: &RawSecret, name: &str, name_at: usize) -> Option<HttpMode> {
        let mode = raw
            .mode
            .as_ref()
            .map(|m| (m.get_ref().as_str(), m.span().start));
        match mode {
            None | Some(("replace", _)) => {
                for (present, key) in [
                    (
                        raw.inject_header.as_ref().map(|v| v.span().start),
                        "inject_header",
                    ),
                    (
                        raw.inject_query_param.as_ref().map(|v| v.span().start),
                        "inject_query_param",
                    ),
                    (
                        raw.inject_formatter.as_ref().map(|v| v.span().start),
                        "inject_formatter",
                    ),
                ] {
                    if let Some(at) = present {
                        self.error(
                            at,
                            format!("secret `{name}`: `{key}` needs `mode = \"inject\"`"),
                        );
                    }
                }
                let headers = match &raw.match_headers {
                    None => HeaderSelector::default_set(),
                    Some(list) => {
                        let names: Vec<&str> = list
                            .get_ref()
                            .iter()
                            .map(|s| s.get_ref().as_str())
                            .collect();
                        match HeaderSelector::parse(&names) {
                            Ok(h) => h,
                            Err(e) => {
                                self.error(
                                    list.span().start,
                                    format!("secret `{name}`: `match_headers`: {e}"),
                                );
                                return None;
                            }
                        }
                    }
                };
                let query: Vec<String> = raw
                    .match_query
                    .as_ref()
                    .map(|q| q.get_ref().iter().map(|s| s.get_ref().clone()).collect())
                    .unwrap_or_default();
                if query.iter().any(String::is_empty) {
                    self.error(
                        name_at,
                        format!("secret `{name}`: `match_query` has an empty name"),
                    );
                }
                let path = raw.match_path.as_ref().is_some_and(|p| *p.get_ref());
                if headers.is_empty() && query.is_empty() && !path {
                    self.error(
                        name_at,
                        format!("secret `{name}`: replace mode scans nothing; set `match_headers`, `match_query` or `match_path = true`"),
                    );
                }
                Some(HttpMode::Replace {
                    headers,
                    query,
                    path,
                })
            }
            Some(("inject", _)) => {
                for (present, key) in [
                    (
                        raw.match_headers.as_ref().map(|v| v.span().start),
                        "match_headers",
                    ),
                    (
                        raw.match_query.as_ref().map(|v| v.span().start),
                        "match_query",
                    ),
                    (
                        raw.match_path.as_ref().map(|v| v.span().start),
                        "match_path",
                    ),
                ] {
                    if let Some(at) = present {
                        self.error(
                            at,
                            format!("secret `{name}`: `{key}` is for `mode = \"replace\"`"),
                        );
                    }
                }
                let target = match (&raw.inject_header, &raw.inject_query_param) {
                    (Some(h), None) => {
                        if h.get_ref().is_empty() || !h.get_ref().bytes().all(is_token_char) {
                            self.error(
                                h.span().start,
                                format!("secret `{name}`: `inject_header` is not a header name"),
                            );
                        }
                        InjectTarget::Header(h.get_ref().clone())
                    }
                    (None, Some(q)) => {
                        if q.get_ref().is_empty() {
                            self.error(
                                q.span().start,
                                format!("secret `{name}`: `inject_query_param` is empty"),
                            );
                        }
                        InjectTarget::Query(q.get_ref().clone())
                    }
                    _ => {
                        self.error(
                            name_at,
                            format!("secret `{name}`: inject mode needs exactly one of `inject_header` or `inject_query_param`"),
                        );
                        return None;
                    }
                };
                let formatter = match &raw.inject_formatter {
                    None => InjectFormatter::value_only(),
                    Some(f) => match InjectFormatter::parse(f.get_ref()) {
                        Ok(f) => f,
                        Err(e) => {
                            self.error(
                                f.span().start,
                                format!("secret `{name}`: `inject_formatter`: {e}"),
                            );
                            return None;
                        }
                    },
                };
                Some(HttpMode::Inject { target, formatter })
            }
            Some((other, at)) => {
                self.error(
                    at,
                    format!(
                        "secret `{name}`: `mode` must be \"replace\" or \"inject\", not \"{other}\""
                    ),
                );
                None
            }
        }
    }
}

fn is_env_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Placeholders are 4–256 characters of `[A-Za-z0-9._~-]`: valid in an environment value,
/// a header, a path segment and a query value without encoding.
fn check_placeholder(p: &str) -> Result<(), String> {
    if !(4..=256).contains(&p.len()) {
        return Err(format!("placeholder `{p}` must be 4 to 256 characters"));
    }
    if !p
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
    {
        return Err(format!(
            "placeholder `{p}` may only contain [A-Za-z0-9._~-]"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
