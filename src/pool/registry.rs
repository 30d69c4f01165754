//! All pools, keyed by (database, user), created on first use from the current config.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::{Pool, PoolKey, PoolSettings};
use crate::auth::Secret;
use crate::config::Config;
use crate::error::{sqlstate, ClientError};
use crate::metrics::Metrics;
use crate::server::hosts::Hosts;
use crate::server::{ServerIdentity, TcpSettings};
use crate::tls::UpstreamTls;

pub struct Registry {
    pub metrics: Arc<Metrics>,
    config: RwLock<Arc<Config>>,
    /// The upstream's hosts and their state, shared by every pool (kept across reloads
    /// that leave the host list as it was).
    hosts: RwLock<Arc<Hosts>>,
    /// foldhash (seeded per process): looked up at every login.
    pools: Mutex<HashMap<PoolKey, Arc<Pool>, foldhash::fast::RandomState>>,
    /// The connector built from `upstream.tls` (files read at start and reload).
    upstream_tls: RwLock<Arc<UpstreamTls>>,
}

impl Registry {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        upstream_tls: Arc<UpstreamTls>,
    ) -> Arc<Registry> {
        Arc::new(Registry {
            metrics,
            upstream_tls: RwLock::new(upstream_tls),
            hosts: RwLock::new(hosts_of(&config)),
            config: RwLock::new(config),
            pools: Mutex::new(HashMap::default()),
        })
    }

    fn tls(&self) -> Arc<UpstreamTls> {
        self.upstream_tls.read().clone()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().clone()
    }

    /// The upstream's hosts with what is known of them (roles, bans).
    pub fn hosts(&self) -> Arc<Hosts> {
        self.hosts.read().clone()
    }

    /// The pool for `key`, created with settings from the current config.
    pub fn get(&self, key: &PoolKey) -> Arc<Pool> {
        let mut pools = self.pools.lock();
        if let Some(p) = pools.get(key) {
            return p.clone();
        }
        let settings = settings_for(&self.config(), key, &self.hosts(), self.tls());
        let pool = Pool::new(key.clone(), settings, self.metrics.clone());
        pools.insert(key.clone(), pool.clone());
        pool
    }

    /// The pool for `key`, unless creating it would pass `limits.max_dynamic_pools`
    /// (pools for databases not listed under `databases:`); then the FATAL to send.
    pub fn try_get(&self, key: &PoolKey) -> Result<Arc<Pool>, ClientError> {
        let config = self.config();
        let mut pools = self.pools.lock();
        if let Some(p) = pools.get(key) {
            return Ok(p.clone());
        }
        let max = config.limits.max_dynamic_pools;
        let dynamic = |k: &PoolKey| config.find_database(&k.database).is_none();
        if dynamic(key) && pools.keys().filter(|k| dynamic(k)).count() >= max {
            // At the cap, a dynamic pool nobody uses (no client, no lease, no login in
            // progress: only this map holds it) makes room, idle servers and all.
            let unused = pools
                .iter()
                .find(|(k, p)| dynamic(k) && Arc::strong_count(p) == 1)
                .map(|(k, _)| k.clone());
            if let Some(k) = unused {
                if let Some(p) = pools.remove(&k) {
                    tracing::info!(pool = %p.name, "closing an unused pool to make room (limits.max_dynamic_pools)");
                    p.close();
                    self.metrics.remove_pool(&p.name);
                }
            }
        }
        if dynamic(key) && pools.keys().filter(|k| dynamic(k)).count() >= max {
            return Err(ClientError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "pgsidecar: too many pools: {max} pools for databases not listed under databases: exist (limits.max_dynamic_pools); no pool for \"{}\" as \"{}\" can be created",
                    key.database, key.user
                ),
            )
            .with_hint("list the databases clients use under databases:, or raise limits.max_dynamic_pools"));
        }
        let settings = settings_for(&config, key, &self.hosts(), self.tls());
        let pool = Pool::new(key.clone(), settings, self.metrics.clone());
        pools.insert(key.clone(), pool.clone());
        Ok(pool)
    }

    pub fn find(&self, key: &PoolKey) -> Option<Arc<Pool>> {
        self.pools.lock().get(key).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self.pools.lock().values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Swaps in a validated config and re-derives every pool's settings in place, so
    /// connected clients and open server connections carry on.
    pub fn apply(&self, config: Arc<Config>, upstream_tls: Arc<UpstreamTls>) {
        *self.config.write() = config.clone();
        *self.upstream_tls.write() = upstream_tls;
        let fresh = hosts_of(&config);
        let hosts = {
            let mut h = self.hosts.write();
            let same = h.list() == fresh.list()
                && h.attrs == fresh.attrs
                && h.load_balance == fresh.load_balance;
            if !same {
                *h = fresh;
            }
            h.clone()
        };
        for pool in self.all() {
            pool.update_settings(settings_for(&config, &pool.key, &hosts, self.tls()));
        }
    }

    /// Forgets a pool that never managed to open a connection (a login to a database
    /// that does not exist, say), with its metric series, so failed logins leave no
    /// state behind. A pool whose own login PostgreSQL refused stays: that is a state
    /// to show, alert on and back off from.
    pub fn forget_if_unused(&self, key: &PoolKey) {
        let mut pools = self.pools.lock();
        if let Some(p) = pools.get(key) {
            let snap = p.snapshot();
            if snap.open == 0
                && snap.clients == 0
                && snap.connects == 0
                && p.login_failure().is_none()
            {
                if let Some(p) = pools.remove(key) {
                    p.close();
                    self.metrics.remove_pool(&p.name);
                }
            }
        }
    }

    /// Refreshes the state gauges from the pools (called at scrape time).
    pub fn refresh_metrics(&self) {
        let m = &self.metrics;
        m.breaker_state.reset();
        for g in [
            &m.clients,
            &m.server_connections,
            &m.pool_min,
            &m.pool_max,
            &m.pool_target,
            &m.pool_current,
            &m.pool_paused,
            &m.aimd_ceiling,
        ] {
            g.reset();
        }
        m.server_age_max.reset();
        for p in self.all() {
            let s = p.snapshot();
            let n = s.name.as_str();
            m.clients
                .with_label_values(&[n, "active"])
                .set(s.clients_active as i64);
            m.clients
                .with_label_values(&[n, "waiting"])
                .set(s.clients_waiting as i64);
            m.clients
                .with_label_values(&[n, "idle"])
                .set(s.clients_idle as i64);
            m.server_connections
                .with_label_values(&[n, "active"])
                .set(s.active_servers as i64);
            m.server_connections
                .with_label_values(&[n, "idle"])
                .set(s.idle as i64);
            m.server_connections
                .with_label_values(&[n, "connecting"])
                .set(s.connecting as i64);
            m.server_connections
                .with_label_values(&[n, "testing"])
                .set(s.testing as i64);
            m.pool_min.with_label_values(&[n]).set(s.min_size as i64);
            m.pool_max.with_label_values(&[n]).set(s.max_size as i64);
            m.pool_target
                .with_label_values(&[n])
                .set(s.target_size as i64);
            m.pool_current.with_label_values(&[n]).set(s.open as i64);
            m.pool_paused.with_label_values(&[n]).set(s.paused as i64);
            m.aimd_ceiling.with_label_values(&[n]).set(s.ceiling as i64);
            m.server_age_max
                .with_label_values(&[n])
                .set(s.oldest_idle_secs);
            m.breaker_state
                .with_label_values(&[n])
                .set(p.breaker_view().state.gauge());
        }
        m.upstream_host_up.reset();
        m.upstream_host_role.reset();
        for h in self.hosts().views(tokio::time::Instant::now()) {
            m.upstream_host_up
                .with_label_values(&[&h.address])
                .set(i64::from(h.up));
            m.upstream_host_role
                .with_label_values(&[&h.address, h.role])
                .set(1);
        }
    }

    pub fn close_all(&self) {
        for p in self.all() {
            p.close();
        }
    }
}

/// Derives one pool's settings: per-database and per-user overrides over the globals.
/// The hosts of `config`'s upstream (validated already; an unparsable list falls back to
/// its default host, which then fails to connect with a clear error).
pub fn hosts_of(config: &Config) -> Arc<Hosts> {
    let u = &config.upstream;
    match u.hosts() {
        Ok(list) => Arc::new(Hosts::new(
            list,
            u.target_session_attrs,
            u.load_balance_hosts,
        )),
        Err(_) => Arc::new(Hosts::single(&u.host, u.port)),
    }
}

pub fn settings_for(
    config: &Config,
    key: &PoolKey,
    hosts: &Arc<Hosts>,
    tls: Arc<UpstreamTls>,
) -> PoolSettings {
    let user = config.find_user(&key.user);
    let db = config.find_database(&key.database);
    let server_user = user
        .and_then(|u| u.server_user.clone())
        .or_else(|| config.upstream.user.clone())
        .unwrap_or_else(|| key.user.clone());
    let client_plain =
        user.and_then(|u| u.password.as_deref())
            .and_then(|p| match Secret::parse(p) {
                Secret::Plain(p) => Some(p),
                _ => None,
            });
    let password = user
        .and_then(|u| u.server_password.clone())
        .or_else(|| config.upstream.password.clone())
        .or(client_plain);
    let database = db
        .and_then(|d| d.server_database.clone())
        .unwrap_or_else(|| key.database.clone());
    let max_size = db.and_then(|d| d.pool_size).unwrap_or(config.pool.size) as usize;
    PoolSettings {
        mode: user.and_then(|u| u.pool_mode).unwrap_or(config.pool_mode),
        max_size,
        min_size: (config.pool.min_size as usize).min(max_size),
        query_wait_timeout: config.pool.query_wait_timeout,
        reset_query: config.pool.reset_query.clone(),
        max_prepared: config.pool.max_prepared_statements,
        server_idle_timeout: config.pool.server_idle_timeout,
        server_lifetime: config.pool.server_lifetime,
        breaker: super::breaker::BreakerSettings {
            failure_threshold: config.breaker.failure_threshold,
            backoff_base: config.breaker.backoff_base,
            backoff_cap: config.breaker.backoff_cap,
        },
        on_open: config.breaker.on_open,
        target_utilization: config.pool.target_utilization,
        shrink_delay: config.pool.shrink_delay,
        aimd: config.pool.aimd,
        aimd_interval: config.pool.aimd_interval,
        session_state: config.pool.session_state,
        health: config.health.clone(),
        identity: ServerIdentity {
            hosts: hosts.clone(),
            tcp: TcpSettings {
                keepalives_idle: config.upstream.keepalives_idle,
                keepalives_interval: config.upstream.keepalives_interval,
                keepalives_count: config.upstream.keepalives_count,
                user_timeout: config.upstream.tcp_user_timeout,
            },
            user: server_user,
            password,
            database,
            connect_timeout: config.upstream.connect_timeout,
            tls,
        },
    }
}
