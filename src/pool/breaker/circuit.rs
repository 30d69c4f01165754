//! A circuit breaker per upstream pool: Closed, Open, HalfOpen, with one transition
//! function.
//!
//! Closed counts consecutive failures (connect, authentication, health check); at the
//! threshold it opens. Open rejects work that needs a new connection until a backoff
//! (exponential in the number of consecutive openings, with jitter, capped) has passed,
//! then lets exactly one trial through (HalfOpen). The trial's success closes the breaker;
//! its failure reopens it with a longer backoff.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// First backoff; doubles with each consecutive opening.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_cap: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 3,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

/// What happened, fed to the one transition function.
#[derive(Debug, Clone)]
pub enum Event {
    Success,
    Failure(String),
    /// Time passed (an Open breaker whose backoff ran out becomes HalfOpen).
    Tick,
    /// A trial is being let through (HalfOpen allows one at a time).
    TrialStarted,
}

/// May a new connection attempt proceed?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Yes, as the single trial of a HalfOpen breaker.
    Trial,
    /// No: the upstream is considered down.
    No {
        down_for: Duration,
        retry_in: Duration,
        last_error: String,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    pub settings: BreakerSettings,
    pub state: State,
    consecutive_failures: u32,
    /// Consecutive openings without a success in between (backoff exponent).
    openings: u32,
    /// When the current outage began (first failure of the run).
    down_since: Option<Instant>,
    /// When an Open breaker allows its next trial.
    retry_at: Option<Instant>,
    trial_in_flight: bool,
    pub last_error: Option<String>,
}

/// The breaker as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerView {
    pub state: State,
    pub consecutive_failures: u32,
    pub down_for_secs: Option<f64>,
    pub retry_in_secs: Option<f64>,
    pub last_error: Option<String>,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Breaker {
            settings,
            state: State::Closed,
            consecutive_failures: 0,
            openings: 0,
            down_since: None,
            retry_at: None,
            trial_in_flight: false,
            last_error: None,
        }
    }

    /// The one transition function. Returns the new state when it changed.
    pub fn on(&mut self, event: Event, now: Instant) -> Option<State> {
        let before = self.state;
        match (self.state, event) {
            (_, Event::Success) => {
                self.state = State::Closed;
                self.consecutive_failures = 0;
                self.openings = 0;
                self.down_since = None;
                self.retry_at = None;
                self.trial_in_flight = false;
            }
            (State::Closed, Event::Failure(e)) => {
                self.consecutive_failures += 1;
                self.down_since.get_or_insert(now);
                self.last_error = Some(e);
                if self.consecutive_failures >= self.settings.failure_threshold.max(1) {
                    self.open(now);
                }
            }
            (State::HalfOpen, Event::Failure(e)) => {
                self.consecutive_failures += 1;
                self.last_error = Some(e);
                self.open(now);
            }
            (State::Open, Event::Failure(e)) => {
                // A failure reported late (an attempt started before opening).
                self.last_error = Some(e);
            }
            (State::Open, Event::Tick) => {
                if self.retry_at.is_some_and(|t| now >= t) {
                    self.state = State::HalfOpen;
                    self.trial_in_flight = false;
                }
            }
            (State::HalfOpen, Event::TrialStarted) => self.trial_in_flight = true,
            (_, Event::Tick) | (_, Event::TrialStarted) => {}
        }
        (self.state != before).then_some(self.state)
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open;
        self.trial_in_flight = false;
        let exp = self.openings.min(16);
        self.openings += 1;
        let base = self.settings.backoff_base.saturating_mul(1u32 << exp);
        let capped = base.min(self.settings.backoff_cap);
        // Up to +-20% jitter so sidecars sharing a database do not retry in lockstep.
        let jitter = 0.8 + rand::random::<f64>() * 0.4;
        self.retry_at = Some(now + capped.mul_f64(jitter));
    }

    /// Asks whether a new connection attempt may start now; a HalfOpen breaker admits a
    /// single trial and records it.
    pub fn admit(&mut self, now: Instant) -> (Admit, Option<State>) {
        let changed = self.on(Event::Tick, now);
        let admit = match self.state {
            State::Closed => Admit::Yes,
            State::HalfOpen if !self.trial_in_flight => {
                self.on(Event::TrialStarted, now);
                Admit::Trial
            }
            State::HalfOpen | State::Open => Admit::No {
                down_for: self.down_since.map(|t| now - t).unwrap_or_default(),
                retry_in: self
                    .retry_at
                    .map(|t| t.saturating_duration_since(now))
                    .unwrap_or_default(),
                last_error: self.last_error.clone().unwrap_or_default(),
            },
        };
        (admit, changed)
    }

    pub fn view(&self, now: Instant) -> BreakerView {
        BreakerView {
            state: self.state,
            consecutive_failures: self.consecutive_failures,
            down_for_secs: self.down_since.map(|t| (now - t).as_secs_f64()),
            retry_in_secs: self
                .retry_at
                .filter(|_| self.state == State::Open)
                .map(|t| t.saturating_duration_since(now).as_secs_f64()),
            last_error: self.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_threshold: 3,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(8),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_half_opens_after_backoff() {
        let mut b = Breaker::new(settings());
        let t0 = Instant::now();
        assert_eq!(b.on(Event::Failure("refused".into()), t0), None);
        assert_eq!(b.on(Event::Failure("refused".into()), t0), None);
        assert_eq!(
            b.on(Event::Failure("refused".into()), t0),
            Some(State::Open)
        );
        assert!(matches!(b.admit(t0).0, Admit::No { .. }));
        // Backoff is 1 s +-20%: closed to trials before 0.8 s, open to one after 1.2 s.
        assert!(matches!(
            b.admit(t0 + Duration::from_millis(790)).0,
            Admit::No { .. }
        ));
        let (a, changed) = b.admit(t0 + Duration::from_millis(1210));
        assert_eq!((a, changed), (Admit::Trial, Some(State::HalfOpen)));
        // Only one trial at a time.
        assert!(matches!(
            b.admit(t0 + Duration::from_millis(1300)).0,
            Admit::No { .. }
        ));
        assert_eq!(
            b.on(Event::Success, t0 + Duration::from_millis(1400)),
            Some(State::Closed)
        );
        assert_eq!(b.admit(t0 + Duration::from_millis(1500)).0, Admit::Yes);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_trial_reopens_with_longer_capped_backoff() {
        let mut b = Breaker::new(settings());
        let mut now = Instant::now();
        for _ in 0..3 {
            b.on(Event::Failure("x".into()), now);
        }
        let mut last_wait = Duration::ZERO;
        for round in 0..6 {
            // Step until a trial is admitted; record how long that took.
            let start = now;
            loop {
                now += Duration::from_millis(50);
                if b.admit(now).0 == Admit::Trial {
                    break;
                }
            }
            let waited = now - start;
            if round < 3 {
                assert!(
                    waited > last_wait.mul_f64(1.2),
                    "backoff grows: {waited:?} after {last_wait:?}"
                );
            }
            assert!(
                waited <= Duration::from_millis(9_700),
                "capped at 8 s + jitter: {waited:?}"
            );
            last_wait = waited;
            assert_eq!(
                b.on(Event::Failure("still down".into()), now),
                Some(State::Open)
            );
        }
        let v = b.view(now);
        assert_eq!(v.state, State::Open);
        assert!(v.down_for_secs.unwrap_or(0.0) > 10.0);
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_failure_count() {
        let mut b = Breaker::new(settings());
        let t = Instant::now();
        b.on(Event::Failure("x".into()), t);
        b.on(Event::Failure("x".into()), t);
        b.on(Event::Success, t);
        b.on(Event::Failure("x".into()), t);
        b.on(Event::Failure("x".into()), t);
        assert_eq!(b.state, State::Closed);
    }
}
