//! Single-flight reloads. The first request that meets a stale cache sends the NOTIFY; every request
//! that fails while that reload is pending joins it and waits on the same completion signal; a
//! request whose answer predates a reload that has since finished just replays. Reloads that others
//! ask for on the channel become flights too, so they are joined rather than doubled; and a budget
//! allows at most one NOTIFY from this guard per interval.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::load_counter::{LoadCounter, ProbeError};
use super::notifier::{Notifier, NotifyError};

const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Replays per client request when the load counter is watched (2 per reload, 2 reloads).
pub const MAX_REPLAYS_OBSERVED: u32 = 4;
/// Replays per client request when completion cannot be observed.
pub const MAX_REPLAYS_BACKOFF: u32 = 6;
/// PostgREST's debounce cool-down between two loads.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct WaitSettings {
    /// The longest a heal may wait in all.
    pub deadline: Duration,
    /// First back-off when completion cannot be observed; doubles up to 1 s.
    pub backoff: Duration,
    /// How often the load counter is read while a reload is awaited.
    pub poll: Duration,
    /// The reload budget: at most one NOTIFY from this guard per interval.
    pub min_interval: Duration,
}

pub struct ReloadCoordinator {
    notifier: Arc<Notifier>,
    /// One per PostgREST instance behind the upstream URL; empty when no admin URL is set.
    load_counters: Vec<LoadCounter>,
    settings: WaitSettings,
    flights: tokio::sync::Mutex<FlightLog>,
}

#[derive(Default)]
struct FlightLog {
    pending: Option<Arc<Flight>>,
    /// When the last reload finished, and when its NOTIFY was sent or seen.
    last_completed: Option<(Instant, Instant)>,
    last_notify: Option<Instant>,
}

impl FlightLog {
    /// Moves a finished or expired pending flight out of the way.
    fn retire(&mut self, deadline: Duration) {
        if let Some(flight) = &self.pending {
            if let Some(done) = flight.completed_at() {
                self.last_completed = self.last_completed.max(Some((done, flight.notified_at)));
                self.pending = None;
            } else if flight.notified_at.elapsed() > deadline {
                self.pending = None;
            }
        }
    }

    /// The reload a request whose answer was sent at `sent_at` can wait on without a new NOTIFY.
    fn existing(&self, sent_at: Instant, join: JoinRule) -> Option<Ticket> {
        if let Some(flight) = &self.pending {
            if join == JoinRule::AnyPending || flight.notified_at >= sent_at {
                return Some(Ticket::Flight(flight.clone()));
            }
            return None;
        }
        if let Some((_, notified_at)) = self.last_completed.filter(|(done, _)| *done > sent_at) {
            return Some(Ticket::AlreadyReloaded { notified_at });
        }
        None
    }
}

/// Which pending reload a request may join.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinRule {
    /// Any: PostgREST's debounce makes the load after the pending NOTIFY end at the first or second
    /// rise, and a request failing meanwhile most likely failed for the same migration.
    AnyPending,
    /// Only one whose NOTIFY came after the request was sent, so its load surely started later
    /// than everything the request depends on.
    NotifiedAfter,
}

/// One reload request (ours or someone else's) and everything that waits on it.
pub struct Flight {
    notified_at: Instant,
    completion: Completion,
    completed_at: Mutex<Option<Instant>>,
}

enum Completion {
    /// PostgREST's load counter, read before the NOTIFY and polled after it; the channel carries
    /// how many loads have finished since.
    LoadCounter { rises: watch::Receiver<u64> },
    /// No way to observe the reload: replay after a growing back-off.
    Backoff { backoff: Duration },
}

/// A request's place in a reload.
pub enum Ticket {
    /// The answer came from a cache that has been replaced since: replay now. The reload's
    /// NOTIFY was sent or seen at `notified_at`.
    AlreadyReloaded {
        notified_at: Instant,
    },
    Flight(Arc<Flight>),
    /// The reload that cures this was asked for; replay with back-off until it shows.
    Settle {
        backoff: Duration,
    },
}

#[derive(Debug)]
pub enum ReloadError {
    Notify(NotifyError),
    /// The reload budget or the database would take us past the heal deadline.
    Deadline,
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Notify(e) => write!(f, "{e}"),
            ReloadError::Deadline => write!(f, "no reload possible before the heal deadline"),
        }
    }
}

impl ReloadCoordinator {
    /// Starts the coordinator and its watch on the channel for reloads others ask for.
    pub fn start(
        notifier: Arc<Notifier>,
        load_counters: Vec<LoadCounter>,
        settings: WaitSettings,
    ) -> Arc<ReloadCoordinator> {
        let mut observed = notifier.subscribe();
        let coordinator = Arc::new(ReloadCoordinator {
            notifier,
            load_counters,
            settings,
            flights: tokio::sync::Mutex::new(FlightLog::default()),
        });
        let weak = Arc::downgrade(&coordinator);
        tokio::spawn(async move {
            loop {
                match observed.recv().await {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                let Some(coordinator) = weak.upgrade() else {
                    return;
                };
                coordinator.observe_external_reload().await;
            }
        });
        coordinator
    }

    async fn observe_external_reload(&self) {
        let mut log = self.flights.lock().await;
        log.retire(self.settings.deadline);
        if log.pending.is_some() {
            return;
        }
        let deadline = Instant::now() + self.settings.deadline;
        let baseline = self.read_baseline(deadline).await;
        log.pending = Some(self.new_flight(baseline));
    }

    /// A reload already pending, or finished since `sent_at`; never sends a NOTIFY. For errors
    /// that only a reload in progress explains (42P01, 42703, 42883), and for stale errors the
    /// catalog could not confirm.
    pub async fn join_existing(&self, sent_at: Instant, deadline: Instant) -> Option<Ticket> {
        let mut log = tokio::time::timeout_at(deadline, self.flights.lock()).await.ok()?;
        log.retire(self.settings.deadline);
        log.existing(sent_at, JoinRule::AnyPending)
    }

    /// Joins the pending reload (as `join` allows), or starts one, for an answer that was requested
    /// at `sent_at`. Returns whether this call sent the NOTIFY. Every step ends by `deadline`.
    pub async fn join_or_start(
        &self,
        sent_at: Instant,
        deadline: Instant,
        join: JoinRule,
    ) -> Result<(Ticket, bool), ReloadError> {
        let mut log =
            tokio::time::timeout_at(deadline, self.flights.lock()).await.map_err(|_| ReloadError::Deadline)?;
        log.retire(self.settings.deadline);
        if let Some(ticket) = log.existing(sent_at, join) {
            return Ok((ticket, false));
        }
        if let Some(last) = log.last_notify {
            // The reload budget. The lock stays held, so whoever fails meanwhile queues here and
            // then joins the flight this call starts.
            let allowed = last + self.settings.min_interval;
            if allowed >= deadline {
                return Err(ReloadError::Deadline);
            }
            tokio::time::sleep_until(allowed).await;
        }
        let baseline = self.read_baseline(deadline).await;
        // Counted against the budget before it is sent: a caller that goes away mid-NOTIFY must
        // not leave a NOTIFY on the wire that the budget never saw.
        log.last_notify = Some(Instant::now());
        self.notifier.notify_reload(deadline).await.map_err(ReloadError::Notify)?;
        let flight = self.new_flight(baseline);
        log.pending = Some(flight.clone());
        Ok((Ticket::Flight(flight), true))
    }

    /// The most replays one client request may cause: two per reload and two reloads when
    /// PostgREST's load counter tells when a reload is done; without it, six back-off replays
    /// (about 25, 75, 225, 675 ms, then 1 s apart) that together cover a reload of about 3 s.
    pub fn replay_budget(&self) -> u32 {
        if !self.load_counters.is_empty() {
            MAX_REPLAYS_OBSERVED
        } else {
            MAX_REPLAYS_BACKOFF
        }
    }

    /// Every instance's load counter before the NOTIFY; None (wait with back-off) when there is
    /// no admin URL or any instance cannot be read.
    async fn read_baseline(&self, deadline: Instant) -> Option<Vec<u64>> {
        if self.load_counters.is_empty() {
            return None;
        }
        let reads =
            self.load_counters.iter().map(|counter| tokio::time::timeout_at(deadline, counter.successful_loads()));
        let mut baseline = Vec::with_capacity(self.load_counters.len());
        for read in futures_util::future::join_all(reads).await {
            match read {
                Ok(Ok(count)) => baseline.push(count),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read PostgREST's load counter; waiting with back-off instead");
                    return None;
                }
                Err(_) => {
                    tracing::warn!(
                        "PostgREST's load counter did not answer before the deadline; waiting with back-off instead"
                    );
                    return None;
                }
            }
        }
        Some(baseline)
    }

    fn new_flight(&self, baseline: Option<Vec<u64>>) -> Arc<Flight> {
        let notified_at = Instant::now();
        let (completion, poller) = match baseline {
            Some(baseline) => {
                let (publish, rises) = watch::channel(0);
                (Completion::LoadCounter { rises }, Some((publish, baseline)))
            }
            None => (Completion::Backoff { backoff: self.settings.backoff }, None),
        };
        let flight = Arc::new(Flight { notified_at, completion, completed_at: Mutex::new(None) });
        if let Some((publish, baseline)) = poller {
            let instances = self.load_counters.iter().cloned().zip(baseline).map(|(c, b)| InstanceLoads::new(c, b));
            spawn_load_poller(Arc::downgrade(&flight), instances.collect(), publish, self.settings.clone());
        }
        flight
    }
}

/// What one PostgREST instance has loaded since a flight's NOTIFY.
struct InstanceLoads {
    counter: LoadCounter,
    baseline: u64,
    unreachable_since_baseline: bool,
    rises: u64,
}

impl InstanceLoads {
    fn new(counter: LoadCounter, baseline: u64) -> InstanceLoads {
        InstanceLoads { counter, baseline, unreachable_since_baseline: false, rises: 0 }
    }

    async fn poll(&mut self) {
        let count = match self.counter.successful_loads().await {
            Ok(count) => count,
            Err(ProbeError::Unreachable(_)) => {
                self.unreachable_since_baseline = true;
                return;
            }
            Err(ProbeError::NoMetric) => return,
        };
        // A restart loads a fresh cache: as good as both loads the debounce could owe us, once
        // the new process has finished its first load. It shows as a counter below the baseline,
        // or as an admin server that went away and came back (the counter of the new process may
        // well read the same as the old one's).
        let restarted = count < self.baseline || self.unreachable_since_baseline;
        self.rises = match (restarted, count) {
            (true, 0) => 0,
            (true, _) => 2,
            (false, _) => count - self.baseline,
        };
    }
}

/// Publishes the loads finished since the baseline by the slowest instance, until there are two or
/// time is up, and marks the flight complete when every instance has loaded once, so later failures
/// stop joining it.
fn spawn_load_poller(
    flight: Weak<Flight>,
    mut instances: Vec<InstanceLoads>,
    publish: watch::Sender<u64>,
    settings: WaitSettings,
) {
    tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < settings.deadline {
            tokio::time::sleep(settings.poll).await;
            futures_util::future::join_all(instances.iter_mut().map(InstanceLoads::poll)).await;
            let rises = instances.iter().map(|i| i.rises).min().unwrap_or(0);
            if rises > 0 {
                match flight.upgrade() {
                    Some(flight) => flight.mark_completed(Instant::now()),
                    None => break,
                }
            }
            publish.send_replace(rises);
            if rises >= 2 {
                break;
            }
        }
    });
}

impl Flight {
    pub fn completed_at(&self) -> Option<Instant> {
        *self.completed_at.lock().expect("flight lock")
    }

    pub fn mark_completed(&self, at: Instant) {
        self.completed_at.lock().expect("flight lock").get_or_insert(at);
    }
}

impl Ticket {
    /// Waits until replay number `attempt` (from 1) within this reload is worth sending; false
    /// means this reload has nothing more to offer.
    pub async fn wait_before_replay(&self, attempt: u32, deadline: Instant) -> bool {
        let flight = match self {
            Ticket::AlreadyReloaded { .. } => return attempt == 1,
            Ticket::Settle { backoff } => return backoff_wait(attempt, *backoff, deadline).await,
            Ticket::Flight(flight) => flight,
        };
        match &flight.completion {
            Completion::LoadCounter { rises } => {
                // PostgREST's debounce: the load that started after our NOTIFY ends at the first or,
                // if one was already running, the second rise of the counter.
                let (target, limit) = match attempt {
                    1 => (1, deadline),
                    2 => {
                        let risen = flight.completed_at().unwrap_or_else(Instant::now);
                        let first_load = risen.saturating_duration_since(flight.notified_at);
                        (2, deadline.min(risen + first_load * 2 + DEBOUNCE + Duration::from_millis(150)))
                    }
                    _ => return false,
                };
                let mut rises = rises.clone();
                let reached = tokio::time::timeout_at(limit, rises.wait_for(|count| *count >= target)).await;
                matches!(reached, Ok(Ok(_)))
            }
            Completion::Backoff { backoff } => backoff_wait(attempt, *backoff, deadline).await,
        }
    }

    pub fn settle(backoff: Duration) -> Ticket {
        Ticket::Settle { backoff }
    }

    /// When the NOTIFY this ticket waits on was sent or seen.
    pub fn notified_at(&self) -> Option<Instant> {
        match self {
            Ticket::Flight(flight) => Some(flight.notified_at),
            Ticket::AlreadyReloaded { notified_at } => Some(*notified_at),
            Ticket::Settle { .. } => None,
        }
    }

    /// A replay succeeded: in back-off mode that is the only sign the reload has finished.
    pub fn succeeded(&self) {
        if let Ticket::Flight(flight) = self {
            flight.mark_completed(Instant::now());
        }
    }
}

/// Sleeps about `backoff * 3^(attempt-1)` (at most 1 s), jittered by ±20 % so that many waiting
/// requests do not replay in one burst, unless that would pass `deadline`.
pub async fn backoff_wait(attempt: u32, backoff: Duration, deadline: Instant) -> bool {
    let delay = backoff.saturating_mul(3u32.saturating_pow(attempt.saturating_sub(1).min(16))).min(MAX_BACKOFF);
    let delay = jittered(delay);
    if Instant::now() + delay > deadline {
        return false;
    }
    tokio::time::sleep(delay).await;
    true
}

/// `delay` times a random factor in [0.8, 1.2).
fn jittered(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let factor = 0.8 + (random % 4096) as f64 / 4096.0 * 0.4;
    delay.mul_f64(factor)
}
