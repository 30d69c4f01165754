//! The pure elastic sizing controller: how many server connections a pool keeps.
//!
//! A plain struct with a step function that takes the time as an argument, so the
//! pool's maintenance task drives it with real time and the tests below drive it with a
//! paused clock, exactly.
//!
//! [`Sizer`] turns demand into a target size between `min_size` and the ceiling. Demand
//! is the *peak* number of connections leased at once since the previous step (kept
//! exactly by checkout and release), plus the clients waiting: a 1 ms transaction
//! between two 100 ms steps is demand, even though a snapshot would never see it. It
//! grows at once (waiting clients are the signal that matters) and shrinks only after
//! demand has stayed below the target for `shrink_delay`, down to the highest demand
//! seen in that window: hysteresis, so a pool does not flap on a bursty load. The pool
//! closes for a shrink only connections that nobody used for `shrink_delay`.
//!
//! Congestion control (the ceiling) lives in `congestion`.

use std::time::Duration;

use tokio::time::Instant;

/// Sizing parameters, derived from the pool settings on every step (so reloads apply).
#[derive(Debug, Clone, Copy)]
pub struct SizingConfig {
    pub min: usize,
    pub max: usize,
    /// Busy / open fraction the pool aims for; the rest is headroom for arrivals.
    pub target_utilization: f64,
    /// How long demand must stay below the target before the pool shrinks.
    pub shrink_delay: Duration,
}

/// What the pool looks like right now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Open connections in every state (idle, busy, connecting, being tested).
    pub open: usize,
    pub idle: usize,
    /// Connections leased to clients right now.
    pub busy: usize,
    /// Most connections leased at once since the previous step (>= busy).
    pub peak: usize,
    /// Clients queued for a connection.
    pub waiting: usize,
    /// The congestion-control ceiling (equals `max` when unconstrained).
    pub ceiling: usize,
}

/// What to do this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub target: usize,
    /// Connections to open now.
    pub open: usize,
    /// Idle connections to close now.
    pub close: usize,
}

/// The elastic sizing controller.
#[derive(Debug, Clone)]
pub struct Sizer {
    target: usize,
    /// Since when the wanted size has been below the target (None: it is not).
    below_since: Option<Instant>,
    /// Highest wanted size seen since `below_since`: where a shrink stops.
    below_peak: usize,
}

impl Sizer {
    pub fn new(min: usize) -> Sizer {
        Sizer {
            target: min,
            below_since: None,
            below_peak: 0,
        }
    }

    pub fn target(&self) -> usize {
        self.target
    }

    /// Lowers the target to `n` at once (connections given back to a full server) and
    /// starts a new shrink window.
    pub fn lower_to(&mut self, n: usize) {
        if n < self.target {
            self.target = n;
            self.below_since = None;
        }
    }

    /// Size that serves `load` at the target utilization, within [floor, limit].
    ///
    /// Headroom is rounded down: a client running one transaction at a time wants one
    /// connection, not two (a spare that a light load never uses is a backend forked
    /// for nothing); from four at once on, the spare share is `1/u - 1` of demand.
    fn wanted(cfg: &SizingConfig, load: &Load, floor: usize, limit: usize) -> usize {
        let demand = load.busy.max(load.peak) + load.waiting;
        let u = cfg.target_utilization.clamp(0.05, 1.0);
        let spare = (demand as f64 * (1.0 / u - 1.0) + 1e-9).floor() as usize;
        (demand + spare).clamp(floor, limit)
    }

    pub fn step(&mut self, cfg: &SizingConfig, load: Load, now: Instant) -> Plan {
        let limit = cfg.max.min(load.ceiling);
        let floor = cfg.min.min(limit);
        let want = Self::wanted(cfg, &load, floor, limit);
        if want >= self.target {
            self.below_since = None;
            if want > self.target {
                // Bounded step: half again, or everyone waiting if more. Waiting clients
                // are served by checkouts that connect inline anyway; the step only
                // decides how much headroom to open ahead of demand.
                let step = (self.target / 2).max(load.waiting).max(1);
                self.target = want.min(self.target + step);
            }
        } else {
            let since = *self.below_since.get_or_insert(now);
            self.below_peak = if since == now {
                want
            } else {
                self.below_peak.max(want)
            };
            if now.duration_since(since) >= cfg.shrink_delay {
                self.target = self.below_peak.max(floor);
                // A new window starts: a further shrink needs another full delay.
                self.below_since = None;
            }
        }
        self.target = self.target.clamp(floor, limit);
        let open = self.target.saturating_sub(load.open);
        // Close only idle connections, and at most half the excess per step so a shrink
        // is gradual (a burst arriving mid-shrink still finds some).
        let excess = load.open.saturating_sub(self.target);
        let close = if excess == 0 {
            0
        } else {
            excess.div_ceil(2).min(load.idle)
        };
        Plan {
            target: self.target,
            open,
            close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn cfg() -> SizingConfig {
        SizingConfig {
            min: 2,
            max: 20,
            target_utilization: 0.8,
            shrink_delay: Duration::from_secs(5),
        }
    }

    fn load(open: usize, busy: usize, waiting: usize) -> Load {
        Load {
            open,
            idle: open.saturating_sub(busy),
            busy,
            peak: busy,
            waiting,
            ceiling: 20,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn warms_up_to_min_and_stays_there_when_quiet() {
        let mut s = Sizer::new(2);
        let now = Instant::now();
        let p = s.step(&cfg(), load(0, 0, 0), now);
        assert_eq!(
            p,
            Plan {
                target: 2,
                open: 2,
                close: 0
            }
        );
        for i in 1..100 {
            let p = s.step(&cfg(), load(2, 0, 0), now + TICK * i);
            assert_eq!(
                p,
                Plan {
                    target: 2,
                    open: 0,
                    close: 0
                }
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_crowd_of_waiters_jumps_to_max_in_one_step() {
        let mut s = Sizer::new(2);
        let now = Instant::now();
        let p = s.step(&cfg(), load(2, 2, 198), now);
        assert_eq!(p.target, 20);
        assert_eq!(p.open, 18);
        // Never above max however many wait.
        let p = s.step(&cfg(), load(20, 20, 500), now + TICK);
        assert_eq!((p.target, p.open), (20, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_headroom_above_target_utilization_in_bounded_steps() {
        let mut s = Sizer::new(2);
        let now = Instant::now();
        // 2 busy of 2: headroom rounds down, so a light load wants no spare.
        assert_eq!(s.step(&cfg(), load(2, 2, 0), now).target, 2);
        // 8 busy wants 10 (8 / 0.8); the step is bounded by half the target (at least 1).
        let p = s.step(&cfg(), load(8, 8, 0), now + TICK);
        assert_eq!(p.target, 3, "from 2, +max(1, 2/2)");
        let p = s.step(&cfg(), load(8, 8, 0), now + TICK * 2);
        assert_eq!(p.target, 4, "from 3, +max(1, 3/2)");
        let p = s.step(&cfg(), load(8, 8, 0), now + TICK * 3);
        assert_eq!(p.target, 6);
        let p = s.step(&cfg(), load(8, 8, 0), now + TICK * 4);
        assert_eq!((p.target, p.open), (9, 1));
        let p = s.step(&cfg(), load(9, 8, 0), now + TICK * 5);
        assert_eq!((p.target, p.open), (10, 1));
        // 8 of 10 busy is exactly 80%: stable.
        let p = s.step(&cfg(), load(10, 8, 0), now + TICK * 6);
        assert_eq!((p.target, p.open, p.close), (10, 0, 0));
    }

    /// One 1 ms transaction per second: every snapshot sees 0 busy, but the peak between
    /// steps sees 1 each second. The pool keeps its one connection for good.
    #[tokio::test(start_paused = true)]
    async fn short_transactions_between_steps_are_demand() {
        let mut c = cfg();
        c.min = 0;
        let mut s = Sizer::new(0);
        let mut t = Instant::now();
        for i in 0..600 {
            t += TICK;
            let mut l = load(1, 0, 0);
            l.peak = usize::from(i % 10 == 0);
            let p = s.step(&c, l, t);
            if i > 0 {
                assert_eq!((p.target, p.open, p.close), (1, 0, 0), "step {i}");
            }
        }
        // Demand really stops: after shrink_delay the target falls to min_size.
        for _ in 0..51 {
            t += TICK;
            s.step(&c, load(1, 0, 0), t);
        }
        assert_eq!(s.target(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shrinks_only_after_the_delay_and_only_to_the_window_peak() {
        let mut s = Sizer::new(2);
        let t0 = Instant::now();
        s.step(&cfg(), load(2, 2, 100), t0);
        assert_eq!(s.target(), 20);
        // Load drops to 4 busy (wants 5), with one blip to 8 busy (wants 10).
        // The window opens at the first low sample; 50 more ticks are 5 s.
        let mut t = t0;
        for i in 0..50 {
            t += TICK;
            let busy = if i == 20 { 8 } else { 4 };
            let p = s.step(&cfg(), load(20, busy, 0), t);
            assert_eq!(
                (p.target, p.close),
                (20, 0),
                "no shrink before 5 s (step {i})"
            );
        }
        t += TICK;
        let p = s.step(&cfg(), load(20, 4, 0), t);
        assert_eq!(
            p.target, 10,
            "shrinks to the window's peak, not the last sample"
        );
        assert_eq!(p.close, 5, "half the excess per step");
        // The next shrink needs another full window.
        for _ in 0..50 {
            t += TICK;
            assert_eq!(s.step(&cfg(), load(10, 4, 0), t).target, 10);
        }
        t += TICK;
        assert_eq!(s.step(&cfg(), load(10, 4, 0), t).target, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_mid_window_cancels_the_shrink() {
        let mut s = Sizer::new(2);
        let mut t = Instant::now();
        s.step(&cfg(), load(2, 2, 30), t);
        for i in 0..100 {
            t += TICK;
            // Quiet, except a full burst every 3 s: never 5 s in a row below target.
            let (busy, waiting) = if i % 30 == 29 { (20, 5) } else { (0, 0) };
            let p = s.step(&cfg(), load(20, busy, waiting), t);
            assert_eq!(p.target, 20, "step {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ceiling_caps_the_target_and_closes_idle_excess() {
        let mut s = Sizer::new(2);
        let now = Instant::now();
        s.step(&cfg(), load(20, 20, 10), now);
        let mut l = load(20, 4, 0);
        l.ceiling = 6;
        let p = s.step(&cfg(), l, now + TICK);
        assert_eq!(p.target, 6);
        assert_eq!(p.close, 7);
    }
}
