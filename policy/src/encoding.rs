//! Percent-decoding that remembers where each decoded byte came from, so a placeholder
//! found in the decoded form can be replaced in the raw form while every other byte stays
//! exactly as the client sent it (REFERENCE.md D12).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

/// Bytes escaped when a value is written into a path segment or a query value: everything
/// but RFC 3986 unreserved characters (so `/`, `&`, `=`, `+` and `%` are always escaped).
pub const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A percent-decoded string with a map back to raw offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The decoded bytes.
    pub bytes: Vec<u8>,
    /// `starts[i]` is the raw offset where decoded byte `i` begins; one extra entry holds
    /// the raw length, so decoded byte `i` spans `starts[i]..starts[i + 1]`.
    pub starts: Vec<usize>,
}

impl Decoded {
    /// The raw byte range covering decoded bytes `start..end`.
    pub fn raw_range(&self, start: usize, end: usize) -> std::ops::Range<usize> {
        self.starts[start]..self.starts[end]
    }
}

/// Decodes `%XX` escapes (either hex case) in `raw`; with `plus_as_space`, `+` decodes to a
/// space (the `application/x-www-form-urlencoded` form used in query strings). A `%` not
/// followed by two hex digits is kept literally.
pub fn decode_mapped(raw: &str, plus_as_space: bool) -> Decoded {
    let b = raw.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut starts = Vec::with_capacity(b.len() + 1);
    let mut i = 0;
    while i < b.len() {
        starts.push(i);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    bytes.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    bytes.push(b'%');
                    i += 1;
                }
            },
            b'+' if plus_as_space => {
                bytes.push(b' ');
                i += 1;
            }
            c => {
                bytes.push(c);
                i += 1;
            }
        }
    }
    starts.push(b.len());
    Decoded { bytes, starts }
}

/// True when the raw path has a `.` or `..` segment, literally or percent-encoded
/// (`%2e`, `%2E%2e`…). Such paths are refused before the pipeline (REFERENCE.md §2.6).
pub fn has_dot_segment(raw_path: &str) -> bool {
    raw_path.split('/').any(is_dot_segment)
}

/// True when `seg` decodes to `.` or `..`: one or two dots, each literal or `%2e`/`%2E`,
/// optionally followed by a path parameter (`;…`, `%3b…`), which servlet containers
/// (Tomcat, Jetty, Spring) strip before resolving the dots: `/a/..;/admin` is `/admin` to
/// them. Reads the bytes in place (no decoding buffer).
fn is_dot_segment(seg: &str) -> bool {
    let seg = match seg.find(';') {
        Some(i) => &seg[..i],
        None => seg,
    };
    let seg = match seg
        .as_bytes()
        .windows(3)
        .position(|w| w[0] == b'%' && w[1] == b'3' && (w[2] | 0x20) == b'b')
    {
        Some(i) => &seg[..i],
        None => seg,
    };
    let mut rest = seg.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && (rest[2] | 0x20) == b'e'
        {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

/// Percent-encodes `value` for a path segment or query value ([`COMPONENT`]).
pub fn encode_component(value: &[u8]) -> String {
    percent_encoding::percent_encode(value, COMPONENT).to_string()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_with_map() {
        let d = decode_mapped("a%2Fb%2fc+d%zz%", true);
        assert_eq!(d.bytes, b"a/b/c d%zz%");
        assert_eq!(d.raw_range(1, 2), 1..4);
        assert_eq!(d.raw_range(0, d.bytes.len()), 0..15);
    }

    #[test]
    fn dot_segments() {
        assert!(has_dot_segment("/a/../b"));
        assert!(has_dot_segment("/a/%2e%2E/b"));
        assert!(has_dot_segment("/./b"));
        assert!(has_dot_segment("/a/."));
        assert!(!has_dot_segment("/a/..b/c.d/%2F"));
        assert!(!has_dot_segment("/a/.../b"));
        assert!(!has_dot_segment("/a/%2e%2e%2e"));
        assert!(!has_dot_segment("/a/%2/b"));
        assert!(!has_dot_segment("/"));
        // Path parameters are stripped by servlet containers before dots are resolved.
        assert!(has_dot_segment("/v1/charges/..;/admin"));
        assert!(has_dot_segment("/v1/%2e%2e;jsessionid=x/admin"));
        assert!(has_dot_segment("/v1/..%3b/admin"));
        assert!(has_dot_segment("/v1/.%3B/admin"));
        assert!(!has_dot_segment("/v1/a;b/..x;/c"));
        assert!(!has_dot_segment("/v1/;../c"));
    }

    proptest! {
        /// The in-place check agrees with decoding the segment and comparing.
        #[test]
        fn dot_segment_matches_decoding(seg in "(\\.|%2[eE]|%2|%|[a-z.])*") {
            let d = decode_mapped(&seg, false).bytes;
            prop_assert_eq!(is_dot_segment(&seg), d == b"." || d == b"..");
        }

        /// Decoding an encoded component gives back the original bytes.
        #[test]
        fn roundtrip(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let enc = encode_component(&v);
            prop_assert_eq!(decode_mapped(&enc, false).bytes, v);
        }

        /// Every decoded byte maps to a non-empty, increasing raw range.
        #[test]
        fn map_is_monotonic(s in "[a-zA-Z0-9%+]{0,40}") {
            let d = decode_mapped(&s, true);
            prop_assert_eq!(d.starts.len(), d.bytes.len() + 1);
            for w in d.starts.windows(2) {
                prop_assert!(w[0] < w[1]);
            }
            prop_assert_eq!(*d.starts.last().unwrap_or(&0), s.len());
        }
    }
}
