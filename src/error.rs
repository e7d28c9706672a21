//! The one place where a failure of the guard itself becomes an HTTP answer: a PostgREST-shaped
//! JSON body (`code`, `details`, `hint`, `message`), a `Proxy-Status` naming the guard, and the
//! CORS headers a browser needs to read it.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::body::{full, GuardBody};

/// What went wrong, and so which status and code the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardErrorKind {
    /// The request never reached the upstream (the connection was refused or could not be made):
    /// 502, safe to send again.
    UpstreamUnreachable,
    /// The request was sent, and the connection broke or the heal's deadline passed before an
    /// answer: 502, it may have run.
    OutcomeUnknown,
    /// The upstream did not start answering in time: 504.
    UpstreamTimeout,
    /// The request could not be read or forwarded as sent: 400.
    MalformedRequest,
    /// The client did not send its request head in time: 408.
    HeaderTimeout,
    /// More connections than `PGRST_GUARD_MAX_CONNECTIONS`: 503.
    TooManyConnections,
    /// Request head over `PGRST_GUARD_MAX_HEADER_BYTES`: 431.
    HeadersTooLarge,
    /// Request body over `PGRST_GUARD_MAX_BODY_BYTES`: 413.
    BodyTooLarge,
    /// A path outside the REST prefix with no pass-through origin: 404.
    NoRoute,
    /// A method no PostgREST serves (CONNECT): 405, as PostgREST's own PGRST117.
    MethodNotAllowed,
    /// The guard itself failed on this request (a panic, caught): 500.
    Internal,
    /// A write waited for PostgREST's schema cache to hold its target's current definition, and
    /// the heal deadline passed first: 503, nothing was sent.
    SchemaReloading,
}

#[derive(Debug)]
pub struct GuardError {
    pub kind: GuardErrorKind,
    pub details: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    details: &'a str,
    hint: Option<&'a str>,
    message: &'a str,
}

impl GuardError {
    pub fn new(kind: GuardErrorKind, details: impl Into<String>) -> GuardError {
        GuardError { kind, details: details.into() }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str, Option<&'static str>, &'static str) {
        match self.kind {
            GuardErrorKind::UpstreamUnreachable => (
                StatusCode::BAD_GATEWAY,
                "PGRSTG01",
                "Could not reach PostgREST. The request was not sent, so it is safe to send again.",
                Some("Check that PostgREST runs and that PGRST_GUARD_UPSTREAM points at it."),
                "destination_unavailable",
            ),
            GuardErrorKind::OutcomeUnknown => (
                StatusCode::BAD_GATEWAY,
                "PGRSTG11",
                "The request reached PostgREST, but no answer came back: it may or may not have run.",
                Some("Check whether it took effect before sending it again."),
                "connection_terminated",
            ),
            GuardErrorKind::UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "PGRSTG02",
                "PostgREST did not answer in time.",
                Some("Raise PGRST_GUARD_UPSTREAM_TIMEOUT_MS for long-running requests."),
                "http_response_timeout",
            ),
            GuardErrorKind::MalformedRequest => {
                (StatusCode::BAD_REQUEST, "PGRSTG03", "Malformed request.", None, "http_request_error")
            }
            GuardErrorKind::HeaderTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "PGRSTG04",
                "The request head did not arrive in time.",
                Some("Send the whole request head within PGRST_GUARD_HEADER_READ_TIMEOUT_MS."),
                "http_request_error",
            ),
            GuardErrorKind::TooManyConnections => (
                StatusCode::SERVICE_UNAVAILABLE,
                "PGRSTG05",
                "Too many connections.",
                Some("Retry later, or raise PGRST_GUARD_MAX_CONNECTIONS."),
                "connection_limit_reached",
            ),
            GuardErrorKind::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "PGRSTG06",
                "Request headers are too large.",
                Some("Send smaller headers, or raise PGRST_GUARD_MAX_HEADER_BYTES."),
                "http_request_error",
            ),
            GuardErrorKind::NoRoute => (
                StatusCode::NOT_FOUND,
                "PGRSTG08",
                "No route for this path.",
                Some("Only paths under PGRST_GUARD_REST_PREFIX are served; set PGRST_GUARD_PASSTHROUGH_UPSTREAM for the rest."),
                "destination_not_found",
            ),
            GuardErrorKind::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "PGRSTG09",
                "Unsupported HTTP method.",
                Some("PostgREST serves GET, HEAD, POST, PATCH, PUT, DELETE and OPTIONS."),
                "http_request_denied",
            ),
            GuardErrorKind::SchemaReloading => (
                StatusCode::SERVICE_UNAVAILABLE,
                "PGRSTG12",
                "PostgREST is reloading its schema cache after a migration. The write was not sent, so it is safe to send again.",
                Some("Retry shortly. A write sent now would be stored with the types or defaults the old cache has."),
                "destination_unavailable",
            ),
            GuardErrorKind::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "PGRSTG10",
                "Internal error in pgrst-guard.",
                Some("Retry the request; if it fails again, report it with the guard's log."),
                "proxy_internal_error",
            ),
            GuardErrorKind::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "PGRSTG07",
                "Request body is too large.",
                Some("Send a smaller body, or raise PGRST_GUARD_MAX_BODY_BYTES."),
                "http_request_error",
            ),
        }
    }

    /// The whole answer as HTTP/1.1 bytes, for a connection hyper no longer serves (a client too
    /// slow to send its request head). It closes the connection.
    pub fn to_http1_bytes(&self) -> Vec<u8> {
        let (status, code, message, hint, _) = self.parts();
        let body = serde_json::to_vec(&ErrorBody { code, details: &self.details, hint, message })
            .expect("error body serializes");
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// The answer for the client. `request_headers` decide the CORS headers.
    pub fn into_response(self, request_headers: &HeaderMap) -> Response<GuardBody> {
        self.into_response_for(request_headers.get(header::ORIGIN))
    }

    /// The answer for a client that sent `origin` (browsers do; CORS headers follow from it).
    pub fn into_response_for(self, origin: Option<&HeaderValue>) -> Response<GuardBody> {
        let (status, code, message, hint, proxy_error) = self.parts();
        let body = serde_json::to_vec(&ErrorBody { code, details: &self.details, hint, message })
            .expect("error body serializes");
        let mut response = Response::new(full(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        headers.insert(
            "proxy-status",
            HeaderValue::from_str(&format!("pgrst-guard; error={proxy_error}; details=\"{code}\"")).expect("ascii"),
        );
        add_cors_headers(headers, origin);
        response
    }
}

/// CORS for answers the guard makes itself, as PostgREST (v13 on, what Supabase runs) sends on its
/// own answers: any origin, no credentials — so a browser can read the error instead of reporting
/// an opaque network failure, and no arbitrary Origin is ever echoed together with credentials.
pub fn add_cors_headers(headers: &mut HeaderMap, origin: Option<&HeaderValue>) {
    if origin.is_some() {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Content-Encoding, Content-Location, Content-Range, Content-Type, Date, Location, Server, Transfer-Encoding, Range-Unit, X-Pgrst-Guard, Proxy-Status"),
        );
    }
}

/// An error and its sources, outermost first: the one walk behind every "was this caused by ..."
/// question and every error message the guard writes.
pub fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// Was `error` caused by a request body over its limit (`crate::body::request_body`)?
pub fn is_over_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    causes(error).any(|cause| cause.is::<http_body_util::LengthLimitError>())
}
