//! WebSocket text messages rewritten as they are relayed (REFERENCE.md D22): a secret with
//! `websocket_frames = true` has its placeholder swapped for the value in the client's text
//! messages to its hosts, and its value put back to the placeholder in the server's (the
//! echo rule of D18, for frames).
//!
//! Only what can be rewritten whole is touched: a frame that is a complete text message
//! (FIN set, opcode 1), with no extension bits (RSV1–3 clear: the pipeline strips the
//! upgrade request's `Sec-WebSocket-Extensions`, so permessage-deflate is never agreed),
//! and at most [`MAX_REWRITTEN`] bytes long. Its payload is unmasked with the frame's own
//! key, rewritten, masked again with the same key, and sent under a new header carrying
//! the new length (RFC 6455 §5.2; §5.3 for masking). Every other frame (binary, control,
//! fragments of a longer message, oversized, or with extension bits) is relayed byte for
//! byte as it streams: a placeholder there is not swapped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Longest frame payload rewritten (1 MiB); a longer text frame is relayed as it is, so one
/// connection never holds more than this much of a message.
pub const MAX_REWRITTEN: u64 = 1 << 20;

/// One replacement: every occurrence of `from` in a rewritten frame becomes `to`.
#[derive(Clone)]
pub struct Rule {
    /// The bytes looked for (a placeholder, or a value for the server's direction).
    pub from: iron_broker::SecretValue,
    /// What they become.
    pub to: iron_broker::SecretValue,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rule([redacted])")
    }
}

/// The rules of one direction of a connection, and how many replacements they made.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Arc<[Rule]>,
    made: Arc<AtomicU64>,
}

impl Rules {
    /// `rules`, with a fresh count. Rules whose `from` is empty are dropped.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules: rules
                .into_iter()
                .filter(|r| !r.from.expose().is_empty())
                .collect(),
            made: Arc::default(),
        }
    }

    /// True when there is nothing to replace (frames then pass untouched, unparsed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Replacements made so far, in all frames.
    pub fn made(&self) -> u64 {
        self.made.load(Ordering::Relaxed)
    }

    /// `payload` with every occurrence of each rule's `from` replaced, scanning left to
    /// right (at one position the rule listed first wins; replaced bytes are not scanned
    /// again), and how many replacements were made. `None` when nothing matched.
    fn rewrite(&self, payload: &[u8]) -> Option<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut n = 0;
        loop {
            let next = self
                .rules
                .iter()
                .filter_map(|r| {
                    memchr::memmem::find(&payload[at..], r.from.expose()).map(|i| (at + i, r))
                })
                .min_by_key(|(i, _)| *i);
            let Some((i, rule)) = next else { break };
            if n == 0 {
                out.reserve(payload.len());
            }
            out.extend_from_slice(&payload[at..i]);
            out.extend_from_slice(rule.to.expose());
            at = i + rule.from.expose().len();
            n += 1;
        }
        if n == 0 {
            return None;
        }
        out.extend_from_slice(&payload[at..]);
        Some((out, n))
    }
}

/// A frame header as read (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    /// The first byte: FIN, RSV1–3 and the opcode.
    first: u8,
    /// The masking key, when the MASK bit is set.
    mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    len: u64,
    /// The header's own length in bytes (2 to 14).
    size: usize,
}

impl Header {
    /// Parses the header at the start of `b`; `None` until all of it is there.
    fn parse(b: &[u8]) -> Option<Header> {
        let (&first, rest) = b.split_first()?;
        let (&second, rest) = rest.split_first()?;
        let (len, rest, mut size) = match second & 0x7f {
            126 => {
                let (l, rest) = rest.split_first_chunk::<2>()?;
                (u64::from(u16::from_be_bytes(*l)), rest, 4)
            }
            127 => {
                let (l, rest) = rest.split_first_chunk::<8>()?;
                (u64::from_be_bytes(*l), rest, 10)
            }
            l => (u64::from(l), rest, 2),
        };
        let mask = if second & 0x80 != 0 {
            size += 4;
            Some(*rest.split_first_chunk::<4>()?.0)
        } else {
            None
        };
        Some(Header {
            first,
            mask,
            len,
            size,
        })
    }

    /// A complete, unextended text message small enough to rewrite.
    fn rewritable(&self) -> bool {
        self.first == 0x81 && self.len <= MAX_REWRITTEN
    }

    /// This header's bytes for a payload of `len` bytes (the shortest length encoding).
    fn encode(&self, len: usize, out: &mut Vec<u8>) {
        out.push(self.first);
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        match len {
            0..=125 => out.push(mask_bit | len as u8),
            126..=0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if let Some(m) = self.mask {
            out.extend_from_slice(&m);
        }
    }
}

/// XORs `data` with the masking key (RFC 6455 §5.3); masking and unmasking are the same.
fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Where the reader is in the frame stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Expecting a frame header.
    Header,
    /// Relaying this many more payload bytes as they are.
    Pass(u64),
    /// Collecting a rewritable frame's whole payload.
    Whole(Header),
}

/// A stream whose reads yield the WebSocket frames read from `inner` with [`Rules`] applied
/// to the rewritable ones (see the module docs); writes go to `inner` untouched. With no
/// rules it reads straight through. Bytes of a frame cut off by the end of the stream are
/// passed on as they are.
#[derive(Debug)]
pub struct Frames<T> {
    inner: T,
    rules: Rules,
    state: State,
    /// Bytes read from `inner` and not yet handled.
    input: Vec<u8>,
    /// Bytes ready for the reader, from `done` on.
    output: Vec<u8>,
    done: usize,
    eof: bool,
}

impl<T> Frames<T> {
    /// Reads frames from `inner`, applying `rules`.
    pub fn new(inner: T, rules: Rules) -> Self {
        Self {
            inner,
            rules,
            state: State::Header,
            input: Vec::new(),
            output: Vec::new(),
            done: 0,
            eof: false,
        }
    }

    /// Moves what `input` holds through the state machine into `output`, as far as it goes.
    fn process(&mut self) {
        loop {
            match self.state {
                State::Pass(0) => self.state = State::Header,
                State::Pass(left) => {
                    if self.input.is_empty() {
                        return;
                    }
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(self.input.len());
                    self.output.extend_from_slice(&self.input[..n]);
                    self.input.drain(..n);
                    self.state = State::Pass(left - n as u64);
                }
                State::Header => {
                    let Some(h) = Header::parse(&self.input) else {
                        return;
                    };
                    if h.rewritable() {
                        self.state = State::Whole(h);
                    } else {
                        self.output.extend_from_slice(&self.input[..h.size]);
                        self.input.drain(..h.size);
                        self.state = State::Pass(h.len);
                    }
                }
                State::Whole(h) => {
                    // `len` is at most MAX_REWRITTEN, so it fits.
                    let len = h.len as usize;
                    if self.input.len() < h.size + len {
                        return;
                    }
                    let frame = &self.input[h.size..h.size + len];
                    let mut payload = frame.to_vec();
                    if let Some(m) = h.mask {
                        apply_mask(&mut payload, m);
                    }
                    match self.rules.rewrite(&payload) {
                        Some((mut new, n)) => {
                            self.rules.made.fetch_add(n, Ordering::Relaxed);
                            if let Some(m) = h.mask {
                                apply_mask(&mut new, m);
                            }
                            h.encode(new.len(), &mut self.output);
                            self.output.extend_from_slice(&new);
                            zeroize::Zeroize::zeroize(&mut new);
                        }
                        None => self.output.extend_from_slice(&self.input[..h.size + len]),
                    }
                    zeroize::Zeroize::zeroize(&mut payload);
                    self.input.drain(..h.size + len);
                    self.state = State::Header;
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Frames<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.rules.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            if this.done < this.output.len() {
                let n = (this.output.len() - this.done).min(buf.remaining());
                buf.put_slice(&this.output[this.done..this.done + n]);
                this.done += n;
                if this.done == this.output.len() {
                    this.output.clear();
                    this.done = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A frame cut off by the end: its bytes go on as they are.
                if !this.input.is_empty() {
                    this.output.append(&mut this.input);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    this.input.extend_from_slice(rb.filled());
                    this.process();
                }
            }
        }
    }
}

crate::io::write_through!(Frames);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn rules(pairs: &[(&str, &str)]) -> Rules {
        Rules::new(
            pairs
                .iter()
                .map(|(f, t)| Rule {
                    from: iron_broker::SecretValue::new(f.as_bytes().to_vec()),
                    to: iron_broker::SecretValue::new(t.as_bytes().to_vec()),
                })
                .collect(),
        )
    }

    /// A frame with `first` (FIN, RSV, opcode) and `payload`, masked with `mask` if given.
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let h = Header {
            first,
            mask,
            len: payload.len() as u64,
            size: 0,
        };
        let mut out = Vec::new();
        h.encode(payload.len(), &mut out);
        let mut p = payload.to_vec();
        if let Some(m) = mask {
            apply_mask(&mut p, m);
        }
        out.extend_from_slice(&p);
        out
    }

    /// What `Frames` makes of `input` written in pieces of `step` bytes.
    async fn run(input: &[u8], r: Rules, step: usize) -> Vec<u8> {
        let (mut w, rd) = tokio::io::duplex(64);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in input.chunks(step.max(1)) {
                w.write_all(piece).await.unwrap();
            }
        });
        let mut f = Frames::new(rd, r);
        let mut out = Vec::new();
        f.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        out
    }

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    #[tokio::test]
    async fn a_masked_text_frame_gets_the_value_and_a_new_length() {
        let long = "v".repeat(200); // crosses the 125-byte length boundary
        for step in [1, 3, 7, 64, 4096] {
            let r = rules(&[("TOKEN", &long)]);
            let input = frame(0x81, b"{\"auth\":\"TOKEN\",\"again\":\"TOKEN\"}", Some(KEY));
            let out = run(&input, r.clone(), step).await;
            let want = format!("{{\"auth\":\"{long}\",\"again\":\"{long}\"}}");
            assert_eq!(out, frame(0x81, want.as_bytes(), Some(KEY)), "step {step}");
            assert_eq!(r.made(), 2);
        }
    }

    #[tokio::test]
    async fn an_unmasked_server_frame_has_the_value_put_back() {
        let r = rules(&[("real-value-123", "TOKEN")]);
        let input = frame(0x81, b"you sent real-value-123", None);
        let out = run(&input, r, 5).await;
        assert_eq!(out, frame(0x81, b"you sent TOKEN", None));
    }

    #[tokio::test]
    async fn other_frames_pass_byte_for_byte_and_the_stream_stays_in_step() {
        let r = rules(&[("TOKEN", "secret")]);
        let mut input = Vec::new();
        let big = vec![b'T'; 70_000]; // 64-bit length form, binary
        let cases = [
            frame(0x82, b"binary TOKEN", Some(KEY)), // binary
            frame(0x01, b"first TOKEN", Some(KEY)),  // a fragment (FIN clear)
            frame(0x80, b"last TOKEN", Some(KEY)),   // its continuation
            frame(0xc1, b"compressed TOKEN", None),  // RSV1 set
            frame(0x89, b"ping TOKEN", Some(KEY)),   // control
            frame(0x82, &big, None),
        ];
        for c in &cases {
            input.extend_from_slice(c);
        }
        // A text frame after them all is still found and rewritten.
        input.extend_from_slice(&frame(0x81, b"TOKEN", Some(KEY)));
        let out = run(&input, r.clone(), 1000).await;
        let mut want: Vec<u8> = cases.concat();
        want.extend_from_slice(&frame(0x81, b"secret", Some(KEY)));
        assert_eq!(out, want);
        assert_eq!(r.made(), 1);
    }

    #[tokio::test]
    async fn an_oversized_text_frame_and_a_cut_off_frame_pass_as_they_are() {
        let r = rules(&[("TOKEN", "secret")]);
        let mut big = vec![b'x'; usize::try_from(MAX_REWRITTEN).unwrap() + 1];
        big[..5].copy_from_slice(b"TOKEN");
        let input = frame(0x81, &big, Some(KEY));
        assert_eq!(run(&input, r.clone(), 8192).await, input);
        let cut = &frame(0x81, b"TOKEN and more", Some(KEY))[..9];
        assert_eq!(run(cut, r.clone(), 2).await, cut);
        assert_eq!(r.made(), 0);
    }

    #[test]
    fn rewrite_scans_once_left_to_right() {
        // The first rule listed wins at a position; a replacement is not scanned again.
        let r = rules(&[("AB", "B"), ("A", "x"), ("BB", "y")]);
        let (out, n) = r.rewrite(b"AAB BB").unwrap();
        assert_eq!((out.as_slice(), n), (&b"xB y"[..], 3));
        assert!(r.rewrite(b"nothing here").is_none());
    }

    #[test]
    fn headers_parse_all_three_length_forms() {
        for len in [0usize, 125, 126, 0xffff, 0x10000] {
            let h = Header {
                first: 0x81,
                mask: Some(KEY),
                len: len as u64,
                size: 0,
            };
            let mut b = Vec::new();
            h.encode(len, &mut b);
            let p = Header::parse(&b).unwrap();
            assert_eq!((p.len, p.mask, p.size), (len as u64, Some(KEY), b.len()));
            assert!(Header::parse(&b[..b.len() - 1]).is_none());
        }
    }
}
