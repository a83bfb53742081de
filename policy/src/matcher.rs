//! Placeholder detection, the per-request plan, and the rewrite.
//!
//! One Aho–Corasick automaton over every placeholder of the policy is built at load time, so
//! a request without placeholders costs one scan per header value, the path and the query.
//! [`Policy::plan`] is the fail-closed decision (DESIGN.md decisions 2–4): every occurrence
//! of a known placeholder — in any header, in a query parameter, in the path, raw or
//! percent-encoded, or inside `Authorization: Basic` — must be on a host and in a location
//! its secret allows, over TLS unless the secret allows plaintext, or the whole request is
//! refused. [`Plan::apply`] then swaps every occurrence, editing only the matched bytes.

use std::borrow::Cow;
use std::fmt;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use smallvec::SmallVec;

use crate::encoding::{decode_mapped, encode_component};
use crate::model::{Grants, HttpMode, InjectTarget, Policy, Secret};

/// The compiled placeholder automaton over the HTTP-applied secrets (`pg_dsn` secrets are
/// relayed, not matched). `owners[i]` is the secret index of pattern `i`.
#[derive(Debug, Clone)]
pub(crate) struct PlaceholderMatcher {
    ac: Option<AhoCorasick>,
    owners: Vec<usize>,
    /// The same placeholders, ASCII case-insensitive: for header names, which reach the
    /// origin in the client's casing while the plan sees them lower-cased.
    names: Option<AhoCorasick>,
    /// The shortest placeholder's length in bytes: a shorter haystack holds none.
    min_len: usize,
}

impl PlaceholderMatcher {
    /// Builds the automata over every placeholder but `pg_dsn`'s.
    ///
    /// # Errors
    /// The automaton builder's message when it cannot build one (limits of the
    /// `aho-corasick` crate): a policy whose placeholders could not be searched for would let
    /// every placeholder pass unrefused, so it does not load.
    pub(crate) fn new(secrets: &[Secret]) -> Result<Self, String> {
        let owners: Vec<usize> = secrets
            .iter()
            .enumerate()
            .filter(|(_, s)| !matches!(s.kind, crate::model::SecretKind::Pg(_)))
            .map(|(i, _)| i)
            .collect();
        let failed = |e: aho_corasick::BuildError| format!("placeholder search: {e}");
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(owners.iter().map(|&i| secrets[i].placeholder.as_bytes()))
            .map_err(failed)?;
        let names = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(owners.iter().map(|&i| secrets[i].placeholder.as_bytes()))
            .map_err(failed)?;
        let (ac, names) = if owners.is_empty() {
            (None, None)
        } else {
            (Some(ac), Some(names))
        };
        let min_len = owners
            .iter()
            .map(|&i| secrets[i].placeholder.len())
            .min()
            .unwrap_or(0);
        Ok(Self {
            ac,
            owners,
            names,
            min_len,
        })
    }

    /// The first header (index in `headers`) whose name holds a placeholder in any ASCII
    /// casing, with the placeholder's secret index. Names shorter than every placeholder
    /// are skipped. (Measured per keep-alive GET: ~0.6k instructions, less than joining the
    /// names for one search or lower-casing them for a case-sensitive one.)
    fn find_in_names(&self, headers: &[(&str, &[u8])]) -> Option<(usize, usize)> {
        let ac = self.names.as_ref()?;
        headers.iter().enumerate().find_map(|(i, (name, _))| {
            if name.len() < self.min_len {
                return None;
            }
            let m = ac.find(name.as_bytes())?;
            Some((i, self.owners[m.pattern().as_usize()]))
        })
    }

    /// Matches in `hay` as (secret index, start, end), leftmost-longest and not
    /// overlapping. The common case, a value with no placeholder, is one search and no
    /// iterator (a value shorter than every placeholder is not searched at all); after a
    /// first match the search goes on from its end, and only when what is left could hold
    /// another placeholder (`Bearer TOKEN` is searched once).
    fn find<'h>(&'h self, hay: &'h [u8]) -> impl Iterator<Item = (usize, usize, usize)> + 'h {
        let first = self
            .ac
            .as_ref()
            .filter(|_| hay.len() >= self.min_len)
            .and_then(|ac| Some((ac, ac.find(hay)?)));
        let rest = first
            .as_ref()
            .filter(|(_, m)| hay.len() - m.end() >= self.min_len)
            .map(|(ac, m)| ac.find_iter(aho_corasick::Input::new(hay).range(m.end()..)));
        first
            .map(|(_, m)| m)
            .into_iter()
            .chain(rest.into_iter().flatten())
            .map(|m| (self.owners[m.pattern().as_usize()], m.start(), m.end()))
    }

    /// `hay` with every placeholder replaced by its value, in a vector of exactly its length
    /// (so it can become shared bytes without another allocation).
    fn replace(&self, hay: &[u8], values: &dyn SecretValues) -> Vec<u8> {
        let found: SmallVec<[(usize, usize, usize); 2]> = self.find(hay).collect();
        splice(hay, found.iter().copied(), values)
    }
}

/// The parts of a request the plan looks at. Hop-by-hop headers (incl.
/// `Proxy-Authorization`) must already be removed: they never reach an origin.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Destination host, normalized ([`crate::normalize_host`]).
    pub host: &'a str,
    /// Destination port.
    pub port: u16,
    /// True on a verified TLS connection to the destination (an intercepted tunnel).
    pub tls: bool,
    /// The request method, as sent.
    pub method: &'a str,
    /// The raw path, without the query.
    pub path: &'a str,
    /// The raw query, without `?`.
    pub query: Option<&'a str>,
    /// Headers as sent: name (client casing) and value bytes.
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// Where a placeholder was found or a value put. Displays as `header:NAME`, `query:NAME` or
/// `path` (the reference's audit `locations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A header, with the client's casing (common names are not copied: see
    /// [`Location::header`]).
    Header(Cow<'static, str>),
    /// A query parameter (decoded name).
    Query(String),
    /// The path.
    Path,
}

/// Header names a placeholder is commonly found in, as HTTP/1 servers hand them over
/// (lowercase): a [`Location`] for one of these borrows the name instead of copying it (and
/// the proxy caches the audit entry of such a location).
pub const COMMON_HEADERS: [&str; 6] = [
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "x-auth-token",
    "anthropic-api-key",
];

impl Location {
    /// The location of header `name`, kept with the casing given.
    pub fn header(name: &str) -> Self {
        Self::Header(
            COMMON_HEADERS
                .into_iter()
                .find(|h| *h == name)
                .map_or_else(|| Cow::Owned(name.to_string()), Cow::Borrowed),
        )
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(h) => write!(f, "header:{h}"),
            Self::Query(q) => write!(f, "query:{q}"),
            Self::Path => f.write_str("path"),
        }
    }
}

/// Why a request is refused by the plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A placeholder headed for a host or location its secret does not allow (decision 3):
    /// 403 `placeholder_not_allowed`.
    #[error("placeholder of secret `{secret}` is not allowed in {location} for this host")]
    PlaceholderNotAllowed {
        /// Secret name.
        secret: String,
        /// Where it was found.
        location: Location,
    },
    /// The secret applies to this host, but it has capabilities and none matches the
    /// request's method and path ([`crate::Capability`]): 403 `capability_not_allowed`.
    #[error("secret `{secret}` has no capability for {method} on this path")]
    CapabilityNotAllowed {
        /// Secret name.
        secret: String,
        /// The request method.
        method: String,
    },
    /// The placeholder of a secret the request's caller is not granted
    /// ([`crate::Caller::grants`]): 403 `secret_not_granted`.
    #[error("secret `{secret}` is not granted to this caller")]
    NotGranted {
        /// Secret name.
        secret: String,
    },
    /// A secret would be sent over cleartext HTTP (decision 4): 403
    /// `cleartext_injection_refused`.
    #[error("secret `{secret}` would be sent in {location} over cleartext http")]
    CleartextInjectionRefused {
        /// Secret name.
        secret: String,
        /// Where it would go.
        location: Location,
    },
}

/// One secret applied to a request, for the audit line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Index into [`Policy::secrets`].
    pub secret: usize,
    /// Where it was swapped or injected.
    pub location: Location,
}

/// What the rewrite will do; says which secret values must be resolved first. The lists
/// hold their first two entries inline: a request with one or two placeholders allocates
/// nothing for its plan.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Secret indices (into [`Policy::secrets`]) whose values the rewrite needs, once each.
    pub secrets: SmallVec<[usize; 2]>,
    /// Every swap and injection, in request order.
    pub applied: SmallVec<[Applied; 2]>,
    header_edits: SmallVec<[(usize, bool); 2]>,
    /// Every placeholder found in a header value as sent, as (header index, secret index,
    /// start, end): [`Plan::apply`] swaps these without scanning the value again.
    header_spans: SmallVec<[(usize, usize, usize, usize); 2]>,
    path_edit: bool,
    query_edit: bool,
    injects: SmallVec<[usize; 2]>,
}

/// Resolved secret values, by secret index. Implemented by the proxy over its own redacted
/// secret type.
pub trait SecretValues {
    /// The value of secret `index`. Only called for indices in [`Plan::secrets`].
    fn value(&self, index: usize) -> &[u8];
}

/// The rewritten parts of a request. They hold real secret values: `Debug` shows which
/// parts changed, never their bytes (DESIGN.md decision 8).
#[derive(Default)]
pub struct Rewritten {
    /// New values for headers, by index in [`RequestView::headers`], each exactly as long
    /// as its bytes (the first two held inline).
    pub headers: SmallVec<[(usize, Vec<u8>); 2]>,
    /// Headers to set (inject mode): remove every header of this name, any casing, then add
    /// it with this casing and value.
    pub set_headers: Vec<(String, Vec<u8>)>,
    /// The new raw path, when it changed.
    pub path: Option<String>,
    /// The new raw query, when it changed.
    pub query: Option<String>,
}

impl fmt::Debug for Rewritten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let indices: SmallVec<[usize; 2]> = self.headers.iter().map(|(i, _)| *i).collect();
        let names: Vec<&str> = self.set_headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Rewritten")
            .field("headers", &indices)
            .field("set_headers", &names)
            .field("path", &self.path.as_ref().map(|_| "<redacted>"))
            .field("query", &self.query.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Plan {
    /// Leaves out the injection of secret `s` (its value could not be had and it fails
    /// open, [`crate::Secret::fail_open`]): true when the plan only injected it; false,
    /// changing nothing, when the request carries its placeholder (which must not be
    /// forwarded without its value) or the plan does not inject it.
    pub fn skip_inject(&mut self, s: usize) -> bool {
        if !self.injects.contains(&s) || self.header_spans.iter().any(|sp| sp.1 == s) {
            return false;
        }
        self.injects.retain(|&mut i| i != s);
        self.applied.retain(|a| a.secret != s);
        self.secrets.retain(|&mut i| i != s);
        true
    }

    /// True when the request needs no change.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }

    /// Applies the plan to `req` with `values` (which must hold every secret in
    /// [`Plan::secrets`]). Only matched bytes change: the rest of the path and query stays
    /// byte-identical.
    pub fn apply(
        &self,
        policy: &Policy,
        req: &RequestView<'_>,
        values: &dyn SecretValues,
    ) -> Rewritten {
        let m = &policy.matcher;
        let mut out = Rewritten::default();
        for &(i, basic) in &self.header_edits {
            let Some((_, value)) = req.headers.get(i) else {
                continue;
            };
            let mut v = if basic {
                m.replace(value, values)
            } else {
                let spans = self.header_spans.iter().filter(move |sp| sp.0 == i);
                splice(
                    value,
                    spans.map(|&(_, s, start, end)| (s, start, end)),
                    values,
                )
            };
            if basic && let Some((scheme, creds, engine)) = split_basic(&v) {
                let swapped = m.replace(&creds, values);
                let encoded = engine.encode(&swapped);
                let mut nv = Vec::with_capacity(scheme.len() + encoded.len());
                nv.extend_from_slice(scheme);
                nv.extend_from_slice(encoded.as_bytes());
                v = nv;
            }
            out.headers.push((i, v));
        }
        if self.path_edit {
            out.path = Some(replace_decoded(m, req.path, false, values));
        }
        let mut query = req.query.map(Cow::Borrowed);
        if self.query_edit
            && let Some(q) = &query
        {
            let edited = q
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((k, v)) => format!("{k}={}", replace_decoded(m, v, true, values)),
                    None => param.to_string(),
                })
                .collect::<Vec<_>>()
                .join("&");
            query = Some(edited.into());
        }
        for &s in &self.injects {
            let Some(HttpMode::Inject { target, formatter }) =
                policy.secrets.get(s).map(|s| &s.mode)
            else {
                continue;
            };
            let rendered = formatter.render(values.value(s));
            match target {
                InjectTarget::Header(h) => out.set_headers.push((h.clone(), rendered)),
                InjectTarget::Query(p) => {
                    let kept: Vec<&str> = query
                        .as_deref()
                        .unwrap_or("")
                        .split('&')
                        .filter(|kv| {
                            !kv.is_empty() && {
                                let k = kv.split_once('=').map_or(*kv, |(k, _)| k);
                                decode_mapped(k, true).bytes != p.as_bytes()
                            }
                        })
                        .collect();
                    let mut q = kept.join("&");
                    if !q.is_empty() {
                        q.push('&');
                    }
                    q.push_str(&encode_component(p.as_bytes()));
                    q.push('=');
                    q.push_str(&encode_component(&rendered));
                    query = Some(q.into());
                }
            }
        }
        if query.as_deref() != req.query {
            out.query = query.map(Cow::into_owned);
        }
        out
    }
}

impl Policy {
    /// Plans the placeholder swap and injections for `req`, or refuses it.
    ///
    /// # Errors
    /// [`PlanError::PlaceholderNotAllowed`] when any placeholder occurrence is on a host or
    /// in a location its secret does not allow; [`PlanError::CapabilityNotAllowed`] when a
    /// secret that would be applied has capabilities and none matches the method and path;
    /// [`PlanError::CleartextInjectionRefused`]
    /// when a secret would go over cleartext without `allow_plaintext`.
    pub fn plan(&self, req: &RequestView<'_>) -> Result<Plan, PlanError> {
        self.plan_for(req, &Grants::All)
    }

    /// [`Policy::plan`] for a caller with `grants` ([`crate::Caller`]): a secret it is not
    /// granted is never applied. Its placeholder anywhere in the request is refused, and a
    /// secret that injects is left out (the next most specific granted one on the same
    /// target, if any, goes in its place).
    ///
    /// # Errors
    /// Those of [`Policy::plan`], and [`PlanError::NotGranted`] for the placeholder of a
    /// secret outside `grants` (checked before where it was found).
    pub fn plan_for(&self, req: &RequestView<'_>, grants: &Grants) -> Result<Plan, PlanError> {
        let m = &self.matcher;
        let mut plan = Plan::default();
        // No secret is swapped into a header name: a placeholder there is refused (decision
        // 3), in whatever casing the client sent it.
        if let Some((i, s)) = m.find_in_names(req.headers) {
            return Err(PlanError::PlaceholderNotAllowed {
                secret: self.secrets[s].name.clone(),
                location: Location::header(req.headers[i].0),
            });
        }
        for (i, (name, value)) in req.headers.iter().enumerate() {
            let mut found = false;
            for (s, start, end) in m.find(value) {
                self.check(req, grants, s, Location::header(name), &mut plan)?;
                plan.header_spans.push((i, s, start, end));
                found = true;
            }
            let mut basic = false;
            let hidden = |s: usize| PlanError::PlaceholderNotAllowed {
                secret: self.secrets[s].name.clone(),
                location: Location::header(name),
            };
            if name.eq_ignore_ascii_case("authorization") {
                if let Some((_, creds, _)) = split_basic(value) {
                    for (s, _, _) in m.find(&creds) {
                        self.check(req, grants, s, Location::header(name), &mut plan)?;
                        basic = true;
                    }
                } else if let Some(creds) = lenient_basic(value)
                    && let Some((s, _, _)) = m.find(&creds).next()
                {
                    // Base64 only a lenient decoder reads (non-zero trailing bits, stray
                    // characters): not re-encoded, so refused wherever it goes.
                    return Err(hidden(s));
                }
            }
            if let Some(s) = self.encoded_placeholder(value) {
                return Err(hidden(s));
            }
            if found || basic {
                plan.header_edits.push((i, basic));
            }
        }
        let path = decoded(req.path, false);
        for (s, _, _) in m.find(&path) {
            self.check(req, grants, s, Location::Path, &mut plan)?;
            plan.path_edit = true;
        }
        if let Some(s) = self.encoded_placeholder(&path) {
            return Err(PlanError::PlaceholderNotAllowed {
                secret: self.secrets[s].name.clone(),
                location: Location::Path,
            });
        }
        for param in req.query.into_iter().flat_map(|q| q.split('&')) {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            let key = decoded(k, true);
            let key_s = || String::from_utf8_lossy(&key).into_owned();
            let in_key = m
                .find(&key)
                .next()
                .map(|(s, _, _)| s)
                .or_else(|| self.encoded_placeholder(&key));
            if let Some(s) = in_key {
                return Err(PlanError::PlaceholderNotAllowed {
                    secret: self.secrets[s].name.clone(),
                    location: Location::Query(key_s()),
                });
            }
            let value = decoded(v, true);
            for (s, _, _) in m.find(&value) {
                self.check(req, grants, s, Location::Query(key_s()), &mut plan)?;
                plan.query_edit = true;
            }
            if let Some(s) = self.encoded_placeholder(&value) {
                return Err(PlanError::PlaceholderNotAllowed {
                    secret: self.secrets[s].name.clone(),
                    location: Location::Query(key_s()),
                });
            }
        }
        for (s, secret) in self.secrets.iter().enumerate() {
            let HttpMode::Inject { target, .. } = &secret.mode else {
                continue;
            };
            let Some(mine) = secret.host_specificity(req.host, req.port, req.tls) else {
                continue;
            };
            if !grants.allows(s) || self.outranked(s, target, mine, req, grants) {
                continue;
            }
            if !capability_allows(secret, req) {
                return Err(capability_not_allowed(secret, req));
            }
            let location = match target {
                InjectTarget::Header(h) => Location::Header(Cow::Owned(h.clone())),
                InjectTarget::Query(q) => Location::Query(q.clone()),
            };
            if !req.tls && !secret.allow_plaintext {
                return Err(PlanError::CleartextInjectionRefused {
                    secret: secret.name.clone(),
                    location,
                });
            }
            plan.injects.push(s);
            plan.applied.push(Applied {
                secret: s,
                location,
            });
            if !plan.secrets.contains(&s) {
                plan.secrets.push(s);
            }
        }
        Ok(plan)
    }

    /// True when another secret injects the same `target` on `req`'s host with a more
    /// specific host pattern ([`HostPattern::specificity`](crate::HostPattern::specificity)),
    /// or an equally specific one declared before secret `s` (the load warns about those):
    /// one request gets one credential per header or query parameter, the most specific.
    fn outranked(
        &self,
        s: usize,
        target: &InjectTarget,
        mine: (bool, usize, bool),
        req: &RequestView<'_>,
        grants: &Grants,
    ) -> bool {
        self.secrets.iter().enumerate().any(|(o, other)| {
            o != s
                && grants.allows(o)
                && other.inject_target().is_some_and(|t| t.same(target))
                && other
                    .host_specificity(req.host, req.port, req.tls)
                    .is_some_and(|theirs| theirs > mine || (theirs == mine && o < s))
        })
    }

    /// A placeholder hidden under percent-encoding in `bytes` (`GITHUB%5FTOKEN` in a
    /// cookie, `%255F` in an already decoded path), as an origin or framework that decodes
    /// once or more would see it: the secret of one that appears in a decoding of `bytes`
    /// (up to three rounds) beyond those in plain sight, or `None`. Such an occurrence is not
    /// swapped (the proxy does not re-encode), so it is refused wherever it goes. Free when
    /// `bytes` holds no `%`; placeholders themselves never contain `%` or `+`.
    fn encoded_placeholder(&self, bytes: &[u8]) -> Option<usize> {
        let m = &self.matcher;
        // An escape makes a placeholder longer: a shorter value holds no encoded one.
        if bytes.len() < m.min_len + 2 || !bytes.contains(&b'%') {
            return None;
        }
        let plain = m.find(bytes).count();
        let mut current = bytes.to_vec();
        for _ in 0..3 {
            if !current.contains(&b'%') {
                break;
            }
            current = percent_encoding::percent_decode(&current).collect();
            let mut found = m.find(&current).peekable();
            let first = found.peek().map(|(s, _, _)| *s);
            if found.count() > plain {
                return first;
            }
        }
        None
    }

    /// The secret whose placeholder appears in `bytes` (raw, not decoded), if any: for the
    /// parts of a request no secret may be swapped into (the method, a WebSocket `Upgrade`
    /// value; header names are checked by [`Policy::plan`], in any casing).
    pub fn placeholder_in(&self, bytes: &[u8]) -> Option<&crate::Secret> {
        self.matcher
            .find(bytes)
            .next()
            .map(|(s, _, _)| &self.secrets[s])
    }

    fn check(
        &self,
        req: &RequestView<'_>,
        grants: &Grants,
        s: usize,
        location: Location,
        plan: &mut Plan,
    ) -> Result<(), PlanError> {
        let secret = &self.secrets[s];
        if !grants.allows(s) {
            return Err(PlanError::NotGranted {
                secret: secret.name.clone(),
            });
        }
        let not_allowed = || PlanError::PlaceholderNotAllowed {
            secret: secret.name.clone(),
            location: location.clone(),
        };
        if !secret.allows_host(req.host, req.port, req.tls) {
            return Err(not_allowed());
        }
        // `Host` names the destination the request was bound to (decision 1): never swapped.
        if matches!(&location, Location::Header(h) if h.eq_ignore_ascii_case("host")) {
            return Err(not_allowed());
        }
        let swap = match (&secret.mode, &location) {
            (HttpMode::Replace { headers, .. }, Location::Header(h)) => headers.selects(h),
            (HttpMode::Replace { query, .. }, Location::Query(q)) => query.contains(q),
            (HttpMode::Replace { path, .. }, Location::Path) => *path,
            // The injected header overwrites whatever the client put there.
            (
                HttpMode::Inject {
                    target: InjectTarget::Header(t),
                    ..
                },
                Location::Header(h),
            ) if t.eq_ignore_ascii_case(h) => return Ok(()),
            (HttpMode::Inject { .. }, _) => false,
        };
        if !swap {
            return Err(not_allowed());
        }
        if !capability_allows(secret, req) {
            return Err(capability_not_allowed(secret, req));
        }
        if !req.tls && !secret.allow_plaintext {
            return Err(PlanError::CleartextInjectionRefused {
                secret: secret.name.clone(),
                location,
            });
        }
        if !plan.secrets.contains(&s) {
            plan.secrets.push(s);
        }
        let applied = Applied {
            secret: s,
            location,
        };
        if !plan.applied.contains(&applied) {
            plan.applied.push(applied);
        }
        Ok(())
    }
}

/// `hay` with the placeholder `spans` — (secret index, start, end), in order and not
/// overlapping, as [`PlaceholderMatcher::find`] gives them — replaced by their values, in a
/// vector of exactly its length (so it can become shared bytes without another allocation).
fn splice(
    hay: &[u8],
    spans: impl Iterator<Item = (usize, usize, usize)> + Clone,
    values: &dyn SecretValues,
) -> Vec<u8> {
    let len = spans.clone().fold(hay.len(), |n, (s, start, end)| {
        n - (end - start) + values.value(s).len()
    });
    let mut out = Vec::with_capacity(len);
    let mut last = 0;
    for (s, start, end) in spans {
        out.extend_from_slice(&hay[last..start]);
        out.extend_from_slice(values.value(s));
        last = end;
    }
    out.extend_from_slice(&hay[last..]);
    out
}

/// Headers some frameworks (Rails, Laravel, ASP.NET, Express `method-override`) read as
/// the real method of a POST.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// True when `secret`'s capabilities allow `req`: its method and path, and the method any
/// method-override header or `_method` query parameter (Rails, Laravel, Symfony, Express
/// `methodOverride('_method')`; PHP's spellings of it, `names_method_override`) names
/// (decoded, upper-cased), since an origin that honours
/// it runs that method instead. A `_method` in a form body is not seen (bodies are not read).
///
/// `TRACE` never carries a credential, whatever the capabilities: the origin echoes the
/// request back, credential included (RFC 9110 §9.3.8 forbids sensitive fields in it).
///
/// Public for the proxy, which applies the same check to the secrets it makes available
/// to a WebSocket connection's messages (`websocket_frames`).
pub fn capability_allows(secret: &crate::Secret, req: &RequestView<'_>) -> bool {
    // The request method is a token (no spaces); override values may be padded.
    let is_trace = |m: &str| m.trim().eq_ignore_ascii_case("TRACE");
    let overrides = || {
        req.headers
            .iter()
            .filter(|(n, _)| METHOD_OVERRIDES.iter().any(|o| n.eq_ignore_ascii_case(o)))
    };
    // Frameworks honour a method override on POST only (Rails, Laravel, Symfony, Express
    // `methodOverride`, ASP.NET): other methods skip the walk over the header names.
    if req.method.eq_ignore_ascii_case("TRACE")
        || (req.method == "POST"
            && overrides().any(|(_, v)| std::str::from_utf8(v).is_ok_and(is_trace)))
    {
        return false;
    }
    if secret.capabilities.is_empty() {
        return true;
    }
    let allows = |m: &[u8]| {
        std::str::from_utf8(m)
            .is_ok_and(|m| secret.allows_request(&m.trim().to_ascii_uppercase(), req.path))
    };
    secret.allows_request(req.method, req.path)
        && overrides().all(|(_, v)| allows(v))
        && req.query.is_none_or(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('='))
                .filter(|(k, _)| names_method_override(&decoded(k, true)))
                .all(|(_, v)| allows(&decoded(v, true)))
        })
}

/// True when a decoded query key is read as `_method` by a framework: exactly, or after
/// PHP's register-variable mangling (`$_GET`, which Laravel and Symfony read), which drops
/// the name at a NUL byte, trims leading spaces, turns ` ` and `.` into `_`, ends the name
/// at a `[` that a `]` closes (`_method[]` is an array named `_method`) turns an
/// unclosed `[` into `_` and ignores a name that starts with `[`. Without it `.method=DELETE` or ` _method=DELETE` would run
/// `DELETE` on a PHP origin past a capability that allows only `GET`.
fn names_method_override(key: &[u8]) -> bool {
    const NAME: &[u8] = b"_method";
    if key == NAME {
        return true;
    }
    let key = key.split(|&b| b == 0).next().unwrap_or_default();
    let key = &key[key.iter().take_while(|&&b| b == b' ').count()..];
    let mut name = Vec::with_capacity(key.len());
    for (i, &b) in key.iter().enumerate() {
        match b {
            b' ' | b'.' => name.push(b'_'),
            // PHP ignores a variable whose name before the `[` is empty.
            b'[' if i == 0 => return false,
            b'[' if key[i + 1..].contains(&b']') => break,
            b'[' => {
                name.push(b'_');
                name.extend_from_slice(&key[i + 1..]);
                break;
            }
            _ => name.push(b),
        }
        if name.len() > NAME.len() {
            return false;
        }
    }
    name == NAME
}

fn capability_not_allowed(secret: &crate::Secret, req: &RequestView<'_>) -> PlanError {
    PlanError::CapabilityNotAllowed {
        secret: secret.name.clone(),
        method: req.method.to_string(),
    }
}

/// The percent-decoded bytes of `raw` ([`decode_mapped`]), borrowed when nothing needs
/// decoding (no `%`, and no `+` when `plus_as_space`).
fn decoded(raw: &str, plus_as_space: bool) -> Cow<'_, [u8]> {
    let b = raw.as_bytes();
    if b.contains(&b'%') || (plus_as_space && b.contains(&b'+')) {
        Cow::Owned(decode_mapped(raw, plus_as_space).bytes)
    } else {
        Cow::Borrowed(b)
    }
}

/// The credentials of `Basic <base64>` as a lenient decoder reads them (Python's
/// `b64decode` without `validate`, Go's and Java's decoders with their lenient options):
/// characters outside both base64 alphabets dropped, URL-safe ones mapped to standard,
/// padding ignored, non-zero trailing bits accepted. `None` when the value is not Basic or
/// still does not decode. Used only to find placeholders [`split_basic`] cannot see.
fn lenient_basic(value: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    if value.len() < 6 || !value[..5].eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let mut b64: Vec<u8> = value[5..]
        .iter()
        .filter_map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' => Some(b),
            b'-' => Some(b'+'),
            b'_' => Some(b'/'),
            _ => None,
        })
        .collect();
    if b64.len() % 4 == 1 {
        b64.pop();
    }
    LENIENT.decode(&b64).ok()
}

/// Splits `Basic <base64>` into the scheme prefix as sent (`Basic` with its casing and the
/// spaces or tabs after it), the decoded credentials, and the base64 flavour they were in
/// (the swap re-encodes in the same one). Standard and URL-safe alphabets (RFC 4648 §4,
/// §5; `token68` allows both), padded or not, are accepted: an origin decoding a flavour
/// the proxy did not would otherwise receive a placeholder neither swapped nor refused.
fn split_basic(value: &[u8]) -> Option<(&[u8], Vec<u8>, &'static GeneralPurpose)> {
    let is_sep = |b: &u8| *b == b' ' || *b == b'\t';
    if value.len() < 6 || !value[..5].eq_ignore_ascii_case(b"basic") || !is_sep(&value[5]) {
        return None;
    }
    let start = 5 + value[5..].iter().take_while(|b| is_sep(b)).count();
    let b64 = value[start..].trim_ascii_end();
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .into_iter()
        .find_map(|e| Some((&value[..start], e.decode(b64).ok()?, e)))
}

/// Replaces every placeholder in the percent-decoded form of `raw`, writing each value
/// percent-encoded over the raw span the placeholder occupied.
fn replace_decoded(
    m: &PlaceholderMatcher,
    raw: &str,
    plus_as_space: bool,
    values: &dyn SecretValues,
) -> String {
    let d = decode_mapped(raw, plus_as_space);
    let mut out = String::with_capacity(raw.len() + 32);
    let mut last = 0;
    for (s, start, end) in m.find(&d.bytes) {
        let r = d.raw_range(start, end);
        out.push_str(&raw[last..r.start]);
        out.push_str(&encode_component(values.value(s)));
        last = r.end;
    }
    out.push_str(&raw[last..]);
    out
}

#[cfg(test)]
mod tests;
