//! Per-source rate limit on CancelRequests. A blind guess at a cancel key is hopeless
//! (31-bit pid, 32-bit secret), but every guess costs the proxy a connection and a
//! lookup; a token bucket per source address caps that cost.
//!
//! Each request takes a token and a forwarded cancel gives it back, so a client
//! cancelling its own queries is never limited; only requests that forward nothing
//! (an unknown key, or a query already finished) use the budget. An address whose bucket
//! is empty has its requests closed without a lookup, valid keys included, until tokens
//! refill. Memory is bounded: at most [`MAX_SOURCES`] addresses are tracked, and
//! beyond that every untracked address shares one bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::cancel::CancelRegistry;

/// Requests an address may send at once.
pub const BURST: f64 = 20.0;
/// Tokens an address gets back per second.
pub const REFILL_PER_SEC: f64 = 10.0;
/// Addresses tracked at most.
pub const MAX_SOURCES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Bucket {
            tokens: BURST,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + secs * REFILL_PER_SEC).min(BURST);
        self.at = now;
    }
}

/// What became of one CancelRequest: the `result` label of
/// `pgsidecar_cancel_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelResult {
    Forwarded,
    /// Unknown key, no query in flight, or the server could not be reached.
    NotForwarded,
    RateLimited,
}

impl CancelResult {
    pub fn label(self) -> &'static str {
        match self {
            CancelResult::Forwarded => "forwarded",
            CancelResult::NotForwarded => "not_forwarded",
            CancelResult::RateLimited => "rate_limited",
        }
    }
}

pub struct CancelLimiter {
    buckets: Mutex<(HashMap<IpAddr, Bucket>, Bucket)>,
    requests: IntCounterVec,
}

impl CancelLimiter {
    /// Registers `pgsidecar_cancel_requests_total` in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "pgsidecar_cancel_requests_total",
                "CancelRequests received, by result (forwarded, not_forwarded, rate_limited)",
            ),
            &["result"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        // Fails only when already registered (a second limiter on one registry).
        let _ = registry.register(Box::new(requests.clone()));
        for r in [
            CancelResult::Forwarded,
            CancelResult::NotForwarded,
            CancelResult::RateLimited,
        ] {
            requests.with_label_values(&[r.label()]);
        }
        CancelLimiter {
            buckets: Mutex::new((HashMap::new(), Bucket::full(Instant::now()))),
            requests,
        }
    }

    /// Takes a token for `ip`; false when its bucket is empty.
    fn take(&self, ip: IpAddr, now: Instant) -> bool {
        let mut guard = self.buckets.lock();
        let (map, shared) = &mut *guard;
        if !map.contains_key(&ip) && map.len() >= MAX_SOURCES {
            // Forget addresses whose buckets have refilled: they lose nothing.
            map.retain(|_, b| {
                b.refill(now);
                b.tokens < BURST
            });
        }
        let b = if map.len() < MAX_SOURCES || map.contains_key(&ip) {
            map.entry(ip).or_insert_with(|| Bucket::full(now))
        } else {
            shared
        };
        b.refill(now);
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        true
    }

    fn give_back(&self, ip: IpAddr) {
        let mut guard = self.buckets.lock();
        let (map, shared) = &mut *guard;
        let b = map.get_mut(&ip).unwrap_or(shared);
        b.tokens = (b.tokens + 1.0).min(BURST);
    }

    /// Serves one CancelRequest from `ip`.
    pub async fn serve(
        &self,
        cancels: &CancelRegistry,
        ip: IpAddr,
        pid: i32,
        secret: &[u8],
    ) -> CancelResult {
        let result = if !self.take(ip, Instant::now()) {
            tracing::debug!(%ip, "cancel request rate-limited");
            CancelResult::RateLimited
        } else if Box::pin(cancels.cancel(pid, secret)).await {
            self.give_back(ip);
            CancelResult::Forwarded
        } else {
            CancelResult::NotForwarded
        };
        self.requests.with_label_values(&[result.label()]).inc();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_empties_refills_and_memory_stays_bounded() {
        let l = CancelLimiter::new(&Registry::new());
        let ip: IpAddr = "10.0.0.1".parse().unwrap_or_else(|_| unreachable!());
        let now = Instant::now();
        let granted = (0..100).filter(|_| l.take(ip, now)).count();
        assert_eq!(granted, BURST as usize);
        assert!(l.take(ip, now + Duration::from_millis(150)), "refilled");
        // Another address is not affected.
        let other: IpAddr = "10.0.0.2".parse().unwrap_or_else(|_| unreachable!());
        assert!(l.take(other, now));
        for i in 0..(MAX_SOURCES as u32 * 2) {
            let _ = l.take(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(l.buckets.lock().0.len() <= MAX_SOURCES);
    }
}
