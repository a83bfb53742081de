//! SOCKS5 on the proxy port (RFC 1928; REFERENCE.md §2.5 and §4 "Tunnel and SOCKS5").
//!
//! A connection whose first byte is `0x05` is a SOCKS5 client (`ALL_PROXY=socks5h://…`).
//! Only CONNECT is served, to an IPv4, IPv6 or domain-name target; the tunnel it opens is
//! the one an HTTP CONNECT to the same `host:port` opens (the same destination checks,
//! interception or passthrough, decision 1's binding of SNI and `Host` to the target).
//!
//! Without `[[callers]]` the client must offer "no authentication" (or username/password,
//! whose values are then ignored). With callers it must offer username/password
//! (RFC 1929): the password is a caller's token, as in `Proxy-Authorization: Basic`
//! (REFERENCE.md D21 refuses SOCKS5 when caller auth is on; this authenticates it instead).

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use iron_policy::normalize_host;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tracing::debug;

use crate::Runtime;
use crate::audit::AuditRecord;
use crate::callers::Authenticated;
use crate::error::ProxyError;
use crate::io::WriteStall;
use crate::pipeline::Conn;

/// The SOCKS protocol version byte.
pub(crate) const VERSION: u8 = 0x05;

const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_ACCEPTABLE: u8 = 0xff;

/// Reply codes (RFC 1928 §6).
const SUCCEEDED: u8 = 0x00;
const GENERAL_FAILURE: u8 = 0x01;
const NOT_ALLOWED: u8 = 0x02;
const HOST_UNREACHABLE: u8 = 0x04;
const TTL_EXPIRED: u8 = 0x06;
const COMMAND_NOT_SUPPORTED: u8 = 0x07;
const ADDRESS_NOT_SUPPORTED: u8 = 0x08;

/// Why a SOCKS5 handshake ended without a tunnel: the reply code to send (if the
/// handshake got as far as the request) and the audit error.
struct Refusal {
    reply: Option<u8>,
    code: &'static str,
}

impl Refusal {
    fn silent(code: &'static str) -> Self {
        Self { reply: None, code }
    }
}

/// The SOCKS5 reply code for a refused destination.
fn reply_for(e: &ProxyError) -> u8 {
    match e {
        ProxyError::DestinationNotAllowed { .. } | ProxyError::DestinationAddressDenied { .. } => {
            NOT_ALLOWED
        }
        ProxyError::UpstreamUnreachable => HOST_UNREACHABLE,
        ProxyError::UpstreamTimeout => TTL_EXPIRED,
        _ => GENERAL_FAILURE,
    }
}

/// Serves one SOCKS5 client connection `tcp` (its first byte, `0x05`, still unread): the
/// client's part of the handshake within `client_header_timeout`, the destination checks
/// under their own timeouts, then the tunnel. Writes one audit line for a refused
/// handshake (`kind: connect`, `method: SOCKS5`); the tunnel audits as a CONNECT's.
pub(crate) async fn serve(rt: Arc<Runtime>, tcp: TcpStream, conn: Arc<Conn>) {
    let limits = rt.policy().proxy.limits.clone();
    let mut io = WriteStall::new(tcp, limits.idle_timeout);
    let id = rt.next_request_id();
    let mut rec = AuditRecord::new("connect", id, conn.client, "CONNECT");
    rec.method = Cow::Borrowed("SOCKS5");
    rec.scheme = "tunnel";
    let asked = tokio::time::timeout(
        limits.client_header_timeout,
        read_request(&rt, &mut io, &mut rec),
    )
    .await
    .unwrap_or(Err(Refusal::silent("client_silent")));
    let opened = match asked {
        Ok((host, port, caller)) => {
            rec.caller = caller.as_ref().map(|c| c.name.clone());
            match crate::server::check_target(&rt, &host, port, &mut rec).await {
                Ok(upstream) => Ok((host, port, upstream, caller)),
                Err(e) => {
                    rec.status = e.status().as_u16();
                    Err(Refusal {
                        reply: Some(reply_for(&e)),
                        code: e.code(),
                    })
                }
            }
        }
        Err(refusal) => Err(refusal),
    };
    let opened = match opened {
        Ok(o) => io
            .write_all(&[VERSION, SUCCEEDED, 0, 1, 0, 0, 0, 0, 0, 0])
            .await
            .map(|()| o)
            .map_err(|_| Refusal::silent("client_cancel")),
        Err(r) => Err(r),
    };
    match opened {
        Ok((host, port, upstream, caller)) => {
            let conn = conn.as_caller(caller);
            crate::server::run_tunnel(rt, conn, host, port, upstream, rec, io).await;
        }
        Err(refusal) => {
            if let Some(code) = refusal.reply {
                // BND.ADDR 0.0.0.0:0: nothing was bound.
                let _ = io.write_all(&[VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]).await;
                let _ = io.shutdown().await;
            }
            debug!(client = %conn.client, code = refusal.code, "SOCKS5 handshake refused");
            rec.outcome = match refusal.code {
                "client_silent" | "socks_invalid" | "client_cancel" => "client_cancel",
                _ => "refused",
            };
            rec.error = Some(refusal.code);
            rec.stop_clock();
            rt.emit(rec);
        }
    }
}

/// The client's part of RFC 1928 §3–§4 (and RFC 1929 when callers are configured): the
/// method negotiation, the caller's credentials, and the CONNECT request. Returns the
/// normalized target and the authenticated caller.
async fn read_request(
    rt: &Runtime,
    io: &mut WriteStall<TcpStream>,
    rec: &mut AuditRecord,
) -> Result<(String, u16, Option<Authenticated>), Refusal> {
    let invalid = |_| Refusal::silent("socks_invalid");
    let policy = rt.policy();
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await.map_err(invalid)?;
    let mut methods = vec![0u8; usize::from(head[1])];
    io.read_exact(&mut methods).await.map_err(invalid)?;
    let auth_required = !policy.callers.is_empty();
    let method = if auth_required {
        methods.contains(&USER_PASS).then_some(USER_PASS)
    } else if methods.contains(&NO_AUTH) {
        Some(NO_AUTH)
    } else {
        methods.contains(&USER_PASS).then_some(USER_PASS)
    };
    let Some(method) = method else {
        let _ = io.write_all(&[VERSION, NO_ACCEPTABLE]).await;
        let _ = io.shutdown().await;
        if auth_required {
            rec.status = 407;
            return Err(Refusal::silent("proxy_auth_required"));
        }
        return Err(Refusal::silent("socks_no_acceptable_method"));
    };
    io.write_all(&[VERSION, method]).await.map_err(invalid)?;
    let mut caller = None;
    if method == USER_PASS {
        // RFC 1929 §2: VER=1, ULEN, UNAME, PLEN, PASSWD; answered VER=1, STATUS.
        let mut ver_len = [0u8; 2];
        io.read_exact(&mut ver_len).await.map_err(invalid)?;
        if ver_len[0] != 1 {
            return Err(Refusal::silent("socks_invalid"));
        }
        let mut user = vec![0u8; usize::from(ver_len[1])];
        io.read_exact(&mut user).await.map_err(invalid)?;
        let plen = io.read_u8().await.map_err(invalid)?;
        let mut password = zeroize::Zeroizing::new(vec![0u8; usize::from(plen)]);
        io.read_exact(&mut password).await.map_err(invalid)?;
        if auth_required {
            match crate::callers::caller_with_token(rt, &policy, &password) {
                Ok(c) => caller = Some(c),
                Err(e) => {
                    let _ = io.write_all(&[1, 1]).await;
                    let _ = io.shutdown().await;
                    rec.status = e.status().as_u16();
                    return Err(Refusal::silent(e.code()));
                }
            }
        }
        io.write_all(&[1, 0]).await.map_err(invalid)?;
    }
    // The request: VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT.
    let mut req = [0u8; 4];
    io.read_exact(&mut req).await.map_err(invalid)?;
    if req[0] != VERSION {
        return Err(Refusal::silent("socks_invalid"));
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            io.read_exact(&mut a).await.map_err(invalid)?;
            Ipv4Addr::from(a).to_string()
        }
        4 => {
            let mut a = [0u8; 16];
            io.read_exact(&mut a).await.map_err(invalid)?;
            Ipv6Addr::from(a).to_string()
        }
        3 => {
            let len = io.read_u8().await.map_err(invalid)?;
            let mut name = vec![0u8; usize::from(len)];
            io.read_exact(&mut name).await.map_err(invalid)?;
            String::from_utf8(name).map_err(|_| Refusal {
                reply: Some(GENERAL_FAILURE),
                code: "socks_invalid",
            })?
        }
        _ => {
            return Err(Refusal {
                reply: Some(ADDRESS_NOT_SUPPORTED),
                code: "socks_address_type_not_supported",
            });
        }
    };
    let port = io.read_u16().await.map_err(invalid)?;
    let host = normalize_host(&host).ok_or(Refusal {
        reply: Some(GENERAL_FAILURE),
        code: "bad_request",
    })?;
    rec.host.clone_from(&host);
    rec.port = port;
    if req[1] != 1 {
        return Err(Refusal {
            reply: Some(COMMAND_NOT_SUPPORTED),
            code: "socks_command_not_supported",
        });
    }
    Ok((host, port, caller))
}
