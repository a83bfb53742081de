use super::*;

fn parse(text: &str) -> Result<Policy, PolicyErrors> {
    Policy::parse(text, Path::new("/etc/iron/policy.toml"))
}

fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("policy accepted"),
        Err(e) => e.errors().map(ToString::to_string).collect(),
    }
}

const GOOD: &str = r#"
version = 1

[proxy]
listen = "127.0.0.1:18080"
ca_cert = "ca/ca.crt"
ca_key = "ca/ca.key"
allow = ["pypi.org", "*.pythonhosted.org"]
allow_cidrs = ["127.0.0.1/32"]
upstream_ca = ["origin-ca.pem"]
resolve = { "api.github.test" = "127.0.0.1" }

[proxy.limits]
idle_timeout_secs = 30

[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = { env = "REAL_GITHUB_TOKEN" }
match_headers = ["Authorization"]
hosts = ["api.github.test", "github.test:8443"]

[[secrets]]
name = "MAPS_KEY"
type = "http"
mode = "inject"
source = { file = "keys.json", json_key = "maps" }
inject_header = "Authorization"
inject_formatter = 'Basic {{base64 "user:" .Value}}'
hosts = ["maps.test"]
optional = true
scrub_response_body = false
"#;

#[test]
fn parses_a_full_policy() {
    let p = parse(GOOD).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.proxy.listen.port(), 18080);
    assert_eq!(
        p.proxy.ca,
        Some((
            PathBuf::from("/etc/iron/ca/ca.crt"),
            PathBuf::from("/etc/iron/ca/ca.key")
        ))
    );
    assert_eq!(
        p.proxy.upstream_ca,
        vec![UpstreamCa::everywhere(PathBuf::from(
            "/etc/iron/origin-ca.pem"
        ))]
    );
    assert_eq!(p.proxy.limits.idle_timeout, Duration::from_secs(30));
    assert_eq!(p.proxy.limits.max_headers, 128);
    assert_eq!(p.secrets.len(), 2);
    assert_eq!(p.secrets[0].placeholder, "GITHUB_TOKEN");
    assert_eq!(
        p.secrets[1].sources()[0].1.kind,
        SourceKind::File(PathBuf::from("/etc/iron/keys.json"))
    );
    assert!(p.secrets[1].optional);
    // Echoes are scrubbed from response bodies unless a secret opts out.
    assert!(p.secrets[0].scrub_response_body);
    assert!(!p.secrets[1].scrub_response_body);
    assert!(p.allows_destination("api.github.test", 443, true));
    assert!(p.allows_destination("github.test", 8443, true));
    assert!(!p.allows_destination("github.test", 443, true));
    assert!(p.allows_destination("files.pythonhosted.org", 443, true));
    assert!(!p.allows_destination("evil.test", 443, true));
}

#[test]
fn errors_carry_file_line_col() {
    let errs = errors("version = 1\n[proxy]\nlisten = \"nope\"\n");
    assert_eq!(
        errs,
        vec![
            "/etc/iron/policy.toml:3:10: `listen` must be an IP:PORT address like `127.0.0.1:8080`"
        ]
    );
}

#[test]
fn unknown_keys_are_rejected_with_position() {
    let errs = errors("version = 1\n[proxy]\nlisen = \"127.0.0.1:1\"\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("/etc/iron/policy.toml:3:1: unknown field `lisen`"),
        "{errs:?}"
    );
}

#[test]
fn every_error_is_reported() {
    let errs = errors(
        r#"version = 2
[[secrets]]
name = "A_TOKEN_X"
type = "http"
source = { env = "X", file = "y" }
hosts = []

[[secrets]]
name = "B_TOKEN_X"
type = "http"
mode = "inject"
source = { env = "Y" }
hosts = ["*"]
"#,
    );
    let joined = errs.join("\n");
    assert!(
        joined.contains(":1:11: unsupported policy version 2"),
        "{joined}"
    );
    assert!(
        joined.contains("exactly one of `env` or `file`"),
        "{joined}"
    );
    assert!(joined.contains("`hosts` is empty"), "{joined}");
    assert!(joined.contains("matches every host"), "{joined}");
    assert!(
        joined.contains("exactly one of `inject_header` or `inject_query_param`"),
        "{joined}"
    );
}

#[test]
fn secret_rules() {
    let base = |extra: &str| {
        format!(
            "version = 1\n[[secrets]]\nname = \"TOKEN_ONE\"\ntype = \"http\"\nsource = {{ env = \"V\" }}\nhosts = [\"a.test\"]\n{extra}"
        )
    };
    assert!(parse(&base("")).is_ok());
    assert!(
        errors(&base("match_headers = []"))
            .join("")
            .contains("scans nothing")
    );
    assert!(
        errors(&base("inject_header = \"X\""))
            .join("")
            .contains("needs `mode = \"inject\"`")
    );
    assert!(
        errors(&base("placeholder = \"has space\""))
            .join("")
            .contains("may only contain")
    );
    assert!(
        errors(&base(
            "mode = \"inject\"\ninject_header = \"A\"\ninject_formatter = \"Bearer\""
        ))
        .join("")
        .contains("never uses the value")
    );
    assert!(errors(&base("[[secrets]]\nname = \"TOKEN_ONE\"\ntype = \"http\"\nsource = { env = \"V\" }\nhosts = [\"b.test\"]")).join("").contains("duplicate secret name"));
    // A pg_dsn secret needs `database`, and `hosts` does not belong to it.
    let pg = errors(&base("").replace("type = \"http\"", "type = \"pg_dsn\"")).join("\n");
    assert!(pg.contains("pg_dsn needs `database`"), "{pg}");
    assert!(pg.contains("`hosts`"), "{pg}");
}

#[test]
fn short_placeholder_warns() {
    let p = parse("version = 1\n[[secrets]]\nname = \"KEY1\"\ntype = \"http\"\nsource = { env = \"V\" }\nhosts = [\"a.test\"]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.warnings.len(), 1);
    assert!(
        p.warnings[0]
            .to_string()
            .contains("warning: secret `KEY1`: placeholder `KEY1` is short")
    );
}

#[test]
fn formatter_forms() {
    let f = |s: &str| InjectFormatter::parse(s).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f("Bearer {value}").render(b"abc"), b"Bearer abc");
    assert_eq!(f("Bearer {token}").render(b"abc"), b"Bearer abc");
    assert_eq!(f("Bearer {{ .Value }}").render(b"abc"), b"Bearer abc");
    // base64("user:abc") = dXNlcjphYmM=
    assert_eq!(
        f("Basic {{base64 \"user:\" .Value}}").render(b"abc"),
        b"Basic dXNlcjphYmM="
    );
    assert!(InjectFormatter::parse("{nope}").is_err());
    assert!(InjectFormatter::parse("{{base64 \"x}}").is_err());
}

#[test]
fn header_selector_default_set() {
    let d = HeaderSelector::default_set();
    for h in [
        "authorization",
        "X-Api-Key",
        "x-goog-api-key",
        "X-CB-ACCESS-SIGN",
        "Cookie",
        "x-auth",
    ] {
        assert!(d.selects(h), "{h}");
    }
    for h in [
        "user-agent",
        "x-request-id",
        "proxy-authorization",
        "x-Api_Key",
    ] {
        assert!(!d.selects(h), "{h}");
    }
    assert!(
        HeaderSelector::parse(&["*"])
            .map(|s| s.selects("anything"))
            .unwrap_or(false)
    );
    assert!(
        HeaderSelector::parse(&[])
            .map(|s| s.is_empty())
            .unwrap_or(false)
    );
}

#[test]
fn deny_cidrs() {
    let p = parse("version = 1\n[proxy]\nallow_cidrs = [\"127.0.0.1/32\"]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let denied = |s: &str| p.is_address_denied(s.parse().unwrap_or_else(|_| panic!("{s}")));
    assert!(!denied("127.0.0.1"));
    assert!(denied("127.0.0.2"));
    assert!(denied("10.1.2.3"));
    assert!(denied("169.254.169.254"));
    assert!(denied("::ffff:169.254.169.254"));
    assert!(denied("::ffff:10.0.0.1"));
    assert!(denied("fd00:ec2::254"));
    assert!(denied("::127.0.0.1"));
    assert!(denied("::a9fe:a9fe"));
    assert!(denied("::1") && denied("::"));
    assert!(denied("100.64.0.1"));
    assert!(!denied("::ffff:127.0.0.1"));
    assert!(!denied("93.184.216.34"));
    assert!(!denied("2606:4700::1111"));
    // Every default range is in force (none dropped for failing to parse).
    assert_eq!(DEFAULT_DENY_NETS.len(), DEFAULT_DENY_CIDRS.len());
}

#[test]
fn oauth_and_gcp_secrets() {
    let p = parse(
        r#"version = 1
[[secrets]]
name = "MAIL_TOKEN"
type = "oauth_token"
grant = "refresh_token"
token_endpoint = "https://id.example.test:8443/oauth/token?x=1"
scopes = ["mail.read"]
fields = { client_id = { env = "CID" }, refresh_token = { file = "rt.json", json_key = "refresh_token" } }
token_endpoint_headers = { "X-Api-Key" = { env = "IDP_KEY" } }
client_auth = "client_secret_basic"
hosts = ["mail.example.test"]

[[secrets]]
name = "GCP_TOKEN"
type = "gcp_auth"
keyfile = { file = "sa.json" }
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let SecretKind::OAuth(o) = &p.secrets[0].kind else {
        panic!("not oauth")
    };
    assert_eq!(o.grant, Grant::RefreshToken);
    assert_eq!(o.token_endpoint.host, "id.example.test");
    assert_eq!(o.token_endpoint.port, 8443);
    assert_eq!(o.token_endpoint.path, "/oauth/token");
    assert_eq!(o.client_auth, ClientAuth::Basic);
    assert_eq!(p.secrets[0].sources().len(), 3);
    assert!(
        matches!(&p.secrets[0].mode, HttpMode::Inject { target: InjectTarget::Header(h), .. } if h == "Authorization")
    );
    let SecretKind::Gcp(g) = &p.secrets[1].kind else {
        panic!("not gcp")
    };
    assert_eq!(g.scopes, vec![GCP_DEFAULT_SCOPE.to_string()]);
    assert!(p.secrets[1].allows_host("storage.googleapis.com", 443, true));
    // Stubs: the token endpoint, Google's token endpoint, the metadata server.
    assert_eq!(
        p.stub_for("id.example.test", 8443, true, "POST", "/oauth/token"),
        Some((0, Stub::OAuthToken))
    );
    assert_eq!(
        p.stub_for("id.example.test", 8443, true, "POST", "/other"),
        None
    );
    assert_eq!(
        p.stub_for("oauth2.googleapis.com", 443, true, "POST", "/token"),
        Some((1, Stub::GcpToken))
    );
    assert_eq!(
        p.stub_for(
            "metadata.google.internal",
            80,
            false,
            "GET",
            "/computeMetadata/v1/instance/service-accounts/default/token"
        ),
        Some((1, Stub::GcpMetadata))
    );
    assert!(p.allows_destination("id.example.test", 8443, true));
    assert!(p.allows_destination("oauth2.googleapis.com", 443, true));
    // The tunnel opens for the stub, but nothing else on the token endpoint's host is
    // forwarded. (oauth2.googleapis.com is under the gcp secret's default `*.googleapis.com`
    // hosts, so it is a secret host.)
    assert!(!p.allows_forward("id.example.test", 8443, true));
    assert!(p.allows_forward("oauth2.googleapis.com", 443, true));
}

#[test]
fn oauth_field_rules() {
    let base = |grant: &str, fields: &str, extra: &str| {
        format!(
            "version = 1\n[[secrets]]\nname = \"TOKEN_ONE\"\ntype = \"oauth_token\"\ngrant = \"{grant}\"\ntoken_endpoint = \"https://id.test/token\"\nfields = {{ {fields} }}\nhosts = [\"a.test\"]\n{extra}"
        )
    };
    assert!(
        parse(&base(
            "client_credentials",
            "client_id = { env = \"A\" }, client_secret = { env = \"B\" }",
            ""
        ))
        .is_ok()
    );
    let e = errors(&base(
        "client_credentials",
        "client_id = { env = \"A\" }",
        "",
    ))
    .join("\n");
    assert!(
        e.contains("grant client_credentials needs field `client_secret`"),
        "{e}"
    );
    let e = errors(&base("password", "client_id = { env = \"A\" }, username = { env = \"U\" }, password = { env = \"P\" }, refresh_token = { env = \"R\" }", "")).join("\n");
    assert!(
        e.contains("field `refresh_token` is not used by grant password"),
        "{e}"
    );
    let e = errors(&base(
        "client_credentials",
        "client_id = { env = \"A\" }, client_secret = { env = \"B\" }",
        "audience = \"x\"\nsource = { env = \"S\" }",
    ))
    .join("\n");
    assert!(
        e.contains("`audience` is only used by grant jwt_bearer"),
        "{e}"
    );
    assert!(
        e.contains("`source` is not valid for type `oauth_token`"),
        "{e}"
    );
    let e = errors(&base("magic", "", "")).join("\n");
    assert!(e.contains("unknown grant `magic`"), "{e}");
    let e = errors(
        &base(
            "client_credentials",
            "client_id = { env = \"A\" }, client_secret = { env = \"B\" }",
            "",
        )
        .replace("https://id.test/token", "http://id.test/token"),
    )
    .join("\n");
    assert!(e.contains("must be an https:// URL"), "{e}");
}

#[test]
fn drop_in_fragments_shadow_earlier_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("policy.d")).unwrap();
    std::fs::write(
        d.join("policy.toml"),
        "version = 1\ninclude = [\"policy.d/*.toml\"]\n[[secrets]]\nname = \"GITHUB_TOKEN\"\ntype = \"http\"\nsource = { env = \"A\" }\nhosts = [\"a.test\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("policy.d/10-github.toml"),
        "[[secrets]]\nname = \"GITHUB_TOKEN\"\ntype = \"http\"\nsource = { env = \"B\" }\nhosts = [\"b.test\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("policy.d/20-extra.toml"),
        "version = 1\n[[secrets]]\nname = \"EXTRA_KEY\"\ntype = \"http\"\nsource = { file = \"extra.txt\" }\nhosts = [\"c.test\"]\n",
    )
    .unwrap();
    let p = Policy::load(&d.join("policy.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.secrets.len(), 2);
    let gh = p.secret("GITHUB_TOKEN").unwrap();
    assert_eq!(gh.file, d.join("policy.d/10-github.toml"));
    assert!(gh.allows_host("b.test", 443, true));
    assert!(!gh.allows_host("a.test", 443, true));
    // Relative paths in a fragment resolve against the fragment's directory.
    assert_eq!(
        p.secret("EXTRA_KEY").unwrap().sources()[0].1.kind,
        SourceKind::File(d.join("policy.d/extra.txt"))
    );
    let shadow = p
        .warnings
        .iter()
        .find(|w| w.message.contains("replaces"))
        .unwrap()
        .to_string();
    assert!(
        shadow.starts_with(&format!(
            "{}:1:1: warning: secret `GITHUB_TOKEN` here replaces the one at {}:4:8",
            d.join("policy.d/10-github.toml").display(),
            d.join("policy.toml").display()
        )),
        "{shadow}"
    );
    assert_eq!(p.files.len(), 3);

    // A broken fragment is reported in its own file.
    std::fs::write(
        d.join("policy.d/30-bad.toml"),
        "[[secrets]]\nname = \"X_TOKEN_1\"\nbogus = 1\n",
    )
    .unwrap();
    let err = Policy::load(&d.join("policy.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "{}:3:1: unknown field `bogus`",
            d.join("policy.d/30-bad.toml").display()
        )),
        "{err}"
    );
}

#[test]
fn passthrough_over_a_secret_host_and_an_empty_include_warn() {
    let p = parse(
        r#"version = 1
include = ["nowhere.d/*.toml"]
[proxy]
passthrough = ["*.example.com", "pinned.test:8443"]
[[secrets]]
name = "GITHUB_TOKEN"
type = "http"
source = { env = "X" }
hosts = ["api.example.com", "pinned.test:443", "other.test"]
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let w: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    assert!(
        w.iter()
            .any(|m| m
                .contains("host `api.example.com` is also covered by passthrough `*.example.com`")),
        "{w:?}"
    );
    // The secret's host is intercepted; the rest of the pattern passes through.
    assert!(!p.is_passthrough("api.example.com", 443));
    assert!(p.is_passthrough("www.example.com", 443));
    assert!(p.is_passthrough("pinned.test", 8443));
    assert!(!p.is_passthrough("pinned.test", 443));
    // Another port, and another host: no overlap.
    assert!(
        !w.iter()
            .any(|m| m.contains("pinned.test") || m.contains("other.test")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|m| m.contains(":2:12:") && m.contains("matches no file")),
        "{w:?}"
    );
}

#[test]
fn host_patterns_overlap_when_some_host_and_port_match_both() {
    let hp = |s: &str| crate::HostPattern::parse(s).unwrap();
    assert!(hp("*.a.com").overlaps(&hp("*.b.a.com")));
    assert!(hp("x.a.com").overlaps(&hp("*.a.com")));
    assert!(hp("a.com:*").overlaps(&hp("a.com:8443")));
    assert!(hp("a.com").overlaps(&hp("a.com:443")));
    assert!(!hp("a.com").overlaps(&hp("a.com:8443")));
    // `*.a.com` takes in the apex.
    assert!(hp("*.a.com").overlaps(&hp("a.com")));
    assert!(!hp("*.a.com").overlaps(&hp("a.com:8443")));
    assert!(!hp("*.a.com").overlaps(&hp("*.b.com")));
}

#[test]
fn pinned_pg_setting_names_must_be_shorter_than_postgres_truncation() {
    let long = format!("app.{}", "t".repeat(63));
    let text = format!(
        "version = 1\n[[secrets]]\nname = \"DATABASE_URL\"\ntype = \"pg_dsn\"\nsource = {{ env = \"DSN\" }}\ndatabase = \"app\"\nsettings = {{ \"{long}\" = \"x\", \"app.tenant\" = \"t\" }}\n"
    );
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("1 to 59 bytes") && e[0].contains(&long),
        "{e:?}"
    );
}

/// A broker over http:// is accepted on loopback only, also after `resolve`; two token
/// secrets sharing a token endpoint are warned about (its stub answers for the first).
#[test]
fn broker_http_must_stay_loopback_and_shared_token_endpoints_warn() {
    let broker = |resolve: &str| {
        format!(
            "version = 1\n[proxy]\nresolve = {{ {resolve} }}\n[[secrets]]\nname = \"CODEX\"\ntype = \"brokered_token\"\nbroker = {{ url = \"http://localhost:8181\" }}\nhosts = [\"chatgpt.test\"]\n"
        )
    };
    assert!(parse(&broker("")).is_ok());
    assert!(parse(&broker("\"localhost\" = \"127.0.0.2\"")).is_ok());
    let e = errors(&broker("\"localhost\" = \"192.0.2.2\""));
    assert!(e.iter().any(|m| m.contains("cleartext")), "{e:?}");
    // Userinfo would make the loopback check read one host while the dial goes to another.
    for url in [
        "http://localhost:80@evil.example",
        "http://localhost@evil.example/v1",
        "https://user:pw@broker.example",
    ] {
        let text = broker("").replace("http://localhost:8181", url);
        let e = errors(&text);
        assert!(e.iter().any(|m| m.contains("userinfo")), "{url}: {e:?}");
    }
    // The credential path is appended to the url, so a query or fragment is refused.
    for tail in ["?x=@evil.example", "/#frag", "\\\\v1"] {
        let e = errors(&broker("").replace(":8181", &format!(":8181{tail}")));
        assert!(
            e.iter().any(|m| m.contains("without `?`, `#`")),
            "{tail}: {e:?}"
        );
    }
    assert!(parse(&broker("").replace(":8181", ":8181/broker/")).is_ok());
    let two = "version = 1\n[[secrets]]\nname = \"TOKEN_ONE\"\ntype = \"oauth_token\"\ngrant = \"client_credentials\"\ntoken_endpoint = \"https://id.test/token\"\nfields = { client_id = { env = \"A\" }, client_secret = { env = \"B\" } }\nhosts = [\"a.test\"]\n[[secrets]]\nname = \"TOKEN_TWO\"\ntype = \"oauth_token\"\ngrant = \"client_credentials\"\ntoken_endpoint = \"https://id.test/token\"\nfields = { client_id = { env = \"C\" }, client_secret = { env = \"D\" } }\nhosts = [\"b.test\"]\n";
    let p = parse(two).unwrap_or_else(|e| panic!("{e}"));
    let w: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    assert!(
        w.iter()
            .any(|m| m.contains("secret `TOKEN_TWO` has the token endpoint of secret `TOKEN_ONE`")),
        "{w:?}"
    );
}

/// `upstream_ca` entries: a path (every host) or `{ file, hosts }` (only those server
/// names); a malformed entry is an error naming what is wrong.
#[test]
fn upstream_ca_entries_are_paths_or_scoped_tables() {
    let with = |entries: &str| format!("version = 1\n[proxy]\nupstream_ca = [{entries}]\n");
    let p = parse(&with(
        "\"all.pem\", { file = \"corp.pem\", hosts = [\"*.corp.test\", \"db.test\"] }",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let cas = &p.proxy.upstream_ca;
    assert_eq!(cas.len(), 2);
    assert!(cas[0].file.ends_with("all.pem") && cas[0].trusted_for("api.stripe.test"));
    assert!(cas[1].file.ends_with("corp.pem"));
    assert!(cas[1].trusted_for("git.corp.test") && cas[1].trusted_for("db.test"));
    assert!(cas[1].trusted_for("corp.test"), "the apex of *.corp.test");
    assert!(!cas[1].trusted_for("xcorp.test") && !cas[1].trusted_for("api.stripe.test"));
    for (entry, says) in [
        ("{ file = \"c.pem\", hosts = [] }", "`hosts` is empty"),
        (
            "{ file = \"c.pem\", hosts = [\"db.test:5432\"] }",
            "without a port",
        ),
        (
            "{ file = \"c.pem\", hosts = [\"*\"] }",
            "matches every host",
        ),
        (
            "{ file = \"c.pem\", host = [\"db.test\"] }",
            "unknown key `host`",
        ),
        ("{ hosts = [\"db.test\"] }", "PEM path or"),
        ("42", "PEM path or"),
    ] {
        let e = errors(&with(entry));
        assert!(e.iter().any(|m| m.contains(says)), "{entry}: {e:?}");
    }
}

/// A `*.suffix` pattern over a whole public suffix matches names of unrelated owners: on a
/// secret's `hosts` an ICANN suffix (`*.co.uk`) is refused and a private one
/// (`*.github.io`) warned about; on `allow` both are warned about. Suffixes under a
/// registrable domain, or not on the list (`*.corp.internal`), pass quietly.
#[test]
fn host_patterns_over_a_public_suffix_are_refused_or_warned() {
    let secret = |hosts: &str| {
        format!(
            "version = 1\n[[secrets]]\nname = \"API_TOKEN\"\ntype = \"http\"\nsource = {{ env = \"T\" }}\nhosts = [{hosts}]\n"
        )
    };
    let e = errors(&secret("\"*.co.uk\""));
    assert!(
        e.iter().any(|m| m.contains(
            "`hosts`: `*.co.uk` covers a whole public suffix (ICANN section of the public suffix list)"
        )),
        "{e:?}"
    );
    let warned = |text: &str| -> Vec<String> {
        let p = parse(text).unwrap_or_else(|e| panic!("{e}"));
        p.warnings.iter().map(ToString::to_string).collect()
    };
    let w = warned(&secret("\"*.github.io\""));
    assert!(
        w.iter()
            .any(|m| m.contains("`*.github.io` covers a whole public suffix (private")),
        "{w:?}"
    );
    let w = warned("version = 1\n[proxy]\nallow = [\"*.co.uk\", \"*.github.io\"]\n");
    assert_eq!(w.len(), 2, "{w:?}");
    for quiet in [
        "\"*.example.co.uk\"",
        "\"*.corp.internal\"",
        "\"*.octo.github.io\"",
        "\"co.uk\"",
    ] {
        let w = warned(&secret(quiet));
        assert!(
            !w.iter().any(|m| m.contains("public suffix")),
            "{quiet}: {w:?}"
        );
    }
}

/// `upstream_proxy = "http://HOST:PORT"` (or `socks5[h]://`) with `no_proxy`; other forms are refused with a
/// message naming what is wrong.
#[test]
fn upstream_proxy_is_an_http_url_with_a_host_and_port() {
    let with = |u: &str| {
        format!("version = 1\n[proxy]\nupstream_proxy = \"{u}\"\nno_proxy = [\"*.corp.test\"]\n")
    };
    let p = parse(&with("http://proxy.corp.test:3128")).unwrap_or_else(|e| panic!("{e}"));
    let up = p
        .proxy
        .upstream_proxy
        .as_ref()
        .unwrap_or_else(|| panic!("none"));
    assert_eq!(up.authority, "proxy.corp.test:3128");
    assert_eq!(up.scheme, ProxyScheme::Http);
    assert_eq!(up.auth, None);
    assert!(!up.covers("git.corp.test") && !up.covers("corp.test"));
    assert!(up.covers("api.github.com"));
    let p = parse(&with("http://[fd00::1]/")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.proxy.upstream_proxy.map(|u| u.authority).as_deref(),
        Some("[fd00::1]:80")
    );
    for (url, says) in [
        ("https://proxy:3128", "not an http://"),
        ("socks4://proxy:1080", "not an http://"),
        ("http://user:pw@proxy:3128", "credentials"),
        ("http://proxy:3128/path", "has a path"),
        ("http://proxy:0", "port"),
        ("http://*.corp.test:3128", "pattern"),
    ] {
        let e = parse(&with(url))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(says), "{url}: {e}");
    }
    // SOCKS5, with the proxy's own credential as a secret reference.
    for (url, scheme, authority) in [
        (
            "socks5h://proxy.corp.test",
            ProxyScheme::Socks5 { remote_dns: true },
            "proxy.corp.test:1080",
        ),
        (
            "socks5://10.0.0.9:9050",
            ProxyScheme::Socks5 { remote_dns: false },
            "10.0.0.9:9050",
        ),
    ] {
        let p = parse(&format!(
            "{}upstream_proxy_auth = {{ env = \"CORP_PROXY_AUTH\" }}\n",
            with(url)
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let up = p.proxy.upstream_proxy.unwrap_or_else(|| panic!("none"));
        assert_eq!((up.scheme, up.authority.as_str()), (scheme, authority));
        assert_eq!(
            up.auth.map(|a| a.kind),
            Some(SourceKind::Env("CORP_PROXY_AUTH".into()))
        );
    }
    let warned =
        parse("version = 1\n[proxy]\nno_proxy = [\"a.test\"]\n").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        warned
            .warnings
            .iter()
            .any(|w| w.message.contains("no_proxy")),
        "{:?}",
        warned.warnings
    );
}

#[test]
fn callers_name_a_token_and_grant_known_secrets() {
    let base = r#"
version = 1
[[secrets]]
name = "ALPHA_KEY"
type = "http"
source = { env = "RA" }
hosts = ["a.test"]
[[secrets]]
name = "BETA_KEY"
type = "http"
source = { env = "RB" }
hosts = ["b.test"]
"#;
    let p = parse(&format!(
        r#"{base}
[[callers]]
name = "ci"
token = {{ env = "CI_PROXY_TOKEN" }}
secrets = ["BETA_KEY"]
[[callers]]
name = "ops"
token = {{ file = "ops.token" }}
secrets = ["*"]
"#
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let ci = p.caller("ci").expect("ci");
    assert_eq!(ci.grants, Grants::Only(vec![false, true]));
    assert!(!ci.grants.allows(0) && ci.grants.allows(1) && !ci.grants.allows(2));
    assert_eq!(ci.token.kind, SourceKind::Env("CI_PROXY_TOKEN".into()));
    let ops = p.caller("ops").expect("ops");
    assert_eq!(ops.grants, Grants::All);
    assert_eq!(
        ops.token.kind,
        SourceKind::File(PathBuf::from("/etc/iron/ops.token"))
    );
    assert!(parse(base).expect("no callers").callers.is_empty());

    let errs = errors(&format!(
        r#"{base}
[[callers]]
name = "ci"
token = {{ env = "T1" }}
secrets = ["ALPHA_KEY", "NOPE"]
[[callers]]
name = "ci"
token = {{ env = "T2" }}
secrets = ["ALPHA_KEY"]
[[callers]]
name = "has:colon"
token = {{ env = "T3" }}
secrets = ["ALPHA_KEY"]
[[callers]]
name = "no-token"
secrets = ["ALPHA_KEY"]
[[callers]]
name = "no-grants"
token = {{ env = "T4" }}
[[callers]]
name = "star-and-more"
token = {{ env = "T5" }}
secrets = ["*", "ALPHA_KEY"]
"#
    ));
    let has = |needle: &str| {
        assert!(
            errs.iter().any(|e| e.contains(needle)),
            "no error with {needle:?} in {errs:#?}"
        );
    };
    has("caller `ci`: no secret named `NOPE`");
    has("duplicate caller name `ci`");
    has("caller `has:colon`: a name is");
    has("caller `no-token`: missing `token`");
    has("caller `no-grants`: missing `secrets`");
    has("caller `star-and-more`: `\"*\"` grants every secret");
    // The position is the unknown name's own.
    assert!(
        errs.iter()
            .any(|e| e.contains("NOPE") && e.starts_with("/etc/iron/policy.toml:17:25:")),
        "{errs:#?}"
    );
}

#[test]
fn a_callers_stub_is_its_granted_secrets() {
    let p = parse(
        r#"version = 1
[[secrets]]
name = "GCP_ONE"
type = "gcp_auth"
keyfile = { file = "one.json" }

[[secrets]]
name = "GCP_TWO"
type = "gcp_auth"
keyfile = { file = "two.json" }
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let token = |grants: &Grants| {
        p.stub_for_grants("oauth2.googleapis.com", 443, true, "POST", "/token", grants)
    };
    assert_eq!(token(&Grants::All), Some((0, Stub::GcpToken)));
    assert_eq!(
        token(&Grants::Only(vec![false, true])),
        Some((1, Stub::GcpToken))
    );
    // None granted: the first match, which the proxy then refuses (secret_not_granted).
    assert_eq!(
        token(&Grants::Only(vec![false, false])),
        Some((0, Stub::GcpToken))
    );
}

#[test]
fn on_failure_open_is_for_injecting_secrets_only() {
    let secret = |extra: &str| {
        format!(
            "version = 1\n[[secrets]]\nname = \"KEY_ONE\"\ntype = \"http\"\nsource = {{ env = \"K\" }}\nhosts = [\"a.test\"]\n{extra}\n"
        )
    };
    let open = parse(&secret(
        "mode = \"inject\"\ninject_header = \"X-Key\"\non_failure = \"open\"",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(open.secrets[0].fail_open);
    let closed = parse(&secret("on_failure = \"closed\"")).unwrap_or_else(|e| panic!("{e}"));
    assert!(!closed.secrets[0].fail_open);
    let e = errors(&secret("on_failure = \"open\""));
    assert!(
        e.iter().any(|m| m.contains("needs a secret that injects")),
        "{e:?}"
    );
    let e = errors(&secret("on_failure = \"maybe\""));
    assert!(e.iter().any(|m| m.contains("`closed` or `open`")), "{e:?}");
}

#[test]
fn regex_header_selectors_mix_with_literals() {
    let s = HeaderSelector::parse(&["Authorization", "/^x-[a-z]+-token$/", "/SECRET/"])
        .unwrap_or_else(|e| panic!("{e}"));
    for h in [
        "authorization",
        "X-Gitlab-Token",
        "x-my-secret-header",
        "SeCrEt",
    ] {
        assert!(s.selects(h), "{h}");
    }
    for h in ["x-gitlab-token-2", "x-token", "cookie"] {
        assert!(!s.selects(h), "{h}");
    }
    let e = errors(
        "version = 1\n[[secrets]]\nname = \"KEY_ONE\"\ntype = \"http\"\nsource = { env = \"K\" }\nhosts = [\"a.test\"]\nmatch_headers = [\"/x-(unclosed/\"]\n",
    );
    assert!(
        e.iter()
            .any(|m| m.contains("/x-(unclosed/") && m.contains("not a valid regular expression")),
        "{e:?}"
    );
}
