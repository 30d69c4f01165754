//! Why a server connection was closed: the `reason` label of
//! `pgsidecar_server_connections_closed_total` and the word in the logs, one spelling.

/// Why a server connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Found dead while idle (the server or the network closed it).
    Broken,
    HealthCheckFailed,
    HealthCheckTimeout,
    /// A check abandoned because the pool closed or its checkout ended.
    CheckCancelled,
    /// More I/O or protocol errors than `MAX_CONN_ERRORS`.
    Errors,
    /// Past `pool.server_lifetime`.
    Lifetime,
    /// Idle past `pool.server_idle_timeout`.
    IdleTimeout,
    /// Its host's role no longer fits the pool (a failover, a demotion).
    Role,
    /// The sizing controller's shrink.
    Shrink,
    /// Over the congestion-control ceiling.
    Congestion,
    /// Given back to a nearly full server by an idle pool.
    Yield,
    /// Over a pool size lowered by a reload.
    Resize,
    BreakerOpen,
    /// RECONNECT, KILL or the API's reconnect.
    Reconnect,
    /// The pool was closed.
    Closed,
    /// A lease dropped without a release (a session ended abnormally).
    Dropped,
    /// The client holding it was killed (KILL).
    Killed,
    /// The proxy is shutting down.
    Shutdown,
    /// A client's startup settings failed on it.
    SettingsCheckFailed,
    /// Released with a transaction or a request still open.
    UncleanAtRelease,
    /// The server stopped answering or closed mid-session.
    ServerLost,
    /// Its client left in the middle of a request.
    ClientLeftMidRequest,
    /// The ROLLBACK after its client left failed.
    RollbackFailed,
    /// The session-mode reset query failed.
    ResetFailed,
    /// Its client ran LOAD: a library cannot be unloaded.
    LibraryLoaded,
    /// Cleaning up a pinned client's session state failed.
    SessionStateCleanupFailed,
    /// `limits.query_timeout` passed and the cancel got no answer.
    QueryTimeout,
    /// `limits.transaction_timeout` passed with a request running.
    TransactionTimeout,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        use CloseReason::*;
        match self {
            Broken => "broken",
            HealthCheckFailed => "health_check_failed",
            HealthCheckTimeout => "health_check_timeout",
            CheckCancelled => "check_cancelled",
            Errors => "errors",
            Lifetime => "lifetime",
            IdleTimeout => "idle_timeout",
            Role => "role",
            Shrink => "shrink",
            Congestion => "congestion",
            Yield => "yield",
            Resize => "resize",
            BreakerOpen => "breaker_open",
            Reconnect => "reconnect",
            Closed => "closed",
            Dropped => "dropped",
            Killed => "killed",
            Shutdown => "shutdown",
            SettingsCheckFailed => "settings_check_failed",
            UncleanAtRelease => "unclean_at_release",
            ServerLost => "server_lost",
            ClientLeftMidRequest => "client_left_mid_request",
            RollbackFailed => "rollback_failed",
            ResetFailed => "reset_failed",
            LibraryLoaded => "library_loaded",
            SessionStateCleanupFailed => "session_state_cleanup_failed",
            QueryTimeout => "query_timeout",
            TransactionTimeout => "transaction_timeout",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
