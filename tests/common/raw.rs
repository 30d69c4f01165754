//! A minimal wire-protocol client for tests that need exact bytes: startup variants,
//! CancelRequest, FunctionCall, simple-query COPY, ParameterStatus.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;

/// One backend message: type byte and body (without the length).
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Bytes,
}

impl Msg {
    /// SQLSTATE of an ErrorResponse / NoticeResponse.
    pub fn code(&self) -> Option<String> {
        self.field(b'C')
    }

    /// Any field of an ErrorResponse / NoticeResponse.
    pub fn field(&self, which: u8) -> Option<String> {
        let mut b = &self.body[..];
        while let Some((&t, rest)) = b.split_first() {
            if t == 0 {
                break;
            }
            let end = rest.iter().position(|&c| c == 0)?;
            if t == which {
                return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            b = &rest[end + 1..];
        }
        None
    }

    /// Values of a DataRow (text format).
    pub fn row(&self) -> Vec<Option<String>> {
        assert_eq!(self.tag, b'D', "not a DataRow: {self:?}");
        let mut b = &self.body[..];
        let n = b.get_i16();
        (0..n)
            .map(|_| {
                let len = b.get_i32();
                if len < 0 {
                    None
                } else {
                    let v = String::from_utf8_lossy(&b[..len as usize]).into_owned();
                    b.advance(len as usize);
                    Some(v)
                }
            })
            .collect()
    }

    /// Name and value of a ParameterStatus.
    pub fn param(&self) -> (String, String) {
        assert_eq!(self.tag, b'S', "not a ParameterStatus: {self:?}");
        let parts: Vec<_> = self.body.split(|&c| c == 0).collect();
        (
            String::from_utf8_lossy(parts[0]).into_owned(),
            String::from_utf8_lossy(parts[1]).into_owned(),
        )
    }
}

/// The bytes of a startup packet with the given protocol version code.
pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

pub fn ssl_request() -> Vec<u8> {
    let mut p = 8i32.to_be_bytes().to_vec();
    p.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    p
}

pub fn cancel_request(pid: i32, secret: i32) -> Vec<u8> {
    let mut p = 16i32.to_be_bytes().to_vec();
    p.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    p.extend_from_slice(&pid.to_be_bytes());
    p.extend_from_slice(&secret.to_be_bytes());
    p
}

/// A typed frontend message.
pub fn fe(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub fn query_msg(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    fe(b'Q', &b)
}

/// FunctionCall with text arguments and a text result.
pub fn function_call_msg(oid: u32, args: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(oid);
    b.put_i16(0); // all arguments in text format
    b.put_i16(args.len() as i16);
    for a in args {
        b.put_i32(a.len() as i32);
        b.put_slice(a.as_bytes());
    }
    b.put_i16(0); // result in text format
    fe(b'F', &b)
}

/// A raw connection to a PostgreSQL-speaking server.
pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    /// BackendKeyData from startup.
    pub pid: i32,
    pub secret: i32,
}

/// How long a single read may take before the test fails.
const READ_LIMIT: Duration = Duration::from_secs(10);

impl RawConn {
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("raw connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn {
            stream,
            buf: BytesMut::new(),
            pid: 0,
            secret: 0,
        }
    }

    /// Connects and logs in (trust only); returns after the first ReadyForQuery.
    pub async fn login(addr: impl tokio::net::ToSocketAddrs, user: &str, db: &str) -> RawConn {
        let mut c = RawConn::connect(addr).await;
        c.send(&startup_packet(196608, &[("user", user), ("database", db)]))
            .await;
        c.finish_login().await;
        c
    }

    /// Reads the login answers up to ReadyForQuery, recording BackendKeyData.
    pub async fn finish_login(&mut self) -> Vec<Msg> {
        let msgs = self.read_until_ready().await;
        for m in &msgs {
            match m.tag {
                b'E' => panic!("login failed: {:?}", m.field(b'M')),
                b'R' => assert_eq!(&m.body[..4], &[0, 0, 0, 0], "only trust is supported"),
                b'K' => {
                    let mut b = &m.body[..];
                    self.pid = b.get_i32();
                    self.secret = b.get_i32();
                }
                _ => {}
            }
        }
        msgs
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw write");
    }

    /// Reads exactly `n` raw bytes (for answers without framing, like SSL's 'N').
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill().await;
        }
        self.buf.split_to(n).to_vec()
    }

    async fn fill(&mut self) {
        let n = tokio::time::timeout(READ_LIMIT, self.stream.read_buf(&mut self.buf))
            .await
            .expect("raw read timed out")
            .expect("raw read");
        assert!(n > 0, "server closed the connection");
    }

    /// Reads one message; None when the peer closed the connection cleanly first.
    pub async fn try_read_msg(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    let tag = frame[0];
                    frame.advance(5);
                    return Some(Msg {
                        tag,
                        body: frame.freeze(),
                    });
                }
            }
            let n = tokio::time::timeout(READ_LIMIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("raw read timed out")
                .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    pub async fn read_msg(&mut self) -> Msg {
        self.try_read_msg()
            .await
            .expect("server closed the connection")
    }

    /// Reads messages up to and including ReadyForQuery.
    pub async fn read_until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.read_msg().await;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Runs a simple query and returns every answer up to ReadyForQuery.
    pub async fn query(&mut self, sql: &str) -> Vec<Msg> {
        self.send(&query_msg(sql)).await;
        self.read_until_ready().await
    }

    /// Runs a simple query that must succeed; returns its rows.
    pub async fn query_rows(&mut self, sql: &str) -> Vec<Vec<Option<String>>> {
        let msgs = self.query(sql).await;
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            panic!("{sql}: {:?} {:?}", e.code(), e.field(b'M'));
        }
        msgs.iter()
            .filter(|m| m.tag == b'D')
            .map(Msg::row)
            .collect()
    }
}

/// Extended-protocol messages (no parameters, text results).
pub fn parse_msg(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes());
    fe(b'P', &b)
}

pub fn bind_msg(portal: &str, stmt: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(portal.as_bytes());
    b.push(0);
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
    b.extend_from_slice(&0i16.to_be_bytes()); // parameters
    b.extend_from_slice(&0i16.to_be_bytes()); // result formats
    fe(b'B', &b)
}

pub fn execute_msg(portal: &str) -> Vec<u8> {
    let mut b = portal.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(&0i32.to_be_bytes());
    fe(b'E', &b)
}

/// Close ('S' statement or 'P' portal).
pub fn close_msg(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    fe(b'C', &b)
}

pub fn sync_msg() -> Vec<u8> {
    fe(b'S', &[])
}

/// The type bytes of a message list, as a string ("1Z", "2DCZ", ...).
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}
