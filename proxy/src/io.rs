//! A stream with bytes already read from it put back in front, so the tunnel can peek at
//! the first byte (0x16: TLS; an ASCII letter: cleartext HTTP) and then hand the whole
//! stream on.

use std::io;
use std::pin::Pin;
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

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Copies bytes both ways between `a` and `b` until both directions have ended, an error
/// occurs, or nothing moves in either direction for `idle`. Returns the bytes copied
/// a→b and b→a. Used for passthrough tunnels and upgraded (WebSocket) connections.
pub async fn relay<A, B>(a: A, b: B, idle: std::time::Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut abuf = vec![0u8; 16 * 1024];
    let mut bbuf = vec![0u8; 16 * 1024];
    let (mut a_open, mut b_open) = (true, true);
    let (mut ab, mut ba) = (0u64, 0u64);
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut abuf), if a_open => match r {
                Ok(0) | Err(_) => {
                    a_open = false;
                    let _ = bw.shutdown().await;
                }
                Ok(n) => {
                    // Flush too: a TLS writer may keep encrypted records buffered after
                    // accepting the plaintext, and nothing else would push them out.
                    if bw.write_all(&abuf[..n]).await.is_err() || bw.flush().await.is_err() {
                        break;
                    }
                    ab += n as u64;
                }
            },
            r = br.read(&mut bbuf), if b_open => match r {
                Ok(0) | Err(_) => {
                    b_open = false;
                    let _ = aw.shutdown().await;
                }
                Ok(n) => {
                    if aw.write_all(&bbuf[..n]).await.is_err() || aw.flush().await.is_err() {
                        break;
                    }
                    ba += n as u64;
                }
            },
            () = tokio::time::sleep(idle) => break,
        }
    }
    (ab, ba)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[tokio::test]
    async fn relay_copies_both_ways_and_stops_when_idle() {
        use tokio::io::AsyncWriteExt as _;
        let (mut c1, p1) = tokio::io::duplex(1024);
        let (p2, mut c2) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(p1, p2, std::time::Duration::from_millis(200)));
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

    #[tokio::test]
    async fn reads_prefix_then_inner() {
        let inner: &[u8] = b"llo";
        let mut p = Prefixed::new(b"he".to_vec(), inner);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello");
    }
}
