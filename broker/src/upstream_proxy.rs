//! Dialing through the `upstream_proxy` (REFERENCE.md D19: a corporate egress proxy), for
//! the proxy's upstream client and relays and the broker's token-endpoint calls: HTTP
//! `CONNECT` (RFC 9110 §9.3.6, hyper-util's `Tunnel`) or SOCKS5 (RFC 1928, hyper-util's
//! `SocksV5`), with the proxy's own credential (`upstream_proxy_auth`, `USER:PASSWORD`)
//! read from its source on every dial, so a rotated credential is used without a reload.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::rt::TokioIo;
use iron_policy::{ProxyScheme, UpstreamProxy};
use tokio::net::TcpStream;
use tower_service::Service as _;

use crate::{SecretValue, SourceResolver};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The leg to the upstream proxy; cheap to clone.
#[derive(Clone)]
pub struct ProxyDial {
    proxy: Arc<UpstreamProxy>,
    uri: http::Uri,
    to_proxy: HttpConnector,
    sources: Arc<SourceResolver>,
}

impl std::fmt::Debug for ProxyDial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyDial")
            .field("proxy", &self.proxy.authority)
            .finish_non_exhaustive()
    }
}

impl ProxyDial {
    /// The dial to `proxy`, its TCP connect bounded by `timeout`; the credential, if any,
    /// is read through `sources`.
    ///
    /// # Errors
    /// A message when the proxy's authority is not a valid URI authority.
    pub fn new(
        proxy: &UpstreamProxy,
        timeout: Duration,
        sources: Arc<SourceResolver>,
    ) -> Result<Self, String> {
        let mut to_proxy = HttpConnector::new();
        to_proxy.set_nodelay(true);
        to_proxy.set_connect_timeout(Some(timeout));
        let uri = format!("http://{}", proxy.authority)
            .parse()
            .map_err(|e| format!("upstream_proxy `{}`: {e}", proxy.authority))?;
        Ok(Self {
            proxy: Arc::new(proxy.clone()),
            uri,
            to_proxy,
            sources,
        })
    }

    /// The proxy this dials.
    pub fn proxy(&self) -> &UpstreamProxy {
        &self.proxy
    }

    /// True when `host` (normalized) goes through the proxy (not in its `no_proxy`).
    pub fn covers(&self, host: &str) -> bool {
        self.proxy.covers(host)
    }

    /// A TCP stream to `target` (`host:port`, `[v6]:port` for an IPv6 literal) through the
    /// proxy, ready for the caller's TLS.
    ///
    /// # Errors
    /// The credential's source cannot be read or holds no `:`; the proxy cannot be
    /// reached, refuses (a status other than 200, a SOCKS5 reply other than success, a
    /// refused credential), or answers something else.
    pub async fn connect(&self, target: &str) -> Result<TokioIo<TcpStream>, BoxError> {
        let dst: http::Uri = format!("http://{target}").parse()?;
        let auth = self.credential()?;
        match self.proxy.scheme {
            ProxyScheme::Http => {
                let mut tunnel = Tunnel::new(self.uri.clone(), self.to_proxy.clone());
                if let Some(value) = &auth {
                    let blob = base64::engine::general_purpose::STANDARD.encode(value.expose());
                    let mut header = http::HeaderValue::try_from(format!("Basic {blob}"))?;
                    header.set_sensitive(true);
                    tunnel = tunnel.with_auth(header);
                }
                Ok(tunnel.call(dst).await?)
            }
            ProxyScheme::Socks5 { remote_dns } => {
                let mut socks =
                    SocksV5::new(self.uri.clone(), self.to_proxy.clone()).local_dns(!remote_dns);
                if let Some(value) = &auth {
                    let (user, pass) = split_credential(value.expose())
                        .ok_or("upstream_proxy_auth holds no `:` (USER:PASSWORD)")?;
                    socks = socks.with_auth(user, pass);
                }
                Ok(socks.call(dst).await?)
            }
        }
    }

    fn credential(&self) -> Result<Option<SecretValue>, BoxError> {
        match &self.proxy.auth {
            None => Ok(None),
            Some(src) => Ok(Some(
                self.sources
                    .resolve(src)
                    .map_err(|e| format!("upstream_proxy_auth: {e}"))?,
            )),
        }
    }
}

/// `USER:PASSWORD` split at the first `:`, each UTF-8 and at most 255 bytes (RFC 1929
/// §2), or `None`.
pub fn split_credential(value: &[u8]) -> Option<(String, String)> {
    let colon = value.iter().position(|&b| b == b':')?;
    let user = std::str::from_utf8(&value[..colon]).ok()?;
    let pass = std::str::from_utf8(&value[colon + 1..]).ok()?;
    (user.len() <= 255 && pass.len() <= 255).then(|| (user.to_string(), pass.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_split_at_the_first_colon() {
        assert_eq!(
            split_credential(b"svc:pa:ss"),
            Some(("svc".into(), "pa:ss".into()))
        );
        assert_eq!(split_credential(b":"), Some((String::new(), String::new())));
        assert_eq!(split_credential(b"no-colon"), None);
        assert_eq!(split_credential(&[b'u', b':', 0xff]), None);
        assert_eq!(
            split_credential(format!("u:{}", "p".repeat(256)).as_bytes()),
            None
        );
    }
}
