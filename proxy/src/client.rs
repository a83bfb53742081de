//! A minimal client of the proxy, for `demo` and the tests: sends CONNECT, then opens TLS
//! inside the tunnel with a chosen SNI, trusting a given CA, then speaks HTTP/1.1 (or
//! HTTP/2, [`tunnel_h2`]).

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A response read completely.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Status code.
    pub status: u16,
    /// Headers, lowercase names.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The trailers, if any came.
    pub trailers: Option<http::HeaderMap>,
}

/// Sends `CONNECT authority` to the proxy at `proxy` and returns the status line's code
/// and the open stream.
///
/// # Errors
/// I/O errors, or a proxy response that is not HTTP.
pub async fn connect(
    proxy: std::net::SocketAddr,
    authority: &str,
) -> std::io::Result<(u16, TcpStream, Vec<u8>)> {
    connect_as(proxy, authority, None).await
}

/// [`connect`] sending `Proxy-Authorization: {proxy_authorization}` when given (a
/// policy with `[[callers]]`).
///
/// # Errors
/// As [`connect`].
pub async fn connect_as(
    proxy: std::net::SocketAddr,
    authority: &str,
    proxy_authorization: Option<&str>,
) -> std::io::Result<(u16, TcpStream, Vec<u8>)> {
    let mut tcp = TcpStream::connect(proxy).await?;
    let auth = proxy_authorization
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    tcp.write_all(
        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n").as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut buf).await? == 0 {
            break;
        }
        head.push(buf[0]);
        if head.len() > 64 * 1024 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("proxy answered something that is not HTTP"))?;
    Ok((status, tcp, head))
}

/// Opens a tunnel to `authority` and TLS inside it with `sni`, trusting `ca_pem`; returns
/// an HTTP/1.1 sender.
///
/// # Errors
/// A message when CONNECT is refused (with the status), TLS fails, or HTTP setup fails.
pub async fn tunnel(
    proxy: std::net::SocketAddr,
    authority: &str,
    sni: &str,
    ca_pem: &str,
) -> Result<SendRequest<Full<Bytes>>, String> {
    tunnel_as(proxy, authority, sni, ca_pem, None).await
}

/// [`tunnel`] whose CONNECT carries `Proxy-Authorization: {proxy_authorization}`.
///
/// # Errors
/// As [`tunnel`].
pub async fn tunnel_as(
    proxy: std::net::SocketAddr,
    authority: &str,
    sni: &str,
    ca_pem: &str,
    proxy_authorization: Option<&str>,
) -> Result<SendRequest<Full<Bytes>>, String> {
    let tls = tls_in_tunnel(
        proxy,
        authority,
        sni,
        ca_pem,
        b"http/1.1",
        proxy_authorization,
    )
    .await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn.with_upgrades());
    Ok(send)
}

/// [`tunnel`] speaking HTTP/2 with request bodies of type `B`: ALPN offers only `h2`.
///
/// # Errors
/// As [`tunnel`]; also when the proxy does not take `h2`.
pub async fn tunnel_h2<B>(
    proxy: std::net::SocketAddr,
    authority: &str,
    sni: &str,
    ca_pem: &str,
) -> Result<hyper::client::conn::http2::SendRequest<B>, String>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tls_in_tunnel(proxy, authority, sni, ca_pem, b"h2", None).await?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err("the proxy did not take h2".into());
    }
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// CONNECT to `authority`, then TLS in the tunnel with `sni`, trusting `ca_pem`, offering
/// `alpn`.
async fn tls_in_tunnel(
    proxy: std::net::SocketAddr,
    authority: &str,
    sni: &str,
    ca_pem: &str,
    alpn: &[u8],
    proxy_authorization: Option<&str>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let (status, tcp, _) = connect_as(proxy, authority, proxy_authorization)
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("CONNECT refused with {status}"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))
}

/// Sends `req` and reads the whole response.
///
/// # Errors
/// The HTTP error, as text.
pub async fn fetch(
    send: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Fetched, String> {
    send.ready().await.map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    read(resp).await
}

/// [`fetch`] over HTTP/2.
///
/// # Errors
/// The HTTP error, as text.
pub async fn fetch_h2<B>(
    send: &mut hyper::client::conn::http2::SendRequest<B>,
    req: Request<B>,
) -> Result<Fetched, String>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    send.ready().await.map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    read(resp).await
}

/// The response read whole, trailers included.
async fn read(resp: http::Response<hyper::body::Incoming>) -> Result<Fetched, String> {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned();
    Ok(Fetched {
        status,
        headers,
        body: collected.to_bytes(),
        trailers,
    })
}
