//! The admin server: `/live`, `/ready`, `/metrics` (v12.2+), `/schema_cache` (v12.2+).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;

use super::State;

pub async fn handle<B>(state: Arc<State>, request: Request<B>) -> Response<Full<Bytes>> {
    let reload = &state.reload;
    let (status, content_type, body) = match request.uri().path() {
        "/live" => (StatusCode::OK, None, String::new()),
        "/ready" => {
            let loaded = state.cache.read().unwrap().is_some();
            let status =
                if reload.pending.load(Ordering::Acquire) || !reload.listener_up.load(Ordering::Acquire) || !loaded {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
            (status, None, String::new())
        }
        "/metrics" if state.profile.has_metrics() => {
            (StatusCode::OK, Some("text/plain; charset=utf-8"), metrics(&state))
        }
        "/schema_cache" if state.profile.has_metrics() => {
            let cache = state.cache.read().unwrap().clone();
            let body = cache.map(|c| serde_json::to_string(&*c).expect("cache serializes")).unwrap_or_default();
            (StatusCode::OK, Some("application/json; charset=utf-8"), body)
        }
        _ => (StatusCode::NOT_FOUND, None, String::new()),
    };
    let mut builder = Response::builder().status(status);
    if let Some(content_type) = content_type {
        builder = builder.header(header::CONTENT_TYPE, content_type);
    }
    builder.body(Full::new(Bytes::from(body))).expect("valid admin response")
}

fn metrics(state: &State) -> String {
    let reload = &state.reload;
    let mut out = String::from(
        "# HELP pgrst_schema_cache_loads_total The total number of times the schema cache was loaded\n\
         # TYPE pgrst_schema_cache_loads_total counter\n",
    );
    let failures = reload.failures.load(Ordering::Acquire);
    if failures > 0 {
        out.push_str(&format!("pgrst_schema_cache_loads_total{{status=\"FAIL\"}} {failures}.0\n"));
    }
    out.push_str(&format!(
        "pgrst_schema_cache_loads_total{{status=\"SUCCESS\"}} {}.0\n",
        reload.successes.load(Ordering::Acquire)
    ));
    out.push_str(&format!(
        "# HELP pgrst_db_pool_max Max pool connections\n# TYPE pgrst_db_pool_max gauge\npgrst_db_pool_max {}.0\n\
         # HELP pgrst_db_pool_available Available connections in the pool\n# TYPE pgrst_db_pool_available gauge\npgrst_db_pool_available {}.0\n",
        state.pool.max_size,
        state.pool.available()
    ));
    out
}
