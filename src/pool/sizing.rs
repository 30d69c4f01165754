//! Pure controllers for the pool's size: elastic sizing (how many connections to keep)
//! and congestion control (how many the upstream lets us have).
//!
//! Both are plain structs with step functions that take the time as an argument, so the
//! pool's maintenance task drives them with real time and the tests below drive them
//! with a paused clock, exactly.
//!
//! - [`Sizer`] turns load (busy connections and waiting clients) into a target size
//!   between `min_size` and the ceiling. It grows at once (waiting clients are the signal
//!   that matters) and shrinks only after load has stayed below the target for
//!   `shrink_delay`, down to the highest demand seen in that window: hysteresis, so a
//!   pool does not flap between sizes on a bursty load.
//! - [`Aimd`] is the ceiling: `max_size` while the upstream accepts every connection,
//!   cut multiplicatively when it refuses one with 53300 (too_many_connections) or when
//!   connecting gets sharply slower, and raised by one per interval without trouble.
//!   Several sidecars that share a database each run their own copy; AIMD's property is
//!   that they converge to a fair share of `max_connections` without talking to each
//!   other.

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
    /// Connections leased to clients.
    pub busy: usize,
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

    /// Size that serves `load` at the target utilization, within [floor, limit].
    fn wanted(cfg: &SizingConfig, load: &Load, floor: usize, limit: usize) -> usize {
        let demand = load.busy + load.waiting;
        let u = cfg.target_utilization.clamp(0.05, 1.0);
        let want = (demand as f64 / u).ceil() as usize;
        want.clamp(floor, limit)
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

/// Intervals after a refusal during which a pool does not yield (`Aimd::yield_one`).
const YIELD_QUIET: u32 = 3;
/// Multiplicative decrease factor.
const DECREASE: f64 = 0.5;
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
    /// Last refusal (cut or not): a pool refused recently gets congestion signals of its
    /// own and does not yield.
    last_refused: Option<Instant>,
}

/// A ceiling change: (from, to).
pub type Change = (usize, usize);

/// Why a ceiling changed by `Aimd::yield_one` (for logs).
pub const YIELD: &str = "yielding a connection under contention";

impl Aimd {
    pub fn new(max: usize) -> Aimd {
        Aimd {
            ceiling: max,
            last_change: None,
            quiet_until: None,
            baseline: None,
            was_cut: false,
            last_refused: None,
        }
    }

    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The upstream refused a connection as too many (53300). `established` is how many
    /// connections this pool holds; the cut is from that, not from a ceiling that was
    /// never reached.
    pub fn on_refused(
        &mut self,
        cfg: &AimdConfig,
        established: usize,
        now: Instant,
    ) -> Option<Change> {
        if !cfg.enabled {
            return None;
        }
        self.last_refused = Some(now);
        if self.quiet_until.is_some_and(|t| now < t) {
            return None;
        }
        let from = self.ceiling;
        let base = from.min(established + 1);
        let to = ((base as f64 * DECREASE) as usize)
            .max(cfg.floor.min(cfg.max))
            .max(1);
        self.quiet_until = Some(now + cfg.interval);
        self.last_change = Some(now);
        self.ceiling = to;
        self.was_cut |= to < from;
        (to != from).then_some((from, to))
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
            return self.on_refused(cfg, established, now);
        }
        None
    }

    /// A pool at its ceiling with clients queued gives one connection up (the ceiling
    /// drops by one and grows back an interval later, like any other change). Without
    /// this, a sidecar that got to its max first would never make a connection attempt
    /// and so never learn that others are starved; with it, another sidecar can take the
    /// slot, and this one's attempt to grow back is refused and cut. A pool refused
    /// within the last `YIELD_QUIET` intervals does not yield: it already meets the
    /// congestion, and yielding would only slow a starved pool's growth.
    pub fn yield_one(&mut self, cfg: &AimdConfig, now: Instant) -> Option<Change> {
        let from = self.ceiling;
        let refused_lately = self
            .last_refused
            .is_some_and(|t| now.duration_since(t) < cfg.interval * YIELD_QUIET);
        if !cfg.enabled || from <= cfg.floor.max(1) || refused_lately {
            return None;
        }
        self.ceiling -= 1;
        self.last_change = Some(now);
        Some((from, self.ceiling))
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
        // 4 busy of 4 open: 100% > 80%, wants 5; step is bounded by half the target.
        // 2 of 2 busy wants 3 (2 / 0.8, rounded up).
        assert_eq!(s.step(&cfg(), load(2, 2, 0), now).target, 3);
        // 4 of 4 busy wants 5; the step is bounded by half the target (at least 1).
        let p = s.step(&cfg(), load(4, 4, 0), now + TICK);
        assert_eq!(p.target, 4, "from 3, +max(1, 3/2)");
        let p = s.step(&cfg(), load(4, 4, 0), now + TICK * 2);
        assert_eq!((p.target, p.open), (5, 1));
        // 4 of 5 busy is exactly 80%: stable.
        let p = s.step(&cfg(), load(5, 4, 0), now + TICK * 4);
        assert_eq!((p.target, p.open, p.close), (5, 0, 0));
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

    fn aimd_cfg(enabled: bool) -> AimdConfig {
        AimdConfig {
            enabled,
            max: 10,
            floor: 1,
            interval: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_halves_once_per_burst_then_grows_one_per_interval() {
        let c = aimd_cfg(true);
        let mut a = Aimd::new(10);
        let t0 = Instant::now();
        assert_eq!(a.on_refused(&c, 7, t0), Some((10, 4)));
        // More refusals from the same burst do not cut again.
        assert_eq!(a.on_refused(&c, 3, t0 + Duration::from_millis(500)), None);
        assert_eq!(a.ceiling(), 4);
        let mut t = t0;
        let mut grown = Vec::new();
        for _ in 0..80 {
            t += TICK;
            if let Some((_, to)) = a.tick(&c, t) {
                grown.push((to, (t - t0).as_millis()));
            }
        }
        assert_eq!(
            grown,
            vec![
                (5, 1000),
                (6, 2000),
                (7, 3000),
                (8, 4000),
                (9, 5000),
                (10, 6000)
            ]
        );
        assert_eq!(
            a.tick(&c, t + Duration::from_secs(5)),
            None,
            "never above max"
        );
        assert!(
            a.take_recovered(10),
            "back at max after a cut is reported once"
        );
        assert!(!a.take_recovered(10));
    }

    #[tokio::test(start_paused = true)]
    async fn floor_holds_and_disabled_means_max() {
        let mut c = aimd_cfg(true);
        c.floor = 3;
        let mut a = Aimd::new(10);
        let t0 = Instant::now();
        assert_eq!(a.on_refused(&c, 0, t0), Some((10, 3)));
        assert_eq!(a.on_refused(&c, 0, t0 + Duration::from_secs(2)), None);
        assert_eq!(a.ceiling(), 3);
        let off = aimd_cfg(false);
        assert_eq!(a.on_refused(&off, 2, t0 + Duration::from_secs(4)), None);
        assert_eq!(a.tick(&off, t0 + Duration::from_secs(4)), Some((3, 10)));
    }

    #[tokio::test(start_paused = true)]
    async fn sharp_latency_rise_cuts_but_noise_does_not() {
        let c = aimd_cfg(true);
        let mut a = Aimd::new(10);
        let mut t = Instant::now();
        for ms in [5, 6, 4, 7, 5, 30, 5] {
            t += TICK;
            assert_eq!(a.on_connected(&c, Duration::from_millis(ms), 8, t), None);
        }
        t += TICK;
        assert_eq!(
            a.on_connected(&c, Duration::from_millis(900), 8, t),
            Some((10, 4))
        );
    }

    /// Three sidecars sharing 15 upstream slots, each wanting 10, starting from an
    /// unfair 10/3/2. A refusal happens when a sidecar tries to grow while the slots are
    /// all taken (it then pauses its attempts briefly, as the pool does). A sidecar at
    /// its ceiling yields a connection about once per interval times max/ceiling, as the
    /// pool does under contention. They must settle near 5 each, with the slots in use.
    #[tokio::test(start_paused = true)]
    async fn three_sidecars_converge_to_a_fair_share() {
        let c = aimd_cfg(true);
        let slots = 15usize;
        let mut a = [Aimd::new(10), Aimd::new(10), Aimd::new(10)];
        let mut held = [10usize, 3, 2];
        let mut paused_until = [Instant::now(); 3];
        let mut last_yield = [Instant::now(); 3];
        let t0 = Instant::now();
        let mut t = t0;
        let mut shares = [0usize; 3];
        let mut rng = 12345u64;
        let mut rand = move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as usize
        };
        for step in 0..4000 {
            t += TICK;
            // Who gets to a freed slot first varies, as between real processes.
            let first = rand() % 3;
            for i in (0..3).map(|k| (k + first) % 3) {
                a[i].tick(&c, t);
                held[i] = held[i].min(a[i].ceiling());
                if held[i] < a[i].ceiling() {
                    if t < paused_until[i] {
                        continue;
                    }
                    if held.iter().sum::<usize>() < slots {
                        held[i] += 1;
                    } else {
                        a[i].on_refused(&c, held[i], t);
                        paused_until[i] = t + Duration::from_millis(250);
                    }
                } else {
                    // +-20% jitter, as the pool applies.
                    let every = c
                        .interval
                        .mul_f64(10.0 / a[i].ceiling() as f64)
                        .mul_f64(0.8 + (rand() % 41) as f64 / 100.0);
                    if t - last_yield[i] >= every {
                        last_yield[i] = t;
                        a[i].yield_one(&c, t);
                        held[i] = held[i].min(a[i].ceiling());
                    }
                }
            }
            // Averaged over the last 5 minutes (after 100 s to converge).
            if step >= 1000 {
                for i in 0..3 {
                    shares[i] += held[i];
                }
            }
        }
        let avg: Vec<f64> = shares.iter().map(|s| *s as f64 / 3000.0).collect();
        for x in &avg {
            assert!((3.8..=5.5).contains(x), "fair share near 5: {avg:?}");
        }
        let used: f64 = avg.iter().sum();
        assert!(used > 12.5, "most slots in use: {used}");
    }

    #[tokio::test(start_paused = true)]
    async fn yield_gives_one_back_and_regrows_after_an_interval() {
        let c = aimd_cfg(true);
        let mut a = Aimd::new(10);
        let t0 = Instant::now();
        assert_eq!(a.yield_one(&c, t0), Some((10, 9)));
        assert_eq!(a.tick(&c, t0 + Duration::from_millis(900)), None);
        assert_eq!(a.tick(&c, t0 + Duration::from_secs(1)), Some((9, 10)));
        let off = aimd_cfg(false);
        assert_eq!(a.yield_one(&off, t0), None);
        // Refused lately: no yield for 3 intervals.
        let t1 = t0 + Duration::from_secs(2);
        a.on_refused(&c, 9, t1);
        assert_eq!(a.yield_one(&c, t1 + Duration::from_millis(2900)), None);
        assert!(a.yield_one(&c, t1 + Duration::from_secs(3)).is_some());
    }
}
