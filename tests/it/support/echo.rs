//! An upstream that answers every request with a JSON description of what it received, to check
//! what the guard forwards. Paths under /slow never answer; /big streams a large body.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub struct EchoServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    pub async fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service_fn(echo))
                        .await;
                });
            }
        });
        EchoServer { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The same echo behind TLS with `server_config`.
    pub async fn start_tls(server_config: rustls::ServerConfig) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_config));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service_fn(echo))
                        .await;
                });
            }
        });
        EchoServer { addr, task }
    }
}

/// Requests for a `/delay` path the echo servers of this process have begun to answer.
pub static DELAYED_STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub async fn echo(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path().contains("/delay") {
        DELAYED_STARTED.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
    if request.uri().path().contains("/slow") {
        std::future::pending::<()>().await;
    }
    if request.uri().path().ends_with("/big") {
        let size: usize =
            request.uri().query().and_then(|q| q.strip_prefix("n=")).and_then(|n| n.parse().ok()).unwrap_or(0);
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; size]))));
    }
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let version = format!("{:?}", request.version());
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_str().unwrap_or("").to_string())))
        .collect();
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let description = serde_json::json!({
        "method": method, "uri": uri, "version": version, "headers": headers,
        "body_len": body.len(), "body": String::from_utf8_lossy(&body[..body.len().min(1024)]),
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("connection", "keep-alive, x-secret-hop")
        .header("x-secret-hop", "must not reach the client")
        .body(Full::new(Bytes::from(description.to_string())))
        .unwrap())
}
