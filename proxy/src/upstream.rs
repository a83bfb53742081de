//! The upstream side: name resolution under the egress policy, the pooled HTTP client with
//! verified TLS, and the classification of its errors.
//!
//! Every dial goes through [`PolicyResolver`]: `resolve` overrides first, then DNS; every
//! address in a deny CIDR (and not in `allow_cidrs`) is dropped, and only the remaining,
//! checked addresses are dialled — there is no second resolution (DESIGN.md decision 5).
//! Upstream TLS always verifies against the web PKI roots plus `upstream_ca` (decision 6).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use iron_policy::Policy;
use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;

use crate::body::ProxyBody;
use crate::error::ProxyError;

/// A dial refused or failed before any connection was made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Every resolved address is in a deny CIDR.
    #[error("every address of {host} is in a denied range")]
    Denied {
        /// The host.
        host: String,
    },
    /// The name did not resolve.
    #[error("failed to resolve {host}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
}

/// Resolves `host` under the policy: a `resolve` override or an IP literal as is, else DNS;
/// then drops denied addresses. `port` is set on every returned address.
///
/// # Errors
/// [`DialError::Denied`] when nothing is left; [`DialError::Resolve`] when DNS fails.
pub async fn resolve_checked(
    policy: &Policy,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, DialError> {
    let addrs: Vec<IpAddr> = if let Some(ip) = policy.proxy.resolve.get(host) {
        vec![*ip]
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        vec![ip]
    } else {
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| DialError::Resolve {
                host: host.to_string(),
                source,
            })?
            .map(|a| a.ip())
            .collect()
    };
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|ip| !policy.is_address_denied(*ip))
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    if allowed.is_empty() {
        return Err(DialError::Denied {
            host: host.to_string(),
        });
    }
    Ok(allowed)
}

/// The resolver the pooled client dials through (see [`resolve_checked`]).
#[derive(Clone)]
pub struct PolicyResolver {
    policy: Arc<Policy>,
}

impl Service<Name> for PolicyResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            // The connector sets the port; 0 here is replaced.
            let host = name.as_str().to_ascii_lowercase();
            resolve_checked(&policy, &host, 0).await.map(Vec::into_iter)
        })
    }
}

use tower_service::Service;

/// The pooled upstream client.
pub type UpstreamClient = Client<ConnectDeadline, ProxyBody>;

/// The pooled client's connector: TCP connect and TLS handshake under one deadline. The TCP
/// connect timeout alone let an upstream that accepts and never finishes the handshake hold
/// a request until the response-header timeout (120 s by default). A miss is an
/// [`io::ErrorKind::TimedOut`] error, which [`classify`] answers 504 `upstream_timeout`.
#[derive(Clone)]
pub struct ConnectDeadline {
    inner: HttpsConnector<TcpConnector>,
    deadline: std::time::Duration,
}

impl Service<http::Uri> for ConnectDeadline {
    type Response = <HttpsConnector<TcpConnector> as Service<http::Uri>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let deadline = self.deadline;
        Box::pin(async move {
            match tokio::time::timeout(deadline, connecting).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TCP connect and TLS handshake to the upstream did not finish in time",
                )
                .into()),
            }
        })
    }
}

/// The TCP dialer under the pooled client: hyper-util's [`HttpConnector`] over
/// [`PolicyResolver`], whose connections report no connection info. hyper-util copies a
/// connection's info ([`hyper_util::client::legacy::connect::HttpInfo`], the socket
/// addresses) into every response's extensions, three allocations per request that nothing
/// here reads.
#[derive(Clone)]
pub struct TcpConnector(HttpConnector<PolicyResolver>);

/// A boxed error, as connectors return them.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<http::Uri> for TcpConnector {
    type Response = TcpConnection;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TcpConnection, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let connecting = self.0.call(dst);
        Box::pin(async move { connecting.await.map(TcpConnection).map_err(Into::into) })
    }
}

/// An upstream TCP connection (see [`TcpConnector`]).
#[derive(Debug)]
pub struct TcpConnection(TokioIo<tokio::net::TcpStream>);

impl hyper_util::client::legacy::connect::Connection for TcpConnection {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for TcpConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TcpConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

/// Builds the rustls client configuration for upstreams from the policy's `upstream_ca`
/// ([`iron_broker::tls::client_config`]).
///
/// # Errors
/// A message naming the `upstream_ca` file that cannot be read or holds no certificate.
pub fn client_tls_config(
    policy: &Policy,
    provider: Arc<CryptoProvider>,
) -> Result<ClientConfig, String> {
    iron_broker::tls::client_config(&policy.proxy.upstream_ca, provider)
}

/// What a pooled upstream client is built from: the policy's `resolve`, `allow_cidrs` and
/// limits, and the `upstream_ca` files (paths and contents). A reload whose key is equal
/// keeps the running clients and their pooled connections (no burst of new TLS handshakes
/// after a policy edit); any difference builds new ones, so a connection dialed under old
/// resolution, address rules or trust is never reused.
#[derive(Debug, PartialEq, Eq)]
pub struct TransportKey {
    resolve: Vec<(String, std::net::IpAddr)>,
    allow_cidrs: Vec<ipnet::IpNet>,
    limits: iron_policy::Limits,
    upstream_ca: Vec<(std::path::PathBuf, Option<Vec<u8>>)>,
}

impl TransportKey {
    /// The key of `policy` (reads the `upstream_ca` files; an unreadable one keys as `None`).
    pub fn of(policy: &Policy) -> Self {
        let mut resolve: Vec<_> = policy
            .proxy
            .resolve
            .iter()
            .map(|(h, ip)| (h.clone(), *ip))
            .collect();
        resolve.sort();
        Self {
            resolve,
            allow_cidrs: policy.proxy.allow_cidrs.clone(),
            limits: policy.proxy.limits.clone(),
            upstream_ca: policy
                .proxy
                .upstream_ca
                .iter()
                .map(|p| (p.clone(), std::fs::read(p).ok()))
                .collect(),
        }
    }
}

/// Builds the pooled client: keep-alive connections pooled per scheme and authority,
/// TCP_NODELAY, the policy's connect and idle timeouts.
pub fn build_client(policy: &Arc<Policy>, tls: ClientConfig) -> UpstreamClient {
    let limits = &policy.proxy.limits;
    let mut http = HttpConnector::new_with_resolver(PolicyResolver {
        policy: policy.clone(),
    });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(limits.upstream_connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(TcpConnector(http));
    let https = ConnectDeadline {
        inner: https,
        deadline: limits.upstream_connect_timeout + limits.tls_handshake_timeout,
    };
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(limits.idle_timeout)
        .pool_max_idle_per_host(64)
        // The casing hyper recorded when it parsed the client's request (and, for the
        // response, the origin's) is written back; a header the proxy adds (inject,
        // `token_endpoint_headers`) goes out in Title-Case.
        .http1_preserve_header_case(true)
        .http1_title_case_headers(true)
        .build(https)
}

/// Token-endpoint requests over the pooled client, so they get the same resolution, deny
/// CIDRs, roots and timeouts as proxied traffic. Redirects are never followed (the client
/// does not follow them); responses over [`iron_broker::tokens::MAX_TOKEN_RESPONSE`] bytes
/// are refused.
#[derive(Clone)]
pub struct ClientTransport {
    active: Arc<arc_swap::ArcSwap<crate::Active>>,
}

impl ClientTransport {
    /// A transport over the client in force (it follows reloads), waiting at most the
    /// policy's `upstream_response_header_timeout` for response headers.
    pub fn new(active: Arc<arc_swap::ArcSwap<crate::Active>>) -> Self {
        Self { active }
    }
}

impl iron_broker::tokens::TokenTransport for ClientTransport {
    fn send(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<http::Response<Vec<u8>>, iron_broker::tokens::TransportError>,
                > + Send,
        >,
    > {
        use http_body_util::BodyExt as _;
        let active = self.active.load_full();
        Box::pin(async move {
            let err = |m: String| iron_broker::tokens::TransportError(m);
            let timeout = active.policy.proxy.limits.upstream_response_header_timeout;
            let (parts, body) = req.into_parts();
            let req = http::Request::from_parts(parts, crate::body::full(bytes::Bytes::from(body)));
            // Headers and body under one deadline: a token endpoint that stalls mid-body is
            // cut off like one that never answers.
            let exchange = async {
                let resp = active
                    .client()
                    .request(req)
                    .await
                    .map_err(|e| err(classify(&e).code().to_string()))?;
                let (parts, body) = resp.into_parts();
                let bytes =
                    http_body_util::Limited::new(body, iron_broker::tokens::MAX_TOKEN_RESPONSE)
                        .collect()
                        .await
                        .map_err(|_| err("response body failed or too large".into()))?
                        .to_bytes();
                Ok(http::Response::from_parts(parts, bytes.to_vec()))
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| err("no response in time".into()))?
        })
    }
}

/// Maps a client error to the proxy error the client sees, by walking the cause chain.
pub fn classify(err: &hyper_util::client::legacy::Error) -> ProxyError {
    classify_chain(err, err.is_connect())
}

/// [`classify`] over any error chain; `connecting` when the error came from opening the
/// connection.
fn classify_chain(err: &(dyn std::error::Error + 'static), connecting: bool) -> ProxyError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<DialError>() {
            return match d {
                DialError::Denied { host } => {
                    ProxyError::DestinationAddressDenied { host: host.clone() }
                }
                DialError::Resolve { .. } => ProxyError::UpstreamUnreachable,
            };
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            return ProxyError::UpstreamTls;
        }
        // io::Error::source skips the error it wraps, and hyper-rustls wraps io errors in
        // io errors: descend into the wrapped error directly.
        cur = match e.downcast_ref::<io::Error>() {
            Some(io) if io.kind() == io::ErrorKind::TimedOut => {
                return ProxyError::UpstreamTimeout;
            }
            Some(io)
                if io.raw_os_error().is_some_and(|n| {
                    n == rustix::io::Errno::MFILE.raw_os_error()
                        || n == rustix::io::Errno::NFILE.raw_os_error()
                }) =>
            {
                return ProxyError::ProxyOverloaded;
            }
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => e.source(),
            },
            None => e.source(),
        };
    }
    if connecting {
        ProxyError::UpstreamUnreachable
    } else {
        ProxyError::Upstream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of file descriptors when dialing is the proxy's own overload (503, retry), not an
    /// unreachable upstream (502); a refused connection and a timeout keep their codes.
    #[test]
    fn connect_errors_are_classified_by_cause() {
        let wrapped = |e: io::Error| io::Error::other(e);
        let emfile = wrapped(io::Error::from_raw_os_error(
            rustix::io::Errno::MFILE.raw_os_error(),
        ));
        let e = classify_chain(&emfile, true);
        assert_eq!(e.code(), "proxy_overloaded");
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after(), Some(1));
        let enfile = io::Error::from_raw_os_error(rustix::io::Errno::NFILE.raw_os_error());
        assert_eq!(classify_chain(&enfile, true).code(), "proxy_overloaded");
        let refused = wrapped(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(
            classify_chain(&refused, true).code(),
            "upstream_unreachable"
        );
        let timeout = wrapped(io::Error::from(io::ErrorKind::TimedOut));
        assert_eq!(classify_chain(&timeout, true).code(), "upstream_timeout");
        assert_eq!(classify_chain(&refused, false).code(), "upstream_error");
    }
}
