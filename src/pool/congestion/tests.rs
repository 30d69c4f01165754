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
        assert_eq!(
            a.on_headroom(&c, h(100, 12, 12), 10, Demand::Queued, t),
            None
        );
        // Full, but only with our own connections.
        assert_eq!(
            a.on_headroom(&c, h(10, 10, 10), 10, Demand::Queued, t),
            None
        );
        // Full, the rest held idle by another application.
        assert_eq!(
            a.on_headroom(&c, h(15, 15, 10), 10, Demand::Queued, t),
            None
        );
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
        a.on_headroom(&c, full, 10, Demand::Met, t0),
        None,
        "not contended"
    );
    // Holding 10 of 15 busy (twice the others' 5): 10 x 0.3 x 2 = 6.
    assert_eq!(
        a.on_headroom(&c, full, 10, Demand::Queued, t0),
        Some((10, 4))
    );
    // Once per interval.
    let soon = t0 + Duration::from_millis(900);
    assert_eq!(a.on_headroom(&c, full, 4, Demand::Queued, soon), None);
    // Holding 4 of 15 busy (the others 11): 4 x 0.3 x 4/11 = 0.44 of a connection
    // per sample, carried over: the third sample cuts one.
    let later = t0 + Duration::from_secs(1);
    assert_eq!(a.on_headroom(&c, full, 4, Demand::Queued, later), None);
    assert_eq!(a.on_headroom(&c, full, 4, Demand::Queued, later), None);
    assert_eq!(
        a.on_headroom(&c, full, 4, Demand::Queued, later),
        Some((4, 3))
    );
    // A small pool next to big ones owes 2 x 0.3 x 2/13 = 0.09 of a connection per
    // sample: it gives one up at the 11th.
    let t1 = t0 + Duration::from_secs(2);
    let mut small = Aimd::new(10);
    let samples = (1..=20)
        .find(|_| small.on_headroom(&c, full, 2, Demand::Queued, t1).is_some())
        .unwrap_or(0);
    assert_eq!((samples, small.ceiling()), (11, 1));
    let t2 = t0 + Duration::from_secs(4);
    // Free slots: one more per sample, up to max.
    assert_eq!(
        a.on_headroom(&c, h(15, 12, 12), 3, Demand::Queued, t2),
        Some((3, 4))
    );
    a = Aimd::new(10);
    assert_eq!(
        a.on_headroom(&c, h(15, 9, 9), 10, Demand::Queued, t2),
        None,
        "at max"
    );
    let off = aimd_cfg(false);
    assert_eq!(a.on_headroom(&off, full, 10, Demand::Queued, t2), None);
}

/// Sidecars sharing 15 upstream slots, each with a max of 10; sidecar `i` has
/// `demand[i]` clients (each keeps one connection busy) and starts holding `held[i]`.
/// A refusal happens when a sidecar tries to grow while the slots are all taken (it
/// then pauses its attempts briefly, as the pool does). A sidecar at its ceiling with
/// clients queued samples the headroom every half interval, one holding all its load
/// needs every interval, as the pool does. The slots each held, averaged after the
/// first 10 s, and how many times each cut its ceiling.
struct Run {
    shares: Vec<f64>,
    cuts: Vec<usize>,
}

fn fleet(demand: &[usize], held: &[usize], seconds: usize, seed: u64) -> Run {
    let n = demand.len();
    let c = aimd_cfg(true);
    let slots = 15usize;
    let t0 = Instant::now();
    let mut a: Vec<Aimd> = (0..n).map(|_| Aimd::new(10)).collect();
    let mut held = held.to_vec();
    let mut paused_until = vec![t0; n];
    let mut last_sample = vec![t0; n];
    let mut cuts = vec![0usize; n];
    let mut t = t0;
    let mut shares = vec![0usize; n];
    let mut rng = seed;
    let mut rand = move || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as usize
    };
    let steps = seconds * 10;
    for step in 0..steps {
        t += TICK;
        // Who gets to a freed slot first varies, as between real processes.
        let first = rand() % n;
        for i in (0..n).map(|k| (k + first) % n) {
            a[i].tick(&c, t);
            held[i] = held[i].min(a[i].ceiling());
            if held[i] < a[i].ceiling().min(demand[i]) {
                if t < paused_until[i] {
                    continue;
                }
                if held.iter().sum::<usize>() < slots {
                    held[i] += 1;
                } else {
                    a[i].on_refused(&c, held[i], t);
                    paused_until[i] = t + Duration::from_millis(250);
                }
                continue;
            }
            let (d, every) = if held[i] < demand[i] {
                (Demand::Queued, c.interval / 2)
            } else {
                (Demand::Saturated, c.interval)
            };
            if t - last_sample[i] >= every {
                last_sample[i] = t;
                let used = held.iter().sum();
                if let Some((from, to)) = a[i].on_headroom(&c, h(slots, used, used), held[i], d, t)
                {
                    cuts[i] += usize::from(to < from);
                }
                held[i] = held[i].min(a[i].ceiling());
            }
        }
        if step >= 100 {
            for i in 0..n {
                shares[i] += held[i];
            }
        }
    }
    Run {
        shares: shares
            .iter()
            .map(|s| *s as f64 / (steps - 100) as f64)
            .collect(),
        cuts,
    }
}

/// From one sidecar holding 10 and the others 1, each wanting 10: within 10 s each is
/// within one of a fair share. (Two sidecars converge as well, but each cut of a pair
/// is 30% of an equal share: they hold about 13 of the 15 slots on average.)
#[tokio::test(start_paused = true)]
async fn sidecars_sharing_a_full_server_converge_to_fair_shares() {
    for (n, seed) in [3, 4, 5]
        .iter()
        .flat_map(|n| [(*n, 1u64), (*n, 7), (*n, 12345)])
    {
        let held: Vec<usize> = (0..n).map(|i| if i == 0 { 10 } else { 1 }).collect();
        let avg = fleet(&vec![10; n], &held, 40, seed).shares;
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

/// One sidecar's load (8 clients) fits below its max and it holds all of it, while
/// its neighbours queue at 3 each: it has no queue, yet it gives up its excess.
#[tokio::test(start_paused = true)]
async fn a_sidecar_whose_load_fits_still_gives_up_its_excess() {
    for seed in [1u64, 7, 12345] {
        let run = fleet(&[10, 8, 8], &[3, 8, 3], 40, seed);
        println!(
            "demands [10, 8, 8] from [3, 8, 3] (seed {seed}): {:.2?}",
            run.shares
        );
        for x in &run.shares {
            assert!((x - 5.0).abs() <= 1.0, "within one of 5: {:?}", run.shares);
        }
    }
}

/// Two sidecars whose loads (8 and 7 clients) fit the 15 slots exactly: nobody wants
/// what a probe cut gives up, so such cuts back off to one per 64 s or less.
#[tokio::test(start_paused = true)]
async fn sidecars_that_fit_exactly_rarely_probe() {
    for seed in [1u64, 7, 12345] {
        let run = fleet(&[8, 7], &[8, 7], 300, seed);
        println!(
            "demands [8, 7] (seed {seed}): {:.2?}, cuts {:?}",
            run.shares, run.cuts
        );
        assert!(
            run.shares[0] >= 7.5 && run.shares[1] >= 6.5,
            "{:?}",
            run.shares
        );
        for c in &run.cuts {
            assert!(*c <= 12, "few probe cuts in 300 s: {:?}", run.cuts);
        }
    }
}
