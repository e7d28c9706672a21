//! The heal service: forward, classify the answer, and for a stale schema cache take part in a
//! reload and replay the request, so the client sees only the healed answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::budget::Budget;
use super::classify::{self, RequestFacts, Verdict};
use super::machine::{verdict_code, Heal, HealOutcome};
use super::replay_body::{ReplayBody, ReplayMemory};
use crate::body::{GuardBody, GuardFuture};
use crate::forwarded::ClientAddr;
use crate::metrics::Metrics;
use crate::reload::{CatalogCheck, Clearance, ReloadCoordinator, TargetKind, WriteBarrier, WriteTarget};

pub const REPLAYED_HEADER: &str = "x-pgrst-guard";

#[derive(Clone, Debug)]
pub struct HealPolicy {
    pub replay_body_limit: usize,
    /// The bytes all kept copies may hold together (`PGRST_GUARD_REPLAY_MEMORY_LIMIT`), shared by
    /// every worker.
    pub replay_memory: Arc<ReplayMemory>,
    pub deadline: Duration,
    /// First back-off where a reload's end cannot be observed; grows to 1 s.
    pub backoff: Duration,
    /// Where unqualified names live: PostgREST's first exposed schema, unless the request picks
    /// another with `Accept-Profile` / `Content-Profile`.
    pub default_schema: String,
}

/// The heal service. Cloned once per request, so it is one shared allocation: a clone costs an
/// atomic increment, not a copy of each part.
pub struct HealService<S> {
    parts: Arc<HealParts<S>>,
}

impl<S> HealService<S> {
    pub(super) fn new(parts: HealParts<S>) -> HealService<S> {
        HealService { parts: Arc::new(parts) }
    }
}

impl<S> std::ops::Deref for HealService<S> {
    type Target = HealParts<S>;

    fn deref(&self) -> &HealParts<S> {
        &self.parts
    }
}

pub struct HealParts<S> {
    pub(super) inner: S,
    pub(super) coordinator: Arc<ReloadCoordinator>,
    pub(super) policy: HealPolicy,
    pub(super) metrics: Arc<Metrics>,
    /// None when the catalog check is turned off.
    pub(super) catalog: Option<Arc<CatalogCheck>>,
    /// None when the write barrier is turned off.
    pub(super) barrier: Option<Arc<WriteBarrier>>,
    /// Replays in flight toward PostgREST, so that a thousand healed requests do not land at once.
    pub(super) replay_slots: Arc<tokio::sync::Semaphore>,
}

/// Replays sent to PostgREST at the same time, per worker.
pub const MAX_CONCURRENT_REPLAYS: usize = 64;

impl<S> Clone for HealService<S> {
    fn clone(&self) -> Self {
        HealService { parts: self.parts.clone() }
    }
}

/// What is needed to send the same request again: the request as PostgREST receives it.
pub(super) struct RequestTemplate {
    pub(super) method: Method,
    pub(super) uri: Uri,
    version: Version,
    pub(super) headers: http::HeaderMap,
    /// The client's address, which the forwarder turns into forwarding headers.
    client: Option<ClientAddr>,
}

impl RequestTemplate {
    pub(super) fn facts<'a>(&'a self, body: Option<&'a [u8]>) -> RequestFacts<'a> {
        let content_type = self.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        RequestFacts { method: &self.method, path: self.uri.path(), query: self.uri.query(), content_type, body }
    }

    /// What a write takes from PostgREST's cache: the relation a POST, PATCH or PUT writes, or the
    /// function a POST or GET calls. Reads, deletes and anything else: None.
    fn write_target(&self, default_schema: &str) -> Option<WriteTarget> {
        let facts = self.facts(None);
        let (kind, name) = match (&self.method, facts.rpc()) {
            (&Method::POST | &Method::GET | &Method::HEAD, Some(function)) => {
                (TargetKind::Function, function.into_owned())
            }
            (&Method::POST | &Method::PATCH | &Method::PUT, None) => {
                (TargetKind::Relation, facts.target().into_owned())
            }
            _ => return None,
        };
        if name.is_empty() {
            return None;
        }
        Some(WriteTarget { schema: self.schema(default_schema), name, kind })
    }

    /// `Prefer: missing=default`: PostgREST fills omitted columns with the defaults it cached.
    fn asks_missing_default(&self) -> bool {
        self.headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split([',', ' ']).any(|p| p.trim().eq_ignore_ascii_case("missing=default")))
    }

    pub(super) fn build<B: Body<Data = Bytes>>(&self, body: Bytes) -> Request<ReplayBody<B>> {
        let mut request = Request::new(ReplayBody::replay(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        if let Some(client) = &self.client {
            request.extensions_mut().insert(client.clone());
        }
        request
    }
}

/// What the heal service wraps (the forwarder): a cloneable service for requests whose body can be
/// replayed.
pub trait Forward<B>:
    Service<Request<ReplayBody<B>>, Response = Response<GuardBody>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T, B> Forward<B> for T where
    T: Service<Request<ReplayBody<B>>, Response = Response<GuardBody>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

impl<S, B> Service<Request<B>> for HealService<S>
where
    S: Forward<B>,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<GuardBody>;
    type Error = Infallible;
    type Future = GuardFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(request).await) })
    }
}

impl<S> HealService<S> {
    async fn handle<B>(self, request: Request<B>) -> Response<GuardBody>
    where
        S: Forward<B>,
        B: Body<Data = Bytes> + Send + 'static,
    {
        let (mut parts, body) = request.into_parts();
        // What PostgREST will receive: a header the request's `Connection` names (say
        // `Content-Profile`) never reaches it, so the heal must not read it either.
        crate::forwarded::strip_hop_by_hop(&mut parts.headers);
        let template = RequestTemplate {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            client: parts.extensions.get::<ClientAddr>().cloned(),
        };
        let arrived = Instant::now();
        if let Some(barrier) = &self.barrier {
            if let Some(target) = template.write_target(&self.policy.default_schema) {
                let deadline = arrived + self.policy.deadline;
                let clearance =
                    barrier.clear(&target, template.asks_missing_default(), &template.headers, deadline).await;
                if clearance == Clearance::TimedOut {
                    return crate::error::GuardError::new(
                        crate::error::GuardErrorKind::SchemaReloading,
                        format!(
                            "PostgREST's schema cache has not been shown to hold the current definition of '{}' \
                             yet; the write was not sent.",
                            target.name.escape_debug()
                        ),
                    )
                    .into_response_for(template.headers.get(http::header::ORIGIN));
                }
            }
        }
        let (body, recording) = ReplayBody::record(body, self.policy.replay_body_limit, &self.policy.replay_memory);
        let sent_at = Instant::now();
        let first = self.send(Request::from_parts(parts, body)).await;
        // Most answers are decided by their head alone; reading an error body and healing are the
        // rare paths, boxed so that the common request's future stays small.
        if classify::passes_by_head(&first, &template.method) {
            return first;
        }
        // The heal's one budget starts with the first answer: reading its error body is already
        // bounded by its deadline.
        // A write's wait at the barrier counts against the same deadline.
        let barrier_wait = sent_at.saturating_duration_since(arrived);
        let budget = Budget::new(Instant::now() - barrier_wait, self.policy.deadline);
        let replay_body = recording.replayable();
        let facts = template.facts(replay_body.as_deref());
        let (response, verdict) = Box::pin(classify::inspect(first, &facts, budget.deadline())).await;
        if verdict == Verdict::PassThrough {
            return response;
        }
        let Some(replay_body) = replay_body else {
            let code = verdict_code(&verdict);
            tracing::info!(code, outcome = HealOutcome::NotReplayable.as_str(), "stale schema cache, but the request body is over the replay cap or was not read whole; passing the error through");
            self.metrics.heal(code, HealOutcome::NotReplayable.as_str());
            return response;
        };
        Box::pin(Heal::new(&self, template, replay_body, budget, (response, verdict, sent_at)).run::<B>()).await
    }

    pub(super) async fn send<B>(&self, request: Request<ReplayBody<B>>) -> Response<GuardBody>
    where
        S: Forward<B>,
        B: Body<Data = Bytes> + Send + 'static,
    {
        match self.inner.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}
