//! Response echo scrubbing (REFERENCE.md D18, d8): a real value the proxy put into a
//! request is put back to its placeholder wherever the origin's response hands it back, so
//! an origin that echoes the request (a debugging endpoint, an error page quoting the
//! `Authorization` header, a redirect to the canonical URL, a JSON `next` link) never gives
//! the sandbox the credential.
//!
//! [`Echoes`] holds, per request, the values that went out and the forms an origin may echo
//! them in: raw, percent-encoded (upper- and lower-case hex), with `+` for a space (form
//! encoding), JSON-escaped (also `\/` and Go's `\u0026`), for a swap inside `Basic`
//! credentials the re-encoded base64 blob (put back to the blob the client sent), and for
//! an injected header its whole value. Every response header, the status text and every
//! trailer are scrubbed; the body, as it streams ([`Scrubbed`]), when the secret's
//! `scrub_response_body` is on (the default) and the body is not content-encoded. Values
//! shorter than [`MIN_VALUE_LEN`] bytes are looked for in [`URL_HEADERS`] only (elsewhere
//! they would match ordinary text). The forms are held as [`SecretValue`]s (zeroized when
//! dropped): the raw value shares the request's, and an encoded form is made only when it
//! differs from the raw one.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use iron_broker::SecretValue;
use smallvec::SmallVec;

/// Shortest real value looked for in responses, in bytes: a shorter one would match
/// ordinary text and corrupt it.
pub const MIN_VALUE_LEN: usize = 8;

/// [`CLASS`] bit: the byte is not unreserved in a URL (RFC 3986 §2.3).
const URL: u8 = 1;
/// [`CLASS`] bit: JSON (or PHP's `json_encode`) escapes the byte.
const JSON: u8 = 2;
/// Per byte, which encodings change it.
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_' || c == b'~') {
            t[b] |= URL;
        }
        if c < 0x20 || c == b'"' || c == b'\\' || c == b'/' {
            t[b] |= JSON;
        }
        b += 1;
    }
    t
};

/// Response headers that carry a URL, where an origin echoes the request's own path and
/// query (a redirect to the canonical host or with a trailing slash, `Content-Location`,
/// `Refresh: 0; url=…`, a `Link` to the next page): values shorter than [`MIN_VALUE_LEN`]
/// are looked for there too.
pub const URL_HEADERS: [http::HeaderName; 4] = [
    http::header::LOCATION,
    http::header::CONTENT_LOCATION,
    http::header::REFRESH,
    http::header::LINK,
];

/// Where [`Echoes::scrub`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A response body: the forms of secrets that scrub bodies, at least
    /// [`MIN_VALUE_LEN`] long.
    Body,
    /// A header or trailer value, or the status text: every form at least
    /// [`MIN_VALUE_LEN`] long.
    Header,
    /// A URL header ([`URL_HEADERS`]): every form.
    UrlHeader,
}

/// One form of a real value, and what it is put back to.
#[derive(Clone)]
struct Needle {
    value: SecretValue,
    with: Bytes,
    /// Looked for in the body too (the secret's `scrub_response_body`).
    body: bool,
    /// The byte values `value` holds, a bit each ([`find_from`] skips past a byte that is
    /// not one of them). Zeroized when dropped, as the value is.
    bytes: [u64; 4],
}

impl Drop for Needle {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.bytes);
    }
}

impl Needle {
    fn new(value: SecretValue, with: Bytes, body: bool) -> Self {
        let mut bytes = [0u64; 4];
        for &b in value.expose() {
            bytes[usize::from(b >> 6)] |= 1 << (b & 63);
        }
        Self {
            value,
            with,
            body,
            bytes,
        }
    }

    /// True when `b` is one of the value's bytes.
    fn holds(&self, b: u8) -> bool {
        self.bytes[usize::from(b >> 6)] & (1 << (b & 63)) != 0
    }

    fn applies(&self, scope: Scope) -> bool {
        let long = self.value.expose().len() >= MIN_VALUE_LEN;
        match scope {
            Scope::Body => self.body && long,
            Scope::Header => long,
            Scope::UrlHeader => true,
        }
    }
}

/// One secret value's echoable forms, made once and shared by every request that sends
/// the value (the proxy keeps one per secret, made again when the value changes): what
/// [`Echoes::add_value`] adds, ready for [`Echoes::add_made`]. The forms are
/// [`SecretValue`]s, zeroized when the last holder drops them.
pub struct Forms {
    value: SecretValue,
    echoes: Echoes,
}

impl Forms {
    /// The forms of `value`, each put back to `placeholder`; `body`: looked for in response
    /// bodies too (the secret's `scrub_response_body`).
    pub fn new(value: &SecretValue, placeholder: &str, body: bool) -> Self {
        let mut echoes = Echoes::new();
        echoes.add_value(value, placeholder, body);
        Self {
            value: value.clone(),
            echoes,
        }
    }

    /// True when these are the forms of `value` (the same bytes).
    pub fn is_of(&self, value: &SecretValue) -> bool {
        self.value.same(value) || self.value == *value
    }
}

/// The real values one request carried, in the forms an origin may echo them in. Empty
/// (and free) when no secret was applied.
#[derive(Clone, Default)]
pub struct Echoes {
    /// Shared with the [`Forms`] they came from while nothing else is added: the common
    /// request, one secret's value, clones a reference instead of every form.
    shared: Option<std::sync::Arc<Vec<Needle>>>,
    /// Shortest needle: a shorter header value or chunk holds none.
    min_len: usize,
}

impl Echoes {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` (a real value that went out) in its echoable forms, each put back to
    /// `placeholder`; `body`: looked for in the response body too. A value shorter than
    /// [`MIN_VALUE_LEN`] is looked for in URL headers only.
    pub fn add_value(&mut self, value: &SecretValue, placeholder: &str, body: bool) {
        let with = Bytes::copy_from_slice(placeholder.as_bytes());
        self.add_forms(value, &with, body);
    }

    /// Adds the forms of one value made beforehand ([`Forms`]): what
    /// [`Echoes::add_value`] adds, without encoding the value again.
    pub fn add_made(&mut self, forms: &Forms) {
        if self.shared.is_none() {
            self.clone_from(&forms.echoes);
            return;
        }
        for n in forms.echoes.needles() {
            self.add_needle(n.clone());
        }
    }

    /// The forms looked for.
    fn needles(&self) -> &[Needle] {
        self.shared.as_deref().map_or(&[], Vec::as_slice)
    }

    /// Adds `value` put back to `with` exactly (a re-encoded `Basic` blob, put back to the
    /// client's own; an injected header's value, put back to the placeholder), in the same
    /// forms as [`Echoes::add_value`].
    pub fn add_exact(&mut self, value: &[u8], with: &[u8], body: bool) {
        self.add_forms(
            &SecretValue::new(value.to_vec()),
            &Bytes::copy_from_slice(with),
            body,
        );
    }

    /// `value` raw, and the forms that differ from it: percent-encoded (upper- and
    /// lower-case hex), with `+` for a space, JSON-escaped (also `\/`, and Go's `\u0026`
    /// for `&<>`).
    fn add_forms(&mut self, value: &SecretValue, with: &Bytes, body: bool) {
        let raw = value.expose();
        if raw.is_empty() {
            return;
        }
        // One pass over the value says which other forms differ from it.
        let class = raw.iter().fold(0, |c, &b| c | CLASS[usize::from(b)]);
        // Not only unreserved bytes (RFC 3986 §2.3): the URL forms differ.
        if class & URL != 0 {
            let encoded = zeroize::Zeroizing::new(iron_policy::encoding::encode_component(raw));
            let lower = lower_hex(&encoded);
            let form = encoded.replace("%20", "+").into_bytes();
            self.add(SecretValue::new(form), with.clone(), body);
            if lower != *encoded.as_bytes() {
                self.add(SecretValue::new(lower), with.clone(), body);
            }
            self.add(
                SecretValue::new(encoded.as_bytes().to_vec()),
                with.clone(),
                body,
            );
        }
        // JSON escapes `"`, `\` and control characters; PHP's json_encode `/` too; Go's
        // encoding/json `&`, `<` and `>`.
        if class & JSON != 0
            && let Ok(text) = std::str::from_utf8(raw)
            && let Ok(json) = serde_json::to_string(text).map(zeroize::Zeroizing::new)
        {
            let json = &json[1..json.len() - 1];
            for v in [
                json.replace('/', "\\/"),
                json.replace('&', "\\u0026")
                    .replace('<', "\\u003c")
                    .replace('>', "\\u003e"),
                json.to_string(),
            ] {
                if v.as_bytes() != raw {
                    self.add(SecretValue::new(v.into_bytes()), with.clone(), body);
                }
            }
        }
        self.add(value.clone(), with.clone(), body);
    }

    fn add(&mut self, value: SecretValue, with: Bytes, body: bool) {
        self.add_needle(Needle::new(value, with, body));
    }

    fn add_needle(&mut self, needle: Needle) {
        let needles = std::sync::Arc::make_mut(self.shared.get_or_insert_default());
        if let Some(n) = needles.iter_mut().find(|n| n.value == needle.value) {
            n.body |= needle.body;
            return;
        }
        let len = needle.value.expose().len();
        self.min_len = if needles.is_empty() {
            len
        } else {
            self.min_len.min(len)
        };
        needles.push(needle);
    }

    /// True when nothing is looked for.
    pub fn is_empty(&self) -> bool {
        self.needles().is_empty()
    }

    /// True when the response body is to be scrubbed.
    pub fn scrubs_body(&self) -> bool {
        self.needles().iter().any(|n| n.applies(Scope::Body))
    }

    /// Scrubs every value of `headers` (trailers too). A value that would not be a valid
    /// header value once scrubbed is emptied rather than left as it was. Returns how many
    /// echoes were put back.
    pub fn mask_headers(&self, headers: &mut HeaderMap) -> u64 {
        let mut hits = 0;
        if self.is_empty() {
            return hits;
        }
        for (name, v) in headers.iter_mut() {
            if v.len() < self.min_len {
                continue;
            }
            // Only a value shorter than MIN_VALUE_LEN tells URL headers apart.
            let scope = if self.min_len < MIN_VALUE_LEN && URL_HEADERS.contains(name) {
                Scope::UrlHeader
            } else {
                Scope::Header
            };
            if let Some((masked, n)) = self.scrub(v.as_bytes(), scope, false) {
                *v = HeaderValue::from_bytes(&masked).unwrap_or(HeaderValue::from_static(""));
                hits += n;
            }
        }
        hits
    }

    /// `hay` with every form that applies to `scope` put back (left to right, not
    /// overlapping; the longest form where several start at one place) and how many were,
    /// or `None` when it holds none. `fit`: each put-back is cut or padded with `*` to the length of what it
    /// replaces (a body whose `Content-Length` must stand). Each form's next occurrence is
    /// searched for once per position it passes, so the cost is linear in `hay` whatever
    /// the number of echoes.
    pub fn scrub(&self, hay: &[u8], scope: Scope, fit: bool) -> Option<(Vec<u8>, u64)> {
        const NONE: usize = usize::MAX;
        if hay.len() < self.min_len {
            return None;
        }
        let needles = self.needles();
        // The first form that occurs; the common case, none, builds nothing.
        let (first, at) = needles.iter().enumerate().find_map(|(i, n)| {
            if n.applies(scope) {
                find_from(hay, 0, n).map(|p| (i, p))
            } else {
                None
            }
        })?;
        // Each form's first occurrence (the forms before `first` have none).
        let mut next: SmallVec<[usize; 4]> = SmallVec::with_capacity(needles.len());
        next.resize(first, NONE);
        next.push(at);
        for n in &needles[first + 1..] {
            next.push(if n.applies(scope) {
                find_from(hay, 0, n).unwrap_or(NONE)
            } else {
                NONE
            });
        }
        let mut out = Vec::new();
        let mut last = 0;
        let mut hits = 0;
        loop {
            let mut best: Option<usize> = None;
            for (i, n) in needles.iter().enumerate() {
                if next[i] == NONE {
                    continue;
                }
                if next[i] < last {
                    next[i] = find_from(hay, last, n).unwrap_or(NONE);
                    if next[i] == NONE {
                        continue;
                    }
                }
                let better = best.is_none_or(|b| {
                    next[i] < next[b]
                        || (next[i] == next[b]
                            && n.value.expose().len() > needles[b].value.expose().len())
                });
                if better {
                    best = Some(i);
                }
            }
            let Some(i) = best else { break };
            let (p, n) = (next[i], &needles[i]);
            let len = n.value.expose().len();
            out.extend_from_slice(&hay[last..p]);
            if fit {
                let cut = n.with.len().min(len);
                out.extend_from_slice(&n.with[..cut]);
                out.resize(out.len() + (len - cut), b'*');
            } else {
                out.extend_from_slice(&n.with);
            }
            last = p + len;
            hits += 1;
        }
        (last > 0).then(|| {
            out.extend_from_slice(&hay[last..]);
            (out, hits)
        })
    }

    /// How many bytes at the end of `hay` could begin a body form (a proper prefix of one):
    /// they are held back until the next chunk shows whether the form goes on.
    fn held_suffix(&self, hay: &[u8]) -> usize {
        let mut hold = 0;
        for n in self.needles().iter().filter(|n| n.applies(Scope::Body)) {
            let value = n.value.expose();
            let longest = (value.len() - 1).min(hay.len());
            if longest <= hold {
                continue;
            }
            // Where the form's first byte starts a suffix longer than `hold`, earliest
            // (longest) first.
            let window = &hay[hay.len() - longest..hay.len() - hold];
            for at in memchr::memchr_iter(value[0], window) {
                let tail = &hay[hay.len() - longest + at..];
                if value.starts_with(tail) {
                    hold = tail.len();
                    break;
                }
            }
        }
        hold
    }
}

/// `encoded` with the hex digits of its `%XX` escapes in lower case (.NET's
/// `HttpUtility.UrlEncode` writes `%2f`).
fn lower_hex(encoded: &str) -> Vec<u8> {
    let mut out = encoded.as_bytes().to_vec();
    let mut i = 0;
    while i + 2 < out.len() {
        if out[i] == b'%' {
            out[i + 1] = out[i + 1].to_ascii_lowercase();
            out[i + 2] = out[i + 2].to_ascii_lowercase();
            i += 3;
        } else {
            i += 1;
        }
    }
    out
}

/// The first occurrence of `needle`'s value in `hay` at or after `from`. A haystack
/// shorter than 4 KiB (a header, a small body) is searched window by window, by the last
/// byte of each: one that the value does not hold rules out every window that covers it,
/// so the search moves on by the value's length (most bytes of a page are not in a
/// token), and sets nothing up; a longer one with `memmem` (its set-up pays for itself
/// there). The window search compares a whole window only where its first and last bytes
/// could be the value's, so it is at worst `hay.len() × value.len()` byte comparisons (a
/// haystack of one byte repeated that the value also starts and ends with), as the
/// first-byte search it replaced was.
fn find_from(hay: &[u8], from: usize, needle: &Needle) -> Option<usize> {
    const LONG: usize = 4096;
    let value = needle.value.expose();
    let rest = hay.get(from..)?;
    if rest.len() > LONG {
        return memchr::memmem::find(rest, value).map(|p| p + from);
    }
    let n = value.len();
    if n == 0 {
        return None;
    }
    let last = hay.len().checked_sub(n)?;
    let mut p = from;
    while p <= last {
        if !needle.holds(hay[p + n - 1]) {
            p += n;
        } else if hay[p] == value[0] && &hay[p..p + n] == value {
            return Some(p);
        } else {
            p += 1;
        }
    }
    None
}

/// A response body with the [`Echoes`] put back as it streams. Bytes at the end of a chunk
/// that could begin a real value are held until the next chunk (at most the longest form
/// less one byte), and sent when the body ends; when the body fails they are dropped with
/// it. Trailer values are scrubbed whether the data is or not. With no echoes it passes
/// frames through untouched.
pub struct Scrubbed<B> {
    inner: B,
    echoes: Option<Echoes>,
    /// The data is scanned (else only trailers are scrubbed).
    scan: bool,
    /// The body's length must stand (a `Content-Length`, a 206 range): each echo is
    /// replaced by its placeholder cut or padded to the echo's length ([`Echoes::scrub`]).
    fit: bool,
    carry: zeroize::Zeroizing<Vec<u8>>,
    /// A trailers frame that waits for the held bytes to go first.
    pending: Option<Frame<Bytes>>,
    /// The inner body ended (it is not polled again).
    done: bool,
    /// Where echoes put back are counted (`[2]`), for the audit record.
    tally: Option<crate::body::Tally>,
}

impl<B> Scrubbed<B> {
    /// Wraps `inner`; empty `echoes` pass it through. `scan`: `Some(fit)` when the data is
    /// scrubbed (a form applies to bodies and the body is not content-encoded), `fit` when
    /// its length must not change (it has a `Content-Length`, or is a 206 range); `None`:
    /// only trailers are. Echoes put back are counted into `tally[2]`.
    pub fn new(
        inner: B,
        echoes: Echoes,
        scan: Option<bool>,
        tally: Option<crate::body::Tally>,
    ) -> Self {
        Self {
            inner,
            scan: scan.is_some(),
            echoes: (!echoes.is_empty()).then_some(echoes),
            fit: scan.unwrap_or(false),
            carry: zeroize::Zeroizing::new(Vec::new()),
            pending: None,
            done: false,
            tally,
        }
    }

    fn count(&self, n: u64) {
        if n > 0
            && let Some(t) = &self.tally
        {
            t[2].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl<B> Body for Scrubbed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let Some(echoes) = &this.echoes else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        if let Some(f) = this.pending.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !this.scan => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(data) => {
                        let buf = if this.carry.is_empty() {
                            data
                        } else {
                            let mut joined = std::mem::take(&mut *this.carry);
                            joined.extend_from_slice(&data);
                            Bytes::from(joined)
                        };
                        let (buf, hits) = match echoes.scrub(&buf, Scope::Body, this.fit) {
                            Some((out, n)) => (Bytes::from(out), n),
                            None => (buf, 0),
                        };
                        this.count(hits);
                        // Nothing more comes after the last frame: nothing to hold for.
                        let hold = if this.inner.is_end_stream() {
                            0
                        } else {
                            echoes.held_suffix(&buf)
                        };
                        if hold > 0 {
                            this.carry.extend_from_slice(&buf[buf.len() - hold..]);
                        }
                        if hold == 0 {
                            // The chunk as it is (a slice, even of all of it, would make
                            // shared bytes of a unique buffer: an allocation).
                            return Poll::Ready(Some(Ok(Frame::data(buf))));
                        }
                        if hold < buf.len() {
                            return Poll::Ready(Some(Ok(Frame::data(
                                buf.slice(..buf.len() - hold),
                            ))));
                        }
                    }
                    Err(mut frame) => {
                        let hits = frame.trailers_mut().map_or(0, |t| echoes.mask_headers(t));
                        this.count(hits);
                        this.done = true;
                        if this.carry.is_empty() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        this.pending = Some(frame);
                        let held = std::mem::take(&mut *this.carry);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(held)))));
                    }
                },
                Some(Err(e)) => {
                    this.carry.clear();
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.done = true;
                    if this.carry.is_empty() {
                        return Poll::Ready(None);
                    }
                    // A proper prefix of a form at the very end: no form in it.
                    let held = std::mem::take(&mut *this.carry);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(held)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.carry.is_empty() && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.scan && !self.fit {
            return SizeHint::default();
        }
        let inner = self.inner.size_hint();
        let extra = self.carry.len() as u64;
        match inner.exact() {
            Some(n) => SizeHint::with_exact(n + extra),
            None => {
                let mut h = SizeHint::new();
                if let Some(u) = inner.upper() {
                    h.set_upper(u + extra);
                }
                h.set_lower(inner.lower() + extra);
                h
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    proptest::proptest! {
        /// The window search finds what a plain left-to-right search finds, from any start,
        /// in haystacks short enough for it (a small alphabet makes near misses common).
        #[test]
        fn find_from_finds_the_first_occurrence(
            hay in proptest::collection::vec(b'a'..=b'd', 0..300),
            value in proptest::collection::vec(b'a'..=b'd', 1..8),
            from in 0usize..320,
        ) {
            let needle = Needle::new(SecretValue::new(value.clone()), Bytes::new(), true);
            let plain = hay
                .get(from..)
                .and_then(|rest| rest.windows(value.len()).position(|w| w == value.as_slice()))
                .map(|p| p + from);
            proptest::prop_assert_eq!(find_from(&hay, from, &needle), plain);
        }
    }

    fn echoes() -> Echoes {
        let mut e = Echoes::new();
        e.add_value(
            &SecretValue::new(b"ghp_REALvalue/123 x".to_vec()),
            "GITHUB_TOKEN",
            true,
        );
        e
    }

    #[test]
    fn every_form_is_put_back() {
        let e = echoes();
        for (hay, want) in [
            ("token=ghp_REALvalue/123 x;", "token=GITHUB_TOKEN;"),
            ("u?t=ghp_REALvalue%2F123%20x&", "u?t=GITHUB_TOKEN&"),
            ("t=ghp_REALvalue%2F123+x", "t=GITHUB_TOKEN"),
            (r#"{"t":"ghp_REALvalue\/123 x"}"#, r#"{"t":"GITHUB_TOKEN"}"#),
            (
                "ghp_REALvalue/123 xghp_REALvalue/123 x",
                "GITHUB_TOKENGITHUB_TOKEN",
            ),
        ] {
            let (got, _) = e.scrub(hay.as_bytes(), Scope::Body, false).expect(hay);
            assert_eq!(String::from_utf8(got).unwrap(), want);
        }
        assert_eq!(e.scrub(b"nothing here at all", Scope::Body, false), None);
        // Fitted to the echo's length: padded (19-byte value, 12-byte placeholder) or cut.
        assert_eq!(
            e.scrub(b"<ghp_REALvalue/123 x>", Scope::Body, true)
                .unwrap()
                .0,
            b"<GITHUB_TOKEN*******>"
        );
        let mut long = Echoes::new();
        long.add_value(
            &SecretValue::new(b"sk-12345".to_vec()),
            "OPENAI_API_KEY",
            true,
        );
        assert_eq!(
            long.scrub(b"k=sk-12345;", Scope::Body, true).unwrap().0,
            b"k=OPENAI_A;"
        );
        // A form put back to text that holds it is not searched again.
        let mut loops = Echoes::new();
        loops.add_exact(b"abcdefgh", b"xabcdefghx", true);
        assert_eq!(
            loops.scrub(b"abcdefgh", Scope::Body, false).unwrap().0,
            b"xabcdefghx"
        );
        let mut short = Echoes::new();
        short.add_value(&SecretValue::new(b"k3y".to_vec()), "SHORT_KEY", true);
        // A 3-byte value would match ordinary text: looked for in URL headers only.
        assert!(!short.scrubs_body());
        assert_eq!(short.scrub(b"monkey k3y", Scope::Header, false), None);
        let mut h = HeaderMap::new();
        h.insert("location", HeaderValue::from_static("/a?key=k3y"));
        h.insert("x-note", HeaderValue::from_static("k3y"));
        short.mask_headers(&mut h);
        assert_eq!(h["location"], "/a?key=SHORT_KEY");
        assert_eq!(h["x-note"], "k3y");
    }

    /// Other encoders' forms: lower-case percent hex (.NET), Go's `\u0026` for `&`, and an
    /// exact blob's `/` escaped by PHP.
    #[test]
    fn other_encoders_forms_are_put_back() {
        let mut e = Echoes::new();
        e.add_value(&SecretValue::new(b"tok/en&more<x>".to_vec()), "T_KEY", true);
        e.add_exact(b"YmxvYi9ibG9iK2Jsb2I=/x", b"ORIGINAL_BLOB", true);
        for (hay, want) in [
            ("a=tok%2fen%26more%3cx%3e", "a=T_KEY"),
            ("a=tok%2Fen%26more%3Cx%3E", "a=T_KEY"),
            (r#""tok\/en&more<x>""#, r#""T_KEY""#),
            (r#""tok/en\u0026more\u003cx\u003e""#, r#""T_KEY""#),
            (r#""YmxvYi9ibG9iK2Jsb2I=\/x""#, r#""ORIGINAL_BLOB""#),
        ] {
            let (got, _) = e.scrub(hay.as_bytes(), Scope::Body, false).expect(hay);
            assert_eq!(String::from_utf8(got).unwrap(), want);
        }
    }

    /// Thousands of echoes in one chunk are all put back (each form is searched for once
    /// per position, not once per echo).
    #[test]
    fn many_echoes_in_one_chunk() {
        let e = echoes();
        let hay = "ghp_REALvalue/123 x,".repeat(5000);
        let (got, n) = e.scrub(hay.as_bytes(), Scope::Body, false).unwrap();
        assert_eq!(got, "GITHUB_TOKEN,".repeat(5000).into_bytes());
        assert_eq!(n, 5000);
    }

    #[test]
    fn headers_are_scrubbed_in_place() {
        let e = echoes();
        let mut h = HeaderMap::new();
        h.insert(
            "x-echo",
            HeaderValue::from_static("Bearer ghp_REALvalue/123 x"),
        );
        h.insert(
            "location",
            HeaderValue::from_static("/a?t=ghp_REALvalue%2F123%20x"),
        );
        h.insert("x-other", HeaderValue::from_static("fine"));
        e.mask_headers(&mut h);
        assert_eq!(h["x-echo"], "Bearer GITHUB_TOKEN");
        assert_eq!(h["location"], "/a?t=GITHUB_TOKEN");
        assert_eq!(h["x-other"], "fine");
    }

    /// A value split across chunks at every possible point is still put back, and what
    /// is held back is sent when the body ends.
    #[tokio::test]
    async fn a_value_split_across_chunks_is_caught() {
        let text = b"before ghp_REALvalue/123 x after ghp_";
        for cut in 0..text.len() {
            let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
                Ok(Frame::data(Bytes::copy_from_slice(&text[..cut]))),
                Ok(Frame::data(Bytes::copy_from_slice(&text[cut..]))),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
            let out = Scrubbed::new(body, echoes(), Some(false), None)
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(&out[..], b"before GITHUB_TOKEN after ghp_", "cut at {cut}");
        }
    }

    /// A body that is not scanned (its secret opted out, or it is compressed) still has its
    /// trailers scrubbed.
    #[tokio::test]
    async fn trailers_are_scrubbed_when_the_data_is_not() {
        let mut t = HeaderMap::new();
        t.insert(
            "grpc-message",
            HeaderValue::from_static("bad ghp_REALvalue/123 x"),
        );
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(
                b"\x1f\x8b ghp_REALvalue/123 x",
            ))),
            Ok(Frame::trailers(t)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let collected = Scrubbed::new(body, echoes(), None, None)
            .collect()
            .await
            .unwrap();
        assert_eq!(
            collected.trailers().unwrap()["grpc-message"],
            "bad GITHUB_TOKEN"
        );
        assert_eq!(&collected.to_bytes()[..], b"\x1f\x8b ghp_REALvalue/123 x");
    }

    /// Trailers are scrubbed, and bytes held back go before them.
    #[tokio::test]
    async fn trailers_are_scrubbed_after_the_held_bytes() {
        let mut t = HeaderMap::new();
        t.insert("x-echo", HeaderValue::from_static("ghp_REALvalue/123 x"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"data ghp_RE"))),
            Ok(Frame::trailers(t)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let collected = Scrubbed::new(body, echoes(), Some(false), None)
            .collect()
            .await
            .unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["x-echo"], "GITHUB_TOKEN");
        assert_eq!(&collected.to_bytes()[..], b"data ghp_RE");
    }
}
