//! The request-path error type and its one response envelope (DESIGN.md decision 7):
//! a status, `x-iron-proxy-error: <code>`, and a JSON body
//! `{"error": "<code>", "message": "...", "request_id": "..."}`. The message is fixed per
//! variant plus names (secret, location, host); it never echoes header values, the query
//! string or a secret. The full error chain goes to the log, not the client.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use iron_policy::{Location, PlanError};

use crate::body::{ProxyBody, full};

/// Header carrying the error code on every proxy-generated error response.
pub const ERROR_HEADER: &str = "x-iron-proxy-error";

/// Why the proxy answered a request itself instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed or not a proxy request (origin-form to the proxy port,
    /// missing `Host`, unparsable authority). 400 `bad_request`.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The path has `.` or `..` segments (raw or percent-encoded). 400 `invalid_path`.
    #[error("path contains dot segments")]
    InvalidPath,
    /// CONNECT authority, SNI and `Host` (or URI authority and `Host`) disagree
    /// (decision 1). 421 `authority_mismatch`.
    #[error("request authority does not match the connection's destination")]
    AuthorityMismatch,
    /// The policy has callers and the request carries no `Proxy-Authorization`, or none
    /// with a caller's token (REFERENCE.md D21). 407 `proxy_auth_required` with
    /// `Proxy-Authenticate: Basic realm="iron-proxy"` (RFC 9110 §11.7.1).
    #[error(
        "proxy authentication required: send Proxy-Authorization with a caller's token (Basic, the token as password, or Bearer)"
    )]
    ProxyAuthRequired,
    /// A caller's token source could not be read, and no other caller's token matched.
    /// 503 `caller_token_unavailable`.
    #[error("a caller token source is unavailable; the request cannot be authenticated")]
    CallerTokenUnavailable,
    /// The caller a tunnel authenticated as is no longer in the policy (a reload removed
    /// it). 403 `caller_revoked`.
    #[error("caller {caller} is no longer in the policy")]
    CallerRevoked {
        /// Caller name.
        caller: String,
    },
    /// The request carries the placeholder of (or asks a token stub of) a secret its
    /// caller is not granted. 403 `secret_not_granted`.
    #[error("secret {secret} is not granted to caller {caller}")]
    SecretNotGranted {
        /// Secret name.
        secret: String,
        /// Caller name.
        caller: String,
    },
    /// The destination is not on the egress allowlist (decision 5).
    /// 403 `destination_not_allowed`.
    #[error("destination {host}:{port} is not allowed by the egress policy")]
    DestinationNotAllowed {
        /// Destination host.
        host: String,
        /// Destination port.
        port: u16,
    },
    /// Every address of the destination is in a deny CIDR (decision 5).
    /// 403 `destination_address_denied`.
    #[error("destination {host} resolves only to denied addresses")]
    DestinationAddressDenied {
        /// Destination host.
        host: String,
    },
    /// A placeholder headed for a host or location its secret does not allow
    /// (decision 3). 403 `placeholder_not_allowed`.
    #[error("placeholder of secret {secret} is not allowed in {location} for this destination")]
    PlaceholderNotAllowed {
        /// Secret name.
        secret: String,
        /// Where it was found.
        location: String,
    },
    /// The secret applies to the host but none of its `capabilities` matches the method
    /// and path. 403 `capability_not_allowed`.
    #[error("secret {secret} has no capability for {method} on this path")]
    CapabilityNotAllowed {
        /// Secret name.
        secret: String,
        /// The request method.
        method: String,
    },
    /// The secret's `rate_limit` is spent. 429 `rate_limited` with `Retry-After`.
    #[error("secret {secret} is over its rate limit; retry in {retry_after_secs} s")]
    RateLimited {
        /// Secret name.
        secret: String,
        /// Whole seconds until a request would be allowed (rounded up, at least 1).
        retry_after_secs: u64,
    },
    /// A secret would be sent over cleartext (decision 4). 403 `cleartext_injection_refused`.
    #[error("secret {secret} may not be sent in {location} over cleartext http")]
    CleartextInjectionRefused {
        /// Secret name.
        secret: String,
        /// Where it would go.
        location: String,
    },
    /// A secret the request needs could not be resolved (source missing, empty, invalid).
    /// The request is never forwarded without it. 502 `credential_unavailable`.
    #[error("credential for secret {secret} is unavailable")]
    CredentialUnavailable {
        /// Secret name.
        secret: String,
    },
    /// The first token mint for a secret is still running past the wait.
    /// 503 `credential_pending` with `Retry-After`.
    #[error("credential for secret {secret} is still being minted; retry shortly")]
    CredentialPending {
        /// Secret name.
        secret: String,
    },
    /// The upstream could not be resolved or connected to. 502 `upstream_unreachable`.
    #[error("upstream is unreachable")]
    UpstreamUnreachable,
    /// The upstream's certificate did not verify, or its TLS handshake failed (decision 6).
    /// 502 `upstream_tls_error`.
    #[error("upstream tls verification failed")]
    UpstreamTls,
    /// The upstream did not answer in time. 504 `upstream_timeout`.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The upstream failed during the exchange. 502 `upstream_error`.
    #[error("upstream failed")]
    Upstream,
    /// The proxy could not open a connection to the upstream for lack of file descriptors
    /// (EMFILE/ENFILE: its own load, not the upstream's fault). 503 `proxy_overloaded`
    /// with `Retry-After: 1`.
    #[error("the proxy is out of file descriptors; retry shortly")]
    ProxyOverloaded,
}

impl ProxyError {
    /// `e` as the response error, for a request by `caller` (named in a
    /// [`ProxyError::SecretNotGranted`]).
    pub fn from_plan(e: PlanError, caller: Option<&str>) -> Self {
        let loc = |l: &Location| l.to_string();
        match e {
            PlanError::NotGranted { secret } => Self::SecretNotGranted {
                secret,
                caller: caller.unwrap_or_default().to_string(),
            },
            PlanError::PlaceholderNotAllowed { secret, location } => Self::PlaceholderNotAllowed {
                secret,
                location: loc(&location),
            },
            PlanError::CapabilityNotAllowed { secret, method } => {
                Self::CapabilityNotAllowed { secret, method }
            }
            PlanError::CleartextInjectionRefused { secret, location } => {
                Self::CleartextInjectionRefused {
                    secret,
                    location: loc(&location),
                }
            }
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::InvalidPath => StatusCode::BAD_REQUEST,
            Self::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::CallerTokenUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::CallerRevoked { .. } | Self::SecretNotGranted { .. } => StatusCode::FORBIDDEN,
            Self::AuthorityMismatch => StatusCode::MISDIRECTED_REQUEST,
            Self::DestinationNotAllowed { .. }
            | Self::DestinationAddressDenied { .. }
            | Self::PlaceholderNotAllowed { .. }
            | Self::CapabilityNotAllowed { .. }
            | Self::CleartextInjectionRefused { .. } => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::CredentialUnavailable { .. }
            | Self::UpstreamUnreachable
            | Self::UpstreamTls
            | Self::Upstream => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::CredentialPending { .. } | Self::ProxyOverloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The stable error code (`x-iron-proxy-error`, audit `error`, JSON `error`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::InvalidPath => "invalid_path",
            Self::ProxyAuthRequired => "proxy_auth_required",
            Self::CallerTokenUnavailable => "caller_token_unavailable",
            Self::CallerRevoked { .. } => "caller_revoked",
            Self::SecretNotGranted { .. } => "secret_not_granted",
            Self::AuthorityMismatch => "authority_mismatch",
            Self::DestinationNotAllowed { .. } => "destination_not_allowed",
            Self::DestinationAddressDenied { .. } => "destination_address_denied",
            Self::PlaceholderNotAllowed { .. } => "placeholder_not_allowed",
            Self::CapabilityNotAllowed { .. } => "capability_not_allowed",
            Self::RateLimited { .. } => "rate_limited",
            Self::CleartextInjectionRefused { .. } => "cleartext_injection_refused",
            Self::CredentialUnavailable { .. } => "credential_unavailable",
            Self::CredentialPending { .. } => "credential_pending",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTls => "upstream_tls_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Upstream => "upstream_error",
            Self::ProxyOverloaded => "proxy_overloaded",
        }
    }

    /// Seconds a client should wait before retrying (`Retry-After`, RFC 9110 §10.2.3):
    /// for a rate limit, until the next request is allowed; for a pending mint, 5 (the README's
    /// promise); when out of file descriptors, 1.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::CredentialPending { .. } => Some(5),
            Self::ProxyOverloaded => Some(1),
            _ => None,
        }
    }

    /// The error as a response: status, `x-iron-proxy-error`, JSON envelope, and
    /// `Retry-After` when [`ProxyError::retry_after`] gives one.
    pub fn to_response(&self, request_id: &str) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "request_id": request_id,
        });
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        let mut resp = Response::new(full(Bytes::from(bytes)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        if let Some(secs) = self.retry_after() {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if *self == Self::ProxyAuthRequired {
            h.insert(
                http::header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"iron-proxy\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn envelope_shape() {
        let e = ProxyError::PlaceholderNotAllowed {
            secret: "GITHUB_TOKEN".into(),
            location: "header:Authorization".into(),
        };
        let resp = e.to_response("r1");
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()[ERROR_HEADER], "placeholder_not_allowed");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "placeholder_not_allowed");
        assert_eq!(v["request_id"], "r1");
        assert!(v["message"].as_str().unwrap().contains("GITHUB_TOKEN"));
        assert!(
            resp_retry_after(&ProxyError::PlaceholderNotAllowed {
                secret: "S".into(),
                location: "path".into(),
            })
            .is_none()
        );
    }

    fn resp_retry_after(e: &ProxyError) -> Option<String> {
        e.to_response("r")
            .headers()
            .get(http::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn rate_limited_and_pending_say_when_to_retry() {
        let limited = ProxyError::RateLimited {
            secret: "S".into(),
            retry_after_secs: 7,
        };
        assert_eq!(limited.status(), 429);
        assert_eq!(resp_retry_after(&limited).as_deref(), Some("7"));
        let pending = ProxyError::CredentialPending { secret: "S".into() };
        assert_eq!(resp_retry_after(&pending).as_deref(), Some("5"));
    }
}
