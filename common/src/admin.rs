//! The admin endpoint: a minimal HTTP/1.0 JSON server on `admin_listen` (loopback by default)
//! that `status` and other operator commands query, and the matching client. Deliberately tiny:
//! GET and POST of a path, a JSON body back.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An admin request: method, path (with query), body.
#[derive(Debug, Clone)]
pub struct AdminRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Status code and JSON body.
pub type AdminResponse = (u16, serde_json::Value);

/// Handles one admin request.
pub type Handler = Arc<dyn Fn(AdminRequest) -> Pin<Box<dyn Future<Output = AdminResponse> + Send>> + Send + Sync>;

const MAX_REQUEST: usize = 1 << 20;

/// Binds `addr`; errors name the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("bind admin endpoint {addr}: {e}")))
}

/// Serves requests until the task is dropped or cancelled. Cancel-safe.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((sock, _)) = listener.accept().await else { continue };
        let h = handler.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(600), handle(sock, h)).await;
        });
    }
}

async fn handle(mut sock: TcpStream, handler: Handler) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let header_end = loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_REQUEST {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("/").to_string();
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_REQUEST);
    let mut body = buf[header_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let (code, json) = handler(AdminRequest { method, path, body }).await;
    let text = serde_json::to_vec_pretty(&json).unwrap_or_default();
    let head = format!(
        "HTTP/1.0 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if code < 400 { "OK" } else { "Error" },
        text.len() + 1
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(&text).await?;
    sock.write_all(b"\n").await?;
    sock.shutdown().await
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Admin client errors.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the daemon's admin endpoint at {addr} ({source}); is it running with this config?")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("admin endpoint {addr}: {0}", addr = .1)]
    Io(std::io::Error, SocketAddr),
    #[error("admin endpoint {addr} answered something that is not HTTP/JSON")]
    Garbled { addr: SocketAddr },
}

/// Sends one request and returns (status code, JSON body). `timeout` bounds the whole call.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), AdminError> {
    let fut = async {
        let mut sock = TcpStream::connect(addr).await.map_err(|source| AdminError::Connect { addr, source })?;
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
        let req = format!("{method} {path} HTTP/1.0\r\nHost: lockstep\r\nContent-Length: {}\r\n\r\n", body.len());
        sock.write_all(req.as_bytes()).await.map_err(|e| AdminError::Io(e, addr))?;
        sock.write_all(&body).await.map_err(|e| AdminError::Io(e, addr))?;
        let mut resp = Vec::new();
        sock.read_to_end(&mut resp).await.map_err(|e| AdminError::Io(e, addr))?;
        let i = find(&resp, b"\r\n\r\n").ok_or(AdminError::Garbled { addr })?;
        let status_line = String::from_utf8_lossy(&resp[..i]).lines().next().unwrap_or("").to_string();
        let code =
            status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(AdminError::Garbled { addr })?;
        let json = serde_json::from_slice(&resp[i + 4..]).map_err(|_| AdminError::Garbled { addr })?;
        Ok((code, json))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(AdminError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"), addr)),
    }
}
