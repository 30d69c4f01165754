//! The proxy's own simple queries on a server connection (resets, rollbacks, health
//! checks, headroom samples, role checks): one path that reads every reply and checks
//! that the connection ends idle.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{QueryOutcome, ServerConn, ServerStream, STARTUP_MESSAGE_LIMIT};
use crate::protocol::framing::{backend_header, be};
use crate::protocol::messages;

impl ServerConn {
    /// Runs a simple query whose results nobody needs (reset, rollback, health check) and
    /// checks that the connection ends idle. Any error makes the connection unusable.
    pub async fn run_quiet(&mut self, sql: &str, limit: Duration) -> Result<(), String> {
        match self.run_simple(sql, limit).await? {
            QueryOutcome::Rows(_) => Ok(()),
            QueryOutcome::ServerError(e) => Err(e),
        }
    }

    /// Runs one of the proxy's own simple queries and returns the first row, as text.
    /// Err: the connection is unusable (I/O, protocol, not idle afterwards, no answer
    /// within `limit`); a server error on an idle connection is an outcome.
    pub async fn query_row(&mut self, sql: &str, limit: Duration) -> Result<QueryOutcome, String> {
        self.run_simple(sql, limit).await
    }

    async fn run_simple(&mut self, sql: &str, limit: Duration) -> Result<QueryOutcome, String> {
        match tokio::time::timeout(limit, self.simple(sql)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    /// The one simple-query path for the proxy's own queries, without a time limit
    /// (callers set one): sends `sql`, reads every reply, returns the first row or the
    /// server's error. Err: the connection is unusable (I/O, protocol, a FATAL, a COPY,
    /// not idle afterwards).
    pub async fn simple(&mut self, sql: &str) -> Result<QueryOutcome, String> {
        let mut buf = BytesMut::new();
        messages::fe_query(&mut buf, sql);
        self.stream
            .write_all(&buf)
            .await
            .map_err(|e| e.to_string())?;
        // TLS buffers writes.
        self.stream.flush().await.map_err(|e| e.to_string())?;
        buf.clear();
        let mut failed = None;
        let mut row = None;
        loop {
            let (tag, body) = read_raw(&mut self.stream, &mut buf)
                .await
                .map_err(|e| e.to_string())?;
            match tag {
                be::READY_FOR_QUERY => {
                    let status = body.first().copied().unwrap_or(b'?');
                    if status != b'I' {
                        return Err(format!("server left in state {}", status as char));
                    }
                    return Ok(match failed {
                        Some(e) => QueryOutcome::ServerError(e),
                        None => QueryOutcome::Rows(row.unwrap_or_default()),
                    });
                }
                be::DATA_ROW if row.is_none() => row = Some(messages::data_row_text(&body)),
                be::ERROR_RESPONSE => {
                    let (code, msg, severity) = messages::error_fields(&body);
                    let text = format!("{}: {}", code.unwrap_or_default(), msg.unwrap_or_default());
                    if matches!(severity.as_deref(), Some("FATAL") | Some("PANIC")) {
                        // The server ends the connection after it.
                        return Err(text);
                    }
                    failed = Some(text);
                }
                be::PARAMETER_STATUS => {
                    if let Some((k, v)) = messages::parse_parameter_status(&body) {
                        self.params.insert(k, v);
                    }
                }
                be::COPY_IN_RESPONSE | be::COPY_OUT_RESPONSE | be::COPY_BOTH_RESPONSE => {
                    return Err("unexpected COPY from an internal query".into())
                }
                // EmptyQueryResponse, rows after the first, CommandComplete, notices.
                _ => {}
            }
        }
    }
}

/// Reads one raw backend message (type, body) for internal queries.
async fn read_raw(
    stream: &mut ServerStream,
    buf: &mut BytesMut,
) -> std::io::Result<(u8, BytesMut)> {
    loop {
        if let Some(h) = backend_header(buf, STARTUP_MESSAGE_LIMIT)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
        {
            if buf.len() >= h.frame_len() {
                let mut frame = buf.split_to(h.frame_len());
                frame.advance(5);
                return Ok((h.tag, frame));
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}
