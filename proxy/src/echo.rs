//! Response echo scrubbing (REFERENCE.md D18, d8): a real value the proxy put into a
//! request is put back to its placeholder wherever the origin's response hands it back, so
//! an origin that echoes the request (a debugging endpoint, an error page quoting the
//! `Authorization` header, a redirect to the canonical URL, a JSON `next` link) never gives
//! the sandbox the credential.
//!
//! [`Echoes`] holds, per request, the values that went out and the forms an origin may echo
//! them in: raw, percent-encoded (as the proxy sent a path or query value), with `+` for a
//! space (form encoding), JSON-escaped, and for a swap inside `Basic` credentials the
//! re-encoded base64 blob (put back to the blob the client sent). Every response header is
//! scrubbed; the body, as it streams, when the secret's `scrub_response_body` is on (the
//! default) and the body is not content-encoded ([`Scrubbed`]). Values shorter than
//! [`MIN_VALUE_LEN`] bytes are not looked for (they would match ordinary text). The forms
//! are held as [`SecretValue`]s (zeroized when dropped): the raw value shares the
//! request's, and an encoded form is made only when it differs from the raw one.

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

/// One form of a real value, and what it is put back to.
struct Needle {
    value: SecretValue,
    with: Bytes,
    /// Looked for in the body too (the secret's `scrub_response_body`).
    body: bool,
}

/// The real values one request carried, in the forms an origin may echo them in. Empty
/// (and free) when no secret was applied.
#[derive(Default)]
pub struct Echoes {
    needles: SmallVec<[Needle; 2]>,
    /// Shortest needle: a shorter header value or chunk holds none.
    min_len: usize,
}

impl Echoes {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` (a real value that went out) in its echoable forms, each put back to
    /// `placeholder`; `body`: looked for in the response body too. Values shorter than
    /// [`MIN_VALUE_LEN`] are ignored.
    pub fn add_value(&mut self, value: &SecretValue, placeholder: &str, body: bool) {
        let raw = value.expose();
        if raw.len() < MIN_VALUE_LEN {
            return;
        }
        let with = Bytes::copy_from_slice(placeholder.as_bytes());
        // One pass over the value says which other forms differ from it.
        let class = raw.iter().fold(0, |c, &b| c | CLASS[usize::from(b)]);
        // Not only unreserved bytes (RFC 3986 §2.3): the URL forms differ.
        if class & URL != 0 {
            let encoded = iron_policy::encoding::encode_component(raw);
            let form = encoded.replace("%20", "+");
            self.add(SecretValue::new(encoded.into_bytes()), with.clone(), body);
            self.add(SecretValue::new(form.into_bytes()), with.clone(), body);
        }
        // JSON escapes `"`, `\` and control characters; some encoders (PHP's json_encode)
        // `/` too.
        if class & JSON != 0
            && let Ok(text) = std::str::from_utf8(raw)
            && let Ok(json) = serde_json::to_string(text)
        {
            let json = &json[1..json.len() - 1];
            self.add(
                SecretValue::new(json.replace('/', "\\/").into_bytes()),
                with.clone(),
                body,
            );
            self.add(
                SecretValue::new(json.as_bytes().to_vec()),
                with.clone(),
                body,
            );
        }
        self.add(value.clone(), with, body);
    }

    /// Adds an exact form: `value` put back to `with` (a re-encoded `Basic` blob, put back
    /// to the client's own).
    pub fn add_exact(&mut self, value: &[u8], with: &[u8], body: bool) {
        if value.len() >= MIN_VALUE_LEN {
            self.add(
                SecretValue::new(value.to_vec()),
                Bytes::copy_from_slice(with),
                body,
            );
        }
    }

    fn add(&mut self, value: SecretValue, with: Bytes, body: bool) {
        if let Some(n) = self.needles.iter_mut().find(|n| n.value == value) {
            n.body |= body;
            return;
        }
        self.min_len = if self.needles.is_empty() {
            value.expose().len()
        } else {
            self.min_len.min(value.expose().len())
        };
        self.needles.push(Needle { value, with, body });
    }

    /// True when nothing is looked for.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// True when the response body is to be scrubbed.
    pub fn scrubs_body(&self) -> bool {
        self.needles.iter().any(|n| n.body)
    }

    /// Scrubs every value of `headers` (all forms).
    pub fn mask_headers(&self, headers: &mut HeaderMap) {
        if self.needles.is_empty() {
            return;
        }
        for v in headers.values_mut() {
            if v.len() < self.min_len {
                continue;
            }
            if let Some(masked) = self.scrub(v.as_bytes(), false, false)
                && let Ok(masked) = HeaderValue::from_bytes(&masked)
            {
                *v = masked;
            }
        }
    }

    /// The earliest match at or after `from` (the longest form on a tie): (start, needle).
    fn next_match(&self, hay: &[u8], from: usize, body: bool) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for (i, n) in self.needles.iter().enumerate() {
            if body && !n.body {
                continue;
            }
            let Some(p) = find_from(hay, from, n.value.expose()) else {
                continue;
            };
            let better = match best {
                None => true,
                Some((bp, bi)) => {
                    p < bp
                        || (p == bp
                            && n.value.expose().len() > self.needles[bi].value.expose().len())
                }
            };
            if better {
                best = Some((p, i));
            }
        }
        best
    }

    /// `hay` with every form put back (left to right, not overlapping), or `None` when it
    /// holds none. `body`: only the forms looked for in bodies. `fit`: each put-back is cut
    /// or padded with `*` to the length of what it replaces (a body whose `Content-Length`
    /// must stand).
    pub fn scrub(&self, hay: &[u8], body: bool, fit: bool) -> Option<Vec<u8>> {
        if hay.len() < self.min_len {
            return None;
        }
        let mut out = Vec::new();
        let mut last = 0;
        while let Some((p, i)) = self.next_match(hay, last, body) {
            let n = &self.needles[i];
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
        }
        (last > 0).then(|| {
            out.extend_from_slice(&hay[last..]);
            out
        })
    }

    /// How many bytes at the end of `hay` could begin a body form (a proper prefix of one):
    /// they are held back until the next chunk shows whether the form goes on.
    fn held_suffix(&self, hay: &[u8]) -> usize {
        let mut hold = 0;
        for n in self.needles.iter().filter(|n| n.body) {
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

/// The first occurrence of `needle` in `hay` at or after `from`.
fn find_from(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let last = hay.len().checked_sub(needle.len())?;
    let mut i = from;
    while i <= last {
        let p = i + memchr::memchr(needle[0], &hay[i..=last])?;
        if &hay[p..p + needle.len()] == needle {
            return Some(p);
        }
        i = p + 1;
    }
    None
}

/// A response body with the [`Echoes`] put back as it streams. Bytes at the end of a chunk
/// that could begin a real value are held until the next chunk (at most the longest form
/// less one byte), and sent when the body ends; when the body fails they are dropped with
/// it. Trailer values are scrubbed too. With no echoes it passes frames through untouched.
pub struct Scrubbed<B> {
    inner: B,
    echoes: Option<Echoes>,
    /// The body has a `Content-Length`: each echo is replaced by its placeholder cut or
    /// padded to the echo's length ([`Echoes::scrub`]), so the length stands.
    fit: bool,
    carry: Vec<u8>,
    /// A trailers frame that waits for the held bytes to go first.
    pending: Option<Frame<Bytes>>,
}

impl<B> Scrubbed<B> {
    /// Wraps `inner`; `echoes`: `None` (or none for bodies) passes it through. `fit`: the
    /// body's length must not change (it has a `Content-Length`).
    pub fn new(inner: B, echoes: Option<Echoes>, fit: bool) -> Self {
        Self {
            inner,
            echoes: echoes.filter(Echoes::scrubs_body),
            fit,
            carry: Vec::new(),
            pending: None,
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
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let buf = if this.carry.is_empty() {
                            data
                        } else {
                            let mut joined = std::mem::take(&mut this.carry);
                            joined.extend_from_slice(&data);
                            Bytes::from(joined)
                        };
                        let buf = echoes.scrub(&buf, true, this.fit).map_or(buf, Bytes::from);
                        let hold = echoes.held_suffix(&buf);
                        if hold > 0 {
                            this.carry.extend_from_slice(&buf[buf.len() - hold..]);
                        }
                        if hold < buf.len() {
                            return Poll::Ready(Some(Ok(Frame::data(
                                buf.slice(..buf.len() - hold),
                            ))));
                        }
                    }
                    Err(mut frame) => {
                        if let Some(t) = frame.trailers_mut() {
                            echoes.mask_headers(t);
                        }
                        if this.carry.is_empty() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        this.pending = Some(frame);
                        let held = std::mem::take(&mut this.carry);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(held)))));
                    }
                },
                Some(Err(e)) => {
                    this.carry.clear();
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    if this.carry.is_empty() {
                        return Poll::Ready(None);
                    }
                    // A proper prefix of a form at the very end: no form in it.
                    let held = std::mem::take(&mut this.carry);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(held)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.carry.is_empty() && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.echoes.is_some() && !self.fit {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

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
            let got = e.scrub(hay.as_bytes(), true, false).expect(hay);
            assert_eq!(String::from_utf8(got).unwrap(), want);
        }
        assert_eq!(e.scrub(b"nothing here at all", true, false), None);
        // Fitted to the echo's length: padded (19-byte value, 12-byte placeholder) or cut.
        assert_eq!(
            e.scrub(b"<ghp_REALvalue/123 x>", true, true).unwrap(),
            b"<GITHUB_TOKEN*******>"
        );
        let mut long = Echoes::new();
        long.add_value(
            &SecretValue::new(b"sk-12345".to_vec()),
            "OPENAI_API_KEY",
            true,
        );
        assert_eq!(
            long.scrub(b"k=sk-12345;", true, true).unwrap(),
            b"k=OPENAI_A;"
        );
        // A form put back to text that holds it is not searched again.
        let mut loops = Echoes::new();
        loops.add_exact(b"abcdefgh", b"xabcdefghx", true);
        assert_eq!(
            loops.scrub(b"abcdefgh", true, false).unwrap(),
            b"xabcdefghx"
        );
        let mut short = Echoes::new();
        short.add_value(&SecretValue::new(b"abc".to_vec()), "P", true);
        assert!(short.is_empty(), "a 3-byte value would match ordinary text");
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
            let out = Scrubbed::new(body, Some(echoes()), false)
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(&out[..], b"before GITHUB_TOKEN after ghp_", "cut at {cut}");
        }
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
        let collected = Scrubbed::new(body, Some(echoes()), false)
            .collect()
            .await
            .unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["x-echo"], "GITHUB_TOKEN");
        assert_eq!(&collected.to_bytes()[..], b"data ghp_RE");
    }
}
