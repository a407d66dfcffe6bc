//! BGP messages on the wire (RFC 4271 section 4).

mod attrs;
mod error;
mod open;
mod prefix;
mod update;

pub use attrs::{AsSegment, PathAttribute};
pub use error::{DecodeError, Notification};
pub use open::{Capability, Open};
pub use update::Update;

/// Smallest valid message: the 19-byte header (a KEEPALIVE).
pub const HEADER_LEN: usize = 19;
/// Largest message without the extended-message capability.
pub const MAX_LEN: usize = 4096;

/// Address family identifiers we speak.
pub const AFI_IPV4: u16 = 1;
/// IPv6.
pub const AFI_IPV6: u16 = 2;
/// Unicast SAFI.
pub const SAFI_UNICAST: u8 = 1;

/// What decoding depends on, negotiated in the OPEN exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ctx {
    /// Both sides announced 4-octet AS numbers (RFC 6793): AS_PATH carries
    /// 4-byte AS numbers.
    pub four_octet_as: bool,
}

/// One BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// OPEN.
    Open(Open),
    /// UPDATE.
    Update(Update),
    /// NOTIFICATION.
    Notification(Notification),
    /// KEEPALIVE.
    Keepalive,
    /// ROUTE-REFRESH (RFC 2918): AFI, SAFI.
    RouteRefresh(u16, u8),
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Self::Open(_) => 1,
            Self::Update(_) => 2,
            Self::Notification(_) => 3,
            Self::Keepalive => 4,
            Self::RouteRefresh(..) => 5,
        }
    }
}

/// Encodes `msg` with its header.
pub fn encode(msg: &Message, ctx: Ctx) -> Vec<u8> {
    let mut body = Vec::new();
    match msg {
        Message::Open(o) => o.encode(&mut body),
        Message::Update(u) => u.encode(&mut body, ctx),
        Message::Notification(n) => {
            body.push(n.code);
            body.push(n.subcode);
            body.extend_from_slice(&n.data);
        }
        Message::Keepalive => {}
        Message::RouteRefresh(afi, safi) => {
            body.extend_from_slice(&afi.to_be_bytes());
            body.push(0);
            body.push(*safi);
        }
    }
    let mut out = vec![0xff; 16];
    out.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
    out.push(msg.kind());
    out.extend_from_slice(&body);
    out
}

/// Decodes one message from the front of `buf`. `Ok(None)` means more bytes
/// are needed; otherwise the message and how many bytes it took. Errors carry
/// the NOTIFICATION to send before closing.
pub fn decode(buf: &[u8], ctx: Ctx) -> Result<Option<(Message, usize)>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(DecodeError::notify(1, 1, vec![]));
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    let kind = buf[18];
    let bad_len = || DecodeError::notify(1, 2, (len as u16).to_be_bytes().to_vec());
    if !(HEADER_LEN..=MAX_LEN).contains(&len) {
        return Err(bad_len());
    }
    let min = match kind {
        1 => 29,
        2 => 23,
        3 => 21,
        4 => 19,
        5 => 23,
        other => return Err(DecodeError::notify(1, 3, vec![other])),
    };
    if len < min || (kind == 4 && len != 19) || (kind == 5 && len != 23) {
        return Err(bad_len());
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..len];
    let msg = match kind {
        1 => Message::Open(Open::decode(body)?),
        2 => Message::Update(Update::decode(body, ctx)?),
        3 => Message::Notification(Notification {
            code: body[0],
            subcode: body[1],
            data: body[2..].to_vec(),
        }),
        4 => Message::Keepalive,
        _ => Message::RouteRefresh(u16::from_be_bytes([body[0], body[1]]), body[3]),
    };
    Ok(Some((msg, len)))
}

#[cfg(test)]
mod tests;
