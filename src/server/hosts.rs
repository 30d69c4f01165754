//! Several upstream hosts, libpq style: which one a new server connection goes to.
//!
//! `upstream.host: [a, b:5433]` (or `"a,b:5433"`, or the URL `postgres://u@a,b:5433/db`)
//! lists the candidates; `target_session_attrs` says what a connection must be
//! connected to (the same words libpq uses), and `load_balance_hosts: random` shuffles
//! the order per connect. Every host has its own state, shared by all pools of the
//! upstream: the role it reported last (from the `in_hot_standby` and
//! `default_transaction_read_only` parameters PostgreSQL 14+ reports at login, else a
//! query), and a ban after connect failures, doubled per failure up to 30 s, so a
//! black-holed host costs one timeout, not one per client. The last candidate is never
//! banned: with every host banned, all are tried.
//!
//! A host name is resolved again on every connect, so a Kubernetes Service or a DNS
//! record that moves to the new primary is followed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

pub use crate::config::hosts::{parse_hosts, HostAddr, LoadBalanceHosts, Role, TargetSessionAttrs};

/// First ban after a failed connect; doubled per further failure.
const BAN_BASE: Duration = Duration::from_secs(1);
const BAN_CAP: Duration = Duration::from_secs(30);

/// What is known of one host.
#[derive(Debug, Clone, Default)]
pub struct HostState {
    pub role: Option<Role>,
    /// Consecutive connect failures.
    pub failures: u32,
    pub banned_until: Option<Instant>,
    pub last_error: Option<String>,
    /// Server connections opened to it.
    pub connects: u64,
}

/// A host and its state, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub address: String,
    /// `primary`, `standby`, `read-only primary` or `unknown`.
    pub role: &'static str,
    pub up: bool,
    pub banned_for_secs: Option<f64>,
    pub failures: u32,
    pub last_error: Option<String>,
    pub connects: u64,
}

/// The hosts of one upstream and what is known of them; shared by its pools.
#[derive(Debug)]
pub struct Hosts {
    list: Vec<HostAddr>,
    pub attrs: TargetSessionAttrs,
    pub load_balance: LoadBalanceHosts,
    state: Mutex<Vec<HostState>>,
    next: AtomicUsize,
    /// The host the last connection went to (usize::MAX: none yet), to log a move.
    last_used: AtomicUsize,
    /// When the hosts' roles were last checked in the background.
    watched: Mutex<Option<Instant>>,
    /// A handle on the socket of every server connection, per host, so that a host
    /// declared dead can have all its connections ended at once (see `sever`).
    sockets: Mutex<Vec<Vec<Weak<socket2::Socket>>>>,
}

impl Hosts {
    pub fn new(
        list: Vec<HostAddr>,
        attrs: TargetSessionAttrs,
        load_balance: LoadBalanceHosts,
    ) -> Hosts {
        let n_hosts = list.len();
        let state = Mutex::new(vec![HostState::default(); n_hosts]);
        Hosts {
            list,
            attrs,
            load_balance,
            state,
            next: AtomicUsize::new(0),
            last_used: AtomicUsize::new(usize::MAX),
            watched: Mutex::new(None),
            sockets: Mutex::new(vec![Vec::new(); n_hosts]),
        }
    }

    /// One host, any role (tests, tools).
    pub fn single(host: &str, port: u16) -> Hosts {
        Hosts::new(
            vec![HostAddr {
                host: host.to_string(),
                port,
            }],
            TargetSessionAttrs::Any,
            LoadBalanceHosts::Disable,
        )
    }

    pub fn list(&self) -> &[HostAddr] {
        &self.list
    }

    pub fn get(&self, i: usize) -> &HostAddr {
        &self.list[i.min(self.list.len().saturating_sub(1))]
    }

    /// The order to try hosts in for a new connection: hosts not banned whose role fits
    /// (or is unknown) first, then those of another role (a role can change: a
    /// standby is promoted), then banned ones; with prefer-standby, known standbys
    /// first. `shuffle` draws a random index below its argument.
    pub fn order(&self, now: Instant, mut shuffle: impl FnMut(usize) -> usize) -> Vec<usize> {
        let n = self.list.len();
        let mut base: Vec<usize> = (0..n).collect();
        match self.load_balance {
            LoadBalanceHosts::Random => {
                for i in (1..n).rev() {
                    base.swap(i, shuffle(i + 1));
                }
            }
            LoadBalanceHosts::Disable if self.attrs.spreads() && n > 1 => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
                base.rotate_left(start);
            }
            LoadBalanceHosts::Disable => {}
        }
        let st = self.state.lock();
        let rank = |i: &usize| {
            let s = &st[*i];
            let banned = s.banned_until.is_some_and(|t| now < t);
            let fits = match s.role {
                None => 1,
                Some(r) if self.attrs == TargetSessionAttrs::PreferStandby => {
                    if r.in_recovery {
                        0
                    } else {
                        2
                    }
                }
                Some(r) if self.attrs.accepts(r) => 0,
                Some(_) => 3,
            };
            (u8::from(banned), fits)
        };
        base.sort_by_key(rank);
        base
    }

    /// A connect to host `i` failed before its role was known.
    pub fn failed(&self, i: usize, error: &str, now: Instant) {
        let mut st = self.state.lock();
        let Some(s) = st.get_mut(i) else { return };
        s.failures = s.failures.saturating_add(1);
        let ban = BAN_BASE
            .saturating_mul(1 << (s.failures - 1).min(5))
            .min(BAN_CAP);
        s.banned_until = Some(now + ban);
        s.last_error = Some(error.to_string());
    }

    /// Host `i` answered and reported `role`. Returns the previous role if it changed.
    pub fn reported(&self, i: usize, role: Role) -> Option<Option<Role>> {
        let mut st = self.state.lock();
        let s = st.get_mut(i)?;
        s.failures = 0;
        s.banned_until = None;
        s.last_error = None;
        let before = s.role.replace(role);
        (before != Some(role)).then_some(before)
    }

    /// A connection was opened to host `i`; returns the host used before if it was
    /// another one (a failover, for a read-write pool).
    pub fn connected(&self, i: usize) -> Option<usize> {
        if let Some(s) = self.state.lock().get_mut(i) {
            s.connects += 1;
        }
        let before = self.last_used.swap(i, Ordering::Relaxed);
        (before != i && before != usize::MAX).then_some(before)
    }

    /// Keeps a handle on a new connection's socket to host `i`.
    pub fn track(&self, i: usize, sock: &Arc<socket2::Socket>) {
        let mut all = self.sockets.lock();
        if let Some(v) = all.get_mut(i) {
            if v.len() >= 16 && v.len().is_power_of_two() {
                v.retain(|w| w.strong_count() > 0);
            }
            v.push(Arc::downgrade(sock));
        }
    }

    /// Host `i` does not answer at all (a frozen server, a network black hole whose
    /// packets the kernel still acknowledges): ends every connection to it, idle or in
    /// use, so that clients waiting on it get an error now instead of waiting forever,
    /// and their next transactions go to a host that works. Returns how many.
    pub fn sever(&self, i: usize) -> usize {
        let socks: Vec<_> = self
            .sockets
            .lock()
            .get_mut(i)
            .map(|v| {
                std::mem::take(v)
                    .into_iter()
                    .filter_map(|w| w.upgrade())
                    .collect()
            })
            .unwrap_or_default();
        for s in &socks {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        socks.len()
    }

    /// True once per `every` (for one caller): time to check every host's role in the
    /// background, so a host that changed role while unused is known before it is
    /// needed. Only for several hosts.
    pub fn watch_due(&self, every: Duration, now: Instant) -> bool {
        if self.list.len() < 2 || every.is_zero() {
            return false;
        }
        let mut w = self.watched.lock();
        if w.is_some_and(|t| now.duration_since(t) < every) {
            return false;
        }
        *w = Some(now);
        true
    }

    /// Host `i` refused a write (25006) on a read-write pool: its role is no longer
    /// known to fit; the next connect checks it again and tries the others first.
    pub fn suspect(&self, i: usize) {
        if let Some(s) = self.state.lock().get_mut(i) {
            s.role = Some(Role {
                in_recovery: false,
                read_only: true,
            });
        }
    }

    /// Whether a connection to host `i` may be used now (its known role fits).
    pub fn fits(&self, i: usize) -> bool {
        let st = self.state.lock();
        st.get(i)
            .and_then(|s| s.role)
            .is_none_or(|r| self.attrs.accepts(r))
    }

    /// The host that serves these attributes now, if known (for logs and the API).
    pub fn current(&self) -> Option<usize> {
        let st = self.state.lock();
        (0..self.list.len()).find(|i| {
            st[*i].role.is_some_and(|r| self.attrs.accepts(r)) && st[*i].banned_until.is_none()
        })
    }

    pub fn views(&self, now: Instant) -> Vec<HostView> {
        let st = self.state.lock();
        self.list
            .iter()
            .zip(st.iter())
            .map(|(a, s)| {
                let banned = s.banned_until.filter(|t| now < *t);
                HostView {
                    address: a.to_string(),
                    role: s.role.map_or("unknown", |r| r.name()),
                    up: banned.is_none() && s.failures == 0,
                    banned_for_secs: banned.map(|t| t.duration_since(now).as_secs_f64()),
                    failures: s.failures,
                    last_error: s.last_error.clone(),
                    connects: s.connects,
                }
            })
            .collect()
    }
}

/// The role from the parameters a server reported at login (PostgreSQL 14+ reports
/// both as GUC_REPORT), if it did.
pub fn role_from_params(get: impl Fn(&str) -> Option<String>) -> Option<Role> {
    let on = |v: String| v == "on";
    let in_recovery = get("in_hot_standby").map(on)?;
    let read_only = get("default_transaction_read_only")
        .map(on)
        .unwrap_or(false);
    Some(Role {
        in_recovery,
        read_only,
    })
}

#[cfg(test)]
#[path = "hosts_tests.rs"]
mod tests;
