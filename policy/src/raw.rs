//! Raw serde shapes of the policy file. Every table rejects unknown keys; values the
//! validator reports on carry their spans so errors can name a line and column.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub version: Option<Spanned<i64>>,
    #[serde(default)]
    pub include: Vec<Spanned<String>>,
    #[serde(default)]
    pub proxy: Option<Spanned<RawProxy>>,
    #[serde(default)]
    pub secrets: Vec<Spanned<RawSecret>>,
    #[serde(default)]
    pub callers: Vec<Spanned<RawCaller>>,
}

/// One `[[callers]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCaller {
    pub name: Option<Spanned<String>>,
    pub token: Option<Spanned<RawSource>>,
    pub secrets: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A drop-in fragment named by `include`: secrets only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFragment {
    pub version: Option<Spanned<i64>>,
    #[serde(default)]
    pub secrets: Vec<Spanned<RawSecret>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    pub listen: Option<Spanned<String>>,
    pub admin_listen: Option<Spanned<String>>,
    pub admin_token: Option<Spanned<RawSource>>,
    pub ca_cert: Option<Spanned<String>>,
    pub ca_key: Option<Spanned<String>>,
    pub egress: Option<Spanned<String>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub passthrough: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    pub upstream_ca: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub resolve: BTreeMap<String, Spanned<String>>,
    pub upstream_proxy: Option<Spanned<String>>,
    pub upstream_proxy_auth: Option<Spanned<RawSource>>,
    #[serde(default)]
    pub no_proxy: Vec<Spanned<String>>,
    #[serde(default)]
    pub limits: Option<Spanned<RawLimits>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_header_bytes: Option<Spanned<u64>>,
    pub max_headers: Option<Spanned<u64>>,
    pub client_header_timeout_secs: Option<Spanned<u64>>,
    pub tls_handshake_timeout_secs: Option<Spanned<u64>>,
    pub idle_timeout_secs: Option<Spanned<u64>>,
    pub upstream_connect_timeout_secs: Option<Spanned<u64>>,
    pub upstream_response_header_timeout_secs: Option<Spanned<u64>>,
    pub leaf_cache_size: Option<Spanned<u64>>,
    pub max_connections: Option<Spanned<u64>>,
    pub shutdown_grace_secs: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecret {
    pub name: Option<Spanned<String>>,
    #[serde(rename = "type")]
    pub kind: Option<Spanned<String>>,
    pub placeholder: Option<Spanned<String>>,
    pub source: Option<Spanned<RawSource>>,
    pub mode: Option<Spanned<String>>,
    pub match_headers: Option<Spanned<Vec<Spanned<String>>>>,
    pub match_query: Option<Spanned<Vec<Spanned<String>>>>,
    pub match_path: Option<Spanned<bool>>,
    pub inject_header: Option<Spanned<String>>,
    pub inject_query_param: Option<Spanned<String>>,
    pub inject_formatter: Option<Spanned<String>>,
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub optional: Option<bool>,
    pub enabled: Option<bool>,
    pub allow_plaintext: Option<bool>,
    pub scrub_response_body: Option<bool>,
    pub websocket_frames: Option<bool>,
    pub on_failure: Option<Spanned<String>>,
    pub capabilities: Option<Spanned<Vec<Spanned<RawCapability>>>>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    // oauth_token
    pub grant: Option<Spanned<String>>,
    pub token_endpoint: Option<Spanned<String>>,
    pub scopes: Option<Spanned<Vec<String>>>,
    pub fields: Option<Spanned<BTreeMap<String, Spanned<RawSource>>>>,
    pub token_endpoint_headers: Option<Spanned<BTreeMap<String, Spanned<RawSource>>>>,
    pub audience: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    // gcp_auth
    pub keyfile: Option<Spanned<RawSource>>,
    pub subject: Option<Spanned<String>>,
    // pg_dsn
    pub database: Option<Spanned<String>>,
    pub listen: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub role: Option<Spanned<String>>,
    pub settings: Option<Spanned<BTreeMap<String, String>>>,
    pub client_tls: Option<Spanned<bool>>,
    pub max_connections: Option<Spanned<u64>>,
    // brokered_token
    pub credential: Option<Spanned<String>>,
    pub broker: Option<Spanned<RawBroker>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCapability {
    pub name: Option<String>,
    #[allow(dead_code)] // documentation for people reading the policy
    pub description: Option<String>,
    pub method: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub requests_per_minute: Option<Spanned<i64>>,
    pub burst: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub url: Spanned<String>,
    pub token: Option<Spanned<RawSource>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    pub env: Option<String>,
    pub file: Option<String>,
    pub json_key: Option<String>,
}
