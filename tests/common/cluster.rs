//! Throw-away PostgreSQL clusters for integration tests.
//!
//! `PgCluster::start()` runs `initdb` into a fresh temp dir under `/tmp`,
//! starts the server on a free 127.0.0.1 port and creates the roles the tests
//! rely on:
//!
//! * superuser `postgres`, password `postgres`
//! * `app` (LOGIN, not superuser), password `app_pw`, with `ALL` on schema
//!   `public` of database `postgres` so it can create tables.
//!
//! Unix-socket connections are always `trust`; TCP connections (127.0.0.1/32)
//! use the method from [`ClusterAuth`].
//!
//! When the tests run as root every PostgreSQL program is executed through
//! `runuser -u postgres --` (PostgreSQL refuses to run as root) and the temp
//! dir is chowned to the `postgres` OS user.
//!
//! All methods are blocking. Calling them from a `#[tokio::test]` is fine, but
//! note that on the default current-thread runtime a blocking call (e.g.
//! `psql`) stalls every tokio-postgres connection task of that test while it
//! runs; use `#[tokio::test(flavor = "multi_thread")]` if the SQL run through
//! `psql` may wait on something held by an async client.
//!
//! Set `PGSIDECAR_KEEP_CLUSTER=1` to keep the temp dir after the test (the
//! server is still stopped) for post-mortem inspection.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Password of the `postgres` superuser.
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "postgres";
/// Unprivileged login role created in every cluster.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app_pw";

/// How TCP (`host ... 127.0.0.1/32`) connections authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterAuth {
    #[default]
    Trust,
    /// `md5` in pg_hba, `password_encryption = md5`.
    Md5,
    /// `scram-sha-256` in pg_hba, `password_encryption = scram-sha-256`.
    Scram,
}

impl ClusterAuth {
    fn hba_method(self) -> &'static str {
        match self {
            ClusterAuth::Trust => "trust",
            ClusterAuth::Md5 => "md5",
            ClusterAuth::Scram => "scram-sha-256",
        }
    }

    fn password_encryption(self) -> &'static str {
        match self {
            ClusterAuth::Md5 => "md5",
            ClusterAuth::Trust | ClusterAuth::Scram => "scram-sha-256",
        }
    }
}

/// Options for [`PgCluster::start_with`].
///
/// NOTE: the harness runs with `fsync = off` and `synchronous_commit = off`.
/// The latter means `stop_immediate()` (a simulated crash) can lose commits
/// from the last few hundred milliseconds. Tests that check durability across
/// a crash must pass `extra_conf: vec!["synchronous_commit = on".into()]`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `max_connections` (default 100). Note that PostgreSQL reserves
    /// `superuser_reserved_connections` (3) of these for superusers, so the
    /// `app` role only gets `max_connections - 3`; add
    /// `"superuser_reserved_connections = 0"` to `extra_conf` if that matters.
    /// (With `max_connections <= 3` the harness sets it to 0 itself.)
    pub max_connections: u32,
    /// Extra `postgresql.conf` lines, appended after the harness settings
    /// (so they override them).
    pub extra_conf: Vec<String>,
    /// Authentication for TCP connections.
    pub auth: ClusterAuth,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            max_connections: 100,
            extra_conf: Vec::new(),
            auth: ClusterAuth::Trust,
        }
    }
}

/// A running (or deliberately stopped / frozen) PostgreSQL cluster that is
/// torn down and deleted on drop.
pub struct PgCluster {
    /// `None` only when the directory is being kept (PGSIDECAR_KEEP_CLUSTER).
    tmp: Option<tempfile::TempDir>,
    base: PathBuf,
    data: PathBuf,
    log_file: PathBuf,
    bin: PgBin,
    /// `Some((uid, gid))` of the `postgres` OS user when we are root.
    run_as: Option<(u32, u32)>,
    port: u16,
    opts: ClusterOptions,
    frozen: AtomicBool,
}

// ---------------------------------------------------------------------------
// public free functions
// ---------------------------------------------------------------------------

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to :0 and release).
/// Racy by nature; callers that bind later should be ready to retry.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("free_port: could not bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("free_port: local_addr of a bound listener")
        .port()
}

// ---------------------------------------------------------------------------
// PgCluster
// ---------------------------------------------------------------------------

impl PgCluster {
    /// Start a cluster with default options (trust auth, 100 connections).
    pub fn start() -> PgCluster {
        Self::start_with(ClusterOptions::default())
    }

    /// Start a cluster with the given options.
    pub fn start_with(opts: ClusterOptions) -> PgCluster {
        let bin = PgBin::get().clone();
        let run_as = if running_as_root() {
            Some(postgres_os_user())
        } else {
            None
        };

        let tmp = tempfile::Builder::new()
            .prefix("pgsidecar-test-")
            .tempdir_in(temp_base())
            .expect("could not create temp dir for the test cluster");
        let base = tmp.path().to_path_buf();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&base, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", base.display()));
        }
        let data = base.join("data");
        let log_file = base.join("postgres.log");

        let mut cluster = PgCluster {
            tmp: Some(tmp),
            base,
            data,
            log_file,
            bin,
            run_as,
            port: 0,
            opts,
            frozen: AtomicBool::new(false),
        };

        cluster.initdb();
        cluster.write_hba();
        cluster.append_include();

        // Pick a port and start; retry with another port if someone grabbed it.
        const ATTEMPTS: usize = 8;
        let mut last_err = String::new();
        let mut started = false;
        for _ in 0..ATTEMPTS {
            cluster.port = free_port();
            cluster.write_conf();
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    started = true;
                    break;
                }
                Err(StartError::PortInUse(msg)) => {
                    last_err = msg;
                    continue;
                }
                Err(StartError::Other(msg)) => {
                    panic!("starting the test cluster failed:\n{msg}")
                }
            }
        }
        if !started {
            panic!("could not start the test cluster: port in use {ATTEMPTS} times in a row; last error:\n{last_err}");
        }
        cluster.wait_ready(Duration::from_secs(30));
        cluster.setup_roles();
        cluster
    }

    /// TCP port of the server (stable across `stop_*` / `start_again`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `"127.0.0.1"`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// `host:port`, handy for proxy configs.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host(), self.port)
    }

    /// `postgres://user:password@127.0.0.1:port/db` (components percent-encoded).
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            pct(user),
            pct(password),
            self.host(),
            self.port,
            pct(db)
        )
    }

    /// URL for `postgres`/`postgres` on database `postgres`.
    pub fn superuser_url(&self) -> String {
        self.url(SUPERUSER, SUPERUSER_PASSWORD, "postgres")
    }

    /// URL for `app`/`app_pw` on database `postgres`.
    pub fn app_url(&self) -> String {
        self.url(APP_USER, APP_PASSWORD, "postgres")
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// The temp dir holding everything (also the unix socket directory).
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    /// Unix socket directory (`host=` value for socket connections).
    pub fn socket_dir(&self) -> &Path {
        &self.base
    }

    /// PGDATA.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Path of a PostgreSQL client program (pgbench, psql) of the same installation.
    pub fn tool_path(&self, prog: &str) -> PathBuf {
        self.bin.tool(prog)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_file
    }

    /// Whole server log so far (lossy UTF-8; empty if unreadable).
    pub fn log_contents(&self) -> String {
        fs::read(&self.log_file)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// PID of the postmaster (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> u32 {
        self.try_postmaster_pid().unwrap_or_else(|| {
            panic!(
                "could not read postmaster pid from {} (is the cluster running?)",
                self.data.join("postmaster.pid").display()
            )
        })
    }

    /// A streaming standby of `primary` (`pg_basebackup -R` over the primary's Unix
    /// socket), on a port of its own, started and accepting read-only connections.
    pub fn standby_of(primary: &PgCluster) -> PgCluster {
        let tmp = tempfile::Builder::new()
            .prefix("pgsidecar-test-standby-")
            .tempdir_in(temp_base())
            .expect("could not create temp dir for the standby");
        let base = tmp.path().to_path_buf();
        if let Some((uid, gid)) = primary.run_as {
            std::os::unix::fs::chown(&base, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", base.display()));
        }
        let mut standby = PgCluster {
            tmp: Some(tmp),
            data: base.join("data"),
            log_file: base.join("postgres.log"),
            base,
            bin: primary.bin.clone(),
            run_as: primary.run_as,
            port: 0,
            opts: primary.opts.clone(),
            frozen: AtomicBool::new(false),
        };
        standby.base_backup_from(primary);
        for _ in 0..8 {
            standby.port = free_port();
            standby.write_conf();
            match standby.pg_ctl_start() {
                Ok(()) => {
                    standby.wait_ready(Duration::from_secs(30));
                    return standby;
                }
                Err(StartError::PortInUse(_)) => continue,
                Err(StartError::Other(msg)) => panic!("starting the standby failed:\n{msg}"),
            }
        }
        panic!("could not start the standby: port in use 8 times in a row");
    }

    /// Replaces this cluster's data with a fresh base backup of `primary` and starts it
    /// as its standby, on the same port (an old primary rejoining after a failover).
    pub fn rejoin_as_standby_of(&self, primary: &PgCluster) {
        let _ = fs::remove_dir_all(&self.data);
        self.base_backup_from(primary);
        self.write_conf();
        self.start_again();
    }

    fn base_backup_from(&self, primary: &PgCluster) {
        let mut cmd = self.pg_command("pg_basebackup");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-R", "-X", "stream", "-c", "fast", "-U", SUPERUSER, "-h"])
            .arg(&primary.base)
            .args(["-p", &primary.port.to_string()]);
        let out = run_capture(&mut cmd);
        assert!(
            out.status.success(),
            "pg_basebackup failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl promote`: the standby leaves recovery and accepts writes.
    pub fn promote(&self) {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "promote"]);
        let out = run_capture(&mut cmd);
        assert!(
            out.status.success(),
            "pg_ctl promote failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl stop -m immediate` (crash-like stop; needs recovery on restart).
    pub fn stop_immediate(&self) {
        self.stop_mode("immediate");
    }

    /// `pg_ctl stop -m fast` (clean shutdown, active sessions are terminated).
    pub fn stop_fast(&self) {
        self.stop_mode("fast");
    }

    /// `pg_ctl restart -m <mode>` (what an operator runs); returns once the server
    /// accepts connections again. With `smart`, PostgreSQL answers new connections
    /// with 57P03 until every session has ended.
    pub fn restart(&self, mode: &str) {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "-m", mode, "-l"])
            .arg(&self.log_file)
            .arg("restart");
        let out = run_capture(&mut cmd);
        assert!(
            out.status.success(),
            "pg_ctl restart failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_ready(Duration::from_secs(30));
    }

    /// Start the cluster again with the same data dir and port; returns once it
    /// accepts connections.
    pub fn start_again(&self) {
        match self.pg_ctl_start() {
            Ok(()) => {}
            Err(StartError::PortInUse(msg)) => panic!(
                "start_again: port {} is now taken by someone else:\n{msg}",
                self.port
            ),
            Err(StartError::Other(msg)) => panic!("start_again failed:\n{msg}"),
        }
        self.wait_ready(Duration::from_secs(30));
    }

    /// Freeze the server: SIGSTOP to the postmaster and all its children.
    /// The TCP listen socket stays open, so new connects hang in the backlog
    /// and existing sessions stop responding. Undo with [`sigcont`](Self::sigcont)
    /// (drop does it automatically).
    pub fn sigstop(&self) {
        let pm = self.postmaster_pid();
        // Postmaster first so it cannot fork new children meanwhile.
        send_signal("STOP", &[pm]).unwrap_or_else(|e| panic!("SIGSTOP postmaster {pm}: {e}"));
        self.frozen.store(true, Ordering::SeqCst);
        let mut done: Vec<u32> = Vec::new();
        // Second pass catches a child forked just before the postmaster stopped.
        for _ in 0..2 {
            let kids: Vec<u32> = children_of(pm)
                .into_iter()
                .filter(|p| !done.contains(p))
                .collect();
            // Children may exit concurrently; ignore errors for them.
            let _ = send_signal("STOP", &kids);
            done.extend(kids);
        }
    }

    /// Resume a server frozen by [`sigstop`](Self::sigstop).
    pub fn sigcont(&self) {
        let pm = self.postmaster_pid();
        let kids = children_of(pm);
        let _ = send_signal("CONT", &kids);
        send_signal("CONT", &[pm]).unwrap_or_else(|e| panic!("SIGCONT postmaster {pm}: {e}"));
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Run `sql` as superuser via `psql -X -A -t` over TCP and return the
    /// trimmed stdout. Panics (with psql's stderr) on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_as(SUPERUSER, SUPERUSER_PASSWORD, "postgres", sql)
    }

    /// Like [`psql`](Self::psql) but ignores the output.
    pub fn exec(&self, sql: &str) {
        let _ = self.psql(sql);
    }

    /// Like [`psql`](Self::psql) with explicit credentials / database.
    pub fn psql_as(&self, user: &str, password: &str, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let mut cmd = Command::new(self.bin.tool("psql"));
        scrub_pg_env(&mut cmd);
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.host()])
            .args(["-p", &port, "-U", user, "-d", db, "-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("could not run psql ({:?}): {e}", self.bin.tool("psql")));
        if !out.status.success() {
            panic!(
                "psql failed ({}) for SQL:\n{sql}\nstderr:\n{}\nstdout:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// True if `pg_isready` reports the server accepting connections.
    pub fn is_ready(&self) -> bool {
        let port = self.port.to_string();
        let mut cmd = Command::new(self.bin.tool("pg_isready"));
        scrub_pg_env(&mut cmd);
        cmd.args(["-h", self.host(), "-p", &port, "-U", SUPERUSER])
            .args(["-d", "postgres", "-t", "2"])
            .stdin(Stdio::null());
        matches!(cmd.output(), Ok(o) if o.status.success())
    }

    // -- internals ----------------------------------------------------------

    fn pg_command(&self, prog: &str) -> Command {
        let exe = self.bin.tool(prog);
        let mut cmd = match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        // The postgres OS user must be able to getcwd(); our cwd may be /root/...
        cmd.current_dir(&self.base);
        scrub_pg_env(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn initdb(&self) {
        let mut cmd = self.pg_command("initdb");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"]);
        let out = run_capture(&mut cmd);
        if !out.status.success() {
            panic!(
                "initdb failed ({}): {cmd:?}\nstdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn write_hba(&self) {
        let m = self.opts.auth.hba_method();
        let hba = format!(
            "# written by the pgsidecar test harness\n\
             local all all trust\n\
             local replication all trust\n\
             host all all 127.0.0.1/32 {m}\n\
             host all all ::1/128 {m}\n"
        );
        self.write_file(&self.data.join("pg_hba.conf"), &hba);
    }

    fn append_include(&self) {
        let conf = self.data.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .unwrap_or_else(|e| panic!("open {} for append: {e}", conf.display()));
        f.write_all(b"\n# pgsidecar test harness\ninclude 'pgsidecar_test.conf'\n")
            .unwrap_or_else(|e| panic!("append to {}: {e}", conf.display()));
    }

    fn write_conf(&self) {
        let o = &self.opts;
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line("listen_addresses = '127.0.0.1'".into());
        line(format!("port = {}", self.port));
        line(format!(
            "unix_socket_directories = '{}'",
            self.base.display().to_string().replace('\'', "''")
        ));
        line("fsync = off".into());
        line("synchronous_commit = off".into());
        line("full_page_writes = off".into());
        line(format!("max_connections = {}", o.max_connections));
        if o.max_connections <= 3 {
            line("superuser_reserved_connections = 0".into());
        }
        line("shared_buffers = 32MB".into());
        line("logging_collector = off".into());
        line("log_destination = 'stderr'".into());
        line("log_line_prefix = '%m [%p] %q%u@%d '".into());
        line(format!(
            "password_encryption = '{}'",
            o.auth.password_encryption()
        ));
        for extra in &o.extra_conf {
            line(extra.clone());
        }
        self.write_file(&self.data.join("pgsidecar_test.conf"), &s);
    }

    /// Write a file and make it owned by the postgres OS user when root.
    fn write_file(&self, path: &Path, contents: &str) {
        fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }

    fn pg_ctl_start(&self) -> Result<(), StartError> {
        let log_before = fs::metadata(&self.log_file).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "-l"])
            .arg(&self.log_file)
            .arg("start");
        let out = run_capture(&mut cmd);
        if out.status.success() {
            return Ok(());
        }
        let log = fs::read(&self.log_file).unwrap_or_default();
        let new_log = String::from_utf8_lossy(log.get(log_before as usize..).unwrap_or(&log[..]))
            .into_owned();
        let msg = format!(
            "pg_ctl start failed ({}) on port {}\npg_ctl stdout:\n{}\npg_ctl stderr:\n{}\nserver log:\n{}",
            out.status,
            self.port,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            new_log
        );
        if new_log.contains("Address already in use")
            || new_log.contains("could not create any TCP/IP sockets")
        {
            Err(StartError::PortInUse(msg))
        } else {
            Err(StartError::Other(msg))
        }
    }

    fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.is_ready() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "cluster on port {} not ready after {within:?}; server log:\n{}",
                    self.port,
                    tail(&self.log_contents(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Create roles over the (always trust) unix socket, independent of the
    /// TCP auth method.
    fn setup_roles(&self) {
        let sql = format!(
            "ALTER ROLE {SUPERUSER} PASSWORD '{SUPERUSER_PASSWORD}'; \
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'; \
             GRANT ALL ON SCHEMA public TO {APP_USER};"
        );
        let port = self.port.to_string();
        let mut cmd = Command::new(self.bin.tool("psql"));
        scrub_pg_env(&mut cmd);
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.base)
            .args(["-p", &port, "-U", SUPERUSER, "-d", "postgres", "-c", &sql])
            .stdin(Stdio::null());
        let out = run_capture(&mut cmd);
        if !out.status.success() {
            panic!(
                "creating test roles failed ({}):\n{}\nserver log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                tail(&self.log_contents(), 40)
            );
        }
    }

    fn stop_mode(&self, mode: &str) {
        if self.frozen.load(Ordering::SeqCst) {
            self.sigcont();
        }
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "-m", mode, "stop"]);
        let out = run_capture(&mut cmd);
        if !out.status.success() {
            panic!(
                "pg_ctl stop -m {mode} failed ({}):\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&self.log_contents(), 40)
            );
        }
    }

    fn try_postmaster_pid(&self) -> Option<u32> {
        let s = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        s.lines().next()?.trim().parse().ok()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Never panic in here: we may already be unwinding.
        if std::thread::panicking() {
            eprintln!(
                "[test harness] test panicked; last lines of the PostgreSQL log ({}):\n{}",
                self.log_file.display(),
                tail(&self.log_contents(), 40)
            );
        }
        let pm = self.try_postmaster_pid();
        if let Some(pm) = pm {
            // A frozen postmaster would not act on pg_ctl's SIGQUIT.
            let kids = children_of(pm);
            let _ = send_signal("CONT", &kids);
            let _ = send_signal("CONT", &[pm]);
        }
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "15", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
        // pg_ctl returns once postmaster.pid is gone, which is just before the
        // postmaster exits; give it a moment, then SIGKILL whatever is left.
        if let Some(pm) = pm {
            let deadline = Instant::now() + Duration::from_secs(5);
            while process_alive(pm) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if process_alive(pm) && is_postgres_process(pm) {
                let mut victims = children_of(pm);
                victims.push(pm);
                let _ = send_signal("KILL", &victims);
            }
        }
        if std::env::var_os("PGSIDECAR_KEEP_CLUSTER").is_some_and(|v| v != "0" && !v.is_empty()) {
            if let Some(tmp) = self.tmp.take() {
                let kept = tmp.keep();
                eprintln!("[test harness] keeping cluster dir {}", kept.display());
            }
        }
        // `self.tmp` (TempDir) is dropped after this and removes the directory.
    }
}

enum StartError {
    PortInUse(String),
    Other(String),
}

// ---------------------------------------------------------------------------
// binaries
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PgBin {
    /// Directory with initdb / pg_ctl / postgres.
    dir: PathBuf,
}

impl PgBin {
    fn get() -> &'static PgBin {
        static BIN: OnceLock<PgBin> = OnceLock::new();
        BIN.get_or_init(|| PgBin {
            dir: find_pg_bindir(),
        })
    }

    /// Path of a PostgreSQL program: from the bin dir, else from PATH.
    fn tool(&self, prog: &str) -> PathBuf {
        let p = self.dir.join(prog);
        if p.is_file() {
            return p;
        }
        search_path(prog).unwrap_or_else(|| {
            panic!(
                "PostgreSQL program `{prog}` not found in {} nor on PATH",
                self.dir.display()
            )
        })
    }
}

fn find_pg_bindir() -> PathBuf {
    // 1. $PG_BIN
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").is_file() {
            panic!(
                "PG_BIN={} does not contain `initdb`; point PG_BIN at PostgreSQL's bin directory",
                dir.display()
            );
        }
        return dir;
    }
    // 2. pg_config --bindir
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").is_file() {
                return dir;
            }
        }
    }
    // 3. /usr/lib/postgresql/<highest version>/bin
    if let Ok(rd) = fs::read_dir("/usr/lib/postgresql") {
        let mut best: Option<((u32, u32), PathBuf)> = None;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('.');
            let major = parts.next().and_then(|p| p.parse::<u32>().ok());
            let minor = parts
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .unwrap_or(0);
            let Some(major) = major else { continue };
            let bin = entry.path().join("bin");
            if bin.join("initdb").is_file()
                && !matches!(&best, Some((v, _)) if (major, minor) <= *v)
            {
                best = Some(((major, minor), bin));
            }
        }
        if let Some((_, bin)) = best {
            return bin;
        }
    }
    // 4. PATH (resolve symlinks so sibling programs are found next to initdb)
    if let Some(initdb) = search_path("initdb") {
        let real = fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = real.parent() {
            return dir.to_path_buf();
        }
    }
    panic!(
        "PostgreSQL server binaries not found: set PG_BIN to the directory containing initdb/pg_ctl/postgres \
         (tried $PG_BIN, `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH). \
         On Debian/Ubuntu: apt-get install postgresql"
    );
}

fn search_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------
// OS helpers
// ---------------------------------------------------------------------------

fn temp_base() -> PathBuf {
    // /tmp is world-traversable (needed when the server runs as `postgres`)
    // and short (unix socket paths are limited to ~107 bytes).
    let tmp = PathBuf::from("/tmp");
    if tmp.is_dir() {
        tmp
    } else {
        std::env::temp_dir()
    }
}

fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        if let Ok(status) = fs::read_to_string("/proc/self/status") {
            if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
                // Uid: real effective saved fs
                if let Some(euid) = line.split_whitespace().nth(2) {
                    return euid == "0";
                }
            }
        }
        let out = Command::new("id")
            .arg("-u")
            .output()
            .expect("could not determine uid: /proc/self/status unreadable and `id -u` failed");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
}

/// (uid, gid) of the `postgres` OS user, creating it if necessary.
fn postgres_os_user() -> (u32, u32) {
    static USER: OnceLock<(u32, u32)> = OnceLock::new();
    *USER.get_or_init(|| {
        if let Some(ids) = lookup_postgres_user() {
            return ids;
        }
        // Another test binary may be doing the same right now; just re-check.
        let out = Command::new("useradd")
            .args(["-r", "-M", "postgres"])
            .output();
        lookup_postgres_user().unwrap_or_else(|| {
            panic!(
                "running as root, but OS user `postgres` does not exist and `useradd -r -M postgres` failed: {:?}",
                out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            )
        })
    })
}

fn lookup_postgres_user() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Remove libpq environment variables that could redirect our commands.
fn scrub_pg_env(cmd: &mut Command) {
    for var in [
        "PGDATA",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGSSLMODE",
        "PGREQUIRESSL",
        "PGCONNECT_TIMEOUT",
        "PGTARGETSESSIONATTRS",
    ] {
        cmd.env_remove(var);
    }
}

fn run_capture(cmd: &mut Command) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.output()
        .unwrap_or_else(|e| panic!("could not spawn {cmd:?}: {e}"))
}

/// Direct children of `pid` (scanning /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return kids;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if stat_ppid(child) == Some(pid) {
            kids.push(child);
        }
    }
    kids
}

fn stat_ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..." - comm may contain spaces/parens.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// True if `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    match stat.rfind(')') {
        Some(i) => !matches!(stat[i + 1..].split_whitespace().next(), Some("Z" | "X")),
        None => true,
    }
}

fn is_postgres_process(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().starts_with("postgres"))
        .unwrap_or(false)
}

fn send_signal(sig: &str, pids: &[u32]) -> Result<(), String> {
    if pids.is_empty() {
        return Ok(());
    }
    let out = Command::new("kill")
        .args(["-s", sig, "--"])
        .args(pids.iter().map(|p| p.to_string()))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run kill: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "kill -s {sig} {pids:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// ---------------------------------------------------------------------------
// small utils
// ---------------------------------------------------------------------------

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
