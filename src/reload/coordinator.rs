//! Single-flight reloads: which [`Flight`] a failing request waits on, and the reload budget.
//!
//! The first request that needs a reload starts a flight (this guard's NOTIFY); every request that
//! fails while it is pending joins it; a request whose answer predates a reload that has since
//! finished just replays. A NOTIFY somebody else sends on the channel becomes a flight too, so it is
//! joined rather than doubled. The budget allows one NOTIFY from this guard per
//! `PGRST_GUARD_RELOAD_MIN_INTERVAL_MS`, and once other senders have been heard on the channel (other
//! guards, failing at the same instant), a short random pause before a NOTIFY lets one of them go
//! first and the rest join it.
//!
//! The flight log is a plain mutex held for bookkeeping only: never across a sleep, a NOTIFY or an
//! HTTP read. The work of a flight runs in its own task ([`Flight::launch`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::database::random_u64;
use super::database::Database;
use super::flight::{Flight, Origin};
use super::load_counter::LoadCounter;

/// Once others have been heard on the channel this recently, this guard pauses before its NOTIFY.
const FLEET_MEMORY: Duration = Duration::from_secs(600);
/// The longest such pause (drawn at random from none to this, once per burst for the whole guard).
const FLEET_JITTER: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct WaitSettings {
    /// The longest a heal may wait in all.
    pub deadline: Duration,
    /// First back-off when completion cannot be observed; grows up to 1 s.
    pub backoff: Duration,
    /// How often the load counter is read while a reload is awaited.
    pub poll: Duration,
    /// The reload budget: at most one NOTIFY from this guard per interval.
    pub min_interval: Duration,
}

pub struct ReloadCoordinator {
    database: Arc<Database>,
    /// One per PostgREST instance behind the upstream URL; empty when no admin URL is set.
    counters: Vec<LoadCounter>,
    settings: WaitSettings,
    log: Mutex<FlightLog>,
    /// Where flights run: the guard's control runtime, not whichever worker asked.
    runtime: Handle,
}

#[derive(Default)]
struct FlightLog {
    pending: Option<Arc<Flight>>,
    /// The newest flight known to have finished.
    last_completed: Option<Arc<Flight>>,
    /// When this guard last sent (or began to send) a NOTIFY.
    last_notify: Option<Instant>,
    /// When a NOTIFY from somebody else was last seen.
    others_heard: Option<Instant>,
    /// Until when this guard holds back its NOTIFY for the burst under way, so that another guard's
    /// can come first.
    paused_until: Option<Instant>,
}

impl FlightLog {
    /// Moves a finished or expired pending flight out of the way.
    fn retire(&mut self, deadline: Duration) {
        if let Some(flight) = &self.pending {
            let failed = flight.progress().failed.is_some();
            if flight.completed_at().is_some() {
                self.last_completed = self.pending.take();
            } else if failed || flight.created_at.elapsed() > deadline {
                self.pending = None;
            }
        }
    }

    /// The reload a request whose answer was requested at `sent_at` can wait on without a NOTIFY.
    fn existing(&self, sent_at: Instant, join: JoinRule) -> Option<Ticket> {
        if let Some(flight) = &self.pending {
            // A NOTIFY not yet sent will be sent after the request's answer.
            let notified_after = flight.progress().notified_at.is_none_or(|at| at >= sent_at);
            if join == JoinRule::AnyPending || notified_after {
                return Some(Ticket::Flight(flight.clone()));
            }
            return None;
        }
        let completed = self.last_completed.as_ref().filter(|f| f.completed_at().is_some_and(|done| done > sent_at));
        completed.map(|flight| Ticket::AlreadyReloaded(flight.clone()))
    }
}

/// Which pending reload a request may join.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinRule {
    /// Any: PostgREST's debounce makes the load after the pending NOTIFY end at the first or second
    /// rise, and a request failing meanwhile most likely failed for the same migration.
    AnyPending,
    /// Only one whose NOTIFY came after the request was sent, so its load surely started later than
    /// everything the request depends on.
    NotifiedAfter,
}

/// A request's place in a reload.
#[derive(Clone)]
pub enum Ticket {
    /// Waiting on a flight.
    Flight(Arc<Flight>),
    /// The answer came from a cache that has been replaced since: replay now, once.
    AlreadyReloaded(Arc<Flight>),
}

impl Ticket {
    pub fn flight(&self) -> &Arc<Flight> {
        match self {
            Ticket::Flight(flight) | Ticket::AlreadyReloaded(flight) => flight,
        }
    }

    /// When the NOTIFY this ticket waits on was sent or seen (None while it is being sent).
    pub fn notified_at(&self) -> Option<Instant> {
        self.flight().progress().notified_at
    }
}

#[derive(Debug)]
pub enum ReloadError {
    /// The reload budget would take the request past its deadline.
    Deadline,
    /// The reason for the reload went away while waiting for the budget.
    NoLongerWanted,
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Deadline => write!(f, "no reload possible before the heal deadline"),
            ReloadError::NoLongerWanted => write!(f, "the reload is no longer wanted"),
        }
    }
}

impl ReloadCoordinator {
    /// Starts the coordinator and its watch on the channel for reloads others ask for, on the
    /// current (control) runtime.
    pub fn start(
        database: Arc<Database>,
        counters: Vec<LoadCounter>,
        settings: WaitSettings,
    ) -> Arc<ReloadCoordinator> {
        let mut observed = database.subscribe();
        let coordinator = Arc::new(ReloadCoordinator {
            database,
            counters,
            settings,
            log: Mutex::new(FlightLog::default()),
            runtime: Handle::current(),
        });
        let weak = Arc::downgrade(&coordinator);
        coordinator.runtime.spawn(async move {
            loop {
                match observed.recv().await {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                let seen = Instant::now();
                let Some(coordinator) = weak.upgrade() else { return };
                coordinator.observe_reload(seen);
            }
        });
        coordinator
    }

    pub fn settings(&self) -> &WaitSettings {
        &self.settings
    }

    /// Somebody else's NOTIFY: a flight of its own unless one is pending already.
    fn observe_reload(&self, seen: Instant) {
        tracing::debug!("a reload NOTIFY from somebody else");
        let mut log = self.log.lock().expect("flight log");
        log.others_heard = Some(seen);
        log.paused_until = None;
        log.retire(self.settings.deadline);
        if log.pending.is_none() {
            log.pending = Some(self.launch(Origin::Observed(seen)));
        }
    }

    fn launch(&self, origin: Origin) -> Arc<Flight> {
        Flight::launch(
            origin,
            self.database.clone(),
            self.counters.clone(),
            self.settings.poll,
            Instant::now() + self.settings.deadline,
            &self.runtime,
        )
    }

    /// A reload already pending, or finished since `sent_at`, that a request may wait on without a
    /// NOTIFY of its own.
    pub fn join(&self, sent_at: Instant, rule: JoinRule) -> Option<Ticket> {
        let mut log = self.log.lock().expect("flight log");
        log.retire(self.settings.deadline);
        log.existing(sent_at, rule)
    }

    /// Joins the pending reload (as `rule` allows) or starts one, for an answer requested at
    /// `sent_at`; true when this call started it. The reload budget is waited out without holding
    /// anything, and `still_wanted` is asked again after each wait.
    pub async fn join_or_start(
        &self,
        sent_at: Instant,
        deadline: Instant,
        rule: JoinRule,
        still_wanted: impl Fn() -> bool,
    ) -> Result<(Ticket, bool), ReloadError> {
        loop {
            let wait_until = {
                let mut log = self.log.lock().expect("flight log");
                log.retire(self.settings.deadline);
                if let Some(ticket) = log.existing(sent_at, rule) {
                    // Somebody's reload came first: this burst's pause is over.
                    log.paused_until = None;
                    return Ok((ticket, false));
                }
                let now = Instant::now();
                let allowed = log.last_notify.map_or(now, |last| last + self.settings.min_interval);
                let others_recently = log.others_heard.is_some_and(|heard| heard.elapsed() < FLEET_MEMORY);
                // Guards failing at the same instant: one pause for this guard's whole burst, drawn at
                // random, so that the first guard's NOTIFY is seen by the others before they send.
                let pause = match log.paused_until {
                    Some(until) => Some(until),
                    _ if others_recently => {
                        let until = now + Duration::from_nanos(random_u64() % FLEET_JITTER.as_nanos() as u64);
                        log.paused_until = Some(until);
                        Some(until)
                    }
                    _ => None,
                };
                let ready_at = pause.map_or(allowed, |pause| pause.max(allowed));
                if ready_at <= now {
                    // Counted against the budget before the NOTIFY is sent, in the flight's own task.
                    log.last_notify = Some(now);
                    log.paused_until = None;
                    let flight = self.launch(Origin::Ours);
                    log.pending = Some(flight.clone());
                    return Ok((Ticket::Flight(flight), true));
                }
                ready_at
            };
            if wait_until >= deadline {
                return Err(ReloadError::Deadline);
            }
            tokio::time::sleep_until(wait_until).await;
            if !still_wanted() {
                return Err(ReloadError::NoLongerWanted);
            }
        }
    }
}
