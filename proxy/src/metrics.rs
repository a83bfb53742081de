//! Prometheus metrics (text format on the admin listener's `/metrics`), with an explicit
//! registry. Labels are bounded: outcome and error codes, host classes, secret *names*,
//! results — never values, placeholders in query strings or other client input.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::audit::AuditRecord;

/// Labels of `iron_proxy_requests`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `request`, `connect` or `tunnel`.
    pub kind: &'static str,
    /// Audit outcome.
    pub outcome: &'static str,
    /// Error code, or `none`.
    pub code: &'static str,
    /// Host class (see [`crate::audit::AuditRecord::host_class`]).
    pub host_class: &'static str,
}

/// A secret name label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    /// Secret name.
    pub secret: String,
}

/// A secret name and a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretResult {
    /// Secret name.
    pub secret: String,
    /// `ok` or an error kind.
    pub result: String,
}

/// Labels of `iron_proxy_caller_requests`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabels {
    /// The caller's name (`[[callers]]`: bounded by the policy).
    pub caller: String,
    /// Audit outcome.
    pub outcome: &'static str,
}

/// A result label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The result.
    pub result: &'static str,
}

/// An error-code label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The error code.
    pub code: &'static str,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests, refused CONNECTs and passthrough tunnels, by outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Secrets swapped or injected, by secret.
    pub injections: Family<SecretLabel, Counter>,
    /// Refusals, by error code.
    pub refusals: Family<CodeLabel, Counter>,
    /// Requests, tunnels and refusals of authenticated callers, by caller and outcome.
    pub caller_requests: Family<CallerLabels, Counter>,
    /// Time from forwarding a request to the upstream's response headers, in seconds.
    pub upstream_seconds: Histogram,
    /// Open client connections (tunnels included).
    pub active_connections: Gauge,
    /// Client TLS handshakes in intercepted tunnels, by result.
    pub tls_handshakes: Family<ResultLabel, Counter>,
    /// Leaf certificate cache lookups, `hit` or `miss`.
    pub leaf_cache: Family<ResultLabel, Counter>,
    /// Token mints, by secret and result.
    pub token_mints: Family<SecretResult, Counter>,
    /// Seconds until the cached token of each token secret expires.
    pub token_expiry_seconds: Family<SecretLabel, Gauge<f64, AtomicU64>>,
    /// Policy reloads, `ok` or `invalid`.
    pub reloads: Family<ResultLabel, Counter>,
    /// Upstream connections opened by the pooled clients (TCP connect, TLS and HTTP/1.1
    /// handshakes done; against `requests`, how often keep-alive saves a handshake), and
    /// requests they sent again after an upstream closed an idle connection under them.
    pub upstream: crate::upstream::UpstreamCounters,
    /// The `requests` counters of forwarded requests without an error, by host class
    /// ([`FORWARDED_CLASSES`]), taken from the family once: a family look-up hashes its four
    /// label strings under a lock, and this is the counter nearly every request counts.
    forwarded: [std::sync::OnceLock<Counter>; FORWARDED_CLASSES.len()],
}

/// Host classes whose forwarded-request counter [`Metrics`] keeps at hand.
const FORWARDED_CLASSES: [&str; 6] = ["secret", "stub", "passthrough", "allow", "open", "denied"];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("iron_proxy");
        let m = Self {
            requests: Family::default(),
            injections: Family::default(),
            refusals: Family::default(),
            caller_requests: Family::default(),
            upstream_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            active_connections: Gauge::default(),
            tls_handshakes: Family::default(),
            leaf_cache: Family::default(),
            token_mints: Family::default(),
            token_expiry_seconds: Family::default(),
            reloads: Family::default(),
            upstream: Default::default(),
            forwarded: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests, refused CONNECTs and tunnels by outcome",
            m.requests.clone(),
        );
        registry.register(
            "injections",
            "Secrets swapped or injected, by secret",
            m.injections.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused by the proxy, by error code",
            m.refusals.clone(),
        );
        registry.register(
            "caller_requests",
            "Requests, tunnels and refusals of authenticated callers, by caller and outcome",
            m.caller_requests.clone(),
        );
        registry.register(
            "upstream_response_seconds",
            "Time to upstream response headers",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "active_connections",
            "Open client connections",
            m.active_connections.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Client TLS handshakes by result",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "leaf_cache_lookups",
            "Leaf certificate cache lookups",
            m.leaf_cache.clone(),
        );
        registry.register(
            "token_mints",
            "Token mints by secret and result",
            m.token_mints.clone(),
        );
        registry.register(
            "token_expiry_seconds",
            "Seconds until the cached access token expires",
            m.token_expiry_seconds.clone(),
        );
        registry.register("reloads", "Policy reloads by result", m.reloads.clone());
        registry.register(
            "upstream_connections_opened",
            "Upstream connections opened by the pooled clients",
            m.upstream.opened.clone(),
        );
        registry.register(
            "upstream_requests_resent",
            "Idempotent requests sent again on a new connection after the upstream closed an idle one under them",
            m.upstream.resent.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Counts an audit record: one per request, refused CONNECT or tunnel. (Its secrets'
    /// `injections` are counted through their [`crate::SecretStats`].)
    pub fn observe(&self, rec: &AuditRecord) {
        let code = rec.error.unwrap_or("none");
        let labels = || RequestLabels {
            kind: rec.kind,
            outcome: rec.outcome,
            code,
            host_class: rec.host_class,
        };
        let hot = (rec.kind == "request" && rec.outcome == "forwarded" && rec.error.is_none())
            .then(|| FORWARDED_CLASSES.iter().position(|c| *c == rec.host_class))
            .flatten();
        match hot {
            Some(i) => self.forwarded[i]
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc(),
            None => self.requests.get_or_create(&labels()).inc(),
        };
        if rec.outcome == "refused" {
            self.refusals.get_or_create(&CodeLabel { code }).inc();
        }
        if let Some(caller) = &rec.caller {
            self.caller_requests
                .get_or_create(&CallerLabels {
                    caller: caller.to_string(),
                    outcome: rec.outcome,
                })
                .inc();
        }
    }

    /// Counts a result in a `result`-labelled family.
    pub fn count(family: &Family<ResultLabel, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabel { result }).inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_requests_are_counted_in_the_family() {
        // The kept counters are the family's own: what /metrics shows.
        let m = Metrics::default();
        let rec = |host_class: &'static str, outcome: &'static str, error| {
            let mut r = AuditRecord::new(
                "request",
                crate::RequestId::default(),
                ([127, 0, 0, 1], 1).into(),
                "GET",
            );
            r.host_class = host_class;
            r.outcome = outcome;
            r.error = error;
            r
        };
        for _ in 0..3 {
            m.observe(&rec("secret", "forwarded", None));
        }
        m.observe(&rec("stub", "forwarded", None));
        m.observe(&rec("secret", "refused", Some("placeholder_not_allowed")));
        m.observe(&rec("secret", "forwarded", Some("upstream_timeout")));
        let text = m.encode();
        for want in [
            r#"iron_proxy_requests_total{kind="request",outcome="forwarded",code="none",host_class="secret"} 3"#,
            r#"iron_proxy_requests_total{kind="request",outcome="forwarded",code="none",host_class="stub"} 1"#,
            r#"iron_proxy_requests_total{kind="request",outcome="refused",code="placeholder_not_allowed",host_class="secret"} 1"#,
            r#"iron_proxy_requests_total{kind="request",outcome="forwarded",code="upstream_timeout",host_class="secret"} 1"#,
            r#"iron_proxy_refusals_total{code="placeholder_not_allowed"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "{want} missing from\n{text}"
            );
        }
    }
}
