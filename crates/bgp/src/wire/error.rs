//! Decode errors and NOTIFICATION messages.

/// A NOTIFICATION (RFC 4271 section 4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code.
    pub code: u8,
    /// Error subcode.
    pub subcode: u8,
    /// Data.
    pub data: Vec<u8>,
}

impl Notification {
    /// A short name for logs, e.g. `UPDATE message error / attribute length error`.
    pub fn describe(&self) -> String {
        let code = match self.code {
            1 => "message header error",
            2 => "OPEN message error",
            3 => "UPDATE message error",
            4 => "hold timer expired",
            5 => "finite state machine error",
            6 => "cease",
            7 => "ROUTE-REFRESH message error",
            _ => "unknown error",
        };
        let sub = match (self.code, self.subcode) {
            (1, 1) => "connection not synchronized",
            (1, 2) => "bad message length",
            (1, 3) => "bad message type",
            (2, 1) => "unsupported version number",
            (2, 2) => "bad peer AS",
            (2, 3) => "bad BGP identifier",
            (2, 4) => "unsupported optional parameter",
            (2, 6) => "unacceptable hold time",
            (2, 7) => "unsupported capability",
            (3, 1) => "malformed attribute list",
            (3, 2) => "unrecognized well-known attribute",
            (3, 3) => "missing well-known attribute",
            (3, 4) => "attribute flags error",
            (3, 5) => "attribute length error",
            (3, 6) => "invalid ORIGIN attribute",
            (3, 8) => "invalid NEXT_HOP attribute",
            (3, 9) => "optional attribute error",
            (3, 10) => "invalid network field",
            (3, 11) => "malformed AS_PATH",
            _ => "",
        };
        if sub.is_empty() {
            format!("{code} (subcode {})", self.subcode)
        } else {
            format!("{code} / {sub}")
        }
    }
}

/// Why bytes did not decode: the session ends with this NOTIFICATION.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bgp decode: {}", .0.describe())]
pub struct DecodeError(pub Notification);

impl DecodeError {
    /// An error answered with NOTIFICATION `code`/`subcode` carrying `data`.
    pub fn notify(code: u8, subcode: u8, data: Vec<u8>) -> Self {
        Self(Notification {
            code,
            subcode,
            data,
        })
    }
}
