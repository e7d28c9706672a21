//! The heal of one client request, as a state machine. It starts from PostgREST's first answer
//! (already classified stale or empty-cache by the service) and ends with the answer the client gets.
//!
//! ```text
//!            ┌──────────────────────────── Judge ◄─────────────────────────────┐
//!            │ stale (new object)     │ stale (same object)   │ empty cache    │
//!            ▼                        ▼                       ▼                │
//!          Check ── exists ──►     Reload ──► Wait ─ ready ─► Replay ──────────┘
//!            │ missing / uncurable    ▲  no more  │  ▲             ▲
//!            ▼                        └── (a 2nd) ┘  └─ Settle ────┘
//!          Done                                   (covering reload done:
//!                                                  back-off, no NOTIFY)
//! ```
//!
//! Every step asks the one [`Budget`]: an upstream request for each replay (whatever it is for), a
//! reload for each flight waited on, and the deadline for every wait and read.

use bytes::Bytes;
use http::{HeaderValue, Method, Response};
use http_body::Body;
use tokio::time::Instant;

use super::budget::Budget;
use super::classify::{self, CallShape, MissingObject, StaleCode, Verdict};
use super::service::{Forward, HealService, RequestTemplate, REPLAYED_HEADER};
use crate::body::GuardBody;
use crate::reload::coordinator::JoinRule;
use crate::reload::flight::{backoff_wait, Completion, ProbeSeat, Turn, Wait};
use crate::reload::{CatalogAnswer, CatalogReply, Ticket};
use crate::upstream::{NeverReachedUpstream, OutcomeUnknown};

/// Replays a reload that may predate the migration offers (on back-off, about 100 ms); then one of
/// our own, with the rest of the budget. One somebody else asked for offers four (about a second):
/// it is most often the migration's own (Supabase's event trigger NOTIFYs at the DDL's commit).
const JOINED_REPLAYS: u32 = 2;
const JOINED_REPLAYS_OBSERVED: u32 = 4;
/// Replays after a reload that surely saw the object was seen to finish on every instance the guard
/// watches: enough for an instance it does not watch (a replica behind the same balancer, reloading
/// on the same NOTIFY) to finish too, about 100 ms.
const SETTLE_AFTER_OBSERVED_RELOAD: u32 = 2;

/// Where the heal is.
#[derive(Debug)]
enum State {
    /// Look at the last answer.
    Judge,
    /// Ask the catalog about the object the error names.
    Check,
    /// Join a reload, or start one.
    Reload,
    /// Wait for the reload's word before the next replay.
    Wait,
    /// A reload that surely saw the object has been asked for (or has done all it could): replay
    /// with back-off, never another NOTIFY.
    Settle,
    /// PostgREST has no cache (PGRST002), or refused the connection: back off, then replay.
    BackOff,
    Replay,
    Done(HealOutcome),
}

/// How a heal ended, as metrics and logs name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealOutcome {
    /// A replay's answer was PostgREST's success.
    Healed,
    /// Not a heal after all: the answer went through as it came.
    Passed,
    /// The catalog says PostgREST would not cache the object: the client's own mistake.
    ClientError,
    /// A reload that surely saw the object did not cure its error before, and nothing changed since.
    Uncurable,
    /// The body was not kept whole, so nothing could be replayed.
    NotReplayable,
    /// No reload could be had (database connection down, budget past the deadline).
    NoDatabase,
    /// The catalog could not be asked and no reload was under way to join.
    Unchecked,
    /// The deadline or the budget ran out with the stale error still there.
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
            HealOutcome::Uncurable => "uncurable",
            HealOutcome::NotReplayable => "not_replayable",
            HealOutcome::NoDatabase => "no_database",
            HealOutcome::Unchecked => "unchecked",
            HealOutcome::GaveUp => "gave_up",
            HealOutcome::ReplayFailed => "replay_failed",
        }
    }
}

/// One request's heal: what it knows and what it holds.
pub(super) struct Heal<'a, S> {
    service: &'a HealService<S>,
    template: RequestTemplate,
    body: Bytes,
    budget: Budget,
    started: Instant,
    /// The last upstream answer, and what it means.
    last: Response<GuardBody>,
    verdict: Verdict,
    /// When the last answer was requested.
    sent_at: Instant,
    replays: u32,
    /// The request's schema (its profile header, else the first exposed one).
    schema: String,
    /// The object the stale error names, with the request's own context filled in.
    object: Option<MissingObject>,
    /// The catalog's word that PostgREST would cache it.
    confirmed: Option<CatalogReply>,
    ticket: Option<Ticket>,
    /// Replays within the current flight, settling, or backing off.
    attempt: u32,
    /// A reload that surely began after the catalog confirmed the object was had.
    covered: bool,
    /// A mark a completed reload left (doubted, or no longer wanted) covers this heal.
    proved_by_mark: bool,
    /// Turns of back-off (empty cache, refused connections, settling), for the growing delays.
    backoffs: u32,
    /// Reloads waited on so far.
    flights: u32,
    /// Back-off turns allowed in all, when a finished reload was seen and only lagging replicas
    /// could still be stale.
    settle_until: Option<u32>,
    /// The first answer's code, which names the heal in metrics and logs.
    code: &'static str,
    /// This request probes its flight's reload (no load counters): held between its probes only.
    probe_seat: Option<ProbeSeat>,
    /// The next replay is a probe, paid from the probe budget.
    probing: bool,
}

impl<'a, S> Heal<'a, S> {
    pub(super) fn new(
        service: &'a HealService<S>,
        template: RequestTemplate,
        body: Bytes,
        budget: Budget,
        first: (Response<GuardBody>, Verdict, Instant),
    ) -> Heal<'a, S> {
        let schema = template.schema(&service.policy.default_schema);
        let (last, verdict, sent_at) = first;
        let code = verdict_code(&verdict);
        Heal {
            service,
            template,
            body,
            budget,
            started: Instant::now(),
            last,
            verdict,
            sent_at,
            replays: 0,
            schema,
            object: None,
            confirmed: None,
            ticket: None,
            attempt: 0,
            covered: false,
            proved_by_mark: false,
            backoffs: 0,
            flights: 0,
            settle_until: None,
            code,
            probe_seat: None,
            probing: false,
        }
    }

    /// Runs the heal to its end; the answer for the client.
    pub(super) async fn run<B>(mut self) -> Response<GuardBody>
    where
        S: Forward<B>,
        B: Body<Data = Bytes> + Send + 'static,
    {
        let mut state = State::Judge;
        let outcome = loop {
            state = match state {
                State::Judge => self.judge(),
                State::Check => self.check().await,
                State::Reload => self.reload().await,
                State::Wait => self.wait().await,
                State::Settle => self.settle().await,
                State::BackOff => self.back_off().await,
                State::Replay => self.replay::<B>().await,
                State::Done(outcome) => break outcome,
            };
            if !matches!(state, State::Judge | State::Wait | State::Replay) {
                // Only a request going on probing keeps the seat: the others wait for its word.
                self.probe_seat = None;
            }
        };
        self.finish(outcome)
    }

    /// Decides from the last answer.
    fn judge(&mut self) -> State {
        if self.last.extensions().get::<NeverReachedUpstream>().is_some() && self.replays > 0 {
            // The replay never reached PostgREST (it restarts): nothing ran, send it again.
            return State::BackOff;
        }
        match &self.verdict {
            Verdict::PassThrough if self.replays == 0 => State::Done(HealOutcome::Passed),
            Verdict::PassThrough if self.last.status().is_success() => State::Done(HealOutcome::Healed),
            Verdict::PassThrough => State::Done(HealOutcome::ReplayFailed),
            Verdict::CacheEmpty => State::BackOff,
            Verdict::StaleDatabase { .. } if self.replays > 0 => State::Done(HealOutcome::ReplayFailed),
            Verdict::StaleDatabase { .. } => {
                // Replayed once, and only while a reload is known to be under way: PostgreSQL raised
                // it inside PostgREST's transaction, which was rolled back.
                match self.service.coordinator.join(self.sent_at, JoinRule::AnyPending) {
                    Some(ticket) => {
                        self.ticket = Some(ticket);
                        State::Wait
                    }
                    None => State::Done(HealOutcome::Passed),
                }
            }
            Verdict::Stale { code, object } => {
                let object = self.in_context(object, *code);
                if self.object.as_ref() != Some(&object) {
                    // A first stale error, or a replay failing on something else: its own check.
                    self.object = Some(object);
                    self.confirmed = None;
                    self.ticket = None;
                    return State::Check;
                }
                if self.replays > 0 && self.cure_was_due() {
                    return self.doubt();
                }
                match self.ticket {
                    Some(_) => State::Wait,
                    None if self.covered => State::Settle,
                    None => State::Reload,
                }
            }
        }
    }

    /// Asks the catalog whether PostgREST would cache the object.
    async fn check(&mut self) -> State {
        let object = self.object.clone().expect("checked objects are set");
        let Some(catalog) = &self.service.catalog else {
            return State::Reload;
        };
        let reply = catalog.check(&object, &self.schema, self.sent_at, self.budget.deadline()).await;
        self.service.metrics.catalog_check(reply.answer.as_str());
        match reply.answer {
            CatalogAnswer::Missing | CatalogAnswer::SharedMissing => State::Done(HealOutcome::ClientError),
            CatalogAnswer::Uncurable => State::Done(HealOutcome::Uncurable),
            CatalogAnswer::Doubted => {
                // A reload that saw it is done, and did not cure it yet (a replica may lag): wait,
                // but ask for nothing.
                self.covered = true;
                self.proved_by_mark = true;
                self.confirmed = Some(reply);
                self.settle_until = Some(self.backoffs + SETTLE_AFTER_OBSERVED_RELOAD);
                State::Settle
            }
            CatalogAnswer::Unknown => {
                // The check is a gate: without its word no reload of our own, but one already under
                // way may still cure this.
                match self.service.coordinator.join(self.sent_at, JoinRule::AnyPending) {
                    Some(ticket) if self.budget.take_reload() => {
                        self.flights += 1;
                        self.ticket = Some(ticket);
                        self.attempt = 0;
                        State::Wait
                    }
                    _ => State::Done(HealOutcome::Unchecked),
                }
            }
            CatalogAnswer::Exists => {
                self.confirmed = Some(reply);
                State::Reload
            }
        }
    }

    /// Joins the pending reload or starts one; a second one must begin after the last replay.
    async fn reload(&mut self) -> State {
        if self.covered {
            return State::Settle;
        }
        if !self.budget.take_reload() {
            return State::Done(HealOutcome::GaveUp);
        }
        self.flights += 1;
        let rule = if self.flights == 1 { JoinRule::AnyPending } else { JoinRule::NotifiedAfter };
        let catalog = self.service.catalog.clone();
        let definition = self.confirmed.as_ref().and_then(|c| c.definition.clone());
        let still_wanted = move || match (&catalog, &definition) {
            (Some(catalog), Some(definition)) => !catalog.marked(definition),
            _ => true,
        };
        match self.service.coordinator.join_or_start(self.sent_at, self.budget.deadline(), rule, still_wanted).await {
            Ok((ticket, _)) => {
                self.ticket = Some(ticket);
                self.attempt = 0;
                State::Wait
            }
            Err(e) => {
                tracing::info!(error = %e, "no reload of our own; passing the error through");
                match e {
                    crate::reload::coordinator::ReloadError::NoLongerWanted => {
                        self.covered = true;
                        self.proved_by_mark = true;
                        State::Settle
                    }
                    crate::reload::coordinator::ReloadError::Deadline => State::Done(HealOutcome::NoDatabase),
                }
            }
        }
    }

    /// Waits on the ticket for the next replay.
    async fn wait(&mut self) -> State {
        let Some(ticket) = self.ticket.clone() else {
            return State::Reload;
        };
        self.attempt += 1;
        let flight = ticket.flight().clone();
        let ready = match &ticket {
            Ticket::AlreadyReloaded(_) if self.attempt == 1 => Wait::Ready,
            Ticket::AlreadyReloaded(_) => Wait::Exhausted,
            // A reload that may predate the migration offers two replays; then one of our own.
            Ticket::Flight(flight) if self.attempt > joined_replays(flight) && !self.covers(flight) => Wait::Exhausted,
            Ticket::Flight(flight) => {
                let turn = Turn {
                    attempt: self.attempt,
                    backoff: self.service.policy.backoff,
                    deadline: self.budget.last_replay_start(),
                    last_sent: self.sent_at,
                    // A reload that may predate the object's migration cannot promise a cure: only
                    // a waiter it covers probes for the others.
                    may_probe: self.budget.probes_left() > 0 && self.covers(flight),
                };
                flight.wait(turn, &mut self.probe_seat).await
            }
        };
        match ready {
            Wait::Ready => State::Replay,
            Wait::Probe => {
                self.probing = true;
                State::Replay
            }
            Wait::Deadline => State::Done(HealOutcome::GaveUp),
            Wait::NotifyFailed(reason) => {
                tracing::warn!(error = %reason, "the reload NOTIFY failed; passing the error through");
                State::Done(HealOutcome::NoDatabase)
            }
            Wait::Exhausted => {
                let progress = flight.progress();
                if self.covers(&flight) && progress.completion == Completion::LoadCounter && progress.rises >= 1 {
                    // No second load within the time one takes: the first was the one that began
                    // after the NOTIFY, and the replay after it failed.
                    return self.doubt();
                }
                self.ticket = None;
                if self.covers(&flight) {
                    // It reached every instance and began after the object was confirmed: a replay
                    // still meeting the error met an instance still loading. Back off, no NOTIFY.
                    self.covered = true;
                    State::Settle
                } else if matches!(self.verdict, Verdict::StaleDatabase { .. }) {
                    State::Done(HealOutcome::Passed)
                } else {
                    State::Reload
                }
            }
        }
    }

    async fn settle(&mut self) -> State {
        if self.settle_until.is_some_and(|until| self.backoffs >= until) {
            return State::Done(HealOutcome::GaveUp);
        }
        self.backoffs += 1;
        match backoff_wait(self.backoffs, self.service.policy.backoff, self.budget.last_replay_start()).await {
            Wait::Ready => State::Replay,
            _ => State::Done(HealOutcome::GaveUp),
        }
    }

    async fn back_off(&mut self) -> State {
        self.backoffs += 1;
        match backoff_wait(self.backoffs, self.service.policy.backoff, self.budget.last_replay_start()).await {
            Wait::Ready => State::Replay,
            _ => State::Done(HealOutcome::GaveUp),
        }
    }

    /// Sends the request again, every part of it bounded by the deadline.
    async fn replay<B>(&mut self) -> State
    where
        S: Forward<B>,
        B: Body<Data = Bytes> + Send + 'static,
    {
        let probe = std::mem::take(&mut self.probing);
        let allowed = if probe { self.budget.take_probe() } else { self.budget.take_replay() };
        if !allowed {
            return State::Done(HealOutcome::GaveUp);
        }
        if probe {
            self.service.metrics.reload_probe();
        }
        let deadline = self.budget.deadline();
        let Ok(permit) = tokio::time::timeout_at(deadline, self.service.replay_slots.acquire()).await else {
            return State::Done(HealOutcome::GaveUp);
        };
        self.sent_at = Instant::now();
        let request = self.template.build::<B>(self.body.clone());
        let answer = tokio::time::timeout_at(deadline, self.service.send(request)).await;
        drop(permit);
        self.replays += 1;
        let answer = match answer {
            Ok(answer) => answer,
            Err(_) => {
                // Sent, and not answered by the deadline: it may still run. Say so, and stop.
                self.last = crate::error::GuardError::new(
                    crate::error::GuardErrorKind::OutcomeUnknown,
                    "A replay of this request after a schema reload got no answer before the heal deadline.",
                )
                .into_response_for(self.template.headers.get(http::header::ORIGIN));
                self.verdict = Verdict::PassThrough;
                return State::Done(HealOutcome::ReplayFailed);
            }
        };
        let facts = self.template.facts(Some(&self.body));
        let (last, verdict) = classify::inspect(answer, &facts, deadline).await;
        self.last = last;
        self.verdict = verdict;
        if self.last.extensions().get::<OutcomeUnknown>().is_some() {
            return State::Done(HealOutcome::ReplayFailed);
        }
        State::Judge
    }

    /// The object with what only the request knows: the path's table where the answer named none
    /// (before v13 a write to an uncached table is a bare `404 {}`; a HEAD's PGRST205 has no body),
    /// and how an RPC passes its arguments. Any other error without a readable object stays
    /// unknown: it is never taken for a check of some other object.
    fn in_context(&self, object: &MissingObject, code: StaleCode) -> MissingObject {
        let path = self.template.uri.path();
        match object {
            MissingObject::Unknown
                if matches!(code, StaleCode::LegacyTableWrite | StaleCode::Table) && !path.contains("/rpc/") =>
            {
                match path.rsplit('/').next() {
                    Some(table) if !table.is_empty() => MissingObject::Table {
                        schema: self.schema.clone(),
                        table: classify::decoded_segment(table).into_owned(),
                    },
                    _ => MissingObject::Unknown,
                }
            }
            MissingObject::ColumnTypes { cast_to, column, current, .. } => {
                let facts = self.template.facts(Some(&self.body));
                let mut columns = facts.written_columns();
                columns.sort();
                columns.dedup();
                MissingObject::ColumnTypes {
                    table: facts.target().into_owned(),
                    columns,
                    cast_to: cast_to.clone(),
                    column: column.clone(),
                    current: current.clone(),
                }
            }
            MissingObject::Function { schema, name, args, .. } => MissingObject::Function {
                schema: schema.clone(),
                name: name.clone(),
                args: args.clone(),
                call: CallShape::of(&self.template.method, self.template.content_type()),
                // PostgREST #4553, in 14.2: a single body argument must be unnamed.
                single_argument_unnamed: classify::server_version(&self.last).is_some_and(|v| v >= (14, 2)),
            },
            known => known.clone(),
        }
    }

    /// A reload that surely saw the object has finished on every instance the guard watches, and a
    /// replay after it still failed: no more NOTIFYs for the object in this definition, and a short
    /// settle for instances the guard does not watch.
    fn doubt(&mut self) -> State {
        if let (Some(catalog), Some(definition)) =
            (&self.service.catalog, self.confirmed.as_ref().and_then(|c| c.definition.as_ref()))
        {
            catalog.doubt(definition);
        }
        self.covered = true;
        self.proved_by_mark = true;
        self.ticket = None;
        self.settle_until = Some(self.backoffs + SETTLE_AFTER_OBSERVED_RELOAD);
        State::Settle
    }

    /// Did `flight` surely begin after the catalog confirmed the object (so its load saw it)?
    fn covers(&self, flight: &crate::reload::Flight) -> bool {
        let notified = flight.progress().notified_at;
        match (notified, &self.confirmed) {
            (Some(notified), Some(confirmed)) => notified >= confirmed.known_since,
            _ => false,
        }
    }

    /// Did a reload that surely saw the object complete before the last replay was sent? With load
    /// counters: every instance finished the load that began after the NOTIFY. Without: a replay
    /// waiting on the same reload succeeded before it (the reload was done on the instance that
    /// answered). A mark set earlier by such a reload (doubted, or no longer wanted) proves it too.
    fn cure_was_proved(&self) -> bool {
        if self.proved_by_mark {
            return true;
        }
        let Some(ticket) = &self.ticket else { return false };
        let flight = ticket.flight();
        let progress = flight.progress();
        let done = match progress.completion {
            Completion::LoadCounter => progress.settled_at,
            Completion::Backoff => progress.cured_at,
        };
        self.covers(flight) && done.is_some_and(|done| done <= self.sent_at)
    }

    /// Did this heal wait on a reload that surely saw the object, whose end nothing could show (no
    /// load counter)?
    fn waited_out_unobserved_reload(&self) -> bool {
        let covering =
            |flight: &crate::reload::Flight| self.covers(flight) && flight.progress().completion == Completion::Backoff;
        self.covered || self.ticket.as_ref().is_some_and(|ticket| covering(ticket.flight()))
    }

    /// Was the last replay sent after a covering reload had finished on every instance?
    fn cure_was_due(&self) -> bool {
        let Some(ticket) = &self.ticket else { return false };
        let flight = ticket.flight();
        let settled = flight.progress().settled_at;
        self.covers(flight) && settled.is_some_and(|settled| settled <= self.sent_at)
    }

    /// Records the outcome, marks what was learned, and hands the last answer to the client.
    fn finish(mut self, outcome: HealOutcome) -> Response<GuardBody> {
        let code = self.code;
        // Out of budget or time with a replay's failure in hand (PostgREST gone, the guard's 502):
        // that failure is what the client gets, and what the heal is counted as.
        let outcome = match outcome {
            HealOutcome::GaveUp if self.replays > 0 && self.verdict == Verdict::PassThrough => {
                HealOutcome::ReplayFailed
            }
            outcome => outcome,
        };
        if outcome == HealOutcome::Passed && self.replays == 0 && matches!(self.verdict, Verdict::StaleDatabase { .. })
        {
            return self.last;
        }
        let stale_again = matches!(&self.verdict, Verdict::Stale { code, object } if Some(&self.in_context(object, *code)) == self.object.as_ref());
        let definition = self.confirmed.as_ref().and_then(|c| c.definition.as_ref());
        if let (Some(catalog), Some(object), Some(definition)) = (&self.service.catalog, &self.object, definition) {
            if outcome == HealOutcome::Healed {
                catalog.cured(definition);
            } else if outcome == HealOutcome::GaveUp && stale_again && self.cure_was_proved() {
                // A reload that surely saw the object completed before the last replay was sent,
                // and the error stayed. A heal that only ran out of time proves nothing: a reload
                // slower than the deadline must not mark a real object uncurable.
                catalog.reload_did_not_cure(object, definition);
            } else if outcome == HealOutcome::GaveUp && stale_again && self.waited_out_unobserved_reload() {
                // Without a load counter a reload's end cannot be seen: the object is only doubted.
                // No more NOTIFYs for it in this definition, but its requests still replay twice
                // with back-off, so a real object whose reload was merely slow heals once it lands.
                catalog.doubt(definition);
            }
        }
        if outcome == HealOutcome::Healed {
            if let Some(ticket) = &self.ticket {
                ticket.flight().cured();
            }
            self.last.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("replayed"));
        }
        let metrics = &self.service.metrics;
        metrics.heal(code, outcome.as_str());
        metrics.observe_heal_wait(self.started.elapsed());
        let request_id =
            self.template.headers.get(crate::edge::REQUEST_ID).and_then(|id| id.to_str().ok()).unwrap_or("");
        tracing::info!(
            code,
            object = ?self.object,
            wait_ms = self.started.elapsed().as_millis() as u64,
            replays = self.replays,
            upstream_requests = 1 + self.budget.replays_used() + self.budget.probes_used(),
            outcome = outcome.as_str(),
            status = self.last.status().as_u16(),
            method = %self.template.method,
            path = %self.template.uri.path().escape_debug(),
            request_id = %request_id.escape_debug(),
            "heal"
        );
        self.last
    }
}

fn joined_replays(flight: &crate::reload::Flight) -> u32 {
    match flight.origin {
        crate::reload::flight::Origin::Observed(_) => JOINED_REPLAYS_OBSERVED,
        crate::reload::flight::Origin::Ours => JOINED_REPLAYS,
    }
}

pub(super) fn verdict_code(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Stale { code, .. } => code.as_str(),
        Verdict::CacheEmpty => "PGRST002",
        Verdict::StaleDatabase { code } => code,
        Verdict::PassThrough => "none",
    }
}

impl RequestTemplate {
    /// The schema a request addresses: `Accept-Profile` for reads, `Content-Profile` for writes.
    pub(super) fn schema(&self, default: &str) -> String {
        let header =
            if matches!(self.method, Method::GET | Method::HEAD) { "accept-profile" } else { "content-profile" };
        self.headers.get(header).and_then(|v| v.to_str().ok()).unwrap_or(default).to_string()
    }

    pub(super) fn content_type(&self) -> Option<&str> {
        self.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
    }
}
