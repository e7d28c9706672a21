//! Every limit of one client request's heal, in one value that each step asks: how many more
//! upstream requests it may cause, how many reloads it may take part in, and the deadline that ends
//! every wait (catalog, NOTIFY, counter reads, back-off, each replay, each error body read).

use std::time::Duration;

use tokio::time::Instant;

/// Upstream requests a heal may add to the client's own, whatever they are for: a replay after a
/// reload, a wait out of an empty cache (PGRST002), a resend after a refused connection. With the
/// admin URL a stale heal needs at most four (two per reload, two reloads).
pub const MAX_REPLAYS: u32 = 6;
/// Probes of a reload's end a request may send besides, when it holds its flight's probe seat (no
/// load counters to watch): see [`crate::reload::flight::MAX_PROBES`].
pub const MAX_PROBES: u32 = crate::reload::flight::MAX_PROBES;
/// Reloads (flights) one request may wait on: the one pending when it failed, and one of its own
/// that surely began after its failure.
pub const MAX_RELOADS: u32 = 2;

/// The part of the deadline kept for the last replay to be answered in: no replay starts later
/// than this fraction of the deadline before its end (a replay unanswered at the deadline can only
/// be answered "sent, outcome unknown").
const REPLAY_WINDOW_DIVISOR: u32 = 10;

#[derive(Debug)]
pub struct Budget {
    deadline: Instant,
    /// No replay starts after this.
    last_replay_start: Instant,
    replays_left: u32,
    probes_left: u32,
    reloads_left: u32,
}

impl Budget {
    /// A heal that began at `started` and may last `deadline`.
    pub fn new(started: Instant, deadline: Duration) -> Budget {
        Budget {
            deadline: started + deadline,
            last_replay_start: started + deadline - deadline / REPLAY_WINDOW_DIVISOR,
            replays_left: MAX_REPLAYS,
            probes_left: MAX_PROBES,
            reloads_left: MAX_RELOADS,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The end of every wait that comes before a replay: the deadline, less the time kept for the
    /// replay's answer.
    pub fn last_replay_start(&self) -> Instant {
        self.last_replay_start
    }

    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// One more upstream request, if the budget and the deadline allow it.
    pub fn take_replay(&mut self) -> bool {
        if self.replays_left == 0 || Instant::now() > self.last_replay_start {
            return false;
        }
        self.replays_left -= 1;
        true
    }

    /// One more probe (a replay sent by the flight's prober), if the probe budget and the deadline
    /// allow it.
    pub fn take_probe(&mut self) -> bool {
        if self.probes_left == 0 || Instant::now() > self.last_replay_start {
            return false;
        }
        self.probes_left -= 1;
        true
    }

    pub fn probes_left(&self) -> u32 {
        self.probes_left
    }

    pub fn probes_used(&self) -> u32 {
        MAX_PROBES - self.probes_left
    }

    /// One more reload to wait on, if the budget allows it.
    pub fn take_reload(&mut self) -> bool {
        if self.reloads_left == 0 || self.expired() {
            return false;
        }
        self.reloads_left -= 1;
        true
    }

    pub fn replays_used(&self) -> u32 {
        MAX_REPLAYS - self.replays_left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_upstream_request_and_reload() {
        let mut budget = Budget::new(Instant::now(), Duration::from_secs(10));
        for _ in 0..MAX_REPLAYS {
            assert!(budget.take_replay());
        }
        assert!(!budget.take_replay());
        assert_eq!(budget.replays_used(), MAX_REPLAYS);
        assert!(budget.take_reload() && budget.take_reload() && !budget.take_reload());
        for _ in 0..MAX_PROBES {
            assert!(budget.take_probe());
        }
        assert!(!budget.take_probe());
        assert_eq!(budget.probes_used(), MAX_PROBES);
    }

    #[test]
    fn nothing_is_allowed_past_the_deadline() {
        let mut budget = Budget::new(Instant::now() - Duration::from_secs(11), Duration::from_secs(10));
        assert!(budget.expired());
        assert!(!budget.take_replay());
        assert!(!budget.take_probe());
        assert!(!budget.take_reload());
    }
}
