//! Per-pool traffic totals for the console's SHOW STATS family, and their averages over
//! the last complete `STATS_PERIOD` (as PgBouncer's `stats_period`): a task snapshots the
//! totals every period, and averages are the difference of the last two snapshots.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

use crate::control::{Stats, Totals};

/// Averages cover this much time (PgBouncer's default stats_period).
pub const STATS_PERIOD: Duration = Duration::from_secs(60);

/// Per-second rates and per-event means over the last complete period.
#[derive(Clone, Copy, Default, Debug)]
pub struct Averages {
    pub server_assignment_count: u64,
    pub xact_count: u64,
    pub query_count: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}

fn averages(old: &Totals, new: &Totals, secs: f64) -> Averages {
    let d = |a: u64, b: u64| b.saturating_sub(a);
    let rate = |a: u64, b: u64| (d(a, b) as f64 / secs) as u64;
    let mean = |t0: u64, t1: u64, n0: u64, n1: u64| d(t0, t1).checked_div(d(n0, n1)).unwrap_or(0);
    Averages {
        server_assignment_count: rate(old.server_assignment_count, new.server_assignment_count),
        xact_count: rate(old.xact_count, new.xact_count),
        query_count: rate(old.query_count, new.query_count),
        recv: rate(old.received, new.received),
        sent: rate(old.sent, new.sent),
        xact_time: mean(old.xact_time, new.xact_time, old.xact_count, new.xact_count),
        query_time: mean(
            old.query_time,
            new.query_time,
            old.query_count,
            new.query_count,
        ),
        wait_time: mean(
            old.wait_time,
            new.wait_time,
            old.server_assignment_count,
            new.server_assignment_count,
        ),
    }
}

/// The last two snapshots per pool name.
#[derive(Default)]
struct Periods {
    last: HashMap<String, Totals>,
    averages: HashMap<String, Averages>,
}

fn periods() -> &'static Mutex<Periods> {
    static P: OnceLock<Mutex<Periods>> = OnceLock::new();
    P.get_or_init(Mutex::default)
}

/// Takes one snapshot of every pool and recomputes the averages.
fn roll(stats: &Stats, secs: f64) {
    let mut p = periods().lock();
    let mut last = HashMap::new();
    let mut avgs = HashMap::new();
    for pool in stats.pools() {
        let now = pool.totals();
        let before = p.last.get(pool.name()).copied().unwrap_or_default();
        avgs.insert(pool.name().to_string(), averages(&before, &now, secs));
        last.insert(pool.name().to_string(), now);
    }
    p.last = last;
    p.averages = avgs;
}

/// Starts the period task (from the admin port's start).
pub fn spawn_sampler(stats: Stats) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STATS_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            roll(&stats, STATS_PERIOD.as_secs_f64());
        }
    });
}

/// Averages of the last complete period (zero before the first one ends).
pub fn averages_of(pool: &str) -> Averages {
    periods()
        .lock()
        .averages
        .get(pool)
        .copied()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_means_over_a_period() {
        let a = Totals::default();
        let b = Totals {
            xact_count: 600,
            xact_time: 1_200_000,
            query_count: 1200,
            query_time: 600_000,
            server_assignment_count: 60,
            wait_time: 6_000,
            received: 6000,
            sent: 60_000,
            server_closed_count: 1,
        };
        let avg = averages(&a, &b, 60.0);
        assert_eq!(avg.xact_count, 10);
        assert_eq!(avg.xact_time, 2000);
        assert_eq!(avg.query_count, 20);
        assert_eq!(avg.query_time, 500);
        assert_eq!(avg.wait_time, 100);
        assert_eq!(avg.recv, 100);
        assert_eq!(avg.sent, 1000);
        assert_eq!(averages(&b, &b, 60.0).xact_time, 0);
    }
}
