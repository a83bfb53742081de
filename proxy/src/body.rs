//! Body plumbing: the boxed body type of proxied responses, and a pass-through wrapper
//! that counts bytes and reports completion, used for the audit line without buffering.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};

/// Errors a proxied body can yield.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the proxy sends and every request it forwards.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// `body` holding `request` (a request body left unread: a stub, a refusal) until it is
/// dropped itself, then reading what is left of it, up to [`DRAIN_BYTES`] within
/// [`DRAIN_TIME`], before dropping it. An HTTP/2 stream whose request body is dropped
/// before the response is sent is reset with `CANCEL`, and one dropped mid-upload after it
/// with `NO_ERROR` (RFC 9113 §8.1), which some clients (curl 7.88: "Stream error in the
/// HTTP/2 framing layer") still report instead of the response; a body read to its end
/// needs no reset at all. Past the bound the stream is reset with `NO_ERROR`.
pub fn holding(body: ProxyBody, request: hyper::body::Incoming) -> ProxyBody {
    Holding {
        inner: body,
        request: Some(request),
    }
    .boxed()
}

/// Most bytes of an unread request body [`holding`] reads after the response: 4 MiB.
pub const DRAIN_BYTES: u64 = 4 << 20;
/// Longest time [`holding`] reads an unread request body after the response: 10 s.
pub const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

struct Holding {
    inner: ProxyBody,
    request: Option<hyper::body::Incoming>,
}

impl Body for Holding {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let (Some(mut request), Ok(rt)) =
            (self.request.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if request.is_end_stream() {
            return;
        }
        rt.spawn(async move {
            let drain = async {
                let mut read = 0u64;
                while let Some(Ok(frame)) = request.frame().await {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if read > DRAIN_BYTES {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}

/// How a counted body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// The whole body was passed on.
    Complete,
    /// The inner body failed mid-stream.
    Error,
    /// The body was dropped before its end (the reader went away).
    Dropped,
}

/// Counters shared by the bodies of one exchange: `[request bytes, response bytes, echoes
/// put back]` (the last by [`crate::echo::Scrubbed`] and the response-header scrub).
pub type Tally = Arc<[AtomicU64; 3]>;

/// A body that passes frames through unchanged, adds data bytes to counter `which` of a
/// shared [`Tally`], and calls `on_end` exactly once when it ends, fails or is dropped.
/// `on_end` is held inline (no allocation of its own: a request's two bodies are boxed once
/// each, callback included).
pub struct Counted<B, F: FnOnce(BodyEnd)> {
    inner: B,
    empty: bool,
    count: Tally,
    which: usize,
    on_end: Option<F>,
}

impl<B: Body, F: FnOnce(BodyEnd)> Counted<B, F> {
    /// Wraps `inner`, counting into `count[which]` (`which` is 0 or 1); `on_end` may be a
    /// no-op.
    pub fn new(inner: B, count: Tally, which: usize, on_end: F) -> Self {
        Self {
            empty: inner.is_end_stream(),
            inner,
            count,
            which: which.min(1),
            on_end: Some(on_end),
        }
    }
}

impl<B, F: FnOnce(BodyEnd)> Counted<B, F> {
    fn is_end_stream_inner(&self) -> bool {
        // Without a `Body` bound here, fall back to the size hint recorded at wrap time.
        self.empty
    }

    fn finish(&mut self, end: BodyEnd) {
        if let Some(f) = self.on_end.take() {
            f(end);
        }
    }
}

impl<B, F: FnOnce(BodyEnd)> Drop for Counted<B, F> {
    fn drop(&mut self) {
        // `on_end` is only still set here when no end was seen while polling; an empty body
        // is never polled, so an inner body already at its end counts as complete.
        if self.on_end.is_some() {
            let end = if self.is_end_stream_inner() {
                BodyEnd::Complete
            } else {
                BodyEnd::Dropped
            };
            self.finish(end);
        }
    }
}

impl<B, F> Body for Counted<B, F>
where
    F: FnOnce(BodyEnd) + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.count[this.which].fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                if this.inner.is_end_stream() {
                    this.finish(BodyEnd::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(BodyEnd::Error);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body whose trailer fields are checked before they go on: `check` gets the
/// trailers frame and, when it refuses them (a placeholder in a trailer), the body fails
/// with its error instead of yielding them, so the upstream never receives a complete
/// request. Data frames pass through unchanged.
pub struct CheckedTrailers<B, F> {
    inner: B,
    check: F,
}

impl<B, F> CheckedTrailers<B, F> {
    /// Wraps `inner`; `check` runs once per trailers frame.
    pub fn new(inner: B, check: F) -> Self {
        Self { inner, check }
    }
}

impl<B, F> Body for CheckedTrailers<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FnMut(&http::HeaderMap) -> Result<(), BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref().map(&mut this.check) {
                Some(Err(e)) => Poll::Ready(Some(Err(e))),
                _ => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that fails when `inner` yields nothing for `idle` while it is being read: an
/// upstream that sends response headers and then stalls would otherwise hold the request,
/// its client connection and the upstream connection for as long as the client waits (many
/// clients have no read timeout). The timer starts when a poll finds nothing and restarts
/// after each frame; a body that is ready when polled never arms it (one allocation, on the
/// first wait, for the rest of the body). The error is [`BodyIdle`]; the client sees the
/// response cut short (hyper closes the connection before the declared end).
pub struct Idle<B> {
    inner: B,
    idle: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

/// The error of an [`Idle`] body: nothing arrived for this long.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent no response body bytes for {} s", .0.as_secs())]
pub struct BodyIdle(pub std::time::Duration);

impl<B> Idle<B> {
    /// Wraps `inner`, failing after `idle` without a frame.
    pub fn new(inner: B, idle: std::time::Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            armed: false,
        }
    }
}

impl<B> Body for Idle<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.armed = false;
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    match &mut this.timer {
                        Some(t) => t.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                let expired = this
                    .timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Some(Err(BodyIdle(this.idle).into())))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
