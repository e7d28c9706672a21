//! A stand-in for a PostgREST whose cache never catches up, for resource tests that need thousands
//! of stale answers cheaply: it reads each request's body whole, answers v14's PGRST204 for the
//! body's first key (with `Proxy-Status`); its admin `/metrics` shows a
//! load counter that never moves, so the guard waits for a reload until its deadline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub struct StaleUpstream {
    addr: SocketAddr,
    admin: SocketAddr,
    requests: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for StaleUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl StaleUpstream {
    pub async fn start() -> StaleUpstream {
        let requests = Arc::new(AtomicU64::new(0));
        // As PostgREST's warp: an accept queue of at least 2048, not tokio's 1024.
        let listener = pgrst_guard::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin) = (listener.local_addr().unwrap(), admin_listener.local_addr().unwrap());
        let counted = requests.clone();
        let api = tokio::spawn(serve(listener, move |request: Request<Incoming>| {
            let counted = counted.clone();
            async move {
                let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                counted.fetch_add(1, Ordering::AcqRel);
                let first_key = std::str::from_utf8(&body[..body.len().min(64)])
                    .ok()
                    .and_then(|text| text.split('"').nth(1))
                    .unwrap_or("a")
                    .to_string();
                let error = format!(
                    r#"{{"code":"PGRST204","details":null,"hint":null,"message":"Could not find the '{first_key}' column of 'chat_messages' in the schema cache"}}"#
                );
                Response::builder()
                    .status(400)
                    .header("content-type", "application/json; charset=utf-8")
                    .header("proxy-status", "PostgREST; error=PGRST204")
                    .header("server", "postgrest/14.17")
                    .body(Full::new(Bytes::from(error)))
                    .unwrap()
            }
        }));
        let admin_task = tokio::spawn(serve(admin_listener, |_request: Request<Incoming>| async {
            Response::builder()
                .header("content-type", "text/plain; charset=utf-8")
                .body(Full::new(Bytes::from_static(b"pgrst_schema_cache_loads_total{status=\"SUCCESS\"} 1.0\n")))
                .unwrap()
        }));
        StaleUpstream { addr, admin, requests, tasks: vec![api, admin_task] }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }
}

async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
