//! Listeners and connections: HTTP/1.1 and HTTP/2 (h2c) from clients, the client address put on
//! each request, and graceful shutdown (stop accepting, let requests and heals finish).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::body::GuardBody;
use crate::metrics::Metrics;
use crate::upstream::ClientAddr;

/// Serves `service` on `listener` until `shutdown` resolves, then waits up to `drain` for open
/// requests to finish.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    metrics: Option<Arc<Metrics>>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) where
    S: Service<Request<Incoming>, Response = Response<GuardBody>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let metrics = metrics.clone();
        let per_request = service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(peer));
            let service = service.clone();
            let metrics = metrics.clone();
            async move {
                let started = Instant::now();
                let response = service.oneshot(request).await?;
                if let Some(metrics) = metrics {
                    metrics.response(response.status().as_u16(), started.elapsed());
                }
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), per_request).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain_ms = drain.as_millis() as u64, "shutdown deadline passed with requests still open");
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
