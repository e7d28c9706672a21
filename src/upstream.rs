//! The forwarder: one pooled keep-alive client to PostgREST, the upstream URL built from the
//! configured base and the request's path only (never an open proxy), and header hygiene.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower::Service;

use crate::body::{BoxError, GuardBody, GuardFuture};
use crate::config::{Config, UpstreamUrl};
use crate::error::{GuardError, GuardErrorKind};
use crate::forwarded::{set_forwarding_headers, strip_hop_by_hop, ClientAddr};
use crate::metrics::Metrics;
use crate::server::ConnectionSlot;
use crate::tls::{upstream_connector, UpstreamConnector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// PostgREST closes an idle keep-alive connection after 30 s (measured on v14.17 and v16.2; 60 s on
/// v11.2.2). A pooled connection must never be handed out after that, or a request sent on it is
/// lost to a reset: idle connections are dropped well before. (A connection found closed before
/// the request was written is retried on a fresh one by the client itself.)
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The forwarder. Cloned once per request, so it is one shared allocation: a clone costs an atomic
/// increment, not a copy of the client and the URL.
pub struct Forwarder<B> {
    parts: Arc<ForwarderParts<B>>,
}

impl<B> std::ops::Deref for Forwarder<B> {
    type Target = ForwarderParts<B>;

    fn deref(&self) -> &ForwarderParts<B> {
        &self.parts
    }
}

pub struct ForwarderParts<B> {
    client: Client<UpstreamConnector, B>,
    upstream: UpstreamUrl,
    response_timeout: Duration,
    /// A WebSocket tunnel with nothing passing for this long is closed.
    idle_timeout: Duration,
    /// Pass `Upgrade` requests (WebSockets) through as a tunnel.
    upgrades: bool,
    metrics: Option<Arc<Metrics>>,
    host_header: HeaderValue,
}

impl<B> Clone for Forwarder<B> {
    fn clone(&self) -> Self {
        Forwarder { parts: self.parts.clone() }
    }
}

impl<B> Forwarder<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// A forwarder to `upstream` with the configured timeouts.
    pub fn new(upstream: &UpstreamUrl, config: &Config, tls: rustls::ClientConfig) -> Forwarder<B> {
        let connector = upstream_connector(tls, config.upstream_connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .retry_canceled_requests(true)
            .build(connector);
        let parts = ForwarderParts {
            client,
            upstream: upstream.clone(),
            response_timeout: config.upstream_timeout,
            idle_timeout: config.idle_timeout,
            upgrades: false,
            metrics: None,
            host_header: HeaderValue::from_str(upstream.authority.as_str())
                .expect("an authority is a valid header value"),
        };
        Forwarder { parts: Arc::new(parts) }
    }

    /// The parts, while the forwarder is being configured (before any clone exists).
    fn configuring(&mut self) -> &mut ForwarderParts<B> {
        Arc::get_mut(&mut self.parts).expect("a forwarder is configured before it is cloned")
    }

    /// Records the upstream's time to answer in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Forwarder<B> {
        self.configuring().metrics = Some(metrics);
        self
    }

    /// Lets `Upgrade` requests (WebSockets) through: both connections are joined after the 101.
    pub fn with_upgrades(mut self) -> Forwarder<B> {
        self.configuring().upgrades = true;
        self
    }

    /// Where a request goes: the configured base plus the request's path and query.
    pub fn upstream_uri(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut target = String::with_capacity(self.upstream.path_prefix.len() + path_and_query.len() + 1);
        target.push_str(&self.upstream.path_prefix);
        if !path_and_query.starts_with('/') {
            target.push('/');
        }
        target.push_str(path_and_query);
        Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query(target)
            .build()
    }

    async fn forward(self, mut request: Request<B>) -> Response<GuardBody> {
        // Only the Origin is needed later, for the CORS headers of an answer the guard makes itself.
        let origin = request.headers().get(header::ORIGIN).cloned();
        let upgrade = if self.upgrades { requested_upgrade(request.headers()) } else { None };
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let original_host = match parts.headers.get(header::HOST) {
            Some(host) => Some(host.clone()),
            None => parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        parts.uri = match self.upstream_uri(&parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                return GuardError::new(GuardErrorKind::MalformedRequest, e.to_string())
                    .into_response_for(origin.as_ref())
            }
        };
        let client = parts.extensions.get::<ClientAddr>().cloned();
        let slot = if upgrade.is_some() { parts.extensions.get::<ConnectionSlot>().cloned() } else { None };
        prepare_request_headers(&mut parts.headers, &self.host_header, original_host, client.as_ref());
        if let Some(protocol) = &upgrade {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        parts.version = Version::HTTP_11;
        if parts.method == http::Method::HEAD {
            // PostgREST 11 leaves a connection unusable after answering HEAD: never pool it.
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let started = tokio::time::Instant::now();
        let sent =
            tokio::time::timeout(self.response_timeout, self.client.request(Request::from_parts(parts, body))).await;
        if let (Some(metrics), Ok(Ok(_))) = (&self.metrics, &sent) {
            metrics.observe_upstream(started.elapsed());
        }
        match sent {
            Ok(Ok(mut response)) => {
                if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, response.status()) {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(tunnel(client_upgrade, upstream_upgrade, self.idle_timeout, slot));
                    return response.map(GuardBody::Upstream);
                }
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, GuardBody::Upstream(body))
            }
            Ok(Err(e)) if crate::error::is_over_limit(&e) => GuardError::new(
                GuardErrorKind::BodyTooLarge,
                "The request body grew past PGRST_GUARD_MAX_BODY_BYTES while it streamed.",
            )
            .into_response_for(origin.as_ref()),
            // What happened, with the upstream's address and the error chain, goes to the log; the
            // client learns only whether its request may have run.
            Ok(Err(e)) if e.is_connect() || reset_unread(&e) => {
                tracing::warn!(upstream = %self.upstream, error = %error_chain(&e), "upstream connect failed or reset before reading");
                let error = GuardError::new(
                    GuardErrorKind::UpstreamUnreachable,
                    "The connection to PostgREST could not be made.",
                );
                self.failed("never_sent", error, NeverReachedUpstream, origin.as_ref())
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %self.upstream, error = %error_chain(&e), "upstream request failed after it was sent");
                let error = GuardError::new(
                    GuardErrorKind::OutcomeUnknown,
                    "The connection to PostgREST broke before its answer.",
                );
                self.failed("no_answer", error, OutcomeUnknown, origin.as_ref())
            }
            Err(_) => {
                tracing::warn!(upstream = %self.upstream, timeout_ms = self.response_timeout.as_millis() as u64, "upstream did not answer in time");
                let error = GuardError::new(
                    GuardErrorKind::UpstreamTimeout,
                    format!("No answer within {} ms.", self.response_timeout.as_millis()),
                );
                self.failed("timeout", error, OutcomeUnknown, origin.as_ref())
            }
        }
    }
}

impl<B> ForwarderParts<B> {
    /// The guard's answer for a request PostgREST did not answer, counted by `result` and marked
    /// with what the heal needs to know of it (`marker`: was it sent?).
    fn failed<M: Clone + Send + Sync + 'static>(
        &self,
        result: &'static str,
        error: GuardError,
        marker: M,
        origin: Option<&HeaderValue>,
    ) -> Response<GuardBody> {
        if let Some(metrics) = &self.metrics {
            metrics.upstream_failed(result);
        }
        let mut response = error.into_response_for(origin);
        response.extensions_mut().insert(marker);
        response
    }
}

/// Marks a guard answer for a request that never reached PostgREST (the connection was refused,
/// could not be made, or was reset with the request unread): sending it again cannot run anything
/// twice.
#[derive(Clone, Copy, Debug)]
pub struct NeverReachedUpstream;

/// Marks a guard answer for a request that was sent but not answered: it may have run, so it is
/// never sent again.
#[derive(Clone, Copy, Debug)]
pub struct OutcomeUnknown;

impl<B> Service<Request<B>> for Forwarder<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GuardBody>;
    type Error = Infallible;
    type Future = GuardFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(request).await) })
    }
}

/// The protocol of an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade: websocket`).
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Joins the client's and the upstream's upgraded connections until either side closes or nothing
/// passes for `idle`. `slot` keeps the tunnel counted against the connection cap while it lives.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
    slot: Option<ConnectionSlot>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::warn!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client_read, mut client_write) = tokio::io::split(TokioIo::new(client));
    let (mut upstream_read, mut upstream_write) = tokio::io::split(TokioIo::new(upstream));
    let (mut from_client, mut from_upstream) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    loop {
        // The sleep is made anew each turn: any byte either way resets the idle clock.
        // A side that stops reading holds the tunnel no longer than an idle one: each write is
        // bounded too.
        tokio::select! {
            read = client_read.read(&mut from_client) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if !matches!(tokio::time::timeout(idle, upstream_write.write_all(&from_client[..n])).await, Ok(Ok(()))) { break },
            },
            read = upstream_read.read(&mut from_upstream) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if !matches!(tokio::time::timeout(idle, client_write.write_all(&from_upstream[..n])).await, Ok(Ok(()))) { break },
            },
            _ = tokio::time::sleep(idle) => {
                tracing::debug!(idle_ms = idle.as_millis() as u64, "closing an idle tunnel");
                break;
            }
        }
    }
    let _ =
        tokio::time::timeout(idle, async { tokio::join!(client_write.shutdown(), upstream_write.shutdown()) }).await;
    drop(slot);
}

/// The connection was reset before any answer: the kernel resets a socket that is closed with
/// bytes still unread, or written to after it closed. Either way PostgREST (or a proxy before it)
/// never consumed the whole request, and PostgREST runs nothing before it has read the body; a
/// request that was read and then lost its answer ends in an orderly close instead.
fn reset_unread(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::causes(e).any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
    })
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error::causes(e).map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

/// Hop-by-hop headers out first, then the forwarding headers (so `Connection` cannot name them
/// away), and `Host` becomes the upstream's.
fn prepare_request_headers(
    headers: &mut HeaderMap,
    upstream_host: &HeaderValue,
    original_host: Option<HeaderValue>,
    client: Option<&ClientAddr>,
) {
    strip_hop_by_hop(headers);
    set_forwarding_headers(headers, client, original_host);
    headers.insert(header::HOST, upstream_host.clone());
}
