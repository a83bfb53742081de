//! Byte-stream plumbing: a stream with bytes already read from it put back in front (so
//! the tunnel can peek at the first byte — 0x16: TLS; an ASCII letter: cleartext HTTP —
//! and then hand the whole stream on), and [`relay`], the two-way copy of passthrough
//! tunnels, upgraded connections and the Postgres relay.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, read as `prefix` followed by the rest of `inner`.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    /// Puts `prefix` back in front of `inner`.
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// `impl AsyncWrite for $ty<T>` that passes every write straight to the wrapper's `inner`
/// field: for read-side wrappers ([`Prefixed`], the Postgres statement filter).
macro_rules! write_through {
    ($ty:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}
pub(crate) use write_through;

write_through!(Prefixed);

/// Copies bytes both ways between `a` and `b` until both directions have ended, an error
/// occurs, nothing moves in either direction for `idle`, or `stop` completes (the Postgres
/// relay's shutdown; `std::future::pending()` for never). Returns the bytes read from `a`
/// (towards `b`) and from `b` (towards `a`). Used for passthrough tunnels, upgraded
/// (WebSocket) connections and the Postgres relay.
///
/// The copy is tokio's [`tokio::io::copy_bidirectional_with_sizes`] (16 KiB each way): both
/// directions in one future, so a writer blocked on a full peer never stops the other
/// direction from being read (a client pipelining a large batch while the server streams
/// results would otherwise deadlock); buffered output is flushed whenever its reader has
/// nothing more (a TLS writer may keep encrypted records until flushed). End of input in one
/// direction shuts down the write side of the other peer (half-close) and the other
/// direction goes on; an error in either ends both.
pub async fn relay<A, B>(
    a: A,
    b: B,
    idle: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_through(a, b, idle, stop, |a| a, |b| b).await
}

/// As [`relay`], with each side wrapped (`wrap_a`, `wrap_b`) once it is metered: the idle
/// clock and the byte counts see what is read from `a` and `b` themselves, also while a
/// wrapper holds it back (a WebSocket message collected whole before it is rewritten,
/// [`crate::ws::Frames`]).
pub async fn relay_through<A, B, WA, WB>(
    a: A,
    b: B,
    idle: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
    wrap_a: impl FnOnce(Metered<A>) -> WA,
    wrap_b: impl FnOnce(Metered<B>) -> WB,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    WA: AsyncRead + AsyncWrite + Unpin,
    WB: AsyncRead + AsyncWrite + Unpin,
{
    const BUF: usize = 16 * 1024;
    let meter = std::sync::Arc::new(Meter {
        start: tokio::time::Instant::now(),
        last: AtomicU64::new(0),
        read: [AtomicU64::new(0), AtomicU64::new(0)],
    });
    let mut a = wrap_a(Metered::new(a, meter.clone(), 0));
    let mut b = wrap_b(Metered::new(b, meter.clone(), 1));
    {
        let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUF, BUF);
        tokio::pin!(copy, stop);
        let tick = (idle / 4).max(std::time::Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = &mut copy => break,
                () = &mut stop => break,
                () = tokio::time::sleep(tick) => {
                    let moved = std::time::Duration::from_millis(meter.last.load(Ordering::Relaxed));
                    if meter.start.elapsed().saturating_sub(moved) >= idle {
                        break;
                    }
                }
            }
        }
    }
    (
        meter.read[0].load(Ordering::Relaxed),
        meter.read[1].load(Ordering::Relaxed),
    )
}

/// What a [`relay`] measures: when it started, the last time a byte moved, bytes read from
/// each side.
#[derive(Debug)]
pub struct Meter {
    start: tokio::time::Instant,
    /// Milliseconds since `start` of the last byte moved in either direction.
    last: AtomicU64,
    read: [AtomicU64; 2],
}

/// A stream that counts the bytes read from it and marks the time of each read or write
/// (for [`relay`]'s idle timeout).
#[derive(Debug)]
pub struct Metered<T> {
    inner: T,
    meter: std::sync::Arc<Meter>,
    side: usize,
}

impl<T> Metered<T> {
    fn new(inner: T, meter: std::sync::Arc<Meter>, side: usize) -> Self {
        Self { inner, meter, side }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.meter.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.meter.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.meter.read[self.side].fetch_add(n as u64, Ordering::Relaxed);
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A client-side stream whose writes fail with `TimedOut` once one has made no progress
/// for `limit` (a `poll_write`, `poll_flush` or `poll_shutdown` pending that long): a client
/// that stops reading cannot hold its connection slot, its request and the upstream
/// connection behind it forever. hyper stops polling a response body while it cannot flush
/// (so the body's own idle cut, `crate::body::Idle`, never runs then), and its header
/// timeout covers only reads. The timer is armed only while a write is pending: a write that
/// completes costs one branch.
#[derive(Debug)]
pub struct WriteStall<T> {
    inner: T,
    limit: std::time::Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteStall<T> {
    /// Wraps `inner`; `limit` is the longest a write may stay pending.
    pub fn new(inner: T, limit: std::time::Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes `r` on; a `Pending` arms the timer (once per stall) and turns into `TimedOut`
    /// when it has run out.
    fn bound<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bound(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bound(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.bound(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bound(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// A write the peer does not read fails with `TimedOut` after the limit; one the peer
    /// reads goes through, however long the stream lives.
    #[tokio::test]
    async fn a_write_pending_past_the_limit_times_out() {
        use tokio::io::AsyncWriteExt as _;
        let (near, mut far) = tokio::io::duplex(64);
        let mut s = WriteStall::new(near, std::time::Duration::from_millis(200));
        s.write_all(&[1; 64]).await.unwrap();
        let mut buf = [0u8; 64];
        far.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        s.write_all(&[2; 64]).await.unwrap();
        let started = std::time::Instant::now();
        let err = s.write_all(&[3; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        far.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, [2; 64]);
    }

    #[tokio::test]
    async fn relay_copies_both_ways_and_stops_when_idle() {
        use tokio::io::AsyncWriteExt as _;
        let (mut c1, p1) = tokio::io::duplex(1024);
        let (p2, mut c2) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(
            p1,
            p2,
            std::time::Duration::from_millis(200),
            std::future::pending(),
        ));
        c1.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 3];
        c2.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"abc");
        c2.write_all(b"de").await.unwrap();
        let mut buf = [0u8; 2];
        c1.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"de");
        // Nothing moves: the relay gives up after the idle timeout.
        assert_eq!(task.await.unwrap(), (3, 2));
    }

    /// Half-close: the client ends its side; the server still gets everything, sees the
    /// end, and its answer still reaches the client.
    #[tokio::test]
    async fn relay_half_close_lets_the_other_direction_finish() {
        use tokio::io::AsyncWriteExt as _;
        let (mut c1, p1) = tokio::io::duplex(1024);
        let (p2, mut c2) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(
            p1,
            p2,
            std::time::Duration::from_secs(5),
            std::future::pending(),
        ));
        c1.write_all(b"ping").await.unwrap();
        c1.shutdown().await.unwrap();
        let mut got = Vec::new();
        c2.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        c2.write_all(b"pong!").await.unwrap();
        drop(c2);
        let mut back = Vec::new();
        c1.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        assert_eq!(task.await.unwrap(), (4, 5));
    }

    /// `stop` ends a relay that would otherwise run for a day, and the counts survive.
    #[tokio::test]
    async fn relay_ends_on_stop_with_its_counts() {
        use tokio::io::AsyncWriteExt as _;
        let (mut c1, p1) = tokio::io::duplex(1024);
        let (p2, mut c2) = tokio::io::duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(relay(
            p1,
            p2,
            std::time::Duration::from_secs(24 * 3600),
            async move {
                let _ = rx.await;
            },
        ));
        c1.write_all(b"abcd").await.unwrap();
        let mut buf = [0u8; 4];
        c2.read_exact(&mut buf).await.unwrap();
        let _ = tx.send(());
        let counts = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the relay ignored stop")
            .unwrap();
        assert_eq!(counts, (4, 0));
    }

    /// A client writing a large request while the server writes a large answer before
    /// reading (pipelined batches): one direction blocked on a full peer must not stop the
    /// other. A relay that writes inside its read loop deadlocks here.
    #[tokio::test]
    async fn relay_directions_do_not_block_each_other() {
        use tokio::io::AsyncWriteExt as _;
        const N: usize = 1 << 20;
        let (c1, p1) = tokio::io::duplex(1024);
        let (p2, mut c2) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(
            p1,
            p2,
            std::time::Duration::from_secs(5),
            std::future::pending(),
        ));
        let (mut c1r, mut c1w) = tokio::io::split(c1);
        let client_reader = tokio::spawn(async move {
            let mut got = vec![0u8; N];
            c1r.read_exact(&mut got).await.map(|_| got)
        });
        let client_writer = tokio::spawn(async move { c1w.write_all(&vec![1u8; N]).await });
        let server = tokio::spawn(async move {
            c2.write_all(&vec![2u8; N]).await?;
            let mut got = vec![0u8; N];
            c2.read_exact(&mut got).await?;
            Ok::<_, std::io::Error>(got)
        });
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let got = client_reader.await.unwrap().unwrap();
            client_writer.await.unwrap().unwrap();
            let srv = server.await.unwrap().unwrap();
            (got, srv)
        })
        .await
        .expect("relay deadlocked");
        assert!(done.0.iter().all(|&b| b == 2) && done.1.iter().all(|&b| b == 1));
        relay.abort();
    }

    #[tokio::test]
    async fn reads_prefix_then_inner() {
        let inner: &[u8] = b"llo";
        let mut p = Prefixed::new(b"he".to_vec(), inner);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello");
    }
}
