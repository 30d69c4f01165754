//! The untyped packets that open a connection: StartupMessage, SSLRequest, GSSENCRequest
//! and CancelRequest. Parsed defensively: the length is checked against PostgreSQL's
//! 10,000-byte cap before anything is buffered.

use super::framing::SMALL_MESSAGE_LIMIT;

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
pub const PROTOCOL_3_0: i32 = 196608;

/// Largest startup packet accepted (PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = SMALL_MESSAGE_LIMIT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: Vec<u8>,
    },
    Startup {
        /// Minor version asked for; 3.x with x > 0 is negotiated down to 3.0.
        minor: u16,
        params: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet ({0} bytes)")]
    BadLength(i64),
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0 to 3.0")]
    UnsupportedVersion(u16, u16),
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Validates the 4-byte length prefix of a startup packet and returns the total length.
pub fn startup_len(prefix: [u8; 4]) -> Result<usize, StartupError> {
    let len = i32::from_be_bytes(prefix);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(StartupError::BadLength(len as i64));
    }
    Ok(len as usize)
}

/// Parses a whole startup packet (including its length prefix).
pub fn parse_startup(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    if packet.len() < 8 {
        return Err(StartupError::BadLength(packet.len() as i64));
    }
    let code = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    match code {
        SSL_REQUEST_CODE if body.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if body.is_empty() => Ok(StartupPacket::GssEncRequest),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => Err(StartupError::Malformed(
            "SSL/GSS request with trailing bytes",
        )),
        CANCEL_REQUEST_CODE => {
            if body.len() < 8 || body.len() > 4 + 256 {
                return Err(StartupError::Malformed("cancel request length"));
            }
            let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            Ok(StartupPacket::Cancel {
                pid,
                secret: body[4..].to_vec(),
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedVersion(major, minor));
            }
            let params = parse_params(body)?;
            Ok(StartupPacket::Startup { minor, params })
        }
    }
}

/// Text of a name or value; bytes that are not UTF-8 become U+FFFD (what they can mean
/// to PostgreSQL depends on an encoding not yet known). The strict check first: it is
/// the common case and several times cheaper than the lossy scan.
fn text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(b).into_owned(),
    }
}

fn parse_params(body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    // user, database, application_name and one or two more, usually.
    let mut params = Vec::with_capacity(6);
    let mut rest = body;
    loop {
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(StartupError::Malformed("missing terminator"));
        };
        if end == 0 {
            // The empty name ends the list; nothing may follow it.
            if rest.len() != 1 {
                return Err(StartupError::Malformed("bytes after terminator"));
            }
            return Ok(params);
        }
        let key = text(&rest[..end]);
        rest = &rest[end + 1..];
        let Some(vend) = rest.iter().position(|&b| b == 0) else {
            return Err(StartupError::Malformed("parameter without value"));
        };
        let value = text(&rest[..vend]);
        rest = &rest[vend + 1..];
        params.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, body: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&((8 + body.len()) as i32).to_be_bytes());
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn startup_params_are_read() {
        let p = packet(PROTOCOL_3_0, b"user\0bob\0database\0db\0\0");
        assert_eq!(
            parse_startup(&p),
            Ok(StartupPacket::Startup {
                minor: 0,
                params: vec![
                    ("user".into(), "bob".into()),
                    ("database".into(), "db".into())
                ]
            })
        );
    }

    #[test]
    fn non_utf8_bytes_become_replacement_characters() {
        let p = packet(PROTOCOL_3_0, b"user\0b\xffb\0\0");
        let Ok(StartupPacket::Startup { params, .. }) = parse_startup(&p) else {
            panic!("not a startup packet");
        };
        assert_eq!(params, vec![("user".into(), "b\u{fffd}b".into())]);
    }

    #[test]
    fn bad_packets_are_refused() {
        assert!(parse_startup(&packet(PROTOCOL_3_0, b"user\0bob\0")).is_err());
        assert!(parse_startup(&packet(PROTOCOL_3_0, b"user\0")).is_err());
        assert!(parse_startup(&packet(PROTOCOL_3_0, b"\0junk")).is_err());
        assert_eq!(
            parse_startup(&packet(2 << 16, b"\0")),
            Err(StartupError::UnsupportedVersion(2, 0))
        );
        assert!(startup_len(7i32.to_be_bytes()).is_err());
        assert!(startup_len((-1i32).to_be_bytes()).is_err());
        assert!(startup_len(10_001i32.to_be_bytes()).is_err());
    }

    #[test]
    fn special_requests() {
        assert_eq!(
            parse_startup(&packet(SSL_REQUEST_CODE, b"")),
            Ok(StartupPacket::SslRequest)
        );
        let c = parse_startup(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4]));
        assert_eq!(
            c,
            Ok(StartupPacket::Cancel {
                pid: 7,
                secret: vec![1, 2, 3, 4]
            })
        );
    }
}
