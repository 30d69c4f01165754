//! Congestion control: the pool's ceiling, driven by what PostgreSQL says, never by our
//! own queue.
//!
//! [`Aimd`] is the ceiling: `max_size` while the upstream has room, cut multiplicatively
//! when it refuses a connection with 53300 (too_many_connections) or when connecting
//! gets sharply slower, and raised by one per interval without trouble (faster when a
//! headroom sample shows free slots).
//!
//! A refusal says "no room now", not "you hold too much": the pool that meets it is
//! usually the small one trying to grow. So a refusal only stops growth (the ceiling
//! becomes what the pool holds), and shares are evened out by a signal every sidecar
//! sees at the same time instead: a headroom sample ([`Headroom`]: `max_connections`
//! less the reserved slots, against the client backends in `pg_stat_activity`). When
//! the server is full and other applications' connections are busy, every contended
//! pool cuts its ceiling (at most once per interval; by more than its share of the
//! busy connections when it holds more than its neighbours), and free slots raise
//! it again. A pool whose load fits below its max, with every connection working,
//! takes part too (as a probe, backed off when nobody takes what it gave up): else it
//! would keep more than its share while its neighbours queue. That is AIMD with synchronised congestion signals, which converges to
//! equal shares (Chiu and Jain). A lone
//! sidecar on a database with room, or whose neighbours only hold idle connections,
//! never drops below `pool.size`.

use std::time::Duration;

use tokio::time::Instant;

/// Congestion-control parameters.
#[derive(Debug, Clone, Copy)]
pub struct AimdConfig {
    pub enabled: bool,
    pub max: usize,
    /// Lowest ceiling: `max(1, min_size)`, never above `max`.
    pub floor: usize,
    /// Additive increase period; also the quiet time after a cut during which further
    /// refusals (from the same burst) do not cut again.
    pub interval: Duration,
}

/// Multiplicative decrease factor on a sharp connect slowdown (an overloaded server).
const DECREASE: f64 = 0.5;
/// Share of its connections a contended pool gives up when the server is full and
/// others are busy, when it holds as many as they do (scaled by own / others).
const SHARE_CUT: f64 = 0.3;
/// A connect slower than this many times the baseline is a congestion signal...
const LATENCY_FACTOR: f64 = 10.0;
/// ...if it is also at least this much slower in absolute terms (a 1 ms baseline
/// becoming 12 ms is noise, not an overloaded server).
const LATENCY_MIN_EXCESS: Duration = Duration::from_millis(500);

/// The congestion-control ceiling.
#[derive(Debug, Clone)]
pub struct Aimd {
    ceiling: usize,
    last_change: Option<Instant>,
    /// No cut before this instant (one cut per congestion event).
    quiet_until: Option<Instant>,
    /// Typical connect latency in seconds: follows drops quickly and rises slowly, so a
    /// sudden slowdown stands out against it.
    baseline: Option<f64>,
    /// Cut since it was last at max (so the return to max is worth reporting).
    was_cut: bool,
    /// Fraction of a connection owed by earlier share cuts (error diffusion).
    cut_debt: f64,
    /// Share cuts made while the pool was [`Demand::Saturated`] (see there).
    probe: Probe,
}

/// What a pool's load wants, as a headroom sample finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    /// Clients queued with every connection busy: the pool wants more than it holds.
    Queued,
    /// No queue, but every connection was in use at once: the pool holds exactly what
    /// its load needs. On a full server with busy neighbours it still gives up a share,
    /// or a pool whose load fits below its max would keep more than its share for
    /// ever while the others queue. It cannot see the neighbours' queues, so the cut
    /// is a probe: slots still free at the next sample were wanted by nobody, and the
    /// next such cut waits twice as long (up to [`MAX_PROBE_BACKOFF`]).
    Saturated,
    /// Connections to spare: nothing to give up by cutting the ceiling.
    Met,
}

/// Saturated share cuts wait at most `interval` x 2^this after one nobody wanted.
pub const MAX_PROBE_BACKOFF: u32 = 6;

/// Share cuts of a saturated pool: whether the last one is still to be judged, and how
/// long the next one waits.
#[derive(Debug, Clone, Copy, Default)]
struct Probe {
    pending: bool,
    backoff: u32,
    not_before: Option<Instant>,
}

/// A ceiling change: (from, to).
pub type Change = (usize, usize);

/// Why a ceiling was cut for fair shares (for logs).
pub const SHARE: &str = "the server is full and other applications are busy: giving up a share";

/// One sample of PostgreSQL's connection slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// Connections the pool's role may hold in all: `max_connections` less the slots
    /// reserved for superusers (and, from PostgreSQL 16, `reserved_connections`).
    pub limit: usize,
    /// Client backends connected now, from every application (this pool's included).
    pub used: usize,
    /// Of those, the ones running a query now or within the last second (or whose
    /// state the pool's role may not see).
    pub busy: usize,
}

impl Headroom {
    pub fn free(&self) -> usize {
        self.limit.saturating_sub(self.used)
    }

    /// The server is full and more of its connections are busy than this pool's own
    /// busy ones (`own_busy`): another application is working and may want a slot.
    /// Idle connections of others (an application holding a pool it does not use) are
    /// no reason to give anything up.
    pub fn others_busy(&self, own_busy: usize) -> bool {
        self.free() == 0 && self.busy > own_busy
    }

    /// Nearly full (at most a tenth of the slots, or one, free) and others are busy: a
    /// pool holding connections it does not use should give them back now, before the
    /// busy ones have to cut each other for the last slots.
    pub fn pressed(&self, own_busy: usize) -> bool {
        self.free() <= (self.limit / 10).max(1) && self.busy > own_busy
    }
}

impl Aimd {
    pub fn new(max: usize) -> Aimd {
        Aimd {
            ceiling: max,
            last_change: None,
            quiet_until: None,
            baseline: None,
            was_cut: false,
            cut_debt: 0.0,
            probe: Probe::default(),
        }
    }

    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The upstream refused a connection as too many (53300): stop growing; the ceiling
    /// becomes what the pool holds (`established`). It rises again per interval, or at
    /// once when a headroom sample shows free slots.
    ///
    /// It does not start a quiet period: the refused pool is usually the one holding
    /// least, and must still take part in the next share cut.
    pub fn on_refused(
        &mut self,
        cfg: &AimdConfig,
        established: usize,
        now: Instant,
    ) -> Option<Change> {
        if !cfg.enabled {
            return None;
        }
        Some(self.lower(cfg, established, now)).filter(|(from, to)| from != to)
    }

    /// Lowers the ceiling to `to` (within the floor), at most once per interval: further
    /// signals of the same event do not cut again.
    fn cut_to(&mut self, cfg: &AimdConfig, to: usize, now: Instant) -> Option<Change> {
        if !cfg.enabled || self.quiet_until.is_some_and(|t| now < t) {
            return None;
        }
        self.quiet_until = Some(now + cfg.interval);
        Some(self.lower(cfg, to, now)).filter(|(from, to)| from != to)
    }

    /// Sets the ceiling to `to` (never above it now, never below the floor).
    fn lower(&mut self, cfg: &AimdConfig, to: usize, now: Instant) -> Change {
        let from = self.ceiling;
        let to = to.min(from).max(cfg.floor.min(cfg.max)).max(1);
        self.last_change = Some(now);
        self.ceiling = to;
        self.was_cut |= to < from;
        (from, to)
    }

    /// A connection opened in `took`; a sharp rise over the baseline counts as congestion.
    pub fn on_connected(
        &mut self,
        cfg: &AimdConfig,
        took: Duration,
        established: usize,
        now: Instant,
    ) -> Option<Change> {
        let s = took.as_secs_f64();
        let Some(base) = self.baseline else {
            self.baseline = Some(s);
            return None;
        };
        let slow = s > base * LATENCY_FACTOR && s - base > LATENCY_MIN_EXCESS.as_secs_f64();
        // Fast to follow improvements, slow to accept a worse normal.
        self.baseline = Some(if s < base {
            base + (s - base) * 0.3
        } else {
            base + (s - base) * 0.02
        });
        if slow {
            let base = self.ceiling.min(established + 1);
            return self.cut_to(cfg, (base as f64 * DECREASE) as usize, now);
        }
        None
    }

    /// A headroom sample. With free slots, the ceiling grows by one (several sidecars
    /// see the same free slots, so none takes them all). With none, a pool whose load
    /// wants all it holds (`demand` not [`Demand::Met`]) and holds `own` connections
    /// cuts some if others are busy too, at most once per interval. Every such sidecar
    /// sees the same full server, so the cuts are synchronised. The cut is 0.3 of `own`
    /// times `own / others' busy` (at most 2.5 times that): a pool holding more than its
    /// neighbours gives up more than in proportion, so shares are pulled together hard
    /// while equal shares lose little (0.3 divided by the neighbours' count). The result
    /// is a fraction of a connection: the remainder is carried to the next cut (error
    /// diffusion), so small pools give up their exact share over time (rounding up
    /// would cut them harder than large ones; down, never).
    pub fn on_headroom(
        &mut self,
        cfg: &AimdConfig,
        h: Headroom,
        own: usize,
        demand: Demand,
        now: Instant,
    ) -> Option<Change> {
        if !cfg.enabled {
            return None;
        }
        let from = self.ceiling;
        let free = h.free();
        self.judge_probe(free);
        if free > 0 {
            if from >= cfg.max {
                return None;
            }
            self.ceiling = from + 1;
            self.last_change = Some(now);
            return Some((from, self.ceiling));
        }
        let quiet = self.quiet_until.is_some_and(|t| now < t);
        let waits = demand == Demand::Saturated && self.probe.not_before.is_some_and(|t| now < t);
        if demand == Demand::Met || !h.others_busy(own) || quiet || waits {
            return None;
        }
        let base = from.min(own);
        let others = h.busy.saturating_sub(own).max(1) as f64;
        let share = (base as f64 / others).min(2.5);
        self.cut_debt += base as f64 * SHARE_CUT * share;
        let cut = self.cut_debt.floor() as usize;
        self.cut_debt -= cut as f64;
        if cut == 0 {
            return None;
        }
        let change = self.cut_to(cfg, base.saturating_sub(cut), now);
        if change.is_some() && demand == Demand::Saturated {
            self.probe.pending = true;
            self.probe.not_before = Some(now + cfg.interval * (1u32 << self.probe.backoff));
        }
        change
    }

    /// The first sample after a saturated pool's cut: were the slots it gave up taken?
    fn judge_probe(&mut self, free: usize) {
        if !std::mem::take(&mut self.probe.pending) {
            return;
        }
        self.probe.backoff = if free > 0 {
            (self.probe.backoff + 1).min(MAX_PROBE_BACKOFF)
        } else {
            0
        };
    }

    /// True once when the ceiling is back at `max` after a cut.
    pub fn take_recovered(&mut self, max: usize) -> bool {
        let r = self.was_cut && self.ceiling >= max;
        if r {
            self.was_cut = false;
        }
        r
    }

    /// Additive increase: +1 per interval since the last change, up to `max`. Also
    /// applies a changed `max` or a disabled controller at once.
    pub fn tick(&mut self, cfg: &AimdConfig, now: Instant) -> Option<Change> {
        let from = self.ceiling;
        if !cfg.enabled || self.ceiling > cfg.max {
            self.ceiling = cfg.max;
        } else if self.ceiling < cfg.max {
            let since = *self.last_change.get_or_insert(now);
            if now.duration_since(since) >= cfg.interval {
                self.ceiling += 1;
                self.last_change = Some(now);
            }
        }
        self.ceiling = self.ceiling.max(cfg.floor.min(cfg.max));
        (self.ceiling != from).then_some((from, self.ceiling))
    }
}

#[cfg(test)]
mod tests;
