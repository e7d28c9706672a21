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
    /// The upstream refused or dropped the connection: 502.
    UpstreamUnreachable,
    /// The upstream did not start answering in time: 504.
    UpstreamTimeout,
    /// The request could not be read or forwarded as sent: 400.
    MalformedRequest,
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
                "Could not reach PostgREST.",
                Some("Check that PostgREST runs and that PGRST_GUARD_UPSTREAM points at it."),
                "destination_unavailable",
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
        }
    }

    /// The answer for the client. `request_headers` decide the CORS headers.
    pub fn into_response(self, request_headers: &HeaderMap) -> Response<GuardBody> {
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
        add_cors_headers(headers, request_headers);
        response
    }
}

/// CORS for answers the guard makes itself, mirroring what PostgREST sends on its own answers, so
/// a browser can read the error instead of reporting an opaque network failure.
pub fn add_cors_headers(headers: &mut HeaderMap, request_headers: &HeaderMap) {
    if let Some(origin) = request_headers.get(header::ORIGIN) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Content-Encoding, Content-Location, Content-Range, Content-Type, Date, Location, Server, Transfer-Encoding, Range-Unit, X-Pgrst-Guard, Proxy-Status"),
        );
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}
