//! hudsucker as a plain intercepting proxy (no handler work), trusting the bench origin's
//! CA upstream and resolving every name to 127.0.0.1 (the bench origin).
//! Usage: hudsucker-peer PORT CA_CERT_PEM CA_KEY_PEM ORIGIN_CA_PEM
use hudsucker::{
    certificate_authority::RcgenAuthority,
    rcgen::{Issuer, KeyPair},
    rustls::{self, crypto::aws_lc_rs},
    Proxy,
};
use hudsucker::hyper_util::client::legacy::connect::{HttpConnector, dns::Name};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Every name resolves to loopback (the bench origin's host names are not in DNS).
#[derive(Clone)]
struct Loopback;

impl tower_service::Service<Name> for Loopback {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(vec![SocketAddr::from(([127, 0, 0, 1], 0))].into_iter()))
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args[1].parse().expect("port");
    let ca_cert = std::fs::read_to_string(&args[2]).expect("ca cert");
    let ca_key = std::fs::read_to_string(&args[3]).expect("ca key");
    let key_pair = KeyPair::from_pem(&ca_key).expect("ca key pem");
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, key_pair).expect("ca cert pem");
    let ca = RcgenAuthority::new(issuer, 1_000, aws_lc_rs::default_provider());

    let mut roots = rustls::RootCertStore::empty();
    let origin_ca = std::fs::read(&args[4]).expect("origin ca");
    for cert in rustls_pemfile::certs(&mut origin_ca.as_slice()) {
        roots.add(cert.expect("origin ca pem")).expect("add root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new_with_resolver(Loopback);
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);

    let proxy = Proxy::builder()
        .with_addr(SocketAddr::from(([127, 0, 0, 1], port)))
        .with_ca(ca)
        .with_http_connector(https)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .build()
        .expect("proxy");
    proxy.start().await.expect("start");
}
