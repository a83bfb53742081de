//! WebSocket messages rewritten as they are relayed (REFERENCE.md D22): a secret with
//! `websocket_frames = true` has its placeholder swapped for the value in the client's text
//! messages to its hosts, and the real values the connection carries, in every form an
//! origin may echo them in (raw, percent-encoded, JSON-escaped, … as for response headers,
//! [`crate::echo`]), put back to their placeholders in the server's messages.
//!
//! Only what can be rewritten whole is touched, and only without extension bits (RSV1–3
//! clear: the pipeline strips the upgrade request's `Sec-WebSocket-Extensions`, so
//! permessage-deflate is never agreed):
//! - from the client, text messages of at most [`MAX_REWRITTEN`] bytes;
//! - from the server, text and binary messages of at most [`MAX_SCRUBBED`] bytes, and
//!   control frames (Close, Ping, Pong), scrubbed to their own length.
//!
//! A message in one frame has its payload unmasked with the frame's key, rewritten, masked
//! again with a fresh key, and sent under a new header carrying the new length (RFC 6455
//! §5.2; §5.3 for masking). A message in fragments is put together, rewritten whole (a
//! placeholder or value split across fragments too) and sent as one frame: an
//! intermediary may change a message's fragmentation when no extension is agreed (§5.4).
//! Control frames between its fragments go ahead of it; a Close, a new message or the end
//! of the stream sends what was held as one fragment. Past the limit, what was put
//! together goes as one fragment and the server's later fragments are scrubbed one by one.
//! Every other frame (the client's binary messages, oversized frames, frames with
//! extension bits) is relayed byte for byte as it streams: a placeholder there is not
//! swapped, and a value the server sends there is not put back. A rewrite whose result
//! would pass the limit ends the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Longest client frame payload rewritten (1 MiB), before and after the swap: a longer
/// text frame is relayed as it is, and a swap that would make one longer (a message packed
/// with a short placeholder whose value is long) ends the connection with an error rather
/// than send it unswapped.
pub const MAX_REWRITTEN: usize = 1 << 20;

/// Longest server frame payload scrubbed (4 MiB), before and after: more than what the
/// client may send, so an origin that echoes a swapped message back inside a larger one
/// (with fields of its own around it) still has it scrubbed.
pub const MAX_SCRUBBED: usize = 4 << 20;

/// What one direction of a connection does to the text messages it reads.
#[derive(Default)]
enum Rewrite {
    /// Nothing: frames are read straight through, unparsed.
    #[default]
    None,
    /// Client to server: each placeholder becomes its value (leftmost-longest, one pass).
    Swap {
        placeholders: aho_corasick::AhoCorasick,
        values: Vec<iron_broker::SecretValue>,
    },
    /// Server to client: each value, in every form an origin may echo it in, is put back
    /// to its placeholder ([`crate::echo::Echoes`], as in response headers).
    Scrub(crate::echo::Echoes),
}

/// The rewrite of one direction of a connection, how many replacements it made, and
/// whether it ended the connection (a message past its limit).
#[derive(Clone, Default)]
pub struct Rules {
    rewrite: Arc<Rewrite>,
    made: Arc<AtomicU64>,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rules([redacted])")
    }
}

/// The error a rewrite past its limit ends the connection with.
fn too_large(limit: usize) -> io::Error {
    io::Error::other(format!(
        "a WebSocket message would pass {} MiB once rewritten",
        limit >> 20
    ))
}

impl Rules {
    /// Client to server: each `(placeholder, value)` pair's placeholder becomes the value.
    /// Empty placeholders are dropped; none left reads straight through.
    pub fn swap(pairs: Vec<(Vec<u8>, iron_broker::SecretValue)>) -> Self {
        let pairs: Vec<_> = pairs.into_iter().filter(|(p, _)| !p.is_empty()).collect();
        if pairs.is_empty() {
            return Self::default();
        }
        let built = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(pairs.iter().map(|(p, _)| p));
        match built {
            Ok(placeholders) => Self {
                rewrite: Arc::new(Rewrite::Swap {
                    placeholders,
                    values: pairs.into_iter().map(|(_, v)| v).collect(),
                }),
                ..Self::default()
            },
            // Only a pattern set past the automaton's size limits fails; placeholders are
            // short names, so this is not expected. Frames then go unrewritten.
            Err(_) => Self::default(),
        }
    }

    /// Server to client: every form of the values in `echoes` is put back.
    pub fn scrub(echoes: crate::echo::Echoes) -> Self {
        if echoes.is_empty() {
            return Self::default();
        }
        Self {
            rewrite: Arc::new(Rewrite::Scrub(echoes)),
            ..Self::default()
        }
    }

    /// True when there is nothing to replace (frames then pass untouched, unparsed).
    pub fn is_empty(&self) -> bool {
        matches!(*self.rewrite, Rewrite::None)
    }

    /// Replacements made so far, in all frames.
    pub fn made(&self) -> u64 {
        self.made.load(Ordering::Relaxed)
    }

    /// True when a message past the limit ended the connection.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Longest frame payload this direction rewrites, before and after.
    fn limit(&self) -> usize {
        match *self.rewrite {
            Rewrite::Scrub(_) => MAX_SCRUBBED,
            _ => MAX_REWRITTEN,
        }
    }

    /// `payload` rewritten and how many replacements were made; `Ok(None)` when nothing
    /// matched.
    ///
    /// # Errors
    /// [`too_large`] when the result would pass [`Rules::limit`].
    fn rewrite(&self, payload: &[u8]) -> io::Result<Option<(Vec<u8>, u64)>> {
        match &*self.rewrite {
            Rewrite::None => Ok(None),
            Rewrite::Swap {
                placeholders,
                values,
            } => {
                let mut out = Vec::new();
                let mut at = 0;
                let mut n = 0;
                for m in placeholders.find_iter(payload) {
                    let value = values[m.pattern().as_usize()].expose();
                    if out.len() + (m.start() - at) + value.len() > MAX_REWRITTEN {
                        zeroize::Zeroize::zeroize(&mut out);
                        return Err(too_large(MAX_REWRITTEN));
                    }
                    out.extend_from_slice(&payload[at..m.start()]);
                    out.extend_from_slice(value);
                    at = m.end();
                    n += 1;
                }
                if n == 0 {
                    return Ok(None);
                }
                if out.len() + (payload.len() - at) > MAX_REWRITTEN {
                    zeroize::Zeroize::zeroize(&mut out);
                    return Err(too_large(MAX_REWRITTEN));
                }
                out.extend_from_slice(&payload[at..]);
                Ok(Some((out, n)))
            }
            Rewrite::Scrub(echoes) => {
                let scrubbed = echoes.scrub(payload, crate::echo::Scope::Header, false);
                match scrubbed {
                    Some((out, _)) if out.len() > MAX_SCRUBBED => Err(too_large(MAX_SCRUBBED)),
                    other => Ok(other),
                }
            }
        }
    }

    /// `payload` with every echo put back, each cut or padded with `*` to the length of
    /// what it replaces, and how many were; `None` when nothing matched or this direction
    /// does not scrub.
    fn scrub_fit(&self, payload: &[u8]) -> Option<(Vec<u8>, u64)> {
        match &*self.rewrite {
            Rewrite::Scrub(echoes) => echoes.scrub(payload, crate::echo::Scope::Header, true),
            _ => None,
        }
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

/// XORs `data` with a fresh masking key and returns it, for a frame the proxy writes anew
/// (RFC 6455 §5.3: the key must be unpredictable; the client's own is known to the client).
/// Falls back to `fallback` (the client's key) if the system's random source fails.
fn mask_fresh(data: &mut [u8], fallback: [u8; 4]) -> [u8; 4] {
    let mut key = [0u8; 4];
    if crate::crypto_provider()
        .secure_random
        .fill(&mut key)
        .is_err()
    {
        key = fallback;
    }
    apply_mask(data, key);
    key
}

/// What a frame's payload, collected whole, is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// A whole message in one frame: rewritten and sent as one frame.
    Message,
    /// A fragment of a message being put together (RFC 6455 §5.4), rewritten whole when
    /// its last fragment is in and sent as one frame.
    Fragment,
    /// A fragment of a message that is not put together (past the limit), from the
    /// server: scrubbed on its own.
    Alone,
    /// A control frame from the server (Close, Ping, Pong): scrubbed to the same length.
    Control,
}

/// Where the reader is in the frame stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Expecting a frame header.
    Header,
    /// Relaying this many more payload bytes as they are.
    Pass(u64),
    /// Collecting a frame's whole payload, for `Use`.
    Whole(Header, Use),
}

/// Where the reader is in a fragmented message (RFC 6455 §5.4).
#[derive(Default)]
enum Message {
    /// Between messages, or in one whose fragments go through as they come (from the
    /// client a binary message; a message past the limit; frames with extension bits).
    #[default]
    Streaming,
    /// Being put together: the first fragment's opcode, whether its frames are masked
    /// (the client's), the mask of the first, and the payload so far, unmasked.
    Held {
        opcode: u8,
        mask: Option<[u8; 4]>,
        payload: zeroize::Zeroizing<Vec<u8>>,
    },
}

/// A stream whose reads yield the WebSocket frames read from `inner` with [`Rules`] applied
/// (see the module docs); writes go to `inner` untouched. With no rules it reads straight
/// through. A fragmented message that is rewritten is put together and sent as one frame
/// (an intermediary may change the fragmentation of a message when no extension is
/// agreed, RFC 6455 §5.4); control frames between its fragments go ahead of it. Bytes of
/// a frame cut off by the end of the stream are passed on as they are, after what was held
/// of an unfinished message.
pub struct Frames<T> {
    inner: T,
    rules: Rules,
    state: State,
    message: Message,
    /// Bytes read from `inner` and not yet handled.
    input: Vec<u8>,
    /// Bytes ready for the reader, from `done` on.
    output: Vec<u8>,
    done: usize,
    eof: bool,
}

impl<T> std::fmt::Debug for Frames<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frames")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<T> Frames<T> {
    /// Reads frames from `inner`, applying `rules`.
    pub fn new(inner: T, rules: Rules) -> Self {
        Self {
            inner,
            rules,
            state: State::Header,
            message: Message::Streaming,
            input: Vec::new(),
            output: Vec::new(),
            done: 0,
            eof: false,
        }
    }

    /// What to do with the frame `h` heads: collect its payload for a [`Use`], or `None`
    /// to relay it as it is. Flushes a held message that the frame ends (a Close, a new
    /// message, or a fragment that would take it past the limit).
    ///
    /// # Errors
    /// The flushed message's rewrite passes the limit.
    fn classify(&mut self, h: &Header) -> io::Result<Option<Use>> {
        let scrub = matches!(*self.rules.rewrite, Rewrite::Scrub(_));
        let limit = self.rules.limit() as u64;
        let opcode = h.first & 0x0f;
        let fin = h.first & 0x80 != 0;
        let plain = h.first & 0x70 == 0;
        if opcode >= 8 {
            // No data frame follows a Close: what was held goes now.
            if opcode == 8 {
                self.flush_held()?;
            }
            return Ok((scrub && plain && h.len <= 125).then_some(Use::Control));
        }
        if opcode == 0 {
            if let Message::Held { payload, .. } = &self.message {
                if plain && (payload.len() as u64).saturating_add(h.len) <= limit {
                    return Ok(Some(Use::Fragment));
                }
                self.flush_held()?;
            }
            return Ok((scrub && plain && h.len <= limit).then_some(Use::Alone));
        }
        // A new message; one held and unfinished (the sender broke off) goes first.
        self.flush_held()?;
        let wanted = plain && h.len <= limit && (opcode == 1 || (scrub && opcode == 2));
        Ok(match (wanted, fin) {
            (true, true) => Some(Use::Message),
            (true, false) => Some(Use::Fragment),
            (false, _) => None,
        })
    }

    /// Sends a held, unfinished message's payload so far, rewritten, as one fragment
    /// (FIN clear); its later fragments, if any come, are handled one by one.
    ///
    /// # Errors
    /// The rewrite passes the limit.
    fn flush_held(&mut self) -> io::Result<()> {
        if let Message::Held { .. } = self.message
            && let Message::Held {
                opcode,
                mask,
                payload,
            } = std::mem::take(&mut self.message)
        {
            self.send(opcode, mask, &payload)?;
        }
        Ok(())
    }

    /// Writes a frame with first byte `first`, masked if `mask` is (with a fresh key) and
    /// `payload` rewritten, to the output.
    ///
    /// # Errors
    /// The rewrite passes the limit.
    fn send(&mut self, first: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> io::Result<()> {
        let rewritten = self.rules.rewrite(payload)?;
        let (body, n) = match &rewritten {
            Some((new, n)) => (&new[..], *n),
            None => (payload, 0),
        };
        self.rules.made.fetch_add(n, Ordering::Relaxed);
        let mut masked = zeroize::Zeroizing::new(body.to_vec());
        let mask = mask.map(|m| mask_fresh(&mut masked, m));
        Header {
            first,
            mask,
            len: 0,
            size: 0,
        }
        .encode(masked.len(), &mut self.output);
        self.output.extend_from_slice(&masked);
        if let Some((mut new, _)) = rewritten {
            zeroize::Zeroize::zeroize(&mut new);
        }
        Ok(())
    }

    /// Moves what `input` holds through the state machine into `output`, as far as it goes.
    ///
    /// # Errors
    /// A rewrite past the direction's limit.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::Pass(0) => self.state = State::Header,
                State::Pass(left) => {
                    if self.input.is_empty() {
                        return Ok(());
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
                        return Ok(());
                    };
                    if let Some(u) = self.classify(&h)? {
                        self.state = State::Whole(h, u);
                    } else {
                        self.output.extend_from_slice(&self.input[..h.size]);
                        self.input.drain(..h.size);
                        self.state = State::Pass(h.len);
                    }
                }
                State::Whole(h, u) => {
                    // `len` is at most the direction's limit, so it fits.
                    let len = h.len as usize;
                    if self.input.len() < h.size + len {
                        return Ok(());
                    }
                    let mut payload =
                        zeroize::Zeroizing::new(self.input[h.size..h.size + len].to_vec());
                    if let Some(m) = h.mask {
                        apply_mask(&mut payload, m);
                    }
                    self.finish(h, u, payload)?;
                    self.input.drain(..h.size + len);
                    self.state = State::Header;
                }
            }
        }
    }

    /// Handles the frame `h` (still at the front of `input`) whose whole `payload`,
    /// unmasked, is in, for `u`.
    ///
    /// # Errors
    /// A rewrite past the direction's limit.
    fn finish(
        &mut self,
        h: Header,
        u: Use,
        mut payload: zeroize::Zeroizing<Vec<u8>>,
    ) -> io::Result<()> {
        let raw = h.size + payload.len();
        match u {
            Use::Message | Use::Alone => match self.rules.rewrite(&payload)? {
                Some((new, n)) => {
                    self.rules.made.fetch_add(n, Ordering::Relaxed);
                    let mut new = zeroize::Zeroizing::new(new);
                    let mask = h.mask.map(|m| mask_fresh(&mut new, m));
                    Header { mask, ..h }.encode(new.len(), &mut self.output);
                    self.output.extend_from_slice(&new);
                }
                None => self.output.extend_from_slice(&self.input[..raw]),
            },
            Use::Control => {
                // A Close frame's status code stays; the same length keeps it a valid
                // control frame (at most 125 bytes).
                let from = if h.first & 0x0f == 8 {
                    2.min(payload.len())
                } else {
                    0
                };
                match self.rules.scrub_fit(&payload[from..]) {
                    Some((new, n)) => {
                        self.rules.made.fetch_add(n, Ordering::Relaxed);
                        payload[from..].copy_from_slice(&new);
                        let mask = h.mask.map(|m| mask_fresh(&mut payload, m));
                        Header { mask, ..h }.encode(payload.len(), &mut self.output);
                        self.output.extend_from_slice(&payload);
                    }
                    None => self.output.extend_from_slice(&self.input[..raw]),
                }
            }
            Use::Fragment => {
                match &mut self.message {
                    Message::Held { payload: held, .. } => {
                        // Grown into a new buffer, so the old one is zeroized as it goes
                        // (a plain extend would free it as it is).
                        let need = held.len() + payload.len();
                        if held.capacity() < need {
                            let mut grown = zeroize::Zeroizing::new(Vec::with_capacity(
                                need.next_power_of_two(),
                            ));
                            grown.extend_from_slice(held);
                            *held = grown;
                        }
                        held.extend_from_slice(&payload);
                    }
                    Message::Streaming => {
                        self.message = Message::Held {
                            opcode: h.first & 0x0f,
                            mask: h.mask,
                            payload: std::mem::take(&mut payload),
                        }
                    }
                }
                if h.first & 0x80 != 0
                    && let Message::Held {
                        opcode,
                        mask,
                        payload,
                    } = std::mem::take(&mut self.message)
                {
                    self.send(0x80 | opcode, mask, &payload)?;
                }
            }
        }
        Ok(())
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
                // An unfinished message goes as far as it came, rewritten; a frame cut
                // off by the end goes on as it is.
                if let Err(e) = this.flush_held() {
                    this.rules.failed.store(true, Ordering::Relaxed);
                    return Poll::Ready(Err(e));
                }
                if !this.output.is_empty() {
                    continue;
                }
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
                    if let Err(e) = this.process() {
                        this.rules.failed.store(true, Ordering::Relaxed);
                        tracing::warn!(error = %e, "WebSocket connection ended");
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }
}

crate::io::write_through!(Frames);

/// Relays an upgraded (WebSocket) connection between the client's stream and the
/// upstream's ([`crate::io::relay_through`]), each direction read through [`Frames`] with
/// its rules (none: the bytes pass unparsed). The meter sits below the frames, so a
/// message held back until it is whole still counts as traffic for `idle`, and the byte
/// counts returned, (client to upstream, upstream to client), are of the bytes as read.
pub async fn relay<A, B>(
    client: A,
    upstream: B,
    idle: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
    to_server: Rules,
    to_client: Rules,
) -> (u64, u64)
where
    A: AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    crate::io::relay_through(
        client,
        upstream,
        idle,
        stop,
        move |c| Frames::new(c, to_server),
        move |u| Frames::new(u, to_client),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use iron_broker::SecretValue;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn swap(pairs: &[(&str, &str)]) -> Rules {
        Rules::swap(
            pairs
                .iter()
                .map(|(p, v)| {
                    (
                        p.as_bytes().to_vec(),
                        SecretValue::new(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
        )
    }

    fn scrub(value: &str, placeholder: &str) -> Rules {
        let mut e = crate::echo::Echoes::new();
        e.add_value(
            &SecretValue::new(value.as_bytes().to_vec()),
            placeholder,
            true,
        );
        Rules::scrub(e)
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
    async fn run(input: &[u8], r: Rules, step: usize) -> io::Result<Vec<u8>> {
        let (mut w, rd) = tokio::io::duplex(64);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in input.chunks(step.max(1)) {
                if w.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        let mut f = Frames::new(rd, r);
        let mut out = Vec::new();
        let read = f.read_to_end(&mut out).await;
        drop(f);
        writer.await.unwrap();
        read.map(|_| out)
    }

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// The frames in `b`, each as (first byte, masked, payload unmasked); panics on bytes
    /// left over.
    fn frames_of(mut b: &[u8]) -> Vec<(u8, bool, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(h) = Header::parse(b) {
            let len = h.len as usize;
            let mut p = b[h.size..h.size + len].to_vec();
            if let Some(m) = h.mask {
                apply_mask(&mut p, m);
            }
            out.push((h.first, h.mask.is_some(), p));
            b = &b[h.size + len..];
        }
        assert!(b.is_empty(), "{} bytes after the last frame", b.len());
        out
    }

    #[tokio::test]
    async fn a_masked_text_frame_gets_the_value_and_a_new_length() {
        let long = "v".repeat(200); // crosses the 125-byte length boundary
        for step in [1, 3, 7, 64, 4096] {
            let r = swap(&[("TOKEN", &long)]);
            let input = frame(0x81, b"{\"auth\":\"TOKEN\",\"again\":\"TOKEN\"}", Some(KEY));
            let out = run(&input, r.clone(), step).await.unwrap();
            let want = format!("{{\"auth\":\"{long}\",\"again\":\"{long}\"}}");
            // Masked again, with a key of the proxy's own.
            assert_eq!(
                frames_of(&out),
                [(0x81, true, want.into_bytes())],
                "step {step}"
            );
            assert_eq!(r.made(), 2);
        }
    }

    #[tokio::test]
    async fn the_longest_placeholder_wins_where_two_start_together() {
        let r = swap(&[("TOKEN", "one"), ("TOKEN_2", "two")]);
        let out = run(&frame(0x81, b"TOKEN_2 TOKEN", None), r, 4)
            .await
            .unwrap();
        assert_eq!(out, frame(0x81, b"two one", None));
    }

    #[tokio::test]
    async fn a_server_frame_has_the_value_put_back_in_its_echoed_forms() {
        let value = "ghp_a/b+c=real-value";
        for (sent, want) in [
            (format!("you sent {value}"), "you sent TOKEN"),
            // JSON-escaped, as a JSON encoder that escapes `/` writes it.
            (
                format!(r#"{{"t":"{}"}}"#, value.replace('/', "\\/")),
                r#"{"t":"TOKEN"}"#,
            ),
        ] {
            let r = scrub(value, "TOKEN");
            let out = run(&frame(0x81, sent.as_bytes(), None), r.clone(), 5)
                .await
                .unwrap();
            assert_eq!(out, frame(0x81, want.as_bytes(), None), "{sent}");
            assert_eq!(r.made(), 1);
        }
    }

    /// From the server every data frame is scrubbed: a binary frame, a fragmented
    /// message put together (a value split across its fragments too), and control frames
    /// to their own length (a Close keeps its status code); a frame with extension bits is
    /// not.
    #[tokio::test]
    async fn the_server_s_binary_frames_fragments_and_control_frames_are_scrubbed_too() {
        let value = "real-value-123";
        let r = scrub(value, "TOKEN");
        let sent = [
            frame(0x82, b"bin real-value-123", None),
            frame(0x01, b"first real-value-123 and real-val", None),
            frame(0x89, b"ping real-value-123", None),
            frame(0x00, b"ue-1", None),
            frame(0x80, b"23 last", None),
            frame(0xc1, b"deflated real-value-123", None),
            frame(0x88, b"\x03\xe8bad real-value-123", None),
        ];
        for step in [1, 3, 4096] {
            let out = run(&sent.concat(), r.clone(), step).await.unwrap();
            assert_eq!(
                frames_of(&out),
                [
                    (0x82, false, b"bin TOKEN".to_vec()),
                    (0x89, false, b"ping TOKEN*********".to_vec()),
                    (0x81, false, b"first TOKEN and TOKEN last".to_vec()),
                    (0xc1, false, b"deflated real-value-123".to_vec()),
                    (0x88, false, b"\x03\xe8bad TOKEN*********".to_vec()),
                ],
                "step {step}"
            );
        }
        assert_eq!(r.made(), 3 * 5);
    }

    /// The client's text message in fragments is put together, swapped (a placeholder split
    /// across fragments too) and sent as one frame; a ping between its fragments goes ahead
    /// of it.
    #[tokio::test]
    async fn a_fragmented_text_message_is_put_together_and_swapped() {
        let r = swap(&[("TOKEN", "secret")]);
        let sent = [
            frame(0x01, b"abc TOK", Some(KEY)),
            frame(0x89, b"p", Some(KEY)),
            frame(0x00, b"EN def", Some(KEY)),
            frame(0x80, b" TOKEN", Some(KEY)),
        ];
        for step in [1, 5, 4096] {
            let out = run(&sent.concat(), r.clone(), step).await.unwrap();
            assert_eq!(
                frames_of(&out),
                [
                    (0x89, true, b"p".to_vec()),
                    (0x81, true, b"abc secret def secret".to_vec()),
                ],
                "step {step}"
            );
        }
        assert_eq!(r.made(), 3 * 2);
    }

    /// A binary message from the client goes as it is, fragments and all; a Close in the
    /// middle of a text message sends what was held first (swapped, as a fragment); an
    /// unfinished message at the end of the stream too.
    #[tokio::test]
    async fn unfinished_and_binary_messages_from_the_client() {
        let r = swap(&[("TOKEN", "secret")]);
        let binary = [
            frame(0x02, b"TOKEN", Some(KEY)),
            frame(0x80, b"TOKEN", Some(KEY)),
        ]
        .concat();
        let close = frame(0x88, b"\x03\xe8", Some(KEY));
        let sent = [
            binary.clone(),
            frame(0x01, b"abc TOKEN", Some(KEY)),
            close.clone(),
        ]
        .concat();
        let out = run(&sent, r.clone(), 3).await.unwrap();
        assert_eq!(out[..binary.len()], binary[..]);
        assert_eq!(
            frames_of(&out[binary.len()..]),
            [
                (0x01, true, b"abc secret".to_vec()),
                (0x88, true, b"\x03\xe8".to_vec()),
            ]
        );
        let out = run(&frame(0x01, b"TOKEN to be", Some(KEY)), r.clone(), 2)
            .await
            .unwrap();
        assert_eq!(frames_of(&out), [(0x01, true, b"secret to be".to_vec())]);
        assert_eq!(r.made(), 2);
    }

    /// A server message whose fragments pass the limit together: what was put together
    /// goes as one fragment, scrubbed, and the fragments after it are scrubbed one by one.
    #[tokio::test]
    async fn a_fragmented_message_past_the_limit_is_scrubbed_in_parts() {
        let r = scrub("real-value-123", "TOKEN");
        let part = |first: u8| {
            let mut p = vec![b'x'; MAX_SCRUBBED / 2 - 100];
            p.extend_from_slice(b"real-value-123");
            frame(first, &p, None)
        };
        let sent = [part(0x01), part(0x00), part(0x80)].concat();
        let out = run(&sent, r.clone(), 65536).await.unwrap();
        let got = frames_of(&out);
        let scrubbed = |n: usize| {
            let mut p = Vec::new();
            for _ in 0..n {
                p.extend(std::iter::repeat_n(b'x', MAX_SCRUBBED / 2 - 100));
                p.extend_from_slice(b"TOKEN");
            }
            p
        };
        assert_eq!(got.len(), 2);
        assert!(
            got[0] == (0x01, false, scrubbed(2)),
            "the first two, put together"
        );
        assert!(got[1] == (0x80, false, scrubbed(1)), "the last, on its own");
        assert_eq!(r.made(), 3);
    }

    #[tokio::test]
    async fn other_frames_pass_byte_for_byte_and_the_stream_stays_in_step() {
        let r = swap(&[("TOKEN", "secret")]);
        let mut input = Vec::new();
        let big = vec![b'T'; 70_000]; // 64-bit length form, binary
        let cases = [
            frame(0x82, b"binary TOKEN", Some(KEY)), // binary
            frame(0xc1, b"compressed TOKEN", None),  // RSV1 set
            frame(0x89, b"ping TOKEN", Some(KEY)),   // control
            frame(0x82, &big, None),
        ];
        for c in &cases {
            input.extend_from_slice(c);
        }
        // A text frame after them all is still found and rewritten.
        input.extend_from_slice(&frame(0x81, b"TOKEN", Some(KEY)));
        let out = run(&input, r.clone(), 1000).await.unwrap();
        let passed = cases.concat();
        assert_eq!(out[..passed.len()], passed[..]);
        assert_eq!(
            frames_of(&out[passed.len()..]),
            [(0x81, true, b"secret".to_vec())]
        );
        assert_eq!(r.made(), 1);
    }

    #[tokio::test]
    async fn an_oversized_text_frame_and_a_cut_off_frame_pass_as_they_are() {
        let r = swap(&[("TOKEN", "secret")]);
        let mut big = vec![b'x'; MAX_REWRITTEN + 1];
        big[..5].copy_from_slice(b"TOKEN");
        let input = frame(0x81, &big, Some(KEY));
        assert_eq!(run(&input, r.clone(), 8192).await.unwrap(), input);
        let cut = &frame(0x81, b"TOKEN and more", Some(KEY))[..9];
        assert_eq!(run(cut, r.clone(), 2).await.unwrap(), cut);
        assert_eq!(r.made(), 0);
    }

    /// A message packed with a short placeholder whose value is long would grow past
    /// [`MAX_REWRITTEN`]: the read fails (the relay ends) instead of sending it unswapped.
    #[tokio::test]
    async fn a_message_that_would_grow_past_the_cap_ends_the_stream() {
        let value = "v".repeat(4096);
        let r = swap(&[("TK", &value)]);
        let payload = "TK".repeat(2048); // 4 KiB in, 8 MiB out
        let e = run(&frame(0x81, payload.as_bytes(), Some(KEY)), r.clone(), 4096)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("1 MiB"), "{e}");
        assert!(r.failed());
    }

    /// The origin may echo a swapped message (up to 1 MiB) inside a larger one of its own:
    /// server frames are scrubbed up to 4 MiB.
    #[tokio::test]
    async fn a_server_frame_past_1_mib_is_still_scrubbed() {
        let r = scrub("real-value-123", "TOKEN");
        let mut big = vec![b'x'; MAX_REWRITTEN + 4096];
        big.extend_from_slice(b"real-value-123");
        let out = run(&frame(0x81, &big, None), r.clone(), 65536)
            .await
            .unwrap();
        let mut want = vec![b'x'; MAX_REWRITTEN + 4096];
        want.extend_from_slice(b"TOKEN");
        assert_eq!(out, frame(0x81, &want, None));
        assert_eq!(r.made(), 1);
    }

    /// A message that arrives in pieces slower than the idle timeout allows for the whole:
    /// each piece is traffic for the relay's idle timeout though the rewrite holds it back
    /// until the frame is whole (the meter sits below the frames, `relay_through`). Paused time: the pieces come
    /// 120 ms apart over ~900 ms, the idle timeout is 300 ms.
    #[tokio::test(start_paused = true)]
    async fn a_message_arriving_slowly_is_not_cut_by_the_idle_timeout() {
        let r = swap(&[("TOKEN", "secret")]);
        let (client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(
            a,
            b,
            std::time::Duration::from_millis(300),
            std::future::pending(),
            r,
            Rules::default(),
        ));
        let f = frame(0x81, b"TOKEN and some more text", Some(KEY));
        let (_client_read, mut client_write) = tokio::io::split(client);
        for piece in f.chunks(4) {
            client_write.write_all(piece).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        }
        let want = b"secret and some more text";
        let mut got = vec![0u8; frame(0x81, want, Some(KEY)).len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(frames_of(&got), [(0x81, true, want.to_vec())]);
        drop(client_write);
        drop(server);
        let (up, _) = relay.await.unwrap();
        assert_eq!(up, f.len() as u64, "bytes counted as they came");
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
