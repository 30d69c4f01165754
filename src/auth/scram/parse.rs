//! Parsing the client's SCRAM messages (RFC 5802 section 7), byte for byte as
//! PostgreSQL does: attribute order, printable nonces, no UTF-8 requirement.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::{ScramError, KEY_LEN, MAX_MESSAGE_LEN};

pub(super) struct ClientFirst<'a> {
    pub(super) cbind_flag: u8,
    pub(super) bare: &'a [u8],
    pub(super) client_nonce: &'a [u8],
}

pub(super) struct ClientFinal<'a> {
    pub(super) channel_binding: &'a [u8],
    pub(super) nonce: &'a [u8],
    pub(super) proof: [u8; KEY_LEN],
    /// Everything before ",p=", which is part of AuthMessage.
    pub(super) without_proof: &'a [u8],
}

pub(super) fn check_message(data: &[u8]) -> Result<(), ScramError> {
    if data.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Malformed("message too long"));
    }
    // PostgreSQL reads these as C strings, so an embedded NUL is malformed.
    if data.contains(&0) {
        return Err(ScramError::Malformed("message contains a NUL byte"));
    }
    Ok(())
}

/// gs2-header client-first-message-bare:
/// `(n|y),,[m=ext,]n=<user>,r=<nonce>[,<attr>=<value>]*`
pub(super) fn parse_client_first(data: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    check_message(data)?;
    // gs2 header: exactly "n,," or "y,," (no authzid, no channel binding).
    let (cbind_flag, bare) = match data {
        [flag @ (b'n' | b'y'), b',', b',', bare @ ..] => (*flag, bare),
        [b'p', ..] => return Err(ScramError::ChannelBindingUnsupported),
        [b'n' | b'y', b',', b'a', ..] => return Err(ScramError::AuthzidUnsupported),
        [b'n' | b'y', b',', ..] => {
            return Err(ScramError::Malformed("comma expected after gs2 header"))
        }
        [b'n' | b'y', ..] => {
            return Err(ScramError::Malformed(
                "comma expected after channel-binding flag",
            ))
        }
        _ => return Err(ScramError::Malformed("unexpected channel-binding flag")),
    };
    if bare.first() == Some(&b'm') {
        return Err(ScramError::UnsupportedExtension);
    }

    let mut fields = bare.split(|&b| b == b',');
    // The username is ignored: the role comes from the startup packet.
    attr_value(fields.next(), b'n')?;
    let client_nonce = attr_value(fields.next(), b'r')?;
    if client_nonce.is_empty() {
        return Err(ScramError::Malformed("empty client nonce"));
    }
    if !client_nonce.iter().all(|&b| is_printable(b)) {
        return Err(ScramError::Malformed(
            "client nonce contains invalid characters",
        ));
    }
    // Optional extensions after the nonce are allowed and ignored.
    for field in fields {
        any_attr(field)?;
    }
    Ok(ClientFirst {
        cbind_flag,
        bare,
        client_nonce,
    })
}

/// `c=<cbind>,r=<nonce>[,<attr>=<value>]*,p=<proof>`
pub(super) fn parse_client_final(data: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    check_message(data)?;
    let mut fields = data.split(|&b| b == b',');
    let channel_binding = attr_value(fields.next(), b'c')?;
    let nonce = attr_value(fields.next(), b'r')?;

    // Skip extensions up to the proof, which must come last. `offset` tracks
    // where the current field starts: after "c=<cb>,r=<nonce>,".
    let mut offset = channel_binding.len() + nonce.len() + 6;
    loop {
        let Some(field) = fields.next() else {
            return Err(ScramError::Malformed(
                "proof missing from client-final-message",
            ));
        };
        let (attr, value) = any_attr(field)?;
        if attr == b'p' {
            if fields.next().is_some() {
                return Err(ScramError::Malformed(
                    "garbage at the end of client-final-message",
                ));
            }
            let proof = STANDARD
                .decode(value)
                .ok()
                .and_then(|p| <[u8; KEY_LEN]>::try_from(p).ok())
                .ok_or(ScramError::Malformed(
                    "malformed proof in client-final-message",
                ))?;
            // AuthMessage takes everything before the comma that precedes "p=".
            let without_proof = data
                .get(..offset - 1)
                .ok_or(ScramError::Malformed("truncated client-final-message"))?;
            return Ok(ClientFinal {
                channel_binding,
                nonce,
                proof,
                without_proof,
            });
        }
        offset += field.len() + 1;
    }
}

/// Value of `field` if it is `<attr>=<value>`.
fn attr_value(field: Option<&[u8]>, attr: u8) -> Result<&[u8], ScramError> {
    let field = field.ok_or(ScramError::Malformed("missing attribute"))?;
    match field {
        [a, b'=', value @ ..] if *a == attr => Ok(value),
        _ => Err(ScramError::Malformed("unexpected attribute")),
    }
}

/// Any `<letter>=<value>` field (PostgreSQL's `read_any_attr`).
fn any_attr(field: &[u8]) -> Result<(u8, &[u8]), ScramError> {
    match field {
        [a, b'=', value @ ..] if a.is_ascii_alphabetic() => Ok((*a, value)),
        _ => Err(ScramError::Malformed("attribute expected")),
    }
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E (visible ASCII except ',').
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}
