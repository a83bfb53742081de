//! Host patterns as written in `hosts`, `allow` and `passthrough`.
//!
//! A pattern is an exact host name or IP literal (`api.github.com`, `10.0.0.5`, `[::1]`),
//! `*.suffix`, which matches subdomains of `suffix` at any depth and `suffix` itself (the
//! apex: REFERENCE.md §2.2, the reference's semantics), or a CIDR block (`10.0.0.0/8`,
//! `[fd00::/8]`), which matches a destination written as an IP literal in it (no DNS
//! look-up: REFERENCE.md §2.2 `cidr`).
//! Matching is case-insensitive and ignores a trailing dot. A pattern without a port matches
//! only the scheme's default port (443 for TLS, 80 for cleartext); `:PORT` matches that port
//! and `:*` any port (DESIGN.md decision 5, REFERENCE.md D5).

use std::fmt;
use std::net::IpAddr;

/// Which ports a [`HostPattern`] admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSpec {
    /// The scheme's default port: 443 on TLS, 80 on cleartext.
    Default,
    /// Exactly this port.
    Port(u16),
    /// Any port (`:*`).
    Any,
}

/// The section of the public suffix list a suffix is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicSuffix {
    /// Registry-operated (`co.uk`, `com.au`): anyone may register a name under it.
    Icann,
    /// Submitted by a company whose customers get names under it (`github.io`,
    /// `herokuapp.com`): each name there belongs to a different customer.
    Private,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostKind {
    Exact(String),
    /// Stored with its leading dot: `.example.com`.
    Suffix(String),
    /// IP literals in this block.
    Cidr(ipnet::IpNet),
}

/// A parsed host pattern. Construct with [`HostPattern::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    kind: HostKind,
    port: PortSpec,
}

impl HostPattern {
    /// Parses `host`, `*.suffix` or a CIDR block, optionally followed by `:PORT` or `:*`.
    /// IPv6 literals and blocks are written in brackets (`[::1]:8443`, `[fd00::/8]:*`).
    ///
    /// # Errors
    /// A message naming the problem: empty, a `*` anywhere but a leading `*.`, a bare `*`,
    /// characters outside `[A-Za-z0-9.-]` in a name, or a port that is not 1–65535.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (host, port) = split_port(text)?;
        if host.is_empty() {
            return Err(format!("host pattern `{text}` has no host"));
        }
        let host = host.to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host).to_string();
        if host == "*" {
            return Err(format!(
                "host pattern `{text}` matches every host; use `egress = \"open\"` to allow all egress, and name secret hosts explicitly"
            ));
        }
        let kind = if host.contains('/') {
            let net: ipnet::IpNet = host
                .parse()
                .map_err(|_| format!("host pattern `{text}` is not a CIDR block"))?;
            if net.prefix_len() == 0 {
                return Err(format!(
                    "host pattern `{text}` matches every address; name the blocks you mean"
                ));
            }
            HostKind::Cidr(net.trunc())
        } else if let Some(suffix) = host.strip_prefix("*.") {
            check_name(suffix, text)?;
            if !suffix.contains('.') {
                return Err(format!(
                    "host pattern `{text}` covers a whole top-level domain"
                ));
            }
            HostKind::Suffix(format!(".{suffix}"))
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostKind::Exact(ip.to_string())
        } else {
            check_name(&host, text)?;
            HostKind::Exact(host)
        };
        Ok(Self { kind, port })
    }

    /// True when `host` (already normalized by [`normalize_host`]) and `port` match, given
    /// whether the connection is TLS (which picks the default port, 443 or 80).
    pub fn matches(&self, host: &str, port: u16, tls: bool) -> bool {
        let port_ok = match self.port {
            PortSpec::Default => port == if tls { 443 } else { 80 },
            PortSpec::Port(p) => port == p,
            PortSpec::Any => true,
        };
        port_ok && self.matches_host(host)
    }

    /// True when the host part matches, whatever the port.
    pub fn matches_host(&self, host: &str) -> bool {
        match &self.kind {
            HostKind::Exact(h) => h == host,
            HostKind::Suffix(s) => {
                (host.len() > s.len() && host.ends_with(s.as_str())) || host == &s[1..]
            }
            HostKind::Cidr(net) => host.parse::<IpAddr>().is_ok_and(|ip| net.contains(&ip)),
        }
    }

    /// True when some `host:port` on TLS matches both patterns (e.g. `api.example.com` and
    /// `*.example.com`, or `:*` and `:8443`).
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        let tls_port = |p: PortSpec| match p {
            PortSpec::Default => Some(443),
            PortSpec::Port(n) => Some(n),
            PortSpec::Any => None,
        };
        let ports = match (tls_port(self.port), tls_port(other.port)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        // A host each pattern matches: the exact name, or a label under the suffix.
        let some_host = |k: &HostKind| match k {
            HostKind::Exact(h) => h.clone(),
            HostKind::Suffix(s) => format!("x{s}"),
            HostKind::Cidr(net) => net.network().to_string(),
        };
        ports
            && (self.matches_host(&some_host(&other.kind))
                || other.matches_host(&some_host(&self.kind)))
    }

    /// How specific the pattern is, compared between patterns that match one host: an
    /// exact name or IP literal beats any `*.suffix`, a longer suffix beats a shorter one,
    /// and a port (default or named) beats `:*`. Chooses among secrets that inject the same
    /// header or query parameter on a host (`api.github.com`'s over `*.github.com`'s).
    pub fn specificity(&self) -> (bool, usize, bool) {
        match &self.kind {
            HostKind::Exact(h) => (true, h.len(), self.port != PortSpec::Any),
            HostKind::Suffix(s) => (false, s.len(), self.port != PortSpec::Any),
            // A longer prefix is a smaller block.
            HostKind::Cidr(net) => (
                false,
                usize::from(net.prefix_len()),
                self.port != PortSpec::Any,
            ),
        }
    }

    /// The public suffix a `*.suffix` pattern covers whole, when `suffix` is itself on
    /// Mozilla's public suffix list (`*.co.uk`, `*.github.io`): the pattern then matches
    /// sites of unrelated owners. `None` for exact patterns and for suffixes under a
    /// registrable domain (`*.example.co.uk`) or not on the list (`*.corp.internal`).
    pub fn covered_public_suffix(&self) -> Option<PublicSuffix> {
        let HostKind::Suffix(s) = &self.kind else {
            return None;
        };
        let bare = &s[1..];
        let found = psl::suffix(bare.as_bytes())?;
        if found.as_bytes() != bare.as_bytes() {
            return None;
        }
        match found.typ()? {
            psl::Type::Icann => Some(PublicSuffix::Icann),
            psl::Type::Private => Some(PublicSuffix::Private),
        }
    }

    /// The port part of the pattern.
    pub fn port(&self) -> PortSpec {
        self.port
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            HostKind::Exact(h) if h.contains(':') => write!(f, "[{h}]")?,
            HostKind::Exact(h) => f.write_str(h)?,
            HostKind::Suffix(s) => write!(f, "*{s}")?,
            HostKind::Cidr(net @ ipnet::IpNet::V6(_)) => write!(f, "[{net}]")?,
            HostKind::Cidr(net) => write!(f, "{net}")?,
        }
        match self.port {
            PortSpec::Default => Ok(()),
            PortSpec::Port(p) => write!(f, ":{p}"),
            PortSpec::Any => f.write_str(":*"),
        }
    }
}

/// Normalizes a host as seen on the wire (CONNECT authority, SNI, `Host`): lowercases ASCII,
/// removes IPv6 brackets and one trailing dot. Returns `None` for an empty host or one with
/// characters no host name or IP literal contains.
pub fn normalize_host(host: &str) -> Option<String> {
    let h = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.is_empty() {
        return None;
    }
    // An address literal in its canonical text (RFC 5952 for IPv6: `2001:0DB8::0:1` and
    // `2001:db8::1` are one host), so patterns, CONNECT authorities and `Host` compare equal.
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    if h.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        Some(h.to_ascii_lowercase())
    } else {
        None
    }
}

fn split_port(text: &str) -> Result<(&str, PortSpec), String> {
    let parse_port = |p: &str| -> Result<PortSpec, String> {
        if p == "*" {
            return Ok(PortSpec::Any);
        }
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(PortSpec::Port(n)),
            _ => Err(format!("host pattern `{text}` has an invalid port `{p}`")),
        }
    };
    if let Some(rest) = text.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err(format!("host pattern `{text}` has an unclosed `[`"));
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() && h.parse::<ipnet::Ipv6Net>().is_err() {
            return Err(format!(
                "host pattern `{text}` is not an IPv6 literal or block"
            ));
        }
        return match after {
            "" => Ok((h, PortSpec::Default)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((h, parse_port(p)?)),
                None => Err(format!("host pattern `{text}` has text after `]`")),
            },
        };
    }
    if text.matches(':').count() > 1 {
        return Err(format!(
            "host pattern `{text}`: write IPv6 literals in brackets, like `[::1]`"
        ));
    }
    match text.split_once(':') {
        Some((h, p)) => Ok((h, parse_port(p)?)),
        None => Ok((text, PortSpec::Default)),
    }
}

fn check_name(name: &str, text: &str) -> Result<(), String> {
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Err(format!("host pattern `{text}` has an empty label"));
    }
    if name.contains('*') {
        return Err(format!(
            "host pattern `{text}`: `*` is only allowed as a leading `*.`"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(format!(
            "host pattern `{text}` has characters outside [A-Za-z0-9.-_]"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn exact_matches_case_insensitively_on_default_port() {
        let pat = p("API.GitHub.com");
        assert!(pat.matches("api.github.com", 443, true));
        assert!(!pat.matches("api.github.com", 8443, true));
        assert!(pat.matches("api.github.com", 80, false));
        assert!(!pat.matches("api.github.com", 443, false));
        assert!(!pat.matches("github.com", 443, true));
        assert!(!pat.matches("xapi.github.com", 443, true));
    }

    #[test]
    fn suffix_matches_subdomains_and_the_apex() {
        let pat = p("*.example.com");
        assert!(pat.matches("a.example.com", 443, true));
        assert!(pat.matches("a.b.example.com", 443, true));
        assert!(pat.matches("example.com", 443, true));
        assert!(!pat.matches("badexample.com", 443, true));
        assert!(!pat.matches("example.com.evil.test", 443, true));
        assert!(!pat.matches(".example.com", 443, true));
        assert!(!pat.matches("com", 443, true));
    }

    #[test]
    fn ports() {
        assert!(p("h.test:8443").matches("h.test", 8443, true));
        assert!(!p("h.test:8443").matches("h.test", 443, true));
        assert!(p("h.test:*").matches("h.test", 1, false));
        assert!(p("[::1]:8443").matches("::1", 8443, true));
        assert!(p("127.0.0.1").matches("127.0.0.1", 443, true));
    }

    #[test]
    fn cidr_blocks_match_ip_literals_only() {
        let v4 = p("10.0.0.0/8:5432");
        assert!(v4.matches("10.1.2.3", 5432, false));
        assert!(!v4.matches("10.1.2.3", 443, true));
        assert!(!v4.matches("11.0.0.1", 5432, false));
        // A name is never resolved to match a block.
        assert!(!v4.matches("db.internal", 5432, false));
        assert_eq!(v4.to_string(), "10.0.0.0/8:5432");
        // Host bits are dropped; IPv6 blocks go in brackets.
        assert_eq!(p("192.168.1.77/24").to_string(), "192.168.1.0/24");
        let v6 = p("[fd00::/8]:*");
        assert!(v6.matches("fd12::1", 8443, true));
        assert!(!v6.matches("fe80::1", 8443, true));
        assert_eq!(v6.to_string(), "[fd00::/8]:*");
        // More specific: an exact address over a block, a longer prefix over a shorter one.
        assert!(p("10.1.2.3").specificity() > p("10.1.0.0/16").specificity());
        assert!(p("10.1.0.0/16").specificity() > v4.specificity());
        assert!(v4.overlaps(&p("10.9.9.9:5432")) && !v4.overlaps(&p("*.corp.internal:5432")));
        for bad in ["0.0.0.0/0", "10.0.0.0/33", "[::/0]", "10.0.0.0/x"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_bad_patterns() {
        for bad in [
            "", "*", "*.com", "a.*.com", "a..b", "h:0", "h:x", "::1", "[::1", "a b", "*.",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_host("API.x.COM.").as_deref(), Some("api.x.com"));
        assert_eq!(normalize_host("[::1]").as_deref(), Some("::1"));
        // One IPv6 address, one text (RFC 5952), in patterns and in requests alike.
        assert_eq!(
            normalize_host("[2001:0DB8:0:0::1]").as_deref(),
            Some("2001:db8::1")
        );
        assert!(p("[2001:db8:0:0:0:0:0:1]").matches(
            &normalize_host("[2001:0db8::1]").unwrap_or_default(),
            443,
            true
        ));
        assert_eq!(normalize_host("a/b"), None);
        assert_eq!(normalize_host(""), None);
    }

    proptest! {
        /// A suffix pattern never matches a host that does not end with `.suffix`, and
        /// always matches `label.suffix`.
        #[test]
        fn suffix_property(label in "[a-z0-9]{1,10}", host in "[a-z0-9.]{1,20}") {
            let pat = p("*.example.org");
            let sub = format!("{}.example.org", label);
            prop_assert!(pat.matches(&sub, 443, true));
            prop_assert_eq!(pat.matches(&host, 443, true), host.ends_with(".example.org") && host.len() > 12);
        }

        /// Matching ignores ASCII case on the pattern side.
        #[test]
        fn case_insensitive(host in "[a-z][a-z0-9]{0,8}\\.[a-z]{2,5}") {
            let pat = p(&host.to_ascii_uppercase());
            prop_assert!(pat.matches(&host, 443, true));
        }
    }
}
