//! Event loops: the proxy runs one single-threaded tokio runtime per worker thread, and
//! hands each accepted client connection to one of them (round robin). Everything a
//! connection does — its TLS sessions, its requests, the pooled upstream connections they
//! use (one pool per event loop, see [`crate::Active::client`]) — stays on that thread, so a
//! request never wakes another thread. Measured on 2 shared cores (bench/README.md), a
//! multi-threaded runtime lost 20–40 % of keep-alive throughput to those wake-ups.
//!
//! Event loop 0 is the thread that calls [`start`] (the binary's main runtime: it also runs
//! the accept loop, the admin API, the Postgres relays and the policy watcher). Without
//! [`start`] (tests, embedding) there is one event loop: the caller's runtime.

use std::cell::Cell;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

struct Loops {
    /// Handles of event loops 1..n (loop 0 is the caller's runtime).
    extra: Vec<Handle>,
    next: AtomicUsize,
}

static LOOPS: OnceLock<Loops> = OnceLock::new();

/// Starts `n - 1` event-loop threads beside the calling one (event loop 0). Call once, from
/// the main runtime, before the proxy is built; later calls do nothing.
///
/// # Errors
/// A message when a thread or its runtime cannot be started.
pub fn start(n: usize) -> Result<(), String> {
    if LOOPS.get().is_some() {
        return Ok(());
    }
    let mut extra = Vec::new();
    for i in 1..n.max(1) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("failed to start event loop {i}: {e}"))?;
        extra.push(rt.handle().clone());
        std::thread::Builder::new()
            .name(format!("iron-proxy-{i}"))
            .spawn(move || {
                INDEX.with(|c| c.set(i));
                rt.block_on(timer_anchor());
            })
            .map_err(|e| format!("failed to start event loop thread {i}: {e}"))?;
    }
    tokio::spawn(timer_anchor());
    let _ = LOOPS.set(Loops {
        extra,
        next: AtomicUsize::new(0),
    });
    Ok(())
}

/// Keeps a timer due within [`ANCHOR`] on the loop, forever. tokio's timer wheel wakes its
/// own loop (an `eventfd` write, then a spurious `epoll_wait` return) whenever a timer is
/// registered earlier than the earliest one seen when the loop last parked — always, when
/// none was registered then. Every request registers timers (header read, upstream
/// response), so an idle keep-alive connection made each request pay that self-wake
/// (strace: one `write(2)` to the eventfd per request). With an anchor due sooner than any
/// request timeout, registering one never wakes the loop; the anchor costs one wake per
/// [`ANCHOR`].
async fn timer_anchor() {
    loop {
        tokio::time::sleep(ANCHOR).await;
    }
}

/// The anchor timer's period, no longer than the request timeouts in use (seconds): a timer
/// due sooner than the anchor still wakes the loop, as before.
const ANCHOR: std::time::Duration = std::time::Duration::from_secs(1);

/// How many event loops there are (1 when [`start`] was not called).
pub fn count() -> usize {
    LOOPS.get().map_or(1, |l| l.extra.len() + 1)
}

/// The event loop the calling thread runs (0 outside the extra threads).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Serves an accepted connection on the next event loop in turn: the socket leaves the
/// calling loop's reactor, `serve(tcp)` runs on the target loop with the socket registered
/// there. A socket that cannot move is logged and dropped (closed).
pub fn hand_off<F, Fut>(tcp: tokio::net::TcpStream, serve: F)
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tcp = match tcp.into_std() {
        Ok(t) => t,
        Err(e) => return tracing::warn!(error = %e, "cannot hand a connection to an event loop"),
    };
    spawn_next(move || async move {
        match tokio::net::TcpStream::from_std(tcp) {
            Ok(tcp) => serve(tcp).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a connection with its event loop")
            }
        }
    });
}

/// Runs `make()`'s future on the next event loop in turn: on the caller's runtime for
/// loop 0, else on that loop's thread. `make` runs on the target thread, so what it creates
/// (e.g. `TcpStream::from_std`) registers with that loop's reactor.
pub fn spawn_next<F, Fut>(make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let target = LOOPS.get().and_then(|l| {
        let i = l.next.fetch_add(1, Ordering::Relaxed) % (l.extra.len() + 1);
        i.checked_sub(1).map(|j| l.extra[j].clone())
    });
    let task = async move { make().await };
    match target {
        None => drop(tokio::spawn(task)),
        Some(h) => drop(h.spawn(task)),
    }
}
