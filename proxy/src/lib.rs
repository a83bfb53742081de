//! iron-proxy: an egress, credential-injecting, TLS-intercepting forward proxy.
//!
//! Sandboxed code holds placeholders and sends its traffic through the proxy; the proxy
//! intercepts TLS with its own CA and swaps each placeholder for the real credential, only
//! on the way to the hosts that credential is meant for (DESIGN.md). This crate is the
//! listener, CONNECT handling, TLS interception, the request pipeline, the upstream client,
//! the audit log and the command line. Policy parsing and the placeholder plan live in
//! `iron-policy`, certificates in `iron-certs`, secret sources in `iron-broker`.
//!
//! Modules:
//! - [`server`]: accept loop, CONNECT, tunnels, interception.
//! - [`pipeline`]: the per-request phases bind → plan → resolve → rewrite → forward → audit.
//! - [`upstream`]: policy-checked resolution, the pooled verified client, error mapping.
//! - [`error`]: `ProxyError` and the error envelope.
//! - [`audit`]: the JSON audit line.
//! - [`state`]: the state directory, CA bootstrap and CA bundle.
//! - [`sandbox`]: the sandbox environment (`env`, `run`).
//! - [`origin`]: a recording local TLS origin (used by `demo` and the tests).
//! - [`cli`]: the `iron-proxy` command line.

pub mod audit;
pub mod body;
pub mod cli;
pub mod client;
pub mod demo;
pub mod error;
pub mod io;
pub mod origin;
pub mod pipeline;
pub mod sandbox;
pub mod server;
pub mod state;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use iron_broker::{Env, SourceResolver};
use iron_certs::{CertificateAuthority, LeafCache};
use iron_policy::Policy;
use tokio::net::TcpListener;

pub use audit::{AuditRecord, AuditSink, MemoryAudit, StderrAudit};
pub use error::ProxyError;

/// Everything a running proxy shares across connections.
pub struct Runtime {
    /// The policy in force.
    pub policy: Arc<Policy>,
    /// Leaf certificates for intercepted hosts.
    pub leaves: LeafCache,
    /// The pooled upstream client.
    pub client: upstream::UpstreamClient,
    /// Secret sources.
    pub sources: Arc<SourceResolver>,
    /// Access tokens of `oauth_token` and `gcp_auth` secrets.
    pub tokens: Arc<iron_broker::tokens::TokenCache>,
    /// Where audit lines go.
    pub audit: Arc<dyn AuditSink>,
    id_prefix: u32,
    ids: AtomicU64,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

/// The one crypto provider of the process (DESIGN.md decision 10).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Runtime {
    /// Builds the runtime for `policy`, intercepting with `ca`, reading secret sources from
    /// `env`, writing audit records to `audit`.
    ///
    /// # Errors
    /// A message when an `upstream_ca` file is unusable or TLS setup fails.
    pub fn new(
        policy: Arc<Policy>,
        ca: Arc<CertificateAuthority>,
        env: Arc<dyn Env>,
        audit: Arc<dyn AuditSink>,
    ) -> Result<Self, String> {
        let provider = crypto_provider();
        let leaves = LeafCache::new(
            ca,
            provider.clone(),
            policy.proxy.limits.leaf_cache_size,
            vec![b"http/1.1".to_vec()],
        )
        .map_err(|e| format!("failed to set up leaf certificates: {e}"))?;
        let tls = upstream::client_tls_config(&policy, provider)?;
        let client = upstream::build_client(&policy, tls);
        let sources = Arc::new(SourceResolver::new(env));
        let tokens = iron_broker::tokens::TokenCache::new(
            Arc::new(upstream::ClientTransport::new(
                client.clone(),
                policy.proxy.limits.upstream_response_header_timeout,
            )),
            sources.clone(),
            iron_broker::tokens::TokenSettings::default(),
        );
        let seed = std::collections::hash_map::RandomState::new();
        let id_prefix = std::hash::BuildHasher::hash_one(&seed, std::process::id()) as u32;
        Ok(Self {
            policy,
            leaves,
            client,
            sources,
            tokens,
            audit,
            id_prefix,
            ids: AtomicU64::new(0),
        })
    }

    /// A new request id: 16 hex digits, unique within the process.
    pub fn next_request_id(&self) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:08x}", self.id_prefix, n as u32)
    }
}

/// A running proxy listener.
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting connections (connections already open finish on their own).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves the proxy on it in a background task.
///
/// # Errors
/// The bind error.
pub async fn start(rt: Arc<Runtime>, addr: SocketAddr) -> std::io::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(server::serve(rt, listener));
    Ok(Running { addr, task })
}
