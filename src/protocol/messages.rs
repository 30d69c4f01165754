//! What the proxy itself says, and the few message bodies it must read.
//!
//! Backend messages the proxy originates are encoded with pgwire's message definitions.
//! Frontend messages the proxy injects towards a server (Parse, Close, Query for state
//! sync) are spliced as bytes, because the data path forwards frames rather than
//! re-encoding them.

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{CommandComplete, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::Message;

use super::framing::{fe, read_cstr};

// Encoding into a BytesMut only fails when a message exceeds pgwire's size cap; the
// messages below are small by construction, so a failure is dropped rather than panicking.
fn put<M: Message>(buf: &mut BytesMut, m: M) {
    let _ = m.encode(buf);
}

pub fn auth_ok(buf: &mut BytesMut) {
    put(buf, Authentication::Ok);
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    put(buf, Authentication::CleartextPassword);
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put(buf, Authentication::MD5Password(salt.to_vec()));
}

pub fn auth_sasl(buf: &mut BytesMut) {
    put(buf, Authentication::SASL(vec!["SCRAM-SHA-256".to_string()]));
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put(
        buf,
        Authentication::SASLContinue(bytes::Bytes::copy_from_slice(data)),
    );
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put(
        buf,
        Authentication::SASLFinal(bytes::Bytes::copy_from_slice(data)),
    );
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put(
        buf,
        ParameterStatus::new(name.to_string(), value.to_string()),
    );
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put(buf, BackendKeyData::new(pid, SecretKey::I32(secret)));
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    put(buf, ReadyForQuery::new(status));
}

pub fn parse_complete(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'1', 0, 0, 0, 4]);
}

pub fn close_complete(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'3', 0, 0, 0, 4]);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put(buf, CommandComplete::new(tag.to_string()));
}

/// A text-format result set header for the admin console.
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    let fields = columns
        .iter()
        .map(|c| FieldDescription::new(c.to_string(), 0, 0, 25, -1, -1, 0))
        .collect();
    put(buf, RowDescription::new(fields));
}

/// A text-format row for the admin console; `None` is SQL NULL.
pub fn data_row(buf: &mut BytesMut, values: &[Option<String>]) {
    let mut data = BytesMut::new();
    for v in values {
        match v {
            Some(s) => {
                data.put_i32(s.len() as i32);
                data.put_slice(s.as_bytes());
            }
            None => data.put_i32(-1),
        }
    }
    put(buf, DataRow::new(data, values.len() as i16));
}

/// Frontend Parse message (injected to prepare a statement on a server).
pub fn fe_parse(buf: &mut BytesMut, name: &[u8], query: &[u8], param_types: &[u8]) {
    let len = 4 + name.len() + 1 + query.len() + 1 + param_types.len();
    buf.reserve(1 + len);
    buf.put_u8(fe::PARSE);
    buf.put_i32(len as i32);
    buf.put_slice(name);
    buf.put_u8(0);
    buf.put_slice(query);
    buf.put_u8(0);
    buf.put_slice(param_types);
}

/// Frontend Close of a prepared statement.
pub fn fe_close_statement(buf: &mut BytesMut, name: &[u8]) {
    buf.put_u8(fe::CLOSE);
    buf.put_i32((4 + 1 + name.len() + 1) as i32);
    buf.put_u8(b'S');
    buf.put_slice(name);
    buf.put_u8(0);
}

/// Frontend simple Query.
pub fn fe_query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(fe::QUERY);
    buf.put_i32((4 + sql.len() + 1) as i32);
    buf.put_slice(sql.as_bytes());
    buf.put_u8(0);
}

pub fn fe_sync(buf: &mut BytesMut) {
    buf.extend_from_slice(&[fe::SYNC, 0, 0, 0, 4]);
}

pub fn fe_terminate(buf: &mut BytesMut) {
    buf.extend_from_slice(&[fe::TERMINATE, 0, 0, 0, 4]);
}

/// The parts of a Parse body: statement name, query text and the raw parameter-type
/// section (count + OIDs), which is kept as bytes so it can be re-sent unchanged.
pub struct ParseBody<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: &'a [u8],
}

pub fn parse_parse(body: &[u8]) -> Option<ParseBody<'_>> {
    let mut pos = 0;
    let name = read_cstr(body, &mut pos)?;
    let query = read_cstr(body, &mut pos)?;
    let param_types = body.get(pos..)?;
    // The type section must at least hold its i16 count and that many OIDs.
    let count = i16::from_be_bytes([*param_types.first()?, *param_types.get(1)?]);
    if count < 0 || param_types.len() != 2 + 4 * count as usize {
        return None;
    }
    Some(ParseBody {
        name,
        query,
        param_types,
    })
}

/// Bind body: portal and statement names, and the offset where the rest begins.
pub fn parse_bind(body: &[u8]) -> Option<(&[u8], &[u8], usize)> {
    let mut pos = 0;
    let portal = read_cstr(body, &mut pos)?;
    let stmt = read_cstr(body, &mut pos)?;
    Some((portal, stmt, pos))
}

/// Describe and Close bodies: kind ('S' statement / 'P' portal) and name.
pub fn parse_target(body: &[u8]) -> Option<(u8, &[u8])> {
    let kind = *body.first()?;
    if kind != b'S' && kind != b'P' {
        return None;
    }
    let mut pos = 1;
    let name = read_cstr(body, &mut pos)?;
    Some((kind, name))
}

/// Rebuilds a Bind frame with another statement name; the rest of the body is copied.
pub fn rebuild_bind(buf: &mut BytesMut, body: &[u8], portal: &[u8], stmt: &[u8], rest: usize) {
    let tail = &body[rest..];
    let len = 4 + portal.len() + 1 + stmt.len() + 1 + tail.len();
    buf.reserve(1 + len);
    buf.put_u8(fe::BIND);
    buf.put_i32(len as i32);
    buf.put_slice(portal);
    buf.put_u8(0);
    buf.put_slice(stmt);
    buf.put_u8(0);
    buf.put_slice(tail);
}

/// Rebuilds a Describe frame for a statement under another name.
pub fn rebuild_describe_statement(buf: &mut BytesMut, stmt: &[u8]) {
    buf.put_u8(b'D');
    buf.put_i32((4 + 1 + stmt.len() + 1) as i32);
    buf.put_u8(b'S');
    buf.put_slice(stmt);
    buf.put_u8(0);
}

/// Reads the SQLSTATE and message fields of an ErrorResponse/NoticeResponse body.
pub fn error_fields(body: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    let (mut code, mut msg, mut severity) = (None, None, None);
    let mut pos = 0;
    while let Some(&field) = body.get(pos) {
        if field == 0 {
            break;
        }
        pos += 1;
        let Some(value) = read_cstr(body, &mut pos) else {
            break;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match field {
            b'C' => code = Some(value),
            b'M' => msg = Some(value),
            b'V' => severity = Some(value),
            b'S' if severity.is_none() => severity = Some(value),
            _ => {}
        }
    }
    (code, msg, severity)
}

/// Reads a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut pos = 0;
    let k = read_cstr(body, &mut pos)?;
    let v = read_cstr(body, &mut pos)?;
    Some((
        String::from_utf8_lossy(k).into_owned(),
        String::from_utf8_lossy(v).into_owned(),
    ))
}

/// Reads a DataRow body of the proxy's own queries as text columns (None: NULL). A
/// malformed row yields the columns read so far. Client data never comes here: the
/// relay forwards rows without decoding them.
pub fn data_row_text(body: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Some(n) = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return out;
    };
    let mut pos = 2;
    for _ in 0..n {
        let Some(len) = body
            .get(pos..pos + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            break;
        };
        pos += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let Some(v) = body.get(pos..pos + len as usize) else {
            break;
        };
        pos += len as usize;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_row_text_reads_columns_nulls_and_stops_at_truncation() {
        let mut b = vec![0u8, 3];
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(b"15");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&5i32.to_be_bytes());
        b.extend_from_slice(b"ab");
        assert_eq!(data_row_text(&b), vec![Some("15".to_string()), None]);
        assert!(data_row_text(&[0]).is_empty());
    }

    #[test]
    fn parse_body_round_trip() {
        let mut b = BytesMut::new();
        fe_parse(&mut b, b"s1", b"select $1", &[0, 1, 0, 0, 0, 23]);
        let p = parse_parse(&b[5..]).expect("valid parse");
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"select $1");
        assert_eq!(p.param_types, &[0, 1, 0, 0, 0, 23]);
        assert_eq!(
            b.len(),
            1 + i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize
        );
    }

    #[test]
    fn parse_with_bad_type_count_is_refused() {
        assert!(parse_parse(b"s\0q\0\x00\x02\0\0\0\x17").is_none());
        assert!(parse_parse(b"s\0q\0\xff\xff").is_none());
        assert!(parse_parse(b"s\0q").is_none());
    }

    #[test]
    fn bind_rebuild_keeps_the_tail() {
        let body = b"p\0stmt\0\x00\x00\x00\x00\x00\x00";
        let (portal, stmt, rest) = parse_bind(body).expect("valid bind");
        assert_eq!((portal, stmt), (&b"p"[..], &b"stmt"[..]));
        let mut out = BytesMut::new();
        rebuild_bind(&mut out, body, portal, b"other", rest);
        assert_eq!(&out[5..], b"p\0other\0\x00\x00\x00\x00\x00\x00");
        assert_eq!(
            i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize,
            out.len() - 1
        );
    }

    #[test]
    fn error_fields_are_read_defensively() {
        let (c, m, s) = error_fields(b"SERROR\0VERROR\0C42P01\0Mno table\0\0");
        assert_eq!(c.as_deref(), Some("42P01"));
        assert_eq!(m.as_deref(), Some("no table"));
        assert_eq!(s.as_deref(), Some("ERROR"));
        // Missing SQLSTATE and unterminated strings do not panic.
        assert_eq!(error_fields(b"Mhalf"), (None, None, None));
        assert_eq!(error_fields(b""), (None, None, None));
    }
}
