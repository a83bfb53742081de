//! Loading a policy for use: parse (with drop-in fragments), then check what parsing cannot —
//! every required secret's sources are present, RSA keys and key files parse, the CA (if
//! named) loads, `upstream_ca` files are usable. Used by `check`, `serve` and every reload,
//! so a policy that `check` refuses is never swapped in (DESIGN.md decision 13).

use std::path::Path;
use std::sync::Arc;

use iron_broker::{Env, SourceResolver};
use iron_certs::CertificateAuthority;
use iron_policy::{Diagnostic, Policy, Severity};

/// Loads and fully validates the policy at `path`, reading sources through `env`, as
/// `check` does: a required secret whose source is missing is an error.
/// Returns the policy (if it parsed) and every diagnostic, errors and warnings, sorted by
/// file and position. The policy is usable only when no diagnostic is an error.
pub fn load(path: &Path, env: Arc<dyn Env>) -> (Option<Policy>, Vec<Diagnostic>) {
    load_with(path, env, true)
}

/// As [`load`], for `serve`, `run` and reloads: a required secret whose source is *absent*
/// (unset variable, missing file) is a warning, not an error, so the proxy starts and
/// reports it (`/readyz` 503 naming it, `/v1/secrets` state `missing`) while requests that
/// need it are refused with 502 `credential_unavailable` (the reference's behaviour: a tool
/// with a missing required secret becomes unavailable, the server keeps running). A source
/// that is present but broken (empty, bad JSON, unreadable) stays an error.
pub fn load_for_serving(path: &Path, env: Arc<dyn Env>) -> (Option<Policy>, Vec<Diagnostic>) {
    load_with(path, env, false)
}

/// Checks each caller's token (`[[callers]]`): readable (an unset variable is a warning
/// when serving: that caller gets 503 until it is set), at least 16 bytes (warning: a
/// short token can be guessed), and different from every other caller's (error: the later
/// caller could never be told apart).
fn caller_tokens(policy: &Policy, sources: &SourceResolver, strict: bool) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let mut seen: Vec<(&str, iron_broker::SecretValue)> = Vec::new();
    for c in &policy.callers {
        let mut at = |severity: Severity, message: String| {
            diags.push(Diagnostic {
                file: policy.path.clone(),
                line: c.token.pos.line,
                col: c.token.pos.col,
                severity,
                message: format!("caller `{}`: token: {message}", c.name),
            });
        };
        match sources.resolve(&c.token) {
            Err(e) => at(
                if strict || !e.is_missing() {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                format!("{e} (its requests get 503 caller_token_unavailable until it is set)"),
            ),
            Ok(token) => {
                if token.expose().len() < 16 {
                    at(
                        Severity::Warning,
                        format!(
                            "{} bytes; use at least 16 random bytes (e.g. `openssl rand -hex 32`)",
                            token.expose().len()
                        ),
                    );
                }
                if let Some((other, _)) = seen
                    .iter()
                    .find(|(_, t)| iron_broker::ct_eq(t.expose(), token.expose()))
                {
                    at(
                        Severity::Error,
                        format!("the same as caller `{other}`'s; each caller needs its own"),
                    );
                }
                seen.push((&c.name, token));
            }
        }
    }
    diags
}

fn load_with(path: &Path, env: Arc<dyn Env>, strict: bool) -> (Option<Policy>, Vec<Diagnostic>) {
    let policy = match Policy::load(path) {
        Ok(p) => p,
        Err(e) => return (None, e.diagnostics),
    };
    let mut diags = policy.warnings.clone();
    let sources = SourceResolver::new(env);
    for s in policy.secrets.iter().filter(|s| s.enabled) {
        let at = |line: usize, col: usize, severity: Severity, message: String| Diagnostic {
            file: s.file.clone(),
            line,
            col,
            severity,
            message,
        };
        let (severity, note) = if s.optional {
            (
                Severity::Warning,
                " (optional secret: requests needing it are refused)",
            )
        } else {
            (Severity::Error, "")
        };
        let mut absent = false;
        for (field, src) in s.sources() {
            if let Err(e) = sources.resolve(src) {
                let field = if field == "source" {
                    String::new()
                } else {
                    format!("field {field}: ")
                };
                let (severity, note) = if !strict && !s.optional && e.is_missing() {
                    absent = true;
                    (
                        Severity::Warning,
                        " (required secret: requests needing it are refused and /readyz reports it until it is set)",
                    )
                } else {
                    (severity, note)
                };
                diags.push(at(
                    src.pos.line,
                    src.pos.col,
                    severity,
                    format!("secret `{}`: {field}{e}{note}", s.name),
                ));
            }
        }
        if absent {
            // Input checks below would only repeat that the source is absent.
            continue;
        }
        if let Some(d) = header_unsafe_value(s, &sources) {
            diags.push(at(s.pos.line, s.pos.col, Severity::Warning, d));
        }
        if let iron_policy::SecretKind::Pg(spec) = &s.kind
            && let Ok(v) = sources.resolve(&spec.source)
        {
            match crate::pg::Dsn::parse(&String::from_utf8_lossy(v.expose())) {
                Ok(dsn) if dsn.dbname != spec.database => diags.push(at(
                    s.pos.line,
                    s.pos.col,
                    Severity::Error,
                    format!(
                        "secret `{}`: `database` is `{}` but the DSN names database `{}`",
                        s.name, spec.database, dsn.dbname
                    ),
                )),
                Ok(_) => {}
                Err(e) => diags.push(at(
                    spec.source.pos.line,
                    spec.source.pos.col,
                    severity,
                    format!("secret `{}`: the DSN is invalid: {e}", s.name),
                )),
            }
        }
        for problem in iron_broker::tokens::validate_inputs(s, &sources) {
            diags.push(at(
                s.pos.line,
                s.pos.col,
                severity,
                format!("secret `{}`: {problem}{note}", s.name),
            ));
        }
    }
    if let Some(src) = &policy.proxy.admin_token
        && let Err(e) = sources.resolve(src)
    {
        // Without it every admin call, /healthz and /readyz included, is refused (503).
        diags.push(Diagnostic {
            file: path.to_path_buf(),
            line: src.pos.line,
            col: src.pos.col,
            severity: if strict || !e.is_missing() {
                Severity::Error
            } else {
                Severity::Warning
            },
            message: format!(
                "[proxy] admin_token: {e} (every admin call is refused with 503 until it is set)"
            ),
        });
    }
    diags.extend(caller_tokens(&policy, &sources, strict));
    if let Some(src) = policy
        .proxy
        .upstream_proxy
        .as_ref()
        .and_then(|p| p.auth.as_ref())
    {
        let problem = match sources.resolve(src) {
            Err(e) => Some((
                if strict || !e.is_missing() {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                format!("{e} (every dial through the upstream proxy fails until it is set)"),
            )),
            Ok(v) if iron_broker::upstream_proxy::split_credential(v.expose()).is_none() => Some((
                Severity::Error,
                "the value is not USER:PASSWORD (UTF-8, each at most 255 bytes)".to_string(),
            )),
            Ok(_) => None,
        };
        if let Some((severity, message)) = problem {
            diags.push(Diagnostic {
                file: policy.path.clone(),
                line: src.pos.line,
                col: src.pos.col,
                severity,
                message: format!("[proxy] upstream_proxy_auth: {message}"),
            });
        }
    }
    let top = |message: String| Diagnostic {
        file: path.to_path_buf(),
        line: 1,
        col: 1,
        severity: Severity::Error,
        message,
    };
    if let Some((cert, key)) = &policy.proxy.ca
        && let Err(e) = CertificateAuthority::load(cert, key)
    {
        diags.push(top(format!(
            "[proxy] ca_cert/ca_key: {}",
            crate::pipeline::ErrorChain(&e)
        )));
    }
    if let Err(e) = crate::upstream::client_tls_config(&policy, crate::crypto_provider()) {
        diags.push(top(format!("[proxy] {e}")));
    }
    diags.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
    (Some(policy), diags)
}

/// A warning when a static secret that goes into headers has a value no header may carry
/// (RFC 9110 §5.5: no CR, LF, NUL or other control character but tab): such a request is
/// refused with 502 `credential_unavailable` when it comes, so `check` says it first. Only a
/// warning: the same value may be fine where the secret is swapped into a path or query
/// (percent-encoded there), and a file source may be corrected while the proxy runs.
fn header_unsafe_value(s: &iron_policy::Secret, sources: &SourceResolver) -> Option<String> {
    use iron_policy::{HttpMode, InjectTarget, SecretKind};
    let SecretKind::Static(src) = &s.kind else {
        return None;
    };
    let in_headers = match &s.mode {
        HttpMode::Replace { headers, .. } => headers.selects_any(),
        HttpMode::Inject { target, .. } => matches!(target, InjectTarget::Header(_)),
    };
    if !in_headers {
        return None;
    }
    let value = sources.resolve(src).ok()?;
    let bad = value
        .expose()
        .iter()
        .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f);
    bad.then(|| {
        format!(
            "secret `{}`: its value holds a line break or another control character, which no header can carry: requests that would put it in a header are refused (502 credential_unavailable)",
            s.name
        )
    })
}

/// True when any diagnostic is an error.
pub fn has_errors(diags: &[Diagnostic]) -> bool {
    diags.iter().any(|d| d.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value with a line break inside is reported by `check` for a header secret (a
    /// single trailing newline is stripped by the source and is fine), not for one that
    /// only goes into the query.
    #[test]
    fn header_secret_with_a_line_break_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            "version = 1\n\
             [[secrets]]\nname = \"HDR_TOKEN\"\ntype = \"http\"\nsource = { env = \"HDR_TOKEN\" }\nhosts = [\"a.test\"]\n\
             [[secrets]]\nname = \"QRY_TOKEN\"\ntype = \"http\"\nsource = { env = \"QRY_TOKEN\" }\nhosts = [\"a.test\"]\nmatch_headers = []\nmatch_query = [\"key\"]\n\
             [[secrets]]\nname = \"TXT_TOKEN\"\ntype = \"http\"\nsource = { env = \"TXT_TOKEN\" }\nhosts = [\"a.test\"]\n",
        )
        .unwrap();
        let env: std::collections::HashMap<String, String> = [
            ("HDR_TOKEN", "abc\r\nX-Evil: 1"),
            ("QRY_TOKEN", "abc\ndef"),
            ("TXT_TOKEN", "fine-value\n"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (loaded, diags) = load(&policy, Arc::new(env));
        assert!(loaded.is_some(), "{diags:?}");
        assert!(!has_errors(&diags), "{diags:?}");
        let warned: Vec<_> = diags
            .iter()
            .filter(|d| d.message.contains("control character"))
            .collect();
        assert_eq!(warned.len(), 1, "{diags:?}");
        assert!(
            warned[0].message.starts_with("secret `HDR_TOKEN`"),
            "{diags:?}"
        );
        assert!(
            !warned[0].message.contains("Evil"),
            "the value is never shown"
        );
    }
}
