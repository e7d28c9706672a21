//! The guard's own admin listener: `/healthz` (the process is alive), `/readyz` (PostgREST is
//! reachable; the database connection is reported, not required) and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use tokio::net::TcpStream;

use crate::body::{full, GuardBody, RequestBody};
use crate::config::UpstreamUrl;
use crate::metrics::Metrics;
use crate::reload::Notifier;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub notifier: Arc<Notifier>,
    pub upstream: UpstreamUrl,
}

pub async fn handle(state: AdminState, request: Request<RequestBody>) -> Result<Response<GuardBody>, Infallible> {
    let (status, content_type, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, "application/json", r#"{"status":"alive"}"#.to_string()),
        "/readyz" => {
            let reachable = upstream_reachable(&state.upstream).await;
            let database = if state.notifier.is_connected() { "connected" } else { "disconnected" };
            let status = if reachable { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let upstream = if reachable { "reachable" } else { "unreachable" };
            (status, "application/json", format!(r#"{{"upstream":"{upstream}","database":"{database}"}}"#))
        }
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(state.notifier.is_connected(), state.notifier.notifications_seen()),
        ),
        _ => (StatusCode::NOT_FOUND, "application/json", r#"{"error":"not found"}"#.to_string()),
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, content_type.parse().expect("static content type"));
    Ok(response)
}

async fn upstream_reachable(upstream: &UpstreamUrl) -> bool {
    let port =
        upstream.authority.port_u16().unwrap_or(if upstream.scheme == http::uri::Scheme::HTTPS { 443 } else { 80 });
    let host = upstream.authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    matches!(tokio::time::timeout(Duration::from_secs(2), TcpStream::connect((host.as_str(), port))).await, Ok(Ok(_)))
}
