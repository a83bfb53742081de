//! The iron-proxy policy: the TOML schema, its validation, host patterns, and the pure
//! per-request placeholder plan and rewrite.
//!
//! This crate does no I/O beyond reading the policy file in [`Policy::load`]: no sockets, no
//! tokio, no secret values. Secret *references* (`{ env = … }`, `{ file = … }`) are parsed
//! here and resolved by `iron-broker`; the request plan says which secrets a request needs
//! and where, and [`Plan::apply`] takes the resolved values to produce the rewritten parts.
//!
//! Modules:
//! - [`capability`]: per-secret method/path capabilities and rate limits.
//! - [`error`]: policy diagnostics with file, line and column.
//! - [`host`]: host patterns (`api.example.com`, `*.example.com`, `:PORT`, `:*`).
//! - [`model`]: the validated policy types and the loader.
//! - [`matcher`]: placeholder detection (Aho–Corasick), the plan, and the rewrite.
//! - [`encoding`]: percent-encoding helpers that keep untouched bytes byte-identical.

pub mod capability;
pub mod encoding;
pub mod error;
pub mod host;
pub mod matcher;
pub mod model;
mod raw;

pub use capability::{Capability, PathPattern, RateLimit};
pub use error::{Diagnostic, PolicyErrors, Severity};
pub use host::{HostPattern, PortSpec, PublicSuffix, normalize_host};
pub use matcher::{
    Applied, COMMON_HEADERS, Location, Plan, PlanError, RequestView, Rewritten, SecretValues,
};
pub use model::{
    BrokeredSpec, Caller, ClientAuth, Egress, GcpSpec, Grant, Grants, HeaderSelector, HttpMode,
    InjectFormatter, InjectTarget, Limits, OAuthSpec, PgSpec, Policy, Pos, ProxyScheme,
    ProxySettings, Secret, SecretKind, SourceKind, SourceRef, Stub, TokenEndpoint, UpstreamCa,
    UpstreamProxy,
};
