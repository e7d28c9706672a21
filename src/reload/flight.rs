//! One reload: the guard's own (read PostgREST's load counters, send the NOTIFY, watch the counters
//! rise) or one somebody else asked for (seen on the channel: read the counters, watch them rise).
//! The work runs as a task of its own on the guard's control runtime, so no request owns it: a
//! client that leaves mid-NOTIFY changes nothing for the others waiting on the same flight.
//!
//! What a waiting request reads is the flight's [`Progress`], published on a watch channel.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::database::{Claim, Database};
use super::load_counter::{LoadCounter, ProbeError};

/// PostgREST's debounce cool-down between two loads.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A flight begun from somebody else's NOTIFY reads its baseline only after that NOTIFY. A reload
/// takes a database round trip and more, so a baseline read this soon after the NOTIFY surely
/// predates the end of its load; one read later may not, and then the first replay waits for a rise
/// at most [`OBSERVED_GRACE`].
const PROMPT_BASELINE: Duration = Duration::from_millis(20);
const OBSERVED_GRACE: Duration = Duration::from_millis(250);
/// An admin server refused this many polls in a row is gone (the old process of a hand-over): the
/// flight's waiters fall back to back-off replays instead of waiting for it.
const GONE_AFTER_REFUSALS: u32 = 3;
/// A guard that claimed the next NOTIFY among guards keeps the claim this long after sending it, so
/// that guards failing just after it expect its NOTIFY instead of sending their own.
const CLAIM_HOLD: Duration = Duration::from_millis(250);
/// How long a guard that found the claim taken waits to see the other guard's NOTIFY before it
/// sends its own after all (the claim's holder may be gone).
const CLAIM_WAIT: Duration = Duration::from_millis(400);
/// Without load counters a reload's end shows only as a replay that succeeds. One request per
/// flight replays on a fine schedule counted from the NOTIFY (its replays are the probes: 5 ms, then
/// each gap 10 % longer up to 20 ms, then every 20 ms; about 2.9 s for all of them); the others wait
/// for its success instead of replaying on back-offs of their own. PostgREST sees one failing
/// request at a time during a reload, at most 50 a second, each answered from its cache, and the
/// heal ends about 10 ms after the reload on average, however long the reload takes.
pub const MAX_PROBES: u32 = 150;
const FIRST_PROBE: Duration = Duration::from_millis(5);
const PROBE_GROWTH: f64 = 1.1;
const MAX_PROBE_GAP: Duration = Duration::from_millis(20);

/// Who asked for the reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This guard's NOTIFY.
    Ours,
    /// A NOTIFY from somebody else (an event trigger, a migration, another guard), seen at this time.
    Observed(Instant),
}

/// How the end of the reload is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Every instance's `pgrst_schema_cache_loads_total{status="SUCCESS"}` is watched.
    LoadCounter,
    /// It cannot be observed (no admin URL, no `/metrics` before v12.2, an admin server gone):
    /// replays back off, and the first success proves it.
    Backoff,
}

/// What is known of a flight so far.
#[derive(Clone, Debug)]
pub struct Progress {
    /// When the NOTIFY was sent (just before the query) or seen; None while the baseline is read.
    pub notified_at: Option<Instant>,
    /// The NOTIFY could not be sent.
    pub failed: Option<Arc<str>>,
    pub completion: Completion,
    /// Loads finished since the baseline by the slowest instance (a restart counts as two).
    pub rises: u64,
    /// When every instance had finished one load since the baseline.
    pub first_rise_at: Option<Instant>,
    /// When every instance had finished the load that surely began after the NOTIFY (the second
    /// rise, PostgREST's debounce allowing one load already under way, or a restart).
    pub settled_at: Option<Instant>,
    /// A replay waiting on this flight succeeded.
    pub cured_at: Option<Instant>,
    /// When the load counters' baseline was read.
    pub baseline_at: Option<Instant>,
    /// Probes sent for this flight (without load counters), by whichever request held the seat.
    pub probes_sent: u32,
    /// A request holds the [`ProbeSeat`].
    pub prober_seated: bool,
}

pub struct Flight {
    pub origin: Origin,
    pub created_at: Instant,
    progress: watch::Sender<Progress>,
}

impl Flight {
    /// Starts a flight: its task reads the baselines, sends the NOTIFY (for [`Origin::Ours`]) and
    /// polls the counters, all ending by `deadline`.
    pub fn launch(
        origin: Origin,
        database: Arc<Database>,
        counters: Vec<LoadCounter>,
        poll: Duration,
        deadline: Instant,
        runtime: &tokio::runtime::Handle,
    ) -> Arc<Flight> {
        let completion = if counters.is_empty() { Completion::Backoff } else { Completion::LoadCounter };
        let progress = Progress {
            notified_at: match origin {
                Origin::Observed(seen) => Some(seen),
                Origin::Ours => None,
            },
            failed: None,
            completion,
            rises: 0,
            first_rise_at: None,
            settled_at: None,
            cured_at: None,
            baseline_at: None,
            probes_sent: 0,
            prober_seated: false,
        };
        let flight = Arc::new(Flight { origin, created_at: Instant::now(), progress: watch::Sender::new(progress) });
        runtime.spawn(fly(Arc::downgrade(&flight), database, counters, poll, deadline));
        flight
    }

    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// When the first load since the NOTIFY finished everywhere, or a replay proved it.
    pub fn completed_at(&self) -> Option<Instant> {
        let progress = self.progress.borrow();
        match (progress.first_rise_at, progress.cured_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A replay that waited on this flight succeeded: in back-off mode the only sign of the end.
    pub fn cured(&self) {
        self.progress.send_if_modified(|progress| {
            let first = progress.cured_at.is_none();
            progress.cured_at.get_or_insert_with(Instant::now);
            first
        });
    }

    /// Waits until the next replay within this flight is worth sending. Without load counters the
    /// request may take the flight's [`ProbeSeat`] into `seat` and keep it between turns.
    pub async fn wait(self: &Arc<Self>, turn: Turn, seat: &mut Option<ProbeSeat>) -> Wait {
        let Turn { attempt, deadline, .. } = turn;
        let mut progress = self.subscribe();
        // The NOTIFY and the baseline first: until both are there, there is nothing to wait for.
        let started = |p: &Progress| {
            p.failed.is_some()
                || (p.notified_at.is_some() && (p.baseline_at.is_some() || p.completion == Completion::Backoff))
        };
        let sent = tokio::time::timeout_at(deadline, progress.wait_for(started))
            .await
            .ok()
            .and_then(|p| p.ok().map(|p| (p.notified_at, p.failed.clone())));
        let notified_at = match sent {
            Some((Some(notified_at), None)) => notified_at,
            Some((_, Some(failed))) => return Wait::NotifyFailed(failed),
            _ => return Wait::Deadline,
        };
        if self.progress().completion == Completion::Backoff {
            return self.wait_without_counters(turn, notified_at, seat).await;
        }
        // PostgREST's debounce: the load that started after the NOTIFY ends at the first or, if one
        // was already running, the second rise of the counter.
        let (target, limit) = match attempt {
            1 => match (self.origin, self.progress().baseline_at) {
                (Origin::Observed(seen), Some(read)) if read > seen + PROMPT_BASELINE => {
                    (1, deadline.min(Instant::now().max(notified_at) + OBSERVED_GRACE))
                }
                _ => (1, deadline),
            },
            2 => {
                let risen = self.progress().first_rise_at.unwrap_or_else(Instant::now);
                let first_load = risen.saturating_duration_since(notified_at);
                (2, deadline.min(risen + first_load * 2 + DEBOUNCE + Duration::from_millis(150)))
            }
            _ => return Wait::Exhausted,
        };
        let reached = tokio::time::timeout_at(
            limit,
            progress.wait_for(|p| p.rises >= target || p.completion == Completion::Backoff),
        )
        .await
        .ok()
        .and_then(|p| p.ok().map(|p| p.rises >= target));
        match reached {
            Some(true) => Wait::Ready,
            // The admin server went away mid-flight: probes instead of its word.
            Some(false) => self.wait_without_counters(turn, notified_at, seat).await,
            _ if matches!(self.origin, Origin::Observed(_)) && attempt == 1 && Instant::now() < deadline => {
                // The load may have finished before the baseline was read: try once.
                Wait::Ready
            }
            _ => Wait::Exhausted,
        }
    }

    /// Without load counters: probe when the seat is free (or already ours); else wait for the
    /// prober's success, backing off on one's own only while nobody probes. A waiter whose failure
    /// this flight may not cover still waits for the prober's success: one replay after it is the
    /// cheapest test of whether the reload included its object.
    async fn wait_without_counters(
        self: &Arc<Self>,
        turn: Turn,
        notified_at: Instant,
        seat: &mut Option<ProbeSeat>,
    ) -> Wait {
        let until = turn.deadline;
        let cured_since_sent = |p: &Progress| p.cured_at.is_some_and(|cured| cured > turn.last_sent);
        let probing = |p: &Progress| p.prober_seated && p.probes_sent < MAX_PROBES;
        let mut progress = self.subscribe();
        loop {
            if cured_since_sent(&progress.borrow_and_update()) {
                return Wait::Ready;
            }
            if turn.may_probe && seat.is_none() {
                *seat = self.take_probe_seat();
            }
            if seat.is_some() {
                match self.next_probe(notified_at, until).await {
                    Some(wait) => return wait,
                    // All probes sent: the campaign is over, and so is the seat.
                    None => *seat = None,
                }
            }
            if !probing(&self.progress()) {
                // Nobody probes (yet): a back-off of one's own, cut short by somebody's success or
                // by a prober taking the seat.
                tokio::select! {
                    wait = backoff_wait(turn.attempt, turn.backoff, until) => return wait,
                    Ok(_) = progress.wait_for(|p| cured_since_sent(p) || probing(p)) => continue,
                }
            }
            // Somebody probes: its success, its leaving, or the end of its probes.
            let changed =
                progress.wait_for(|p| cured_since_sent(p) || !probing(p) || (turn.may_probe && !p.prober_seated));
            match tokio::time::timeout_at(until, changed).await {
                Ok(Ok(_)) => continue,
                _ => return Wait::Deadline,
            }
        }
    }

    /// The flight's probe seat, if nobody holds it and probes are left.
    fn take_probe_seat(self: &Arc<Self>) -> Option<ProbeSeat> {
        let taken = self.progress.send_if_modified(|p| {
            let free = !p.prober_seated && p.probes_sent < MAX_PROBES;
            p.prober_seated |= free;
            free
        });
        taken.then(|| ProbeSeat { flight: self.clone() })
    }

    /// Sleeps until the flight's next probe is due and counts it: [`Wait::Probe`]; [`Wait::Deadline`]
    /// if it would be due after `until`; None when every probe has been sent.
    async fn next_probe(&self, notified_at: Instant, until: Instant) -> Option<Wait> {
        let sent = self.progress().probes_sent;
        if sent >= MAX_PROBES {
            return None;
        }
        let due = (notified_at + probe_offset(sent + 1)).max(Instant::now());
        if due > until {
            return Some(Wait::Deadline);
        }
        tokio::time::sleep_until(due).await;
        self.progress.send_modify(|p| p.probes_sent += 1);
        Some(Wait::Probe)
    }
}

/// One waiting request's turn: what it may still do.
#[derive(Clone, Copy, Debug)]
pub struct Turn {
    /// Replay number within this flight, from 1.
    pub attempt: u32,
    pub backoff: Duration,
    /// No replay starts after this.
    pub deadline: Instant,
    /// When the request's last answer was requested: a cure after it is news.
    pub last_sent: Instant,
    /// The request's budget allows probes.
    pub may_probe: bool,
}

/// The right to probe a flight's reload, one request at a time; given up when dropped (the request
/// was answered, left, or moved on).
pub struct ProbeSeat {
    flight: Arc<Flight>,
}

impl Drop for ProbeSeat {
    fn drop(&mut self) {
        self.flight.progress.send_modify(|p| p.prober_seated = false);
    }
}

/// When probe number `n` (from 1) is due, counted from the NOTIFY: 5 ms, 10.5 ms, 16.6 ms, ...
/// 158.9 ms (the 15th; the gaps have grown to [`MAX_PROBE_GAP`]), 178.9 ms, 198.9 ms, ...
fn probe_offset(n: u32) -> Duration {
    let growing_gaps =
        ((MAX_PROBE_GAP.as_secs_f64() / FIRST_PROBE.as_secs_f64()).ln() / PROBE_GROWTH.ln()).ceil() as u32;
    let grown = n.min(growing_gaps);
    FIRST_PROBE.mul_f64((PROBE_GROWTH.powi(grown as i32) - 1.0) / (PROBE_GROWTH - 1.0)) + MAX_PROBE_GAP * (n - grown)
}

/// What a waiting request may do next.
#[derive(Debug)]
pub enum Wait {
    /// Replay now.
    Ready,
    /// Replay now, as the flight's probe of its reload's end.
    Probe,
    /// This flight has nothing more to offer this request.
    Exhausted,
    /// The NOTIFY could not be sent.
    NotifyFailed(Arc<str>),
    /// The deadline came first.
    Deadline,
}

/// The flight's task: baselines, NOTIFY, then the counters until the second rise everywhere.
async fn fly(
    flight: std::sync::Weak<Flight>,
    database: Arc<Database>,
    counters: Vec<LoadCounter>,
    poll: Duration,
    deadline: Instant,
) {
    let Some(strong) = flight.upgrade() else { return };
    let origin = strong.origin;
    drop(strong);
    let mut instances = match read_baselines(&counters, deadline).await {
        Some(instances) => {
            publish(&flight, |p| p.baseline_at = Some(Instant::now()));
            instances
        }
        None => {
            publish(&flight, |p| p.completion = Completion::Backoff);
            Vec::new()
        }
    };
    if origin == Origin::Ours {
        let launched = Instant::now();
        let claim = database.claim_reload(deadline).await;
        let expected = match claim {
            Claim::Taken => {
                let since = launched.checked_sub(CLAIM_HOLD).unwrap_or(launched);
                wait_for_foreign_notify(&database, since, deadline.min(launched + CLAIM_WAIT)).await
            }
            Claim::Ours | Claim::NotCoordinated => None,
        };
        match expected {
            Some(seen) => {
                // Another guard's NOTIFY, sent for the same burst: this flight waits on it.
                tracing::info!(channel = %database.channel(), "another guard sent the reload NOTIFY; joining it");
                publish(&flight, |p| p.notified_at = Some(seen));
            }
            None => {
                let sending = Instant::now();
                let sent = database.notify_reload(deadline).await;
                if claim == Claim::Ours {
                    let database = database.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(CLAIM_HOLD).await;
                        database.release_claim(Instant::now() + CLAIM_HOLD).await;
                    });
                }
                if let Err(e) = sent {
                    let reason: Arc<str> = e.to_string().into();
                    tracing::warn!(error = %reason, "reload NOTIFY failed");
                    publish(&flight, |p| p.failed = Some(reason));
                    return;
                }
                tracing::info!(channel = %database.channel(), "reload NOTIFY sent");
                publish(&flight, |p| p.notified_at = Some(sending));
            }
        }
    }
    if instances.is_empty() {
        return;
    }
    while Instant::now() < deadline {
        tokio::time::sleep(poll).await;
        futures_util::future::join_all(instances.iter_mut().map(InstanceLoads::poll)).await;
        if instances.iter().any(|instance| instance.gone()) {
            tracing::info!("a PostgREST admin server went away mid-reload; waiting with back-off instead");
            publish(&flight, |p| p.completion = Completion::Backoff);
            return;
        }
        let rises = instances.iter().map(|i| i.rises).min().unwrap_or(0);
        let alive = publish(&flight, |p| {
            if rises > p.rises {
                let now = Instant::now();
                p.rises = rises;
                p.first_rise_at.get_or_insert(now);
                if rises >= 2 {
                    p.settled_at.get_or_insert(now);
                }
            }
        });
        if !alive || rises >= 2 {
            return;
        }
    }
}

/// When a NOTIFY from somebody else, seen after `since`, arrives by `until`.
async fn wait_for_foreign_notify(database: &Database, since: Instant, until: Instant) -> Option<Instant> {
    loop {
        if let Some(seen) = database.last_seen().filter(|seen| *seen >= since) {
            return Some(seen);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Applies `change` to the flight's progress; false once the flight is gone.
fn publish(flight: &std::sync::Weak<Flight>, change: impl FnOnce(&mut Progress)) -> bool {
    match flight.upgrade() {
        Some(flight) => {
            flight.progress.send_modify(change);
            true
        }
        None => false,
    }
}

/// Every instance's counter before the NOTIFY; None (back-off) when any cannot be read.
async fn read_baselines(counters: &[LoadCounter], deadline: Instant) -> Option<Vec<InstanceLoads>> {
    if counters.is_empty() {
        return None;
    }
    let reads = counters.iter().map(|counter| tokio::time::timeout_at(deadline, counter.successful_loads()));
    let mut instances = Vec::with_capacity(counters.len());
    for (counter, read) in counters.iter().zip(futures_util::future::join_all(reads).await) {
        match read {
            Ok(Ok(count)) => instances.push(InstanceLoads::new(counter.clone(), count)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read PostgREST's load counter; waiting with back-off instead");
                return None;
            }
            Err(_) => {
                tracing::warn!("PostgREST's load counter did not answer in time; waiting with back-off instead");
                return None;
            }
        }
    }
    Some(instances)
}

/// What one PostgREST instance has loaded since a flight's baseline.
struct InstanceLoads {
    counter: LoadCounter,
    baseline: u64,
    /// The admin server refused a poll since the baseline: a restart, or the process is gone.
    refused_since_baseline: bool,
    refusals_in_a_row: u32,
    rises: u64,
}

impl InstanceLoads {
    fn new(counter: LoadCounter, baseline: u64) -> InstanceLoads {
        InstanceLoads { counter, baseline, refused_since_baseline: false, refusals_in_a_row: 0, rises: 0 }
    }

    fn gone(&self) -> bool {
        self.refusals_in_a_row >= GONE_AFTER_REFUSALS
    }

    async fn poll(&mut self) {
        let count = match self.counter.successful_loads().await {
            Ok(count) => count,
            Err(ProbeError::Refused(_)) => {
                self.refused_since_baseline = true;
                self.refusals_in_a_row += 1;
                return;
            }
            // A slow answer says nothing about a restart: no data, nothing concluded.
            Err(ProbeError::Unreachable(_) | ProbeError::NoMetric) => return,
        };
        self.refusals_in_a_row = 0;
        // A restart loads a fresh cache: as good as both loads the debounce could owe us, once the
        // new process has finished its first load. It shows as a counter below the baseline, or as
        // an admin server that refused and came back (the new process's counter may read the same).
        let restarted = count < self.baseline || self.refused_since_baseline;
        self.rises = match (restarted, count) {
            (true, 0) => 0,
            (true, _) => 2,
            (false, _) => count - self.baseline,
        };
    }
}

/// Sleeps about `backoff * 3^(attempt-1)` (at most 1 s), jittered by ±20 % so that many waiting
/// requests do not replay in one burst; [`Wait::Deadline`] if that would pass `deadline`.
pub async fn backoff_wait(attempt: u32, backoff: Duration, deadline: Instant) -> Wait {
    let delay = jittered(backoff_delay(attempt, backoff));
    if Instant::now() + delay > deadline {
        return Wait::Deadline;
    }
    tokio::time::sleep(delay).await;
    Wait::Ready
}

const MAX_BACKOFF: Duration = Duration::from_secs(1);

fn backoff_delay(attempt: u32, backoff: Duration) -> Duration {
    backoff.saturating_mul(3u32.saturating_pow(attempt.saturating_sub(1).min(16))).min(MAX_BACKOFF)
}

/// `delay` times a random factor in [0.8, 1.2).
pub fn jittered(delay: Duration) -> Duration {
    let factor = 0.8 + (super::database::random_u64() % 4096) as f64 / 4096.0 * 0.4;
    delay.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_start_fine_and_settle_at_the_widest_gap() {
        let ms = |n| probe_offset(n).as_secs_f64() * 1000.0;
        assert!((ms(1) - 5.0).abs() < 0.01 && (ms(2) - 10.5).abs() < 0.01, "{} {}", ms(1), ms(2));
        let gaps: Vec<f64> = (1..MAX_PROBES).map(|n| ms(n + 1) - ms(n)).collect();
        assert!(gaps.windows(2).all(|pair| pair[1] >= pair[0] - 1e-9), "gaps never shrink");
        assert!(gaps.iter().all(|&gap| gap <= 20.0 + 1e-9), "no gap is wider than 20 ms");
        assert!((ms(15) - 158.9).abs() < 0.1 && (ms(16) - 178.9).abs() < 0.1, "{} {}", ms(15), ms(16));
        assert!((2850.0..2870.0).contains(&ms(MAX_PROBES)), "all probes reach {} ms", ms(MAX_PROBES));
    }
}
