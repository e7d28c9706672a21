//! Reads PostgREST's `pgrst_schema_cache_loads_total{status="SUCCESS"}` from its admin server
//! (v12.2+). The counter moves after the new cache is swapped in, which makes it the one reliable
//! "reload finished" signal PostgREST offers (`/ready` is not: its 503 window can be too short to see).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::UpstreamUrl;
use crate::tls::{upstream_connector, UpstreamConnector};

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct LoadCounter {
    metrics_uri: Uri,
    client: Client<UpstreamConnector, Empty<Bytes>>,
}

#[derive(Debug)]
pub enum ProbeError {
    /// The admin server answered but has no such metric (PostgREST before v12.2): fall back to back-off.
    NoMetric,
    /// No connection could be made: the process is restarting, or gone.
    Refused(String),
    /// No answer in time: nothing can be concluded from it.
    Unreachable(String),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::NoMetric => write!(f, "the admin server has no pgrst_schema_cache_loads_total metric"),
            ProbeError::Refused(reason) => write!(f, "admin server refused the connection: {reason}"),
            ProbeError::Unreachable(reason) => write!(f, "admin server unreachable: {reason}"),
        }
    }
}

impl LoadCounter {
    pub fn new(admin: &UpstreamUrl, tls: rustls::ClientConfig) -> LoadCounter {
        let metrics_uri = format!("{}://{}{}/metrics", admin.scheme, admin.authority, admin.path_prefix)
            .parse()
            .expect("admin URL was validated");
        let connector = upstream_connector(tls, PROBE_TIMEOUT);
        LoadCounter { metrics_uri, client: Client::builder(TokioExecutor::new()).build(connector) }
    }

    pub async fn successful_loads(&self) -> Result<u64, ProbeError> {
        let request = Request::get(self.metrics_uri.clone()).body(Empty::new()).expect("valid request");
        let response = tokio::time::timeout(PROBE_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| ProbeError::Unreachable("timed out".to_string()))?
            .map_err(|e| {
                if e.is_connect() {
                    ProbeError::Refused(e.to_string())
                } else {
                    ProbeError::Unreachable(e.to_string())
                }
            })?;
        if response.status() != StatusCode::OK {
            return Err(ProbeError::NoMetric);
        }
        let body = tokio::time::timeout(PROBE_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| ProbeError::Unreachable("timed out".to_string()))?
            .map_err(|e| ProbeError::Unreachable(e.to_string()))?
            .to_bytes();
        parse_success_count(&String::from_utf8_lossy(&body)).ok_or(ProbeError::NoMetric)
    }
}

/// `pgrst_schema_cache_loads_total{status="SUCCESS"} 3.0` → 3. Before the first load the series
/// may be absent while the FAIL one is present; then the count is 0.
pub fn parse_success_count(metrics: &str) -> Option<u64> {
    let mut family_seen = false;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("pgrst_schema_cache_loads_total") else {
            continue;
        };
        family_seen = true;
        if rest.starts_with('{') && rest.contains("status=\"SUCCESS\"") {
            let value = rest.rsplit('}').next()?.split_whitespace().next()?;
            return value.parse::<f64>().ok().map(|v| v as u64);
        }
    }
    family_seen.then_some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_success_series() {
        let text = "# TYPE pgrst_schema_cache_loads_total counter\npgrst_schema_cache_loads_total{status=\"FAIL\"} 2.0\npgrst_schema_cache_loads_total{status=\"SUCCESS\"} 7.0\n";
        assert_eq!(parse_success_count(text), Some(7));
        assert_eq!(parse_success_count("pgrst_schema_cache_loads_total{status=\"FAIL\"} 1.0\n"), Some(0));
        assert_eq!(parse_success_count("pgrst_db_pool_max 10.0\n"), None);
    }
}
