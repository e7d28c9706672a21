//! The proof without a load counter: a marker view. PostgREST answers `OPTIONS /<relation>` from
//! its schema cache alone, never the database (Response.hs, `OptionsRead`, every family 11.2.2 to
//! 16.2): 404 while the relation is not cached, 200 once it is. A load reads tables, views and
//! their columns in one statement with one snapshot (SchemaCache.hs `tablesSqlQuery`), so a load
//! that shows a view committed after a moment read every column definition as of after that moment.
//! The guard creates a view (`pgrst_guard_proof_<guard>_<n>`, `SELECT 1`) in the first exposed
//! schema after its snapshot began, dropping its previous one in the same statement, NOTIFYs, and
//! asks `OPTIONS` until PostgREST knows the view. What it needs: CREATE on that schema. What it
//! leaves: one such view per running guard (a guard killed without a stop leaves its last one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::config::UpstreamUrl;
use crate::reload::database::{random_u64, Database};
use crate::tls::{upstream_connector, UpstreamConnector};

/// One OPTIONS ends by then.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between two OPTIONS while a load is awaited: each costs PostgREST a cache lookup, no query.
const PROBE_GAP: Duration = Duration::from_millis(20);

/// Headers a probe borrows from a waiting write, so that a gateway in front of PostgREST (Supabase's
/// requires `apikey`) lets it through. OPTIONS reads no data.
pub(super) const BORROWED: [&str; 2] = ["apikey", "authorization"];

pub(super) struct Marker {
    client: Client<UpstreamConnector, Empty<Bytes>>,
    upstream: UpstreamUrl,
    schema: String,
    guard: String,
    next: AtomicU64,
    /// The view of the last proof, dropped by the next.
    current: std::sync::Mutex<Option<String>>,
}

/// Why a marker proof ended without one.
pub(super) enum MarkerFailure {
    /// The view could not be made, or PostgREST's answer says the probe cannot work here.
    Unusable(String),
    /// PostgREST did not show the view before the deadline.
    Slow,
}

impl Marker {
    pub(super) fn new(upstream: UpstreamUrl, tls: rustls::ClientConfig, schema: String) -> Marker {
        Marker {
            client: Client::builder(TokioExecutor::new()).build(upstream_connector(tls, PROBE_TIMEOUT)),
            upstream,
            schema,
            guard: format!("{:08x}", random_u64() as u32),
            next: AtomicU64::new(1),
            current: std::sync::Mutex::new(None),
        }
    }

    /// Creates the next marker (after the caller's snapshot began), NOTIFYs, and waits until
    /// PostgREST's cache has it.
    pub(super) async fn prove(
        &self,
        database: &Database,
        credentials: &HeaderMap,
        deadline: Instant,
    ) -> Result<(), MarkerFailure> {
        let name = format!("pgrst_guard_proof_{}_{}", self.guard, self.next.fetch_add(1, Ordering::Relaxed));
        let previous = self.current.lock().expect("marker lock").clone();
        let drop_previous = previous
            .map(|previous| format!("EXECUTE 'DROP VIEW IF EXISTS {}.{}';", quoted(&self.schema), quoted(&previous)))
            .unwrap_or_default();
        let create = format!(
            "DO $pgrst_guard$ BEGIN {drop_previous} EXECUTE 'CREATE VIEW {}.{} AS SELECT 1 AS proof'; END $pgrst_guard$",
            quoted(&self.schema),
            quoted(&name)
        );
        database.query(deadline, &create, &[]).await.map_err(|e| MarkerFailure::Unusable(e.to_string()))?;
        *self.current.lock().expect("marker lock") = Some(name.clone());
        database.notify_reload_for_proof(deadline).await.map_err(|e| MarkerFailure::Unusable(e.to_string()))?;
        let uri: Uri =
            format!("{}://{}{}/{}", self.upstream.scheme, self.upstream.authority, self.upstream.path_prefix, name)
                .parse()
                .map_err(|e: http::uri::InvalidUri| MarkerFailure::Unusable(e.to_string()))?;
        loop {
            let mut request = Request::builder().method(Method::OPTIONS).uri(uri.clone());
            for (header, value) in credentials.iter().filter(|(h, _)| BORROWED.contains(&h.as_str())) {
                request = request.header(header, value);
            }
            let request = request.body(Empty::new()).map_err(|e| MarkerFailure::Unusable(e.to_string()))?;
            match tokio::time::timeout(PROBE_TIMEOUT, self.client.request(request)).await {
                Ok(Ok(answer)) if answer.status().is_success() => return Ok(()),
                Ok(Ok(answer)) if answer.status() == StatusCode::NOT_FOUND => {}
                Ok(Ok(answer)) => {
                    return Err(MarkerFailure::Unusable(format!("OPTIONS of the marker answered {}", answer.status())))
                }
                // PostgREST restarting or slow: its next load will show the marker too.
                Ok(Err(_)) | Err(_) => {}
            }
            if Instant::now() + PROBE_GAP >= deadline {
                return Err(MarkerFailure::Slow);
            }
            tokio::time::sleep(PROBE_GAP).await;
        }
    }
}

/// An identifier quoted for SQL inside a quoted string: `"` doubled, then `'` doubled.
fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\"")).replace('\'', "''")
}
