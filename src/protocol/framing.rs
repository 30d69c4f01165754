//! Message boundaries: the 5-byte header (type + length) and per-type length caps.
//!
//! PostgreSQL validates a message's type before trusting its length and caps small
//! message types at 10,000 bytes (`PQ_SMALL_MESSAGE_LIMIT`); we do the same so a hostile
//! length can never make us reserve memory we should not.

/// Cap for startup-phase packets and small frontend messages (PostgreSQL's limit).
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;
/// Cap for SASL/password messages (PostgreSQL's `PG_MAX_AUTH_TOKEN_LENGTH` + framing).
pub const AUTH_MESSAGE_LIMIT: usize = 65_535 + 1024;
/// Cap for server messages the proxy buffers whole before forwarding (everything but
/// DataRow, CopyData, FunctionCallResponse and ParameterDescription, which stream). The
/// largest legitimate one, a RowDescription of 1,664 columns, is far below this.
pub const BACKEND_WHOLE_MESSAGE_LIMIT: usize = 64 << 20;
/// Length of a typed message header: type byte + i32 length.
pub const HEADER_LEN: usize = 5;

/// Frontend (client to server) message types.
pub mod fe {
    pub const BIND: u8 = b'B';
    pub const CLOSE: u8 = b'C';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PARSE: u8 = b'P';
    pub const PASSWORD: u8 = b'p';
    pub const QUERY: u8 = b'Q';
    pub const SYNC: u8 = b'S';
    pub const TERMINATE: u8 = b'X';
}

/// Backend (server to client) message types.
pub mod be {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const NO_DATA: u8 = b'n';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A type byte that is not a frontend message once the session is established.
    UnknownType(u8),
    /// A length below 4 (the length counts itself) or negative.
    BadLength(u8, i32),
    /// A length above the cap for this type.
    TooLong { tag: u8, len: usize, max: usize },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::UnknownType(t) => write!(f, "invalid frontend message type {t}"),
            FrameError::BadLength(t, l) => {
                write!(f, "invalid message length {l} for message type {t}")
            }
            FrameError::TooLong { tag, len, max } => write!(
                f,
                "message of type {tag} is {len} bytes, over the limit of {max} bytes"
            ),
        }
    }
}

/// A parsed message header. `len` counts the length field itself but not the type byte,
/// as on the wire; the whole frame is `1 + len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub len: usize,
}

impl Header {
    /// Total bytes of the frame including the type byte.
    #[inline]
    pub fn frame_len(&self) -> usize {
        1 + self.len
    }

    /// Bytes of body after the header.
    #[inline]
    pub fn body_len(&self) -> usize {
        self.len - 4
    }
}

/// Reads the raw type and length from the first 5 bytes of `buf`, if present.
#[inline]
pub fn peek_raw(buf: &[u8]) -> Option<(u8, i32)> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    Some((buf[0], len))
}

/// The largest length a frontend message of type `tag` may have, or None when `tag`
/// is not a frontend message type. Mirrors PostgreSQL's `SocketBackend`.
#[inline]
pub fn frontend_limit(tag: u8, large: usize) -> Option<usize> {
    match tag {
        fe::QUERY | fe::FUNCTION_CALL | fe::BIND | fe::PARSE | fe::COPY_DATA => Some(large),
        fe::CLOSE
        | fe::DESCRIBE
        | fe::EXECUTE
        | fe::FLUSH
        | fe::SYNC
        | fe::TERMINATE
        | fe::COPY_DONE
        | fe::COPY_FAIL => Some(SMALL_MESSAGE_LIMIT),
        fe::PASSWORD => Some(AUTH_MESSAGE_LIMIT),
        _ => None,
    }
}

/// Validates a frontend header: known type, sane length, under the cap.
#[inline]
pub fn frontend_header(buf: &[u8], large: usize) -> Result<Option<Header>, FrameError> {
    let Some((tag, raw)) = peek_raw(buf) else {
        return Ok(None);
    };
    let max = frontend_limit(tag, large).ok_or(FrameError::UnknownType(tag))?;
    check_len(tag, raw, max).map(Some)
}

/// Validates a backend header: any type, sane length, under `max`.
#[inline]
pub fn backend_header(buf: &[u8], max: usize) -> Result<Option<Header>, FrameError> {
    let Some((tag, raw)) = peek_raw(buf) else {
        return Ok(None);
    };
    check_len(tag, raw, max).map(Some)
}

#[inline]
fn check_len(tag: u8, raw: i32, max: usize) -> Result<Header, FrameError> {
    if raw < 4 {
        return Err(FrameError::BadLength(tag, raw));
    }
    let len = raw as usize;
    if len > max {
        return Err(FrameError::TooLong { tag, len, max });
    }
    Ok(Header { tag, len })
}

/// Reads a NUL-terminated string starting at `*pos`, advancing past the NUL.
#[inline]
pub fn read_cstr<'a>(body: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = body.get(*pos..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    *pos += end + 1;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rejects_negative_and_short_lengths() {
        let buf = [b'Q', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            frontend_header(&buf, 1 << 20),
            Err(FrameError::BadLength(b'Q', -1))
        );
        let buf = [b'Q', 0, 0, 0, 3];
        assert!(frontend_header(&buf, 1 << 20).is_err());
    }

    #[test]
    fn small_types_are_capped_before_allocation() {
        let buf = [b'S', 0, 1, 0, 0];
        assert!(matches!(
            frontend_header(&buf, 1 << 30),
            Err(FrameError::TooLong { .. })
        ));
        let buf = [b'Q', 0, 1, 0, 0];
        assert_eq!(
            frontend_header(&buf, 1 << 30),
            Ok(Some(Header {
                tag: b'Q',
                len: 65536
            }))
        );
    }

    #[test]
    fn unknown_frontend_type_is_refused() {
        let buf = [b'z', 0, 0, 0, 4];
        assert_eq!(
            frontend_header(&buf, 100),
            Err(FrameError::UnknownType(b'z'))
        );
    }

    #[test]
    fn incomplete_header_asks_for_more() {
        assert_eq!(frontend_header(&[b'Q', 0, 0], 100), Ok(None));
    }

    #[test]
    fn cstr_reading_is_bounded() {
        let body = b"abc\0def";
        let mut pos = 0;
        assert_eq!(read_cstr(body, &mut pos), Some(&b"abc"[..]));
        assert_eq!(read_cstr(body, &mut pos), None);
        let mut pos = 100;
        assert_eq!(read_cstr(body, &mut pos), None);
    }
}
