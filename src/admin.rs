//! The guard's own admin listener: `/healthz` (the process is alive), `/readyz` (PostgREST is
//! reachable; the database connection is reported, not required) and `/metrics`.
//!
//! The database path does not decide readiness: forwarding does not need it, and every guard of a
//! fleet shares one `PGRST_GUARD_DB_URI`, so a database that cannot NOTIFY (a standby during a
//! failover) would take the whole fleet out of its load balancer at once. It is reported instead,
//! and alerted on (`pgrst_guard_database_connected`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use tokio::net::TcpStream;

use crate::body::{full, GuardBody, RequestBody};
use crate::config::UpstreamUrl;
use crate::health::Listening;
use crate::metrics::Metrics;
use crate::reload::Database;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub database: Arc<Database>,
    pub upstream: UpstreamUrl,
}

pub async fn handle(state: AdminState, request: Request<RequestBody>) -> Result<Response<GuardBody>, Infallible> {
    let (status, content_type, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, "application/json", r#"{"status":"alive"}"#.to_string()),
        "/readyz" => {
            let reachable = upstream_reachable(&state.upstream).await;
            let status = if reachable { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, "application/json", readiness(reachable, &state.database).to_string())
        }
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(&state.database.health(), state.database.notify_counts()),
        ),
        _ => (StatusCode::NOT_FOUND, "application/json", r#"{"error":"not found"}"#.to_string()),
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, content_type.parse().expect("static content type"));
    Ok(response)
}

/// What `/readyz` says: PostgREST's port (which readiness depends on), and what was last verified of
/// the database path (which forwarding does not need, but healing does).
fn readiness(upstream_reachable: bool, database: &Database) -> serde_json::Value {
    let health = database.health();
    let verified_ms_ago = health
        .last_verified
        .and_then(|at| at.elapsed().ok())
        .map(|ago| u64::try_from(ago.as_millis()).unwrap_or(u64::MAX));
    let (listening, joining) = match &health.listening {
        Listening::Hearing => ("hearing", "on"),
        Listening::Off(_) => ("off", "off"),
        Listening::Unverified => ("unverified", "unverified"),
    };
    serde_json::json!({
        "upstream": if upstream_reachable { "reachable" } else { "unreachable" },
        "database": match (&health.cannot_notify, health.connected) {
            (Some(why), _) => format!("cannot NOTIFY: {why}"),
            (None, true) => "connected".to_string(),
            (None, false) => "disconnected".to_string(),
        },
        "database_verified_ms_ago": verified_ms_ago,
        "database_error": health.last_error,
        "listen": listening,
        "joining_others_reloads": joining,
        "listen_problem": match &health.listening { Listening::Off(why) => Some(*why), _ => None },
        "reconnects": health.reconnects.iter().map(|(cause, n)| (cause.as_str(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
    })
}

async fn upstream_reachable(upstream: &UpstreamUrl) -> bool {
    let port =
        upstream.authority.port_u16().unwrap_or(if upstream.scheme == http::uri::Scheme::HTTPS { 443 } else { 80 });
    let host = upstream.authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    matches!(tokio::time::timeout(Duration::from_secs(2), TcpStream::connect((host.as_str(), port))).await, Ok(Ok(_)))
}
