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
//! it again. That is AIMD with synchronised congestion signals, which converges to
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

    /// A headroom sample. With free slots, the ceiling grows by half of them at once
    /// (several sidecars see the same free slots, so none takes them all). With none,
    /// a `contended` pool (clients queued, every connection busy) holding `own`
    /// connections cuts some if others are busy too, at most once per interval. Every
    /// contended sidecar sees the same full server, so the cuts are synchronised. The cut
    /// is 0.3 of `own` times `own / others' busy` (at most half of `own`): a pool
    /// holding more than its neighbours gives up more than in proportion, so shares are
    /// pulled together hard while equal shares lose little (0.3 divided by the
    /// neighbours' count). The result is a fraction of a connection: the remainder is
    /// carried to the next cut (error diffusion), so small pools give up their exact
    /// share over time (rounding up would cut them harder than large ones; down, never).
    pub fn on_headroom(
        &mut self,
        cfg: &AimdConfig,
        h: Headroom,
        own: usize,
        contended: bool,
        now: Instant,
    ) -> Option<Change> {
        if !cfg.enabled {
            return None;
        }
        let from = self.ceiling;
        let free = h.free();
        if free > 0 {
            if from >= cfg.max {
                return None;
            }
            self.ceiling = from + 1;
            self.last_change = Some(now);
            return Some((from, self.ceiling));
        }
        let quiet = self.quiet_until.is_some_and(|t| now < t);
        if !contended || !h.others_busy(own) || quiet {
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
        self.cut_to(cfg, base.saturating_sub(cut), now)
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

    fn aimd_cfg(enabled: bool) -> AimdConfig {
        AimdConfig {
            enabled,
            max: 10,
            floor: 1,
            interval: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_stops_growth_then_grows_one_per_interval() {
        let c = aimd_cfg(true);
        let mut a = Aimd::new(10);
        let t0 = Instant::now();
        assert_eq!(a.on_refused(&c, 4, t0), Some((10, 4)), "holds what it has");
        // Another refusal holds again and restarts the wait for the next raise.
        assert_eq!(a.on_refused(&c, 4, t0 + Duration::from_millis(500)), None);
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
                (5, 1500),
                (6, 2500),
                (7, 3500),
                (8, 4500),
                (9, 5500),
                (10, 6500)
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
    async fn sharp_latency_rise_halves_but_noise_does_not() {
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

    fn h(limit: usize, used: usize, busy: usize) -> Headroom {
        Headroom { limit, used, busy }
    }

    #[test]
    fn pressure_means_nearly_full_with_busy_neighbours() {
        assert!(h(15, 14, 10).pressed(3));
        assert!(!h(15, 13, 10).pressed(3), "two free of 15");
        assert!(h(100, 90, 80).pressed(3));
        assert!(!h(100, 89, 80).pressed(3));
        assert!(!h(15, 15, 3).pressed(3), "nobody else busy");
        assert!(h(15, 15, 4).others_busy(3));
        assert!(!h(15, 14, 4).others_busy(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_pool_never_cuts_without_busy_neighbours() {
        let c = aimd_cfg(true);
        let mut a = Aimd::new(10);
        let mut t = Instant::now();
        for _ in 0..100 {
            t += TICK;
            // Room on the server.
            assert_eq!(a.on_headroom(&c, h(100, 12, 12), 10, true, t), None);
            // Full, but only with our own connections.
            assert_eq!(a.on_headroom(&c, h(10, 10, 10), 10, true, t), None);
            // Full, the rest held idle by another application.
            assert_eq!(a.on_headroom(&c, h(15, 15, 10), 10, true, t), None);
            assert_eq!(a.tick(&c, t), None);
        }
        assert_eq!(a.ceiling(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_server_with_busy_neighbours_cuts_big_shares_most_and_free_slots_regrow() {
        let c = aimd_cfg(true);
        let mut a = Aimd::new(10);
        let t0 = Instant::now();
        let full = h(15, 15, 15);
        assert_eq!(
            a.on_headroom(&c, full, 10, false, t0),
            None,
            "not contended"
        );
        // Holding 10 of 15 busy (twice the others' 5): 10 x 0.3 x 2 = 6.
        assert_eq!(a.on_headroom(&c, full, 10, true, t0), Some((10, 4)));
        // Once per interval.
        let soon = t0 + Duration::from_millis(900);
        assert_eq!(a.on_headroom(&c, full, 4, true, soon), None);
        // Holding 4 of 15 busy (the others 11): 4 x 0.3 x 4/11 = 0.44 of a connection
        // per sample, carried over: the third sample cuts one.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(a.on_headroom(&c, full, 4, true, later), None);
        assert_eq!(a.on_headroom(&c, full, 4, true, later), None);
        assert_eq!(a.on_headroom(&c, full, 4, true, later), Some((4, 3)));
        // A small pool next to big ones owes 2 x 0.3 x 2/13 = 0.09 of a connection per
        // sample: it gives one up at the 11th.
        let t1 = t0 + Duration::from_secs(2);
        let mut small = Aimd::new(10);
        let samples = (1..=20)
            .find(|_| small.on_headroom(&c, full, 2, true, t1).is_some())
            .unwrap_or(0);
        assert_eq!((samples, small.ceiling()), (11, 1));
        let t2 = t0 + Duration::from_secs(4);
        // Free slots: one more per sample, up to max.
        assert_eq!(a.on_headroom(&c, h(15, 12, 12), 3, true, t2), Some((3, 4)));
        a = Aimd::new(10);
        assert_eq!(a.on_headroom(&c, h(15, 9, 9), 10, true, t2), None, "at max");
        let off = aimd_cfg(false);
        assert_eq!(a.on_headroom(&off, full, 10, true, t2), None);
    }

    /// `n` sidecars sharing 15 upstream slots, each wanting 10, starting from one that
    /// holds 10 and the others 1. A refusal happens when a sidecar tries to grow while
    /// the slots are all taken (it then pauses its attempts briefly, as the pool does).
    /// A sidecar at its ceiling with clients queued samples the headroom every half
    /// interval, as the pool does. Within 10 s each is within one of a fair share.
    /// (Two sidecars converge as well, but each cut of a pair is 30% of an equal share:
    /// they hold about 13 of the 15 slots on average.)
    fn fleet(n: usize, seed: u64) -> Vec<f64> {
        let c = aimd_cfg(true);
        let slots = 15usize;
        let t0 = Instant::now();
        let mut a: Vec<Aimd> = (0..n).map(|_| Aimd::new(10)).collect();
        let mut held: Vec<usize> = (0..n).map(|i| if i == 0 { 10 } else { 1 }).collect();
        let mut paused_until = vec![t0; n];
        let mut last_sample = vec![t0; n];
        let mut t = t0;
        let mut shares = vec![0usize; n];
        let mut rng = seed;
        let mut rand = move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as usize
        };
        let steps = 400;
        for step in 0..steps {
            t += TICK;
            // Who gets to a freed slot first varies, as between real processes.
            let first = rand() % n;
            for i in (0..n).map(|k| (k + first) % n) {
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
                } else if t - last_sample[i] >= c.interval / 2 {
                    last_sample[i] = t;
                    let used = held.iter().sum();
                    a[i].on_headroom(&c, h(slots, used, used), held[i], true, t);
                    held[i] = held[i].min(a[i].ceiling());
                }
            }
            if step >= 100 {
                for i in 0..n {
                    shares[i] += held[i];
                }
            }
        }
        shares
            .iter()
            .map(|s| *s as f64 / (steps - 100) as f64)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn sidecars_sharing_a_full_server_converge_to_fair_shares() {
        for (n, seed) in [3, 4, 5]
            .iter()
            .flat_map(|n| [(*n, 1u64), (*n, 7), (*n, 12345)])
        {
            let avg = fleet(n, seed);
            let fair = 15.0 / n as f64;
            let sd = (avg.iter().map(|x| (x - fair).powi(2)).sum::<f64>() / n as f64).sqrt();
            println!("{n} sidecars (seed {seed}): {avg:.2?} rms {sd:.2}");
            for x in &avg {
                assert!(
                    (x - fair).abs() <= 1.0,
                    "{n} sidecars, within one of {fair}: {avg:?}"
                );
            }
            let used: f64 = avg.iter().sum();
            assert!(used > 12.0, "{n} sidecars: most slots in use: {used}");
        }
    }
}
