//! Supabase gateway mode: one address for a whole Supabase project. Requests under the REST prefix
//! (`/rest/v1`) go through the heal layer to PostgREST; every other path (`/auth/v1`,
//! `/storage/v1`, `/functions/v1`, `/graphql/v1`, `/realtime/v1` and its WebSocket) passes through to
//! the project's origin untouched and streamed. Without a prefix every request is a REST request.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response, Uri};
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use crate::body::{GuardBody, RequestBody};
use crate::error::{GuardError, GuardErrorKind};

#[derive(Clone)]
pub struct Gateway<R, P> {
    rest: R,
    passthrough: Option<P>,
    rest_prefix: Option<String>,
}

impl<R, P> Gateway<R, P> {
    /// `rest_prefix` such as `/rest/v1` (no trailing slash), or None to send everything to `rest`.
    pub fn new(rest: R, passthrough: Option<P>, rest_prefix: Option<String>) -> Gateway<R, P> {
        Gateway { rest, passthrough, rest_prefix }
    }
}

impl<R, P> Service<Request<RequestBody>> for Gateway<R, P>
where
    R: Service<Request<RequestBody>, Response = Response<GuardBody>, Error = Infallible> + Clone + Send + 'static,
    R::Future: Send,
    P: Service<Request<RequestBody>, Response = Response<GuardBody>, Error = Infallible> + Clone + Send + 'static,
    P::Future: Send,
{
    type Response = Response<GuardBody>;
    type Error = Infallible;
    type Future = RouteFuture<Oneshot<R, Request<RequestBody>>, Oneshot<P, Request<RequestBody>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let Some(prefix) = &self.rest_prefix else {
            return RouteFuture::Rest { inner: self.rest.clone().oneshot(request) };
        };
        if let Some(inner) = strip_prefix(request.uri(), prefix) {
            *request.uri_mut() = inner;
            return RouteFuture::Rest { inner: self.rest.clone().oneshot(request) };
        }
        match &self.passthrough {
            Some(passthrough) => RouteFuture::Passthrough { inner: passthrough.clone().oneshot(request) },
            None => {
                let path = request.uri().path();
                let response = GuardError::new(GuardErrorKind::NoRoute, format!("{path} is not under {prefix}."))
                    .into_response(request.headers());
                RouteFuture::Answered { response: Some(response) }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The routed request's future, without a box of its own.
    #[project = RouteFutureProj]
    pub enum RouteFuture<R, P> {
        Rest { #[pin] inner: R },
        Passthrough { #[pin] inner: P },
        Answered { response: Option<Response<GuardBody>> },
    }
}

impl<R, P> Future for RouteFuture<R, P>
where
    R: Future<Output = Result<Response<GuardBody>, Infallible>>,
    P: Future<Output = Result<Response<GuardBody>, Infallible>>,
{
    type Output = Result<Response<GuardBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RouteFutureProj::Rest { inner } => inner.poll(cx),
            RouteFutureProj::Passthrough { inner } => inner.poll(cx),
            RouteFutureProj::Answered { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

/// `/rest/v1/todos?x=1` under `/rest/v1` is `/todos?x=1`; `/rest/v1` alone is `/`.
fn strip_prefix(uri: &Uri, prefix: &str) -> Option<Uri> {
    let rest = uri.path().strip_prefix(prefix)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    Uri::builder().path_and_query(path_and_query).build().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_whole_segments() {
        let uri: Uri = "/rest/v1/todos?select=id".parse().unwrap();
        assert_eq!(strip_prefix(&uri, "/rest/v1").unwrap(), "/todos?select=id");
        assert_eq!(strip_prefix(&"/rest/v1".parse().unwrap(), "/rest/v1").unwrap(), "/");
        assert_eq!(strip_prefix(&"/rest/v10/x".parse().unwrap(), "/rest/v1"), None);
        assert_eq!(strip_prefix(&"/auth/v1/user".parse().unwrap(), "/rest/v1"), None);
    }
}
