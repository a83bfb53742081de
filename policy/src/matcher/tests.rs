use std::path::Path;

use proptest::prelude::*;

use super::*;

const POLICY: &str = r#"
version = 1
[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = { env = "REAL" }
match_headers = ["Authorization"]
hosts = ["api.github.test"]

[[secrets]]
name = "QUERY_KEY"
type = "http"
source = { env = "Q" }
match_headers = []
match_query = ["key"]
match_path = true
hosts = ["maps.test"]

[[secrets]]
name = "PLAIN_TOKEN"
type = "http"
source = { env = "P" }
hosts = ["plain.test"]
allow_plaintext = true

[[secrets]]
name = "INJECTED_KEY"
type = "http"
mode = "inject"
source = { env = "I" }
inject_header = "X-Api-Key"
inject_formatter = "Key {value}"
hosts = ["inject.test"]

[[secrets]]
name = "INJECTED_QUERY"
type = "http"
mode = "inject"
source = { env = "J" }
inject_query_param = "api_key"
hosts = ["injectq.test"]

[[secrets]]
name = "MULTI_TOKEN"
type = "http"
source = { env = "M" }
match_headers = ["X-A", "X-B", "Authorization"]
hosts = ["multi.test"]
"#;

fn policy() -> Policy {
    Policy::parse(POLICY, Path::new("p.toml")).unwrap_or_else(|e| panic!("{e}"))
}

struct Values;
impl SecretValues for Values {
    fn value(&self, index: usize) -> &[u8] {
        [
            &b"ghp_real/+="[..],
            b"q real&v",
            b"plainreal",
            b"injreal",
            b"jj",
            b"multireal",
        ][index]
    }
}

fn view<'a>(
    host: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a [(&'a str, &'a [u8])],
) -> RequestView<'a> {
    RequestView {
        host,
        port: 443,
        tls: true,
        method: "GET",
        path,
        query,
        headers,
    }
}

#[test]
fn swaps_header_substring_on_allowed_host() {
    let p = policy();
    let h: &[(&str, &[u8])] = &[
        ("Accept", b"*/*"),
        ("authorization", b"Bearer GITHUB_TOKEN"),
    ];
    let req = view("api.github.test", "/user", None, h);
    let plan = p.plan(&req).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.secrets.as_slice(), [0]);
    assert_eq!(plan.applied[0].location.to_string(), "header:authorization");
    let out = plan.apply(&p, &req, &Values);
    assert_eq!(
        out.headers.as_slice(),
        [(1, b"Bearer ghp_real/+=".to_vec())]
    );
    assert_eq!(out.path, None);
}

#[test]
fn rewritten_values_are_sized_exactly_and_common_names_borrowed() {
    // The proxy turns each rewritten value into shared bytes; an exact-size vector does
    // not need a second allocation for that.
    let p = policy();
    let h: &[(&str, &[u8])] = &[("authorization", b"Bearer GITHUB_TOKEN, GITHUB_TOKEN")];
    let req = view("api.github.test", "/", None, h);
    let plan = p.plan(&req).unwrap_or_else(|e| panic!("{e}"));
    let out = plan.apply(&p, &req, &Values);
    assert_eq!(out.headers.len(), 1);
    assert_eq!(out.headers[0].1, b"Bearer ghp_real/+=, ghp_real/+=");
    for (_, v) in &out.headers {
        assert_eq!(v.capacity(), v.len());
    }
    assert!(matches!(
        Location::header("authorization"),
        Location::Header(std::borrow::Cow::Borrowed("authorization"))
    ));
    assert_eq!(
        Location::header("X-Custom-Token"),
        Location::Header("X-Custom-Token".into())
    );
}

#[test]
fn refuses_placeholder_on_other_host() {
    let p = policy();
    let h: &[(&str, &[u8])] = &[("Authorization", b"Bearer GITHUB_TOKEN")];
    let err = p.plan(&view("maps.test", "/", None, h)).err();
    assert_eq!(
        err,
        Some(PlanError::PlaceholderNotAllowed {
            secret: "GITHUB_TOKEN".into(),
            location: Location::Header("Authorization".into())
        })
    );
}

#[test]
fn refuses_placeholder_in_unselected_header_or_wrong_port() {
    let p = policy();
    let h: &[(&str, &[u8])] = &[("X-Other", b"GITHUB_TOKEN")];
    assert!(p.plan(&view("api.github.test", "/", None, h)).is_err());
    let h: &[(&str, &[u8])] = &[("Authorization", b"GITHUB_TOKEN")];
    let mut req = view("api.github.test", "/", None, h);
    req.port = 8443;
    assert!(matches!(
        p.plan(&req),
        Err(PlanError::PlaceholderNotAllowed { .. })
    ));
}

#[test]
fn basic_auth_is_decoded_swapped_and_reencoded() {
    let p = policy();
    // base64("x-access-token:GITHUB_TOKEN"), unpadded form too
    let padded = b"Basic eC1hY2Nlc3MtdG9rZW46R0lUSFVCX1RPS0VO";
    let h: &[(&str, &[u8])] = &[("Authorization", padded)];
    let req = view("api.github.test", "/", None, h);
    let plan = p.plan(&req).unwrap_or_else(|e| panic!("{e}"));
    let out = plan.apply(&p, &req, &Values);
    let v = &out.headers[0].1;
    assert!(v.starts_with(b"Basic "));
    let decoded = STANDARD.decode(&v[6..]).unwrap_or_default();
    assert_eq!(decoded, b"x-access-token:ghp_real/+=");
    // Same placeholder inside Basic, to another host: refused.
    assert!(p.plan(&view("maps.test", "/", None, h)).is_err());
}

/// `Basic` credentials in the URL-safe alphabet, unpadded, after a tab: still found, swapped
/// and written back in the flavour they came in; refused on another host.
#[test]
fn basic_auth_in_other_base64_flavours_is_swapped_in_kind_or_refused() {
    let p = policy();
    // "u?>:GITHUB_TOKEN": its base64 has a `/` (standard) or `_` (URL-safe).
    let creds = b"u?>:GITHUB_TOKEN";
    for (engine, sep) in [
        (&URL_SAFE, " "),
        (&URL_SAFE_NO_PAD, "\t"),
        (&STANDARD_NO_PAD, "  "),
    ] {
        let value = format!("basic{sep}{}", engine.encode(creds));
        let h: &[(&str, &[u8])] = &[("Authorization", value.as_bytes())];
        let req = view("api.github.test", "/", None, h);
        let plan = p.plan(&req).unwrap_or_else(|e| panic!("{value}: {e}"));
        let out = plan.apply(&p, &req, &Values);
        let v = &out.headers[0].1;
        let prefix = format!("basic{sep}");
        assert!(v.starts_with(prefix.as_bytes()), "{value}");
        let decoded = engine.decode(&v[prefix.len()..]).unwrap_or_default();
        assert_eq!(decoded, b"u?>:ghp_real/+=", "{value}");
        assert!(
            matches!(
                p.plan(&view("maps.test", "/", None, h)),
                Err(PlanError::PlaceholderNotAllowed { .. })
            ),
            "{value}"
        );
    }
}

/// A placeholder in a header name (never swapped) is refused in any casing, also on the
/// secret's own host.
#[test]
fn placeholder_in_a_header_name_is_refused() {
    let p = policy();
    for name in ["github_token", "X-GITHUB_TOKEN-Leak", "x-Github_Token"] {
        let h: &[(&str, &[u8])] = &[
            ("Content-Type", b"text/plain"),
            ("Accept", b"*/*"),
            (name, b"1"),
            ("X-Something-Long", b"GITHUB_TOKEN"),
        ];
        for host in ["api.github.test", "maps.test"] {
            match p.plan(&view(host, "/", None, h)) {
                Err(PlanError::PlaceholderNotAllowed { secret, location }) => {
                    assert_eq!(secret, "GITHUB_TOKEN");
                    assert_eq!(location.to_string(), format!("header:{name}"));
                }
                other => panic!("{name} to {host}: {other:?}"),
            }
        }
    }
    // A header name merely like a placeholder passes.
    let h: &[(&str, &[u8])] = &[("x-github-token", b"1")];
    assert!(p.plan(&view("maps.test", "/", None, h)).is_ok());
}

#[test]
fn query_and_path_edit_only_the_span() {
    let p = policy();
    let req = view(
        "maps.test",
        "/v1/a%2Fb/QUERY%5FKEY/x",
        Some("z=2&key=pre-QUERY_KEY&a=%2F+b&key=Q%55ERY_KEY"),
        &[],
    );
    let plan = p.plan(&req).unwrap_or_else(|e| panic!("{e}"));
    let out = plan.apply(&p, &req, &Values);
    assert_eq!(out.path.as_deref(), Some("/v1/a%2Fb/q%20real%26v/x"));
    assert_eq!(
        out.query.as_deref(),
        Some("z=2&key=pre-q%20real%26v&a=%2F+b&key=q%20real%26v")
    );
}

#[test]
fn query_placeholder_in_unlisted_param_is_refused() {
    let p = policy();
    let req = view("maps.test", "/", Some("other=QUERY_KEY"), &[]);
    assert_eq!(
        p.plan(&req).err(),
        Some(PlanError::PlaceholderNotAllowed {
            secret: "QUERY_KEY".into(),
            location: Location::Query("other".into())
        })
    );
    let req = view("maps.test", "/", Some("QUERY_KEY=1"), &[]);
    assert!(p.plan(&req).is_err());
}

#[test]
fn cleartext_is_refused_unless_allowed() {
    let p = policy();
    let h: &[(&str, &[u8])] = &[("Authorization", b"Bearer GITHUB_TOKEN")];
    let mut req = view("api.github.test", "/", None, h);
    req.tls = false;
    req.port = 80;
    assert!(matches!(
        p.plan(&req),
        Err(PlanError::CleartextInjectionRefused { .. })
    ));
    let h: &[(&str, &[u8])] = &[("Authorization", b"Bearer PLAIN_TOKEN")];
    let mut req = view("plain.test", "/", None, h);
    req.tls = false;
    req.port = 80;
    assert!(p.plan(&req).is_ok());
    let mut req = view("inject.test", "/", None, &[]);
    req.tls = false;
    req.port = 80;
    assert!(matches!(
        p.plan(&req),
        Err(PlanError::CleartextInjectionRefused { .. })
    ));
}

#[test]
fn inject_header_and_query() {
    let p = policy();
    let h: &[(&str, &[u8])] = &[("x-api-key", b"INJECTED_KEY")];
    let req = view("inject.test", "/", None, h);
    let plan = p.plan(&req).unwrap_or_else(|e| panic!("{e}"));
    let out = plan.apply(&p, &req, &Values);
    assert_eq!(
        out.set_headers,
        vec![("X-Api-Key".to_string(), b"Key injreal".to_vec())]
    );
    let req = view("injectq.test", "/", Some("a=1&api_key=old"), &[]);
    let plan = p.plan(&req).unwrap_or_else(|e| panic!("{e}"));
    let out = plan.apply(&p, &req, &Values);
    assert_eq!(out.query.as_deref(), Some("a=1&api_key=jj"));
    // Not applied on other hosts.
    let plan = p
        .plan(&view("maps.test", "/", None, &[]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.is_empty());
}

#[test]
fn each_header_gets_the_swaps_found_in_it() {
    // The plan keeps where each placeholder was found; the rewrite of one header must use
    // that header's positions only.
    let p = policy();
    let h: &[(&str, &[u8])] = &[
        ("X-A", b"MULTI_TOKEN"),
        ("Accept", b"*/*"),
        ("X-B", b"a MULTI_TOKEN b MULTI_TOKEN!"),
        ("Authorization", b"Basic dXNlcjpNVUxUSV9UT0tFTg=="), // user:MULTI_TOKEN
    ];
    let req = view("multi.test", "/", None, h);
    let plan = p.plan(&req).unwrap_or_else(|e| panic!("{e}"));
    let out = plan.apply(&p, &req, &Values);
    assert_eq!(
        out.headers.as_slice(),
        [
            (0, b"multireal".to_vec()),
            (2, b"a multireal b multireal!".to_vec()),
            (3, b"Basic dXNlcjptdWx0aXJlYWw=".to_vec()), // user:multireal
        ]
    );
}

proptest! {
    /// After a rewrite no placeholder of an applied secret remains in the rewritten header,
    /// and the secret's value is present.
    #[test]
    fn no_placeholder_survives(prefix in "[ -~]{0,20}", suffix in "[ -~]{0,20}") {
        let p = policy();
        let value = format!("{prefix}GITHUB_TOKEN{suffix}");
        let h: &[(&str, &[u8])] = &[("Authorization", value.as_bytes())];
        let req = view("api.github.test", "/", None, h);
        if let Ok(plan) = p.plan(&req) {
            let out = plan.apply(&p, &req, &Values);
            let v = String::from_utf8_lossy(&out.headers[0].1).into_owned();
            prop_assert!(!v.contains("GITHUB_TOKEN"));
            prop_assert!(v.contains("ghp_real/+="));
        }
    }

    /// A placeholder anywhere in a request to a host outside every secret's allowlist is
    /// refused: no secret reaches a non-allowlisted host.
    #[test]
    fn no_secret_reaches_other_hosts(
        host in "[a-z]{1,8}\\.(test|example)",
        where_ in 0usize..3,
        pad in "[a-zA-Z0-9]{0,6}",
        which in 0usize..3,
    ) {
        prop_assume!(!["maps.test", "plain.test", "inject.test", "injectq.test"].contains(&host.as_str()));
        let p = policy();
        let ph = ["GITHUB_TOKEN", "QUERY_KEY", "PLAIN_TOKEN"][which];
        let text = format!("{pad}{ph}{pad}");
        let headers_owned = [("Authorization", text.as_bytes())];
        let path = format!("/{text}");
        let query = format!("key={text}");
        let req = match where_ {
            0 => view(&host, "/", None, &headers_owned),
            1 => view(&host, &path, None, &[]),
            _ => view(&host, "/", Some(&query), &[]),
        };
        let res = p.plan(&req);
        prop_assert!(
            matches!(res, Err(PlanError::PlaceholderNotAllowed { .. })),
            "placeholder allowed on unrelated host"
        );
    }

    /// Bytes of the query that hold no placeholder are kept exactly.
    #[test]
    fn untouched_query_bytes_are_kept(q in "[a-zA-Z0-9%=&+_.-]{0,40}") {
        let p = policy();
        let full = format!("{q}&key=QUERY_KEY");
        let req = view("maps.test", "/", Some(&full), &[]);
        let plan = p.plan(&req);
        prop_assume!(plan.is_ok());
        let plan = plan.unwrap_or_default();
        let out = plan.apply(&p, &req, &Values);
        let expected = format!("{q}&key=q%20real%26v");
        prop_assert_eq!(out.query.as_deref(), Some(expected.as_str()));
    }
}

const CAPS: &str = r#"
version = 1
[[secrets]]
name = "STRIPE_KEY"
type = "http"
source = { env = "S" }
hosts = ["api.stripe.test"]
capabilities = [
  { name = "list-charges", method = "get", path = "/v1/charges" },
  { method = "POST", path = "/v1/charges/*/refunds" },
]

[[secrets]]
name = "MAPS_KEY"
type = "http"
mode = "inject"
source = { env = "M" }
inject_header = "X-Api-Key"
hosts = ["maps.test"]
capabilities = [{ path = "/geocode" }]
"#;

#[test]
fn capabilities_gate_swaps_and_injections_by_method_and_path() {
    let p = Policy::parse(CAPS, Path::new("p.toml")).unwrap_or_else(|e| panic!("{e}"));
    let h: &[(&str, &[u8])] = &[("authorization", b"Bearer STRIPE_KEY")];
    let req = |method, path| RequestView {
        method,
        ..view("api.stripe.test", path, None, h)
    };
    for (m, path) in [
        ("GET", "/v1/charges"),
        ("GET", "/v1/charges/ch_1"),
        ("POST", "/v1/charges/ch_1/refunds"),
    ] {
        let plan = p
            .plan(&req(m, path))
            .unwrap_or_else(|e| panic!("{m} {path}: {e}"));
        assert_eq!(plan.secrets.as_slice(), [0], "{m} {path}");
    }
    for (m, path) in [
        ("POST", "/v1/charges"),
        ("DELETE", "/v1/charges/ch_1"),
        ("GET", "/v1/customers"),
        ("POST", "/v1/charges/ch_1"),
    ] {
        assert_eq!(
            p.plan(&req(m, path)).unwrap_err(),
            PlanError::CapabilityNotAllowed {
                secret: "STRIPE_KEY".into(),
                method: m.into(),
            },
            "{m} {path}"
        );
    }
    // A method-override header names the method the origin will run: it must be allowed too.
    let overridden: &[(&str, &[u8])] = &[
        ("authorization", b"Bearer STRIPE_KEY"),
        ("X-HTTP-Method-Override", b"delete"),
    ];
    let r = RequestView {
        method: "GET",
        ..view("api.stripe.test", "/v1/charges", None, overridden)
    };
    assert!(matches!(
        p.plan(&r),
        Err(PlanError::CapabilityNotAllowed { .. })
    ));
    let get_override: &[(&str, &[u8])] = &[
        ("authorization", b"Bearer STRIPE_KEY"),
        ("x-http-method", b"GET"),
    ];
    let r = RequestView {
        method: "GET",
        ..view("api.stripe.test", "/v1/charges", None, get_override)
    };
    assert!(p.plan(&r).is_ok());
    // So does a `_method` query parameter (any case, percent-encoded or not).
    let bearer: &[(&str, &[u8])] = &[("authorization", b"Bearer STRIPE_KEY")];
    // PHP (Laravel, Symfony) reads `$_GET`, whose names it mangles: these all reach it
    // as `_method`.
    for query in [
        "_method=DELETE",
        "a=1&_method=delete",
        "%5Fmethod=del%45te",
        ".method=DELETE",
        "+_method=DELETE",
        "%20%20_method=DELETE",
        "_method%00x=DELETE",
        "_method[]=DELETE",
        "_method[0]=DELETE",
    ] {
        let r = RequestView {
            method: "GET",
            ..view("api.stripe.test", "/v1/charges", Some(query), bearer)
        };
        assert!(
            matches!(p.plan(&r), Err(PlanError::CapabilityNotAllowed { .. })),
            "{query}"
        );
    }
    let r = RequestView {
        method: "GET",
        ..view(
            "api.stripe.test",
            "/v1/charges",
            Some(
                "_method=get&x=_method&_methods=DELETE&x_method=DELETE&_meth.od=DELETE&[method=DELETE&_method[=DELETE",
            ),
            bearer,
        )
    };
    assert!(p.plan(&r).is_ok());
    // Without the placeholder the capability-restricted swap secret is not involved.
    let plain = RequestView {
        method: "DELETE",
        ..view("api.stripe.test", "/v1/customers", None, &[])
    };
    assert!(p.plan(&plain).unwrap().is_empty());
    // An injecting secret applies to every request to its hosts, so a request outside its
    // capabilities is refused rather than sent without the credential.
    let inject = |path| view("maps.test", path, None, &[]);
    assert_eq!(
        p.plan(&inject("/geocode/json")).unwrap().secrets.as_slice(),
        [1]
    );
    assert!(matches!(
        p.plan(&inject("/directions")),
        Err(PlanError::CapabilityNotAllowed { .. })
    ));
}

#[test]
fn capability_and_rate_limit_errors_name_the_problem() {
    let bad = |extra: &str| {
        let text = format!(
            "version = 1\n[[secrets]]\nname = \"API_KEY\"\ntype = \"http\"\nsource = {{ env = \"K\" }}\nhosts = [\"a.test\"]\n{extra}\n"
        );
        Policy::parse(&text, Path::new("p.toml"))
            .unwrap_err()
            .to_string()
    };
    for (extra, want) in [
        ("capabilities = []", "`capabilities` is empty"),
        ("capabilities = [{ method = \"GET\" }]", "has no `path`"),
        ("capabilities = [{ path = \"v1\" }]", "must start with `/`"),
        (
            "capabilities = [{ method = \"G T\", path = \"/\" }]",
            "not an HTTP method",
        ),
        ("capabilities = [{ path = \"/\", verb = \"GET\" }]", "verb"),
        ("rate_limit = { burst = 5 }", "needs `requests_per_minute`"),
        (
            "rate_limit = { requests_per_minute = 0 }",
            "from 1 to 1000000",
        ),
        (
            "rate_limit = { requests_per_minute = 10, burst = -1 }",
            "from 1 to 1000000",
        ),
    ] {
        let e = bad(extra);
        assert!(e.contains(want), "{extra}: {e}");
        assert!(e.contains("p.toml:"), "{extra}: {e}");
    }
    let ok = Policy::parse(
        "version = 1\n[[secrets]]\nname = \"API_KEY\"\ntype = \"http\"\nsource = { env = \"K\" }\nhosts = [\"a.test\"]\nrate_limit = { requests_per_minute = 60 }\n",
        Path::new("p.toml"),
    )
    .unwrap();
    let r = ok.secrets[0].rate_limit.unwrap();
    assert_eq!((r.per_minute.get(), r.burst.get()), (60, 60));
}

proptest! {
    /// The matcher's search (one search first, then iteration from the first match; short
    /// values skipped) finds exactly what a plain leftmost-longest iteration over the whole
    /// value finds, for values built from placeholders, their fragments and other bytes.
    #[test]
    fn find_agrees_with_a_plain_iteration(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("GITHUB_TOKEN".to_string()),
                Just("MULTI_TOKEN".to_string()),
                Just("GITHUB_".to_string()),
                Just("TOKEN".to_string()),
                "[ -~]{0,6}",
            ],
            0..6,
        )
    ) {
        let p = policy();
        let m = &p.matcher;
        let hay = parts.concat();
        let found: Vec<_> = m.find(hay.as_bytes()).collect();
        let plain: Vec<_> = m
            .ac
            .as_ref()
            .map(|ac| {
                ac.find_iter(hay.as_bytes())
                    .map(|x| (m.owners[x.pattern().as_usize()], x.start(), x.end()))
                    .collect()
            })
            .unwrap_or_default();
        prop_assert_eq!(found, plain);
    }
}

/// Two secrets injecting one header on hosts both match: the most specific host pattern
/// wins (exact over `*.suffix`, longer suffix over shorter, a port over `:*`), whatever
/// their order; the loser's capabilities do not refuse the request. Equally specific
/// patterns are warned about at load, and the first declared is used.
#[test]
fn the_most_specific_host_wins_a_shared_injection_target() {
    let secret = |name: &str, hosts: &str, extra: &str| {
        format!(
            "[[secrets]]\nname = \"{name}\"\ntype = \"http\"\nmode = \"inject\"\nsource = {{ env = \"{name}\" }}\ninject_header = \"Authorization\"\nhosts = [{hosts}]\n{extra}\n"
        )
    };
    let wide = secret("ORG_TOKEN", "\"*.github.test\"", "");
    let deep = secret("DEEP_TOKEN", "\"*.eu.github.test\"", "");
    let api = secret(
        "API_TOKEN",
        "\"api.github.test\", \"api.github.test:*\"",
        "capabilities = [{ method = \"GET\", path = \"/\" }]",
    );
    let any_port = secret("PORTS_TOKEN", "\"raw.github.test:*\"", "");
    let raw = secret("RAW_TOKEN", "\"raw.github.test\"", "");
    let winner = |text: &str, host: &str, port: u16, method: &'static str| {
        let p = Policy::parse(text, Path::new("p.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let req = RequestView {
            port,
            method,
            ..view(host, "/", None, &[])
        };
        p.plan(&req).map(|plan| {
            assert_eq!(plan.applied.len(), 1, "{host}");
            p.secrets[plan.secrets[0]].name.clone()
        })
    };
    for text in [
        format!("version = 1\n{wide}{deep}{api}{any_port}{raw}"),
        format!("version = 1\n{raw}{any_port}{api}{deep}{wide}"),
    ] {
        assert_eq!(
            winner(&text, "api.github.test", 443, "GET").unwrap(),
            "API_TOKEN"
        );
        assert_eq!(
            winner(&text, "x.eu.github.test", 443, "GET").unwrap(),
            "DEEP_TOKEN"
        );
        assert_eq!(
            winner(&text, "gist.github.test", 443, "POST").unwrap(),
            "ORG_TOKEN"
        );
        assert_eq!(
            winner(&text, "raw.github.test", 443, "GET").unwrap(),
            "RAW_TOKEN"
        );
        assert_eq!(
            winner(&text, "raw.github.test", 8443, "GET").unwrap(),
            "PORTS_TOKEN"
        );
        // The winner's capabilities apply, not the loser's.
        assert!(matches!(
            winner(&text, "api.github.test", 443, "POST"),
            Err(PlanError::CapabilityNotAllowed { secret, .. }) if secret == "API_TOKEN"
        ));
    }
    // Equally specific: warned, and the first declared is used.
    let again = secret("OTHER_ORG_TOKEN", "\"*.github.test\"", "");
    let p = Policy::parse(&format!("version = 1\n{wide}{again}"), Path::new("p.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let w: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    assert!(
        w.iter().any(|m| m.contains(
            "secret `OTHER_ORG_TOKEN` injects header `Authorization` on `*.github.test` as secret `ORG_TOKEN` does"
        )),
        "{w:?}"
    );
    let plan = p.plan(&view("gist.github.test", "/", None, &[])).unwrap();
    assert_eq!(plan.secrets.as_slice(), [0]);
    // A different header is not a conflict: both are injected.
    let key =
        secret("X_KEY_TOKEN", "\"*.github.test\"", "").replace("\"Authorization\"", "\"X-Key\"");
    let p = Policy::parse(&format!("version = 1\n{wide}{key}"), Path::new("p.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let plan = p.plan(&view("gist.github.test", "/", None, &[])).unwrap();
    assert_eq!(plan.secrets.as_slice(), [0, 1]);
}

/// `TRACE` never carries a credential (the origin echoes the request back, RFC 9110
/// §9.3.8): neither a swap nor an injection, nor a method override naming it; a TRACE with
/// no credential involved goes on.
#[test]
fn trace_never_carries_a_credential() {
    let p = policy();
    let trace = |host, headers| RequestView {
        method: "TRACE",
        ..view(host, "/", None, headers)
    };
    let bearer: &[(&str, &[u8])] = &[("authorization", b"Bearer GITHUB_TOKEN")];
    let refused = |r: Result<Plan, PlanError>| matches!(r, Err(PlanError::CapabilityNotAllowed { method, .. }) if method == "TRACE");
    assert!(refused(p.plan(&trace("api.github.test", bearer))));
    assert!(refused(p.plan(&trace("inject.test", &[]))));
    assert!(p.plan(&trace("api.github.test", &[])).unwrap().is_empty());
    let overridden: &[(&str, &[u8])] = &[
        ("authorization", b"Bearer GITHUB_TOKEN"),
        ("X-HTTP-Method-Override", b" trace"),
    ];
    let post = RequestView {
        method: "POST",
        ..view("api.github.test", "/", None, overridden)
    };
    assert!(matches!(
        p.plan(&post),
        Err(PlanError::CapabilityNotAllowed { .. })
    ));
}

/// Placeholders hidden where the swap does not reach — percent-encoded in a header value,
/// encoded twice in the path or query, in base64 only a lenient decoder reads — are
/// refused, on the secret's host too (an origin or framework decoding them would see the
/// placeholder, never the real value). Plain `%` escapes beside a placeholder are fine.
#[test]
fn placeholders_hidden_under_an_encoding_are_refused() {
    let p = policy();
    let refused = |host: &str, path: &str, query: Option<&str>, headers: &[(&str, &[u8])]| {
        matches!(
            p.plan(&view(host, path, query, headers)),
            Err(PlanError::PlaceholderNotAllowed { .. })
        )
    };
    for host in ["api.github.test", "maps.test"] {
        assert!(refused(host, "/", None, &[("cookie", b"t=GITHUB%5FTOKEN")]));
        assert!(refused(
            host,
            "/",
            None,
            &[("authorization", b"Bearer GITHUB%5fTOKEN")]
        ));
        // Non-zero trailing bits, and a stray character: Python's b64decode reads both.
        assert!(refused(
            host,
            "/",
            None,
            &[("authorization", b"Basic dTpHSVRIVUJfVE9LRU5=")]
        ));
        assert!(refused(
            host,
            "/",
            None,
            &[("authorization", b"Basic dTpH!SVRIVUJfVE9LRU4=")]
        ));
        assert!(refused(host, "/x/GITHUB%255FTOKEN", None, &[]));
        assert!(refused(host, "/x/GITHUB%25255FTOKEN", None, &[]));
        assert!(refused(host, "/", Some("q=GITHUB%255FTOKEN"), &[]));
        assert!(refused(host, "/", Some("GITHUB%255FTOKEN=1"), &[]));
    }
    let fine: &[(&str, &[u8])] = &[
        ("authorization", b"Bearer GITHUB_TOKEN"),
        ("cookie", b"a=%20x; b=100%25"),
    ];
    let plan = p
        .plan(&view(
            "api.github.test",
            "/files/100%25",
            Some("q=%2541"),
            fine,
        ))
        .unwrap();
    assert_eq!(plan.secrets.as_slice(), [0]);
    // The canonical Basic form is swapped as before.
    let basic: &[(&str, &[u8])] = &[("authorization", b"Basic dTpHSVRIVUJfVE9LRU4=")];
    assert_eq!(
        p.plan(&view("api.github.test", "/", None, basic))
            .unwrap()
            .secrets
            .as_slice(),
        [0]
    );
}

#[test]
fn a_caller_uses_only_the_secrets_it_is_granted() {
    let p = Policy::parse(
        r#"
version = 1
[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = { env = "REAL" }
match_headers = ["Authorization"]
hosts = ["api.github.test"]

[[secrets]]
name = "BROAD_KEY"
type = "http"
mode = "inject"
source = { env = "B" }
inject_header = "X-Api-Key"
hosts = ["*.inject.test"]

[[secrets]]
name = "NARROW_KEY"
type = "http"
mode = "inject"
source = { env = "N" }
inject_header = "X-Api-Key"
hosts = ["api.inject.test"]
"#,
        Path::new("p.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let only = |granted: &[usize]| Grants::Only((0..3).map(|i| granted.contains(&i)).collect());
    let h: &[(&str, &[u8])] = &[("Authorization", b"Bearer GITHUB_TOKEN")];
    let gh = view("api.github.test", "/user", None, h);
    // Granted: swapped as without callers.
    assert_eq!(
        p.plan_for(&gh, &only(&[0]))
            .expect("granted")
            .secrets
            .as_slice(),
        [0]
    );
    // Not granted: refused wherever the placeholder is, before the host check.
    for req in [gh, view("elsewhere.test", "/", None, h)] {
        assert_eq!(
            p.plan_for(&req, &only(&[1, 2])).map(|_| ()),
            Err(PlanError::NotGranted {
                secret: "GITHUB_TOKEN".into()
            })
        );
    }
    // A placeholder in the path is checked the same way.
    assert!(matches!(
        p.plan_for(
            &view("api.github.test", "/x/GITHUB_TOKEN", None, &[]),
            &only(&[])
        ),
        Err(PlanError::NotGranted { .. })
    ));
    // Injection: the most specific granted secret goes in; none when none is granted.
    let api = view("api.inject.test", "/", None, &[]);
    assert_eq!(
        p.plan_for(&api, &Grants::All)
            .expect("all")
            .secrets
            .as_slice(),
        [2]
    );
    assert_eq!(
        p.plan_for(&api, &only(&[1]))
            .expect("broad")
            .secrets
            .as_slice(),
        [1]
    );
    assert!(
        p.plan_for(&api, &only(&[0]))
            .expect("none")
            .secrets
            .is_empty()
    );
    assert_eq!(p.plan(&api).expect("plan").secrets.as_slice(), [2]);
}

#[test]
fn a_header_matched_by_a_literal_and_a_regex_is_swapped_once() {
    let p = Policy::parse(
        r#"
version = 1
[[secrets]]
name = "GITLAB_TOKEN"
type = "http"
source = { env = "G" }
match_headers = ["Private-Token", "/^private-/", "/token$/"]
hosts = ["gitlab.test"]
"#,
        Path::new("p.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let h: &[(&str, &[u8])] = &[("private-token", b"GITLAB_TOKEN and GITLAB_TOKEN")];
    let v = view("gitlab.test", "/", None, h);
    let plan = p.plan(&v).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.secrets.as_slice(), [0]);
    struct Real;
    impl SecretValues for Real {
        fn value(&self, _: usize) -> &[u8] {
            b"glpat-real"
        }
    }
    let out = plan.apply(&p, &v, &Real);
    assert_eq!(out.headers.len(), 1);
    assert_eq!(out.headers[0].1, b"glpat-real and glpat-real");
    // A header no entry selects carries the placeholder to a refusal.
    let other: &[(&str, &[u8])] = &[("x-other", b"GITLAB_TOKEN")];
    assert!(matches!(
        p.plan(&view("gitlab.test", "/", None, other)),
        Err(PlanError::PlaceholderNotAllowed { .. })
    ));
}
