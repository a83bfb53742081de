//! End-to-end: `oauth_token` (four grants) and `gcp_auth` secrets through the proxy, with a
//! fake TLS IdP on loopback, a recording origin, and real curl / Python clients.

#![allow(clippy::expect_used)] // setup helpers: a failed step is a failed test

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use iron_proxy::origin::OriginOptions;
use iron_tests::idp::{self, Idp};
use iron_tests::*;

struct Keys {
    private_pem: String,
    public_pem: String,
}

fn rsa() -> Keys {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
    Keys {
        private_pem: key.serialize_pem(),
        public_pem: key.public_key_pem(),
    }
}

const TOKEN_POLICY: &str = r#"version = 1

[proxy]
listen = "127.0.0.1:0"
allow = ["other.test:{PORT}"]
allow_cidrs = ["127.0.0.1/32"]
upstream_ca = ["origin-ca.pem", "idp-ca.pem"]
resolve = { "cc.test" = "127.0.0.1", "rt.test" = "127.0.0.1", "pw.test" = "127.0.0.1", "jwt.test" = "127.0.0.1", "gcp.test" = "127.0.0.1", "other.test" = "127.0.0.1", "idp.test" = "127.0.0.1" }

[[secrets]]
name = "CC_TOKEN"
type = "oauth_token"
grant = "client_credentials"
token_endpoint = "https://idp.test:{IDP}/token"
scopes = ["read", "write"]
fields = { client_id = { env = "IDP_CLIENT_ID" }, client_secret = { env = "IDP_CLIENT_SECRET" } }
token_endpoint_headers = { "X-Idp-Key" = { env = "IDP_HEADER" } }
hosts = ["cc.test:{PORT}"]

[[secrets]]
name = "RT_TOKEN"
type = "oauth_token"
grant = "refresh_token"
token_endpoint = "https://idp.test:{IDP}/token"
client_auth = "client_secret_basic"
fields = { client_id = { env = "IDP_CLIENT_ID" }, client_secret = { env = "IDP_CLIENT_SECRET" }, refresh_token = { file = "refresh.json", json_key = "refresh_token" } }
hosts = ["rt.test:{PORT}"]

[[secrets]]
name = "PW_TOKEN"
type = "oauth_token"
grant = "password"
token_endpoint = "https://idp.test:{IDP}/token"
fields = { client_id = { env = "IDP_CLIENT_ID" }, username = { env = "IDP_USER" }, password = { env = "IDP_PASSWORD" } }
hosts = ["pw.test:{PORT}"]
inject_header = "X-Token"
inject_formatter = "Token {value}"

[[secrets]]
name = "JWT_TOKEN"
type = "oauth_token"
grant = "jwt_bearer"
token_endpoint = "https://idp.test:{IDP}/token"
audience = "https://idp.test:{IDP}/token"
fields = { issuer = { env = "JWT_ISSUER" }, subject = { env = "JWT_ISSUER" }, private_key = { file = "jwt.pem" }, private_key_id = { env = "JWT_KID" } }
hosts = ["jwt.test:{PORT}"]

[[secrets]]
name = "GCP_TOKEN"
type = "gcp_auth"
keyfile = { file = "sa.json" }
hosts = ["gcp.test:{PORT}"]
"#;

fn token_env() -> HashMap<String, String> {
    [
        ("IDP_CLIENT_ID", idp::CLIENT_ID),
        ("IDP_CLIENT_SECRET", idp::CLIENT_SECRET),
        ("IDP_HEADER", "idp-header-value"),
        ("IDP_USER", idp::USERNAME),
        ("IDP_PASSWORD", idp::PASSWORD),
        ("JWT_ISSUER", idp::ISSUER),
        ("JWT_KID", "kid-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

struct Setup {
    w: World,
    idp: Idp,
    keys: Keys,
}

async fn setup() -> Setup {
    let keys = rsa();
    let idp = Idp::start(keys.public_pem.clone()).await;
    let policy = TOKEN_POLICY.replace("{IDP}", &idp.addr.port().to_string());
    let w = World::new(&policy, OriginOptions::default()).await;
    std::fs::write(w.dir.path().join("idp-ca.pem"), &idp.ca_pem).expect("idp ca");
    std::fs::write(w.dir.path().join("jwt.pem"), &keys.private_pem).expect("jwt key");
    std::fs::write(
        w.dir.path().join("refresh.json"),
        format!("{{\"refresh_token\": \"{}\"}}", idp::REFRESH_TOKEN),
    )
    .expect("refresh");
    let sa = serde_json::json!({
        "type": "service_account",
        "client_email": idp::ISSUER,
        "private_key": keys.private_pem,
        "private_key_id": "sa-kid",
        "token_uri": format!("https://idp.test:{}/token", idp.addr.port()),
    });
    std::fs::write(w.dir.path().join("sa.json"), sa.to_string()).expect("sa");
    Setup { w, idp, keys }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grant_and_gcp_inject_a_minted_token() {
    if !have("curl") {
        return;
    }
    let s = setup().await;
    let audience_ok = s.idp.addr.port() > 0;
    assert!(audience_ok);
    let p = s.w.proxy(token_env()).await;
    let port = s.w.port();
    for host in ["cc.test", "rt.test", "pw.test", "jwt.test", "gcp.test"] {
        let r = p.curl(&[&format!("https://{host}:{port}/api")]).await;
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
    let recs = s.w.origin.records();
    let issued = s.idp.state.issued.lock().expect("lock").clone();
    assert_eq!(issued.len(), 5, "{issued:?}");
    let auth = |i: usize, h: &str| recs[i].header(h).unwrap_or_default();
    assert_eq!(auth(0, "authorization"), format!("Bearer {}", issued[0]));
    assert!(issued[0].contains("client_credentials"));
    assert!(issued[1].contains("refresh_token"));
    assert_eq!(auth(1, "authorization"), format!("Bearer {}", issued[1]));
    assert_eq!(auth(2, "x-token"), format!("Token {}", issued[2]));
    assert!(issued[2].contains("password"));
    assert!(issued[3].contains("jwt-bearer"));
    assert_eq!(auth(3, "authorization"), format!("Bearer {}", issued[3]));
    assert_eq!(auth(4, "authorization"), format!("Bearer {}", issued[4]));

    // Cached: more requests, no more token calls.
    for host in ["cc.test", "rt.test", "jwt.test"] {
        assert_eq!(
            p.curl(&[&format!("https://{host}:{port}/again")])
                .await
                .status,
            200
        );
    }
    assert_eq!(s.idp.state.calls.load(Ordering::SeqCst), 5);

    // Other hosts get nothing, and a token placeholder headed there is refused.
    let r = p.curl(&[&format!("https://other.test:{port}/")]).await;
    assert_eq!(r.status, 200);
    assert!(
        s.w.origin
            .records()
            .last()
            .expect("rec")
            .header("authorization")
            .is_none()
    );
    let r = p
        .curl(&[
            &format!("https://other.test:{port}/"),
            "-H",
            "Authorization: Bearer CC_TOKEN",
        ])
        .await;
    assert_eq!(r.error_code().as_deref(), Some("placeholder_not_allowed"));

    // Nothing secret in responses or audit records.
    let audit = serde_json::to_string(&p.audit.records()).expect("audit");
    for t in issued.iter().map(String::as_str).chain([
        idp::CLIENT_SECRET,
        idp::REFRESH_TOKEN,
        idp::PASSWORD,
    ]) {
        assert!(!audit.contains(t));
        assert!(!r.body.contains(t));
    }
    let _ = &s.keys;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_outage_fails_closed_then_recovers() {
    if !have("curl") {
        return;
    }
    let s = setup().await;
    let p = s.w.proxy(token_env()).await;
    let port = s.w.port();
    s.idp.state.fail_next.store(100, Ordering::SeqCst);
    let r = p.curl(&[&format!("https://cc.test:{port}/x")]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.error_code().as_deref(), Some("credential_unavailable"));
    assert!(!r.body.contains("boom"), "IdP body relayed");
    assert!(
        s.w.origin.records().is_empty(),
        "forwarded without a credential"
    );
    assert!(s.idp.state.calls.load(Ordering::SeqCst) >= 2, "no retry");
    // Recovery without restart, once the 1 s cool-down after the failed mint is over;
    // during it, requests are refused without calling the IdP.
    s.idp.state.fail_next.store(0, Ordering::SeqCst);
    let calls = s.idp.state.calls.load(Ordering::SeqCst);
    let r = p.curl(&[&format!("https://cc.test:{port}/x")]).await;
    assert_eq!(r.error_code().as_deref(), Some("credential_unavailable"));
    assert_eq!(
        s.idp.state.calls.load(Ordering::SeqCst),
        calls,
        "IdP called while cooling down"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = p.curl(&[&format!("https://cc.test:{port}/x")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(s.w.origin.records().len(), 1);

    // invalid_grant: failed, with the reason, until the source changes.
    s.idp.state.invalid_grant.store(true, Ordering::SeqCst);
    let r = p.curl(&[&format!("https://rt.test:{port}/x")]).await;
    assert_eq!(r.error_code().as_deref(), Some("credential_unavailable"));
    let calls = s.idp.state.calls.load(Ordering::SeqCst);
    s.idp.state.invalid_grant.store(false, Ordering::SeqCst);
    let r = p.curl(&[&format!("https://rt.test:{port}/x")]).await;
    assert_eq!(r.error_code().as_deref(), Some("credential_unavailable"));
    assert_eq!(
        s.idp.state.calls.load(Ordering::SeqCst),
        calls,
        "retried a dead grant"
    );
    // A new refresh token in the source (a human re-consented) revives it.
    s.idp.set_refresh_token("rt_REALreconsented_1");
    std::fs::write(
        s.w.dir.path().join("refresh.json"),
        "{\"refresh_token\": \"rt_REALreconsented_1\"}",
    )
    .expect("write");
    let r = p.curl(&[&format!("https://rt.test:{port}/x")]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_rotation_is_followed() {
    if !have("curl") {
        return;
    }
    let s = setup().await;
    s.idp.state.rotate.store(true, Ordering::SeqCst);
    s.idp.state.expires_in.store(1, Ordering::SeqCst);
    let p = s.w.proxy(token_env()).await;
    let port = s.w.port();
    // Each request finds the 1 s token expired, so each refreshes with the refresh token the
    // previous response rotated in.
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let r = p.curl(&[&format!("https://rt.test:{port}/x")]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(s.idp.state.calls.load(Ordering::SeqCst), 3);
    assert!(
        s.idp
            .state
            .grants
            .lock()
            .expect("lock")
            .iter()
            .all(|g| g == "refresh_token")
    );
}

/// The proxy's own refresh_token grant against an IdP that rotates: when the IdP rotates
/// the token and a gateway in front of it answers 504, the proxy does not send the
/// rotated-out token again (the IdP would see reuse and revoke the grant). The credential
/// is unavailable (its admin status says `rotation_interrupted`) until a human puts a
/// current refresh token in the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_after_a_rotation_is_not_replayed() {
    if !have("curl") {
        return;
    }
    let s = setup().await;
    s.idp.state.rotate.store(true, Ordering::SeqCst);
    s.idp.state.expires_in.store(1, Ordering::SeqCst);
    let p = s.w.proxy(token_env()).await;
    let port = s.w.port();
    let url = format!("https://rt.test:{port}/x");
    let r = p.curl(&[&url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The IdP rotates once more, and the 504 loses its answer.
    s.idp.state.gateway_timeout_next.store(1, Ordering::SeqCst);
    let r = p.curl(&[&url]).await;
    assert_eq!(
        r.error_code().as_deref(),
        Some("credential_unavailable"),
        "{r:?}"
    );
    assert_eq!(s.idp.state.calls.load(Ordering::SeqCst), 2, "replayed");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = p.curl(&[&url]).await;
    assert_eq!(r.error_code().as_deref(), Some("credential_unavailable"));
    // The reason is for the operator (admin status, log), not the sandbox.
    let failed = p.rt.tokens.status("RT_TOKEN").and_then(|t| t.failed);
    assert!(
        failed
            .as_deref()
            .is_some_and(|f| f.contains("rotation_interrupted")),
        "{failed:?}"
    );
    assert_eq!(
        s.idp.state.calls.load(Ordering::SeqCst),
        2,
        "called again after the interruption"
    );
    assert_eq!(
        s.w.origin.records().len(),
        1,
        "forwarded without a credential"
    );
    // A human re-consents: a new refresh token in the source brings it back.
    s.idp.set_refresh_token("rt_REALreconsented_2");
    std::fs::write(
        s.w.dir.path().join("refresh.json"),
        "{\"refresh_token\": \"rt_REALreconsented_2\"}",
    )
    .expect("write");
    let r = p.curl(&[&url]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_sdk_token_dance_is_stubbed() {
    let has_requests = std::process::Command::new("python3")
        .args(["-c", "import requests"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_requests {
        return eprintln!("python3 with requests not installed; skipped");
    }
    let s = setup().await;
    let p = s.w.proxy(token_env()).await;
    let port = s.w.port();
    let idp_port = s.idp.addr.port();
    // An SDK holding stub credentials: token dance against the configured token endpoint,
    // then the API call with the token it got; and gcloud-style against Google's endpoint,
    // which does not even resolve here (the proxy must not dial out).
    let script = format!(
        "import requests\n\
         t = requests.post('https://idp.test:{idp_port}/token', data={{'grant_type': 'client_credentials', 'client_id': 'stub', 'client_secret': 'stub'}}).json()\n\
         r = requests.get('https://cc.test:{port}/sdk', headers={{'Authorization': 'Bearer ' + t['access_token']}})\n\
         g = requests.post('https://oauth2.googleapis.com/token', data={{'grant_type': 'urn:ietf:params:oauth:grant-type:jwt-bearer', 'assertion': 'x'}}).json()\n\
         r2 = requests.get('https://gcp.test:{port}/sdk', headers={{'Authorization': 'Bearer ' + g['access_token']}})\n\
         md = {{'Metadata-Flavor': 'Google'}}\n\
         m = requests.get('http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token', headers=md)\n\
         m2 = requests.get('http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token', headers=md)\n\
         print(t['access_token'], r.status_code, g['access_token'], r2.status_code, m.json()['access_token'], m.headers['Metadata-Flavor'], m2.json()['access_token'])\n"
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .env("HTTPS_PROXY", format!("http://{}", p.addr()))
        .env("HTTP_PROXY", format!("http://{}", p.addr()))
        .env("REQUESTS_CA_BUNDLE", &p.ca.cert)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The metadata server's token path (by name and by its link-local address, which the
    // allowlist and the denied ranges would otherwise refuse) is stubbed too.
    assert_eq!(
        stdout.trim(),
        "CC_TOKEN 200 GCP_TOKEN 200 GCP_TOKEN Google GCP_TOKEN",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The IdP saw only the proxy's own grants, never the sandbox's stub credentials.
    let grants = s.idp.state.grants.lock().expect("lock").clone();
    assert_eq!(grants.len(), 2, "{grants:?}");
    let issued = s.idp.state.issued.lock().expect("lock").clone();
    let recs = s.w.origin.records();
    assert_eq!(
        recs[0].header("authorization"),
        Some(format!("Bearer {}", issued[0]))
    );
    assert_eq!(
        recs[1].header("authorization"),
        Some(format!("Bearer {}", issued[1]))
    );
    let stubbed = p
        .audit
        .records()
        .iter()
        .filter(|r| r.outcome == "stubbed")
        .count();
    assert_eq!(stubbed, 4);

    // Only the stub is answered on a token endpoint's host: any other path or method is not
    // forwarded to it (the host is in no `allow` entry), and the IdP is not called.
    let calls = s.idp.state.calls.load(Ordering::SeqCst);
    for args in [
        vec!["-X", "POST", "/other"],
        vec!["-X", "POST", "//token"],
        vec!["-X", "GET", "/token"],
    ] {
        let url = format!("https://idp.test:{idp_port}{}", args[2]);
        let r = p.curl(&[args[0], args[1], &url]).await;
        assert_eq!(r.status, 403, "{args:?} {r:?}");
        assert_eq!(
            r.error_code().as_deref(),
            Some("destination_not_allowed"),
            "{args:?}"
        );
    }
    assert_eq!(s.idp.state.calls.load(Ordering::SeqCst), calls);
}

#[test]
fn check_validates_token_secrets_without_the_idp() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bad.pem"),
        "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
    )
    .expect("pem");
    std::fs::write(dir.path().join("sa.json"), "{\"client_email\": \"x@y\"}").expect("sa");
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "version = 1\n[[secrets]]\nname = \"JWT_TOKEN\"\ntype = \"oauth_token\"\ngrant = \"jwt_bearer\"\ntoken_endpoint = \"https://idp.invalid/token\"\nfields = { issuer = { env = \"ISS\" }, subject = { env = \"ISS\" }, private_key = { file = \"bad.pem\" } }\nhosts = [\"api.test\"]\n\n[[secrets]]\nname = \"GCP_TOKEN\"\ntype = \"gcp_auth\"\nkeyfile = { file = \"sa.json\" }\n",
    )
    .expect("policy");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iron-proxy-e2e"))
        .args(["check", "--policy"])
        .arg(&policy)
        .env("ISS", "me")
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            ":3:8: secret `JWT_TOKEN`: field private_key is not an RSA private key in PEM"
        ),
        "{text}"
    );
    assert!(
        text.contains(":11:8: secret `GCP_TOKEN`: keyfile has no private_key"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_grant_secret_in_trace_logs() {
    if !have("curl") {
        return;
    }
    let s = setup().await;
    let home = s.w.dir.path().join("home");
    let proxy = Spawned::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_iron-proxy-e2e")),
        &s.w.policy_path,
        &home,
        &token_env(),
        "trace",
    );
    let port = s.w.port();
    let idp_port = s.idp.addr.port();
    let mut bodies = String::new();
    for url in ["cc", "rt", "pw", "jwt", "gcp"].map(|h| format!("https://{h}.test:{port}/x")) {
        let r = curl_via(proxy.addr, &proxy.ca, &[&url]).await;
        assert_eq!(r.status, 200, "{r:?}");
        bodies.push_str(&r.body);
    }
    let stub = curl_via(
        proxy.addr,
        &proxy.ca,
        &[
            "-d",
            "grant_type=client_credentials",
            &format!("https://idp.test:{idp_port}/token"),
        ],
    )
    .await;
    bodies.push_str(&stub.body);
    // The gcp_auth stub key file is offered to the sandbox by `env`.
    let env = std::process::Command::new(env!("CARGO_BIN_EXE_iron-proxy-e2e"))
        .args(["env", "--policy"])
        .arg(&s.w.policy_path)
        .env("IRON_PROXY_HOME", &home)
        .envs(token_env())
        .output()
        .expect("env");
    let env_text = String::from_utf8_lossy(&env.stdout).into_owned();
    let log = proxy.stop();
    assert!(log.contains("TRACE"), "not at trace level");
    let issued = s.idp.state.issued.lock().expect("lock").clone();
    assert_eq!(issued.len(), 5);
    let private_body: String = s
        .keys
        .private_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for secret in issued.iter().map(String::as_str).chain([
        idp::CLIENT_SECRET,
        idp::REFRESH_TOKEN,
        idp::PASSWORD,
        &private_body[200..260],
    ]) {
        assert!(!log.contains(secret), "secret in logs");
        assert!(!bodies.contains(secret), "secret in a response");
        assert!(!env_text.contains(secret), "secret in env output");
    }
    assert!(
        stub.body.contains("\"access_token\":\"CC_TOKEN\""),
        "{}",
        stub.body
    );
    let keyfile = env_text
        .lines()
        .find_map(|l| l.strip_prefix("export GOOGLE_APPLICATION_CREDENTIALS='"))
        .map(|v| v.trim_end_matches('\'').to_string())
        .expect("GOOGLE_APPLICATION_CREDENTIALS");
    assert!(env_text.contains(&format!(
        "export CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE='{keyfile}'"
    )));
    let stub_key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&keyfile).expect("stub key file"))
            .expect("json");
    assert_eq!(stub_key["type"], "service_account");
    assert_eq!(stub_key["token_uri"], "https://oauth2.googleapis.com/token");
    assert!(
        !stub_key["private_key"]
            .as_str()
            .unwrap_or_default()
            .contains(&private_body[200..260])
    );
}

/// A token that expires under load: 200 parallel requests arriving after expiry cause one
/// token request, and every one of them reaches the origin with the new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_under_200_parallel_requests_mints_once() {
    if !have("curl") {
        return;
    }
    let s = setup().await;
    s.idp.state.expires_in.store(1, Ordering::SeqCst);
    let p = s.w.proxy(token_env()).await;
    let port = s.w.port();
    let url = format!("https://cc.test:{port}/x");
    let r = p.curl(&[&url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let before = s.idp.state.calls.load(Ordering::SeqCst);
    s.idp.state.expires_in.store(60, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut args = vec![
        "--parallel",
        "--parallel-max",
        "200",
        "--parallel-immediate",
    ];
    args.extend(std::iter::repeat_n(url.as_str(), 200));
    let r = p.curl(&args).await;
    assert_eq!(r.exit, 0, "{}", r.stderr);
    assert_eq!(
        s.idp.state.calls.load(Ordering::SeqCst),
        before + 1,
        "200 requests after expiry made more than one token request"
    );
    let issued = s.idp.state.issued.lock().expect("lock").clone();
    let fresh = format!("Bearer {}", issued.last().expect("issued"));
    let recs = s.w.origin.records();
    assert_eq!(recs.len(), 201);
    assert_eq!(
        recs[1..]
            .iter()
            .filter(|r| r.header("authorization").as_deref() == Some(fresh.as_str()))
            .count(),
        200
    );
}
