//! The layers every request passes before it is routed, all from tower-http: a panic anywhere below
//! becomes a PostgREST-shaped 500 instead of a dropped connection; every request carries an
//! `X-Request-Id` (the client's own, else a new one) to PostgREST and back; credentials are marked
//! sensitive so that no trace prints them; and a trace span per request at debug level.
//!
//! Not layers here, and why: the body limit is http-body-util's `Limited` (what tower-http's body
//! limit wraps bodies in) without tower-http's layer, whose answer is a bare 413 where ours is
//! PostgREST-shaped with CORS headers ([`crate::body`]); the upstream timeout is one
//! `tokio::time::timeout` in the forwarder, answering 504 where tower-http's timeout layer answers
//! 408 ([`crate::upstream`]).

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response};
use tower::ServiceBuilder;
use tower_http::body::UnsyncBoxBody;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::sensitive_headers::{SetSensitiveRequestHeadersLayer, SetSensitiveResponseHeadersLayer};
use tower_http::trace::{DefaultMakeSpan, DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::body::{BoxError, GuardBody};
use crate::error::{GuardError, GuardErrorKind};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request headers that carry credentials: JWTs, Supabase's `apikey`, cookies, and proxy
/// credentials (never forwarded, being hop-by-hop, but still printed by a debug span).
fn sensitive_request_headers() -> [HeaderName; 4] {
    [header::AUTHORIZATION, HeaderName::from_static("apikey"), header::COOKIE, header::PROXY_AUTHORIZATION]
}

/// Wraps `routed` (the gateway) in the edge layers; answers keep the guard's body type.
pub fn layer<S>(
    routed: S,
) -> impl tower::Service<
    Request<crate::body::RequestBody>,
    Response = Response<GuardBody>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
       + Send
       + 'static
where
    S: tower::Service<
            Request<crate::body::RequestBody>,
            Response = Response<GuardBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let trace: TraceLayer<SharedClassifier<ServerErrorsAsFailures>> = TraceLayer::new_for_http()
        .make_span_with(DefaultMakeSpan::new().level(Level::DEBUG).include_headers(true))
        .on_response(DefaultOnResponse::new().level(Level::DEBUG))
        // A 5xx is PostgREST's answer to pass on, not the guard's failure: no error-level event.
        .on_failure(DefaultOnFailure::new().level(Level::DEBUG));
    let stack = ServiceBuilder::new()
        .map_response(|response: Response<UnsyncBoxBody<Bytes, BoxError>>| response.map(GuardBody::Boxed))
        // Outside the panic catcher, so that even a panic's answer carries the request's id.
        .layer(SetRequestIdLayer::new(REQUEST_ID, NextRequestId))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(CatchPanicLayer::custom(answer_panic))
        .layer(SetSensitiveRequestHeadersLayer::new(sensitive_request_headers()))
        .layer(SetSensitiveResponseHeadersLayer::new([header::SET_COOKIE]))
        .layer(trace);
    stack.service(routed)
}

/// The answer to a request whose handling panicked. The Origin is out of reach here, so the CORS
/// headers are sent as for any browser request: a browser can then read the error.
fn answer_panic(panic: Box<dyn Any + Send + 'static>) -> Response<GuardBody> {
    let reason = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown");
    tracing::error!(panic = reason, "a request panicked; answered 500");
    GuardError::new(GuardErrorKind::Internal, "The guard failed on this request; it keeps serving others.")
        .into_response_for(Some(&HeaderValue::from_static("*")))
}

/// Request ids: a random prefix per process and a counter, formatted like a UUID. Cheaper than a
/// random UUID per request (no system call) and as unique within and across processes.
#[derive(Clone, Copy)]
struct NextRequestId;

impl MakeRequestId for NextRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        static PREFIX: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let prefix = *PREFIX.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
            );
            hasher.write_u32(std::process::id());
            hasher.finish()
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // xxxxxxxx-xxxx-4xxx-8xxx-xxxxxxxxxxxx: the prefix fills the first 60 bits, the counter the rest.
        let mut id = [b'-'; 36];
        let mut put = |range: std::ops::Range<usize>, mut value: u64| {
            for at in range.rev() {
                id[at] = b"0123456789abcdef"[(value & 0xf) as usize];
                value >>= 4;
            }
        };
        put(0..8, prefix >> 32);
        put(9..13, (prefix >> 16) & 0xffff);
        put(15..18, prefix & 0xfff);
        put(20..23, (n >> 48) & 0xfff);
        put(24..36, n & 0xffff_ffff_ffff);
        id[14] = b'4';
        id[19] = b'8';
        HeaderValue::from_bytes(&id).ok().map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Nothing on the real request path panics on purpose, so a service that does stands in for
    /// a bug: the client still gets a PostgREST-shaped answer, and the next request is served.
    #[tokio::test]
    async fn a_panic_becomes_a_postgrest_shaped_500() {
        let service = layer(tower::service_fn(|request: Request<crate::body::RequestBody>| async move {
            if request.uri().path() == "/boom" {
                panic!("a bug");
            }
            Ok::<_, std::convert::Infallible>(Response::new(crate::body::full("fine")))
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(crate::server::serve(listener, service, None, stopped, crate::server::ServerLimits::admin()));
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<Bytes>>();
        let get = |path: &str| {
            let request = Request::get(format!("http://{addr}{path}")).body(http_body_util::Empty::new()).unwrap();
            client.clone().oneshot(request)
        };
        let response = get("/boom").await.unwrap();
        assert_eq!(response.status(), 500);
        assert!(response.headers().contains_key(REQUEST_ID));
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "PGRSTG10");
        assert!(body["message"].is_string() && body.get("details").is_some() && body.get("hint").is_some());
        assert_eq!(get("/fine").await.unwrap().status(), 200);
    }

    #[test]
    fn request_ids_differ_and_look_like_uuids() {
        let request = Request::new(());
        let a = NextRequestId.make_request_id(&request).unwrap();
        let b = NextRequestId.make_request_id(&request).unwrap();
        let (a, b) = (a.header_value().to_str().unwrap().to_string(), b.header_value().to_str().unwrap().to_string());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }
}
