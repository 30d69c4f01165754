//! Command line: run from a file, from an upstream URL alone, or check a file.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Parser, Subcommand};

use crate::config::{AuthMethod, Config, ConfigError, PoolMode, UpstreamConfig, UserConfig};

#[derive(Debug, Parser)]
#[command(
    name = "pgsidecar",
    version,
    about = "PostgreSQL sidecar proxy: pooling, health, metrics"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Configuration file (proxy.yaml).
    #[arg(long, short = 'c', env = "PGSIDECAR_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Upstream URL, postgres://USER[:PASS]@HOST[:PORT]/DB; enough to run without a file.
    #[arg(long, env = "PGSIDECAR_UPSTREAM")]
    pub upstream: Option<String>,
    /// Client listen address (default 127.0.0.1:6432).
    #[arg(long)]
    pub listen: Option<String>,
    /// Admin HTTP listen address (default 127.0.0.1:9930).
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// session or transaction (default transaction).
    #[arg(long)]
    pub pool_mode: Option<PoolMode>,
    /// Server connections per (database, user) pool.
    #[arg(long)]
    pub pool_size: Option<u32>,
    /// Threads running client sessions (default 1: a single event loop).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Log format: text or json.
    #[arg(long, env = "PGSIDECAR_LOG_FORMAT")]
    pub log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and exit (non-zero with a message when invalid).
    Check,
}

impl Cli {
    /// Builds the effective configuration: file (if any), then flags on top.
    pub fn build_config(&self) -> Result<Config, ConfigError> {
        let mut config = match (&self.config, &self.upstream) {
            (Some(path), _) => Config::load(path).map_err(|e| self.locate(e))?,
            (None, Some(url)) => config_from_url(url)?,
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "give --config proxy.yaml or --upstream postgres://user@host:port/db".into(),
                ))
            }
        };
        if let (Some(_), Some(url)) = (&self.config, &self.upstream) {
            let from_url = config_from_url(url)?;
            config.upstream.host = from_url.upstream.host;
            config.upstream.port = from_url.upstream.port;
            // The URL's role (trust URLs drop it from `from_url`) overrides the file's.
            let (user, password) = url_identity(url)?;
            if user.is_some() {
                config.upstream.user = user;
                config.upstream.password = password;
            }
        }
        if let Some(l) = &self.listen {
            config.listen = l.clone();
        }
        if let Some(l) = &self.admin_listen {
            config.admin_listen = l.clone();
        }
        if let Some(m) = self.pool_mode {
            config.pool_mode = m;
        }
        if let Some(n) = self.pool_size {
            config.pool.size = n;
            config.pool.min_size = config.pool.min_size.min(n);
        }
        if let Some(t) = self.threads {
            config.worker_threads = t;
        }
        if let Some(f) = &self.log_format {
            // `JSON` from an environment variable means json.
            config.logging.format = f.to_ascii_lowercase();
        }
        config.validate().map_err(|e| self.locate(e))?;
        Ok(config)
    }

    /// Names the file and line of the key a validation error is about, when it is
    /// written in the file.
    fn locate(&self, e: ConfigError) -> ConfigError {
        let Some(path) = &self.config else { return e };
        let p = path.display();
        match &e {
            ConfigError::YamlSyntax {
                line,
                column,
                message,
            } => return ConfigError::Invalid(format!("{p}:{line}:{column}: {message}")),
            ConfigError::Yaml { key, message } => {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                return ConfigError::Invalid(
                    match crate::config::checks::position_of(&text, key) {
                        Some((line, col)) => format!("{p}:{line}:{col} {key}: {message}"),
                        None => format!("{p} {key}: {message}"),
                    },
                );
            }
            _ => {}
        }
        let ConfigError::Invalid(m) = &e else {
            return e;
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let line =
            crate::config::checks::key_of(m).and_then(|k| crate::config::checks::line_of(&text, k));
        match line {
            Some(n) => ConfigError::Invalid(format!("{} line {n}: {m}", path.display())),
            None => e,
        }
    }
}

/// `--upstream` alone. With a password in the URL, server connections log in as the
/// URL's user with it, and clients must connect as that user with that password (SCRAM).
/// Without one the proxy authenticates no one itself: every client logs in upstream as
/// its own role, without a password, so PostgreSQL admits exactly the roles it trusts
/// from the proxy's address. Clients may ask for any database.
pub fn config_from_url(url: &str) -> Result<Config, ConfigError> {
    let pg = parse_url(url)?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(_) => {
            return Err(ConfigError::Invalid(
                "--upstream: Unix sockets are not supported; use a TCP host".into(),
            ))
        }
        None => "127.0.0.1".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let mut upstream = UpstreamConfig::new(host, port);
    let (user, password) = url_identity(url)?;
    let Some(password) = password else {
        // Trust: no `users` list admits every role, and without `upstream.user` each
        // logs in upstream as itself (never as the URL's role: that would hand every
        // client the URL role's privileges).
        let mut config = Config::with_upstream(upstream);
        config.auth.method = AuthMethod::Trust;
        return Ok(config);
    };
    upstream.user = user.clone();
    upstream.password = Some(password.clone());
    let mut config = Config::with_upstream(upstream);
    config.auth.method = AuthMethod::ScramSha256;
    config.users.push(UserConfig {
        name: user.unwrap_or_else(|| "postgres".into()),
        password: Some(password),
        server_user: None,
        server_password: None,
        pool_mode: None,
        admin: false,
    });
    Ok(config)
}

fn parse_url(url: &str) -> Result<tokio_postgres::Config, ConfigError> {
    tokio_postgres::Config::from_str(url)
        .map_err(|e| ConfigError::Invalid(format!("--upstream: {e}")))
}

/// The URL's user and password.
fn url_identity(url: &str) -> Result<(Option<String>, Option<String>), ConfigError> {
    let pg = parse_url(url)?;
    let user = pg.get_user().map(str::to_string);
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    Ok((user, password))
}
