//! Reading proxy.yaml: the text, its expansion and its typed parse.

use std::path::Path;

use super::env::expand_value;
use super::*;

impl Config {
    /// A configuration with defaults everywhere and the given upstream.
    pub fn with_upstream(upstream: UpstreamConfig) -> Self {
        Config {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            pool_mode: PoolMode::default(),
            worker_threads: default_worker_threads(),
            upstream,
            auth: AuthConfig::default(),
            users: Vec::new(),
            databases: Vec::new(),
            pool: PoolConfig::default(),
            limits: LimitsConfig::default(),
            breaker: BreakerConfig::default(),
            health: HealthConfig::default(),
            admin: AdminConfig::default(),
            logging: LoggingConfig::default(),
            tls: Default::default(),
        }
    }

    /// Reads, expands and parses a file (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &|k| std::env::var(k).ok())
    }

    /// Parses YAML text, expanding `${VAR}` / `${VAR:-default}` in string values with
    /// `env`. Expansion happens after YAML parsing so a secret's characters can never
    /// change the document's structure.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            ConfigError::YamlSyntax {
                line,
                column,
                message: e.to_string(),
            }
        })?;
        expand_value(&mut value, env)?;
        // The path of the value that failed (`pool.size`), which serde_yaml's own error
        // does not name once the document is a Value.
        serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Yaml {
            key: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    /// Every duration at most `MAX_DURATION`: time arithmetic with absurd values
    /// (`1000000000000years`) would overflow at run time.
    pub(super) fn check_durations(&self) -> Result<(), ConfigError> {
        let (u, p, h, l, b, a) = (
            &self.upstream,
            &self.pool,
            &self.health,
            &self.limits,
            &self.breaker,
            &self.admin,
        );
        let all = [
            ("upstream.connect_timeout", Some(u.connect_timeout)),
            ("upstream.tcp_user_timeout", Some(u.tcp_user_timeout)),
            ("upstream.keepalives_idle", Some(u.keepalives_idle)),
            ("upstream.keepalives_interval", Some(u.keepalives_interval)),
            ("pool.query_wait_timeout", Some(p.query_wait_timeout)),
            ("pool.server_idle_timeout", Some(p.server_idle_timeout)),
            ("pool.server_lifetime", Some(p.server_lifetime)),
            ("pool.shrink_delay", Some(p.shrink_delay)),
            ("pool.aimd_interval", Some(p.aimd_interval)),
            ("health.check_timeout", Some(h.check_timeout)),
            ("health.server_check_delay", Some(h.server_check_delay)),
            ("health.idle_check_interval", Some(h.idle_check_interval)),
            ("health.probe_interval", Some(h.probe_interval)),
            ("health.probe_timeout", Some(h.probe_timeout)),
            ("limits.client_login_timeout", Some(l.client_login_timeout)),
            (
                "limits.client_startup_timeout",
                Some(l.client_startup_timeout),
            ),
            (
                "limits.idle_transaction_timeout",
                l.idle_transaction_timeout,
            ),
            ("limits.query_timeout", l.query_timeout),
            ("limits.transaction_timeout", l.transaction_timeout),
            ("limits.client_idle_timeout", l.client_idle_timeout),
            ("breaker.backoff_base", Some(b.backoff_base)),
            ("breaker.backoff_cap", Some(b.backoff_cap)),
            ("admin.pause_timeout", Some(a.pause_timeout)),
            ("admin.startup_grace", Some(a.startup_grace)),
            ("admin.shutdown_delay", Some(a.shutdown_delay)),
            ("admin.shutdown_timeout", Some(a.shutdown_timeout)),
        ];
        for (key, d) in all {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(ConfigError::Invalid(format!(
                    "{key} is longer than the most allowed, 365 days"
                )));
            }
        }
        Ok(())
    }

    pub fn find_user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn find_database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }
}
