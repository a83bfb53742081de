//! Per-secret request capabilities and rate limits (the seeds' tool `capabilities` and
//! `rateLimit`): which methods and paths a secret may be used on, and how often.
//!
//! A capability is a method and a path pattern. A secret with capabilities is applied only
//! to requests matching at least one of them; a secret without any is applied to every
//! request to its hosts (RunAgents: "when capabilities are defined, … requests match at
//! least one capability (method + path prefix). If no capabilities are defined, all
//! requests are allowed through").

use std::fmt;
use std::num::NonZeroU32;

use crate::encoding::decode_mapped;

/// One `capabilities` entry: a method (or any) and a path prefix pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// The entry's optional `name`, for people reading the policy and the admin API.
    pub name: Option<String>,
    /// The method, upper-case as written on the wire (`GET`, `POST`…); `None` for any
    /// (`method` omitted or `"*"`). Compared exactly: HTTP methods are case-sensitive
    /// (RFC 9110 §9.1).
    pub method: Option<String>,
    /// The path pattern.
    pub path: PathPattern,
}

impl Capability {
    /// True when a request with `method` and raw (still percent-encoded) `path` matches.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method) && self.path.matches(path)
    }
}

/// A path pattern: a prefix that ends at a segment boundary, whose segments may hold `*`
/// (any run of characters within one segment, at least one character when the segment is
/// `*` alone). `/v1/charges` matches `/v1/charges`, `/v1/charges/` and `/v1/charges/ch_1`,
/// not `/v1/chargesX`; `/drive/v3/files/*` needs one more segment; `/` matches every path.
///
/// Request paths are compared segment by segment after percent-decoding each segment, so
/// `/v1/%63harges` matches `/v1/charges`. A path with a segment that decodes to something
/// holding `/` or `\` (`%2F`, `%5C`), anywhere, matches no pattern: an origin that decodes
/// it would see a different path than the one checked. Empty segments (`//`) match no pattern segment.
/// `.` and `..` segments never get here: the proxy refuses them with 400 first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Vec<u8>>,
}

impl PathPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// A message naming the problem when the pattern does not start with `/`, holds a `?`
    /// or `#`, a `.`/`..` or empty inner segment, or a `**`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("path pattern `{text}` must start with `/`"));
        }
        if text.contains(['?', '#']) {
            return Err(format!(
                "path pattern `{text}` must not hold a query or fragment (`?`, `#`)"
            ));
        }
        if text.contains("**") {
            return Err(format!(
                "path pattern `{text}`: `**` is not supported; a pattern is already a prefix (`*` matches within one segment)"
            ));
        }
        let trimmed = text.trim_end_matches('/');
        let mut segments = Vec::new();
        if !trimmed.is_empty() {
            for seg in trimmed[1..].split('/') {
                let decoded = decode_mapped(seg, false).bytes;
                if decoded.is_empty() || decoded == b"." || decoded == b".." {
                    return Err(format!(
                        "path pattern `{text}` has an empty, `.` or `..` segment"
                    ));
                }
                segments.push(decoded);
            }
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when raw `path` (no query) starts with this pattern's segments and none of
    /// its segments, matched or not, decodes to a `/` or `\`.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let segs: Vec<Vec<u8>> = rest
            .split('/')
            .map(|s| decode_mapped(s, false).bytes)
            .collect();
        if segs.iter().any(|s| s.contains(&b'/') || s.contains(&b'\\')) {
            return false;
        }
        self.segments.len() <= segs.len()
            && self
                .segments
                .iter()
                .zip(&segs)
                .all(|(pat, seg)| !seg.is_empty() && glob(pat, seg))
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Matches `text` against `pat`, where `*` matches any run of bytes (the segment has no
/// `/` by then). Iterative, with one backtrack point: linear in practice.
fn glob(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pat.len() && pat[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|b| *b == b'*')
}

/// A secret's `rate_limit`: at most `per_minute` requests a minute on average, with bursts
/// of up to `burst` (GCRA, as the seeds' `rateLimit { requestsPerMinute, burst }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Sustained requests per minute (1 to 1 000 000).
    pub per_minute: NonZeroU32,
    /// Requests allowed at once; default `per_minute`.
    pub burst: NonZeroU32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(method: Option<&str>, path: &str) -> Capability {
        Capability {
            name: None,
            method: method.map(str::to_string),
            path: PathPattern::parse(path).unwrap(),
        }
    }

    #[test]
    fn a_pattern_is_a_prefix_at_segment_boundaries() {
        let p = PathPattern::parse("/v1/charges").unwrap();
        for ok in [
            "/v1/charges",
            "/v1/charges/",
            "/v1/charges/ch_1",
            "/v1/charges/ch_1/refunds",
        ] {
            assert!(p.matches(ok), "{ok}");
        }
        for no in [
            "/v1/chargesX",
            "/v1/charge",
            "/v1",
            "/",
            "/v2/charges",
            "v1/charges",
            "",
        ] {
            assert!(!p.matches(no), "{no}");
        }
        let root = PathPattern::parse("/").unwrap();
        assert!(root.matches("/") && root.matches("/anything/at/all"));
    }

    #[test]
    fn a_star_matches_within_one_segment() {
        let p = PathPattern::parse("/drive/v3/files/*").unwrap();
        assert!(p.matches("/drive/v3/files/abc"));
        assert!(p.matches("/drive/v3/files/abc/permissions"));
        assert!(!p.matches("/drive/v3/files"));
        assert!(!p.matches("/drive/v3/files/"));
        let q = PathPattern::parse("/repos/acme/*-api/issues").unwrap();
        assert!(q.matches("/repos/acme/billing-api/issues"));
        assert!(q.matches("/repos/acme/-api/issues"));
        assert!(!q.matches("/repos/acme/billing/issues"));
        assert!(!q.matches("/repos/acme/billing-api/pulls"));
        assert!(glob(b"a*b*c", b"aXXbYYc") && !glob(b"a*b*c", b"aXXbYY"));
    }

    #[test]
    fn segments_are_compared_decoded_and_encoded_separators_never_match() {
        let p = PathPattern::parse("/v1/charges/*").unwrap();
        assert!(p.matches("/v1/%63harges/ch_1"));
        assert!(!p.matches("/v1/charges/a%2F..%2Fadmin"));
        assert!(!p.matches("/v1/charges/a%2f..%2fadmin"));
        assert!(!p.matches("/v1/charges/a%5Cb"));
        assert!(!p.matches("/v1/charges/a\\b"));
        assert!(!p.matches("/v1//charges/x"));
        let prefix = PathPattern::parse("/v1/charges").unwrap();
        assert!(!prefix.matches("/v1/charges%2Fx"));
        // past the pattern's own segments too: the origin may decode and resolve them
        assert!(!prefix.matches("/v1/charges/a%2F..%2F..%2Fv1%2Fcustomers"));
        assert!(!prefix.matches("/v1/charges/x/a%5c..%5cb"));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        for (bad, why) in [
            ("v1/charges", "start with `/`"),
            ("/v1/charges?x=1", "query"),
            ("/v1//charges", "empty"),
            ("/v1/../admin", "`..`"),
            ("/v1/**", "`**`"),
        ] {
            let e = PathPattern::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn methods_compare_exactly_and_none_is_any() {
        let get = cap(Some("GET"), "/v1");
        assert!(get.matches("GET", "/v1/x"));
        assert!(!get.matches("POST", "/v1/x"));
        assert!(!get.matches("get", "/v1/x"));
        assert!(cap(None, "/v1").matches("DELETE", "/v1"));
    }
}
