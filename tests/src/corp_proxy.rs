//! A corporate egress proxy for the tests: answers `CONNECT host:port` (HTTP, or SOCKS5
//! when the client's first byte is 5) and splices the connection to `127.0.0.1:port`
//! (whatever the host), recording each target. [`CorpProxy::start_with_auth`] makes it
//! require `USER:PASSWORD`: `Proxy-Authorization: Basic` (else 407), or SOCKS5
//! username/password (RFC 1929; else refused).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A running CONNECT proxy on `127.0.0.1:0`; stops when dropped.
pub struct CorpProxy {
    /// Its address.
    pub addr: SocketAddr,
    /// Targets asked for: `host:port` for HTTP CONNECT, `socks5 host:port` for SOCKS5.
    targets: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CorpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CorpProxy {
    /// Starts the proxy.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts the proxy requiring `user_pass` (`USER:PASSWORD`) from every client.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn start_with_auth(user_pass: &str) -> Self {
        Self::start_with(Some(user_pass.to_string())).await
    }

    #[allow(clippy::expect_used)] // test set-up
    async fn start_with(auth: Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let targets = Arc::new(Mutex::new(Vec::new()));
        let seen = targets.clone();
        let auth = Arc::new(auth);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(relay(tcp, seen.clone(), auth.clone()));
            }
        });
        Self {
            addr,
            targets,
            task,
        }
    }

    /// The `CONNECT` targets asked for so far, in order.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

async fn relay(mut client: TcpStream, seen: Arc<Mutex<Vec<String>>>, auth: Arc<Option<String>>) {
    let mut first = [0u8; 1];
    if client.peek(&mut first).await.ok() != Some(1) {
        return;
    }
    if first[0] == 5 {
        return socks(client, seen, auth.as_deref()).await;
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut words = text.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if let Some(expected) = auth.as_deref() {
        use base64::Engine as _;
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(expected)
        );
        let given = text.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("proxy-authorization")
                .then(|| value.trim())
        });
        if given != Some(want.as_str()) {
            let _ = client
                .write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n",
                )
                .await;
            return;
        }
    }
    if let Ok(mut t) = seen.lock() {
        t.push(target.to_string());
    }
    let port = target
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(443);
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// SOCKS5 (RFC 1928) CONNECT, with RFC 1929 username/password when `auth` is set.
async fn socks(mut client: TcpStream, seen: Arc<Mutex<Vec<String>>>, auth: Option<&str>) {
    let mut head = [0u8; 2];
    if client.read_exact(&mut head).await.is_err() {
        return;
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    if client.read_exact(&mut methods).await.is_err() {
        return;
    }
    let method = if auth.is_some() { 2 } else { 0 };
    if !methods.contains(&method) {
        let _ = client.write_all(&[5, 0xff]).await;
        return;
    }
    if client.write_all(&[5, method]).await.is_err() {
        return;
    }
    if let Some(expected) = auth {
        let mut b = [0u8; 2];
        if client.read_exact(&mut b).await.is_err() {
            return;
        }
        let mut user = vec![0u8; usize::from(b[1])];
        let _ = client.read_exact(&mut user).await;
        let mut plen = [0u8; 1];
        let _ = client.read_exact(&mut plen).await;
        let mut pass = vec![0u8; usize::from(plen[0])];
        let _ = client.read_exact(&mut pass).await;
        let given = format!(
            "{}:{}",
            String::from_utf8_lossy(&user),
            String::from_utf8_lossy(&pass)
        );
        let ok = given == expected;
        let _ = client.write_all(&[1, u8::from(!ok)]).await;
        if !ok {
            return;
        }
    }
    let mut req = [0u8; 4];
    if client.read_exact(&mut req).await.is_err() {
        return;
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            let _ = client.read_exact(&mut a).await;
            std::net::Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            let _ = client.read_exact(&mut len).await;
            let mut name = vec![0u8; usize::from(len[0])];
            let _ = client.read_exact(&mut name).await;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => {
            let _ = client.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0]).await;
            return;
        }
    };
    let mut port = [0u8; 2];
    if client.read_exact(&mut port).await.is_err() {
        return;
    }
    let port = u16::from_be_bytes(port);
    if let Ok(mut t) = seen.lock() {
        t.push(format!("socks5 {host}:{port}"));
    }
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
        let _ = client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        return;
    };
    if client
        .write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0])
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
