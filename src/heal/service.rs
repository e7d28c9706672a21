//! The heal service: forward, classify the answer, and for a stale schema cache take part in a
//! reload and replay the request, so the client sees only the healed answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::classify::MissingObject;
use super::classify::{self, RequestFacts, Verdict};
use super::replay_body::ReplayBody;
use crate::body::{GuardBody, GuardFuture};
use crate::forwarded::ClientAddr;
use crate::metrics::Metrics;
use crate::reload::coordinator::backoff_wait;
use crate::reload::coordinator::JoinRule;
use crate::reload::{CatalogAnswer, CatalogCheck, ReloadCoordinator, Ticket};
use crate::upstream::NeverReachedUpstream;

pub const REPLAYED_HEADER: &str = "x-pgrst-guard";

#[derive(Clone, Debug)]
pub struct HealPolicy {
    pub replay_body_limit: usize,
    pub deadline: Duration,
    pub empty_cache_backoff: Duration,
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
    /// Replays in flight toward PostgREST, so that a thousand healed requests do not land at once.
    pub(super) replay_slots: Arc<tokio::sync::Semaphore>,
}

/// Replays while PostgREST has no schema cache (PGRST002): about 25, 75, 225, 675 ms, then 1 s
/// apart, which spans PostgREST's own first two load retries (1 s, then 2 s later).
pub const MAX_EMPTY_CACHE_REPLAYS: u32 = 8;

/// Replays sent to PostgREST at the same time, per worker.
pub const MAX_CONCURRENT_REPLAYS: usize = 64;

impl<S> Clone for HealService<S> {
    fn clone(&self) -> Self {
        HealService { parts: self.parts.clone() }
    }
}

/// What is needed to send the same request again.
struct RequestTemplate {
    method: Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
    /// The client's address, which the forwarder turns into forwarding headers.
    client: Option<ClientAddr>,
}

impl RequestTemplate {
    fn facts<'a>(&'a self, body: Option<&'a [u8]>) -> RequestFacts<'a> {
        RequestFacts { method: &self.method, path: self.uri.path(), query: self.uri.query(), body }
    }

    fn build<B: Body<Data = Bytes>>(&self, body: Bytes) -> Request<ReplayBody<B>> {
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
        let (parts, body) = request.into_parts();
        let template = RequestTemplate {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            client: parts.extensions.get::<ClientAddr>().cloned(),
        };
        let (body, recording) = ReplayBody::record(body, self.policy.replay_body_limit);
        let sent_at = Instant::now();
        let first = self.send(Request::from_parts(parts, body)).await;
        // Most answers are decided by their head alone; reading an error body and healing are the
        // rare paths, boxed so that the common request's future stays small.
        if classify::passes_by_head(&first, &template.method) {
            return first;
        }
        let replay_body = recording.replayable();
        let facts = template.facts(replay_body.as_deref());
        let (response, verdict) = Box::pin(classify::inspect(first, &facts)).await;
        if verdict == Verdict::PassThrough {
            return response;
        }
        let Some(replay_body) = replay_body else {
            tracing::info!(code = verdict_code(&verdict), outcome = HealOutcome::NotReplayable.as_str(), "stale schema cache, but the request body is over the replay cap or was not read whole; passing the error through");
            self.metrics.heal(verdict_code(&verdict), HealOutcome::NotReplayable.as_str());
            return response;
        };
        Box::pin(self.heal(template, replay_body, response, verdict, sent_at)).await
    }

    async fn send<B>(&self, request: Request<ReplayBody<B>>) -> Response<GuardBody>
    where
        S: Forward<B>,
        B: Body<Data = Bytes> + Send + 'static,
    {
        match self.inner.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    /// Waits and replays until the answer is no longer a schema-cache error, the replay budget is
    /// spent or the deadline passes; then the last upstream answer goes to the client unchanged.
    async fn heal<B>(
        &self,
        template: RequestTemplate,
        body: Bytes,
        mut last: Response<GuardBody>,
        mut verdict: Verdict,
        mut sent_at: Instant,
    ) -> Response<GuardBody>
    where
        S: Forward<B>,
        B: Body<Data = Bytes> + Send + 'static,
    {
        let started = Instant::now();
        let deadline = started + self.policy.deadline;
        let code = verdict_code(&verdict);
        let schema = request_schema(&template, &self.policy.default_schema);
        let facts = template.facts(Some(&body));
        let mut object = String::new();
        let mut ticket: Option<Ticket> = None;
        // When the catalog said the object exists, and whether the heal is settling (replaying
        // with back-off after a NOTIFY that surely covers the migration).
        let (mut confirmed_at, mut settling): (Option<Instant>, bool) = (None, false);
        let (mut flights, mut attempts_in_flight, mut empty_attempts, mut replays) = (0u32, 0u32, 0u32, 0u32);
        let max_replays = self.coordinator.replay_budget();
        let outcome = loop {
            // The replay budget counts replays for stale errors; waiting out an empty cache has
            // its own (below): PGRST002 comes before any SQL, and PostgREST retries its load
            // after 1 s, then 2 s.
            if matches!(verdict, Verdict::Stale { .. } | Verdict::StaleDatabase { .. })
                && replays - empty_attempts >= max_replays
            {
                break HealOutcome::GaveUp;
            }
            let proceed = match &verdict {
                Verdict::PassThrough if replays == 0 => break HealOutcome::Passed,
                Verdict::PassThrough if last.status().is_success() => break HealOutcome::Healed,
                Verdict::PassThrough => break HealOutcome::ReplayFailed,
                Verdict::Stale { code: stale_code, object: named } => {
                    if ticket.is_none() {
                        if flights == 0 {
                            let named = with_path_table(named, &template, &schema);
                            object = format!("{named:?}");
                            if let Some(catalog) = &self.catalog {
                                let (answer, answered_at) = catalog.exists(&named, &schema, sent_at, deadline).await;
                                confirmed_at = Some(answered_at);
                                self.metrics.catalog_check(answer.as_str());
                                if answer.is_missing() {
                                    break HealOutcome::ClientError;
                                }
                                if answer == CatalogAnswer::Unknown {
                                    // The check is a gate: without its word no reload of our own,
                                    // but one already under way may still cure this.
                                    match self.coordinator.join_existing(sent_at, deadline).await {
                                        Some(joined) => {
                                            ticket = Some(joined);
                                            flights = 2;
                                            attempts_in_flight = 0;
                                        }
                                        None => break HealOutcome::Unchecked,
                                    }
                                }
                            }
                        }
                        // One reload of our own after the first one offered nothing: the catalog
                        // says the object exists, so the cache may have gone stale again.
                        if ticket.is_none() && (flights >= 2 || Instant::now() >= deadline) {
                            break HealOutcome::GaveUp;
                        }
                    }
                    if ticket.is_none() {
                        // A second flight must begin after the last replay was sent: only a load
                        // that starts after that surely sees what the catalog already shows.
                        let join = if flights == 0 { JoinRule::AnyPending } else { JoinRule::NotifiedAfter };
                        match self.coordinator.join_or_start(sent_at, deadline, join).await {
                            Ok((joined, sent)) => {
                                if sent {
                                    self.metrics.notify_sent();
                                }
                                ticket = Some(joined);
                                flights += 1;
                                attempts_in_flight = 0;
                            }
                            Err(e) => {
                                tracing::warn!(code = stale_code.as_str(), error = %e, "no reload possible; passing the error through");
                                break HealOutcome::NoDatabase;
                            }
                        }
                    }
                    attempts_in_flight += 1;
                    let ready = ticket
                        .as_ref()
                        .expect("ticket set above")
                        .wait_before_replay(attempts_in_flight, deadline)
                        .await;
                    if !ready {
                        // A NOTIFY sent after the catalog confirmed the object reaches every
                        // PostgREST instance and starts a load that sees it: a replay still meeting
                        // the stale error met an instance that has not finished (replicas behind a
                        // balancer). Keep replaying with back-off, without another NOTIFY.
                        let covering = ticket.as_ref().and_then(Ticket::notified_at).zip(confirmed_at);
                        ticket = match covering {
                            Some((notified, confirmed)) if notified >= confirmed && !settling => {
                                settling = true;
                                attempts_in_flight = 0;
                                Some(Ticket::settle(self.policy.empty_cache_backoff))
                            }
                            _ => None,
                        };
                        continue;
                    }
                    true
                }
                Verdict::StaleDatabase { .. } => {
                    // Replayed once, and only while a reload is known to be under way. PostgreSQL
                    // raised it inside PostgREST's transaction, which was rolled back, and the
                    // classifier trusts it on /rpc/ only with PostgREST's own Proxy-Status.
                    if replays > 0 {
                        break HealOutcome::ReplayFailed;
                    }
                    match self.coordinator.join_existing(sent_at, deadline).await {
                        Some(joined) => {
                            let ready = joined.wait_before_replay(1, deadline).await;
                            ticket = Some(joined);
                            ready
                        }
                        None => break HealOutcome::Passed,
                    }
                }
                Verdict::CacheEmpty => {
                    if empty_attempts >= MAX_EMPTY_CACHE_REPLAYS {
                        break HealOutcome::GaveUp;
                    }
                    empty_attempts += 1;
                    backoff_wait(empty_attempts, self.policy.empty_cache_backoff, deadline).await
                }
            };
            if !proceed {
                break HealOutcome::GaveUp;
            }
            let Some(replayed) = self.replay(&template, &body, deadline).await else {
                break HealOutcome::GaveUp;
            };
            sent_at = replayed.1;
            replays += 1;
            (last, verdict) = classify::inspect(replayed.0, &facts).await;
        };
        if outcome == HealOutcome::Passed && replays == 0 && matches!(verdict, Verdict::StaleDatabase { .. }) {
            return last;
        }
        let wait_ms = started.elapsed().as_millis() as u64;
        if outcome == HealOutcome::Healed {
            if let Some(ticket) = &ticket {
                ticket.succeeded();
            }
            last.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("replayed"));
        }
        self.metrics.heal(code, outcome.as_str());
        self.metrics.observe_heal_wait(started.elapsed());
        let request_id = template.headers.get(crate::edge::REQUEST_ID).and_then(|id| id.to_str().ok()).unwrap_or("");
        tracing::info!(code, object = %object, wait_ms, replays, outcome = outcome.as_str(), status = last.status().as_u16(), method = %template.method, path = template.uri.path(), request_id, "heal");
        last
    }

    /// Sends the request again, at most [`MAX_CONCURRENT_REPLAYS`] at a time toward PostgREST. A
    /// replay that never reached PostgREST (refused connection, e.g. while it restarts) is sent
    /// again after a back-off until the deadline. Returns the answer and when it was requested.
    async fn replay<B>(
        &self,
        template: &RequestTemplate,
        body: &Bytes,
        deadline: Instant,
    ) -> Option<(Response<GuardBody>, Instant)>
    where
        S: Forward<B>,
        B: Body<Data = Bytes> + Send + 'static,
    {
        let mut refused = 0;
        loop {
            let permit = tokio::time::timeout_at(deadline, self.replay_slots.acquire()).await.ok()?.ok()?;
            let sent_at = Instant::now();
            let answer = self.send(template.build::<B>(body.clone())).await;
            drop(permit);
            if answer.extensions().get::<NeverReachedUpstream>().is_none() {
                return Some((answer, sent_at));
            }
            refused += 1;
            if !backoff_wait(refused, self.policy.empty_cache_backoff, deadline).await {
                return Some((answer, sent_at));
            }
        }
    }
}

/// How a heal ended, as metrics and logs name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealOutcome {
    /// A replay's answer was PostgREST's success.
    Healed,
    /// Not a heal after all: the answer went through as it came.
    Passed,
    /// The catalog says the object does not exist: the client's own mistake.
    ClientError,
    /// The body was not kept whole, so nothing could be replayed.
    NotReplayable,
    /// No reload could be had (database connection down, budget past the deadline).
    NoDatabase,
    /// The catalog could not be asked and no reload was under way to join.
    Unchecked,
    /// The deadline or the replay budget ran out with the stale error still there.
    GaveUp,
    /// A replay was answered, but not with a success (401, 5xx, the guard's own 502/504, ...).
    ReplayFailed,
}

impl HealOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            HealOutcome::Healed => "healed",
            HealOutcome::Passed => "passed",
            HealOutcome::ClientError => "client_error",
            HealOutcome::NotReplayable => "not_replayable",
            HealOutcome::NoDatabase => "no_database",
            HealOutcome::Unchecked => "unchecked",
            HealOutcome::GaveUp => "gave_up",
            HealOutcome::ReplayFailed => "replay_failed",
        }
    }
}

/// The schema a request addresses: `Accept-Profile` for reads, `Content-Profile` for writes.
fn request_schema(template: &RequestTemplate, default: &str) -> String {
    let header =
        if matches!(template.method, Method::GET | Method::HEAD) { "accept-profile" } else { "content-profile" };
    template.headers.get(header).and_then(|v| v.to_str().ok()).unwrap_or(default).to_string()
}

/// Before v13 a write to an uncached table is a bare `404 {}`: the table is the path's last segment.
fn with_path_table(object: &MissingObject, template: &RequestTemplate, schema: &str) -> MissingObject {
    match object {
        MissingObject::Unknown => match template.uri.path().rsplit('/').next() {
            Some(table) if !table.is_empty() => {
                MissingObject::Table { schema: schema.to_string(), table: table.to_string() }
            }
            _ => MissingObject::Unknown,
        },
        known => known.clone(),
    }
}

fn verdict_code(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Stale { code, .. } => code.as_str(),
        Verdict::CacheEmpty => "PGRST002",
        Verdict::StaleDatabase { code } => code,
        Verdict::PassThrough => "none",
    }
}
