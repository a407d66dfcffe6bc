//! The CNI versions trellis speaks and what each allows.

use crate::error::{CniError, INCOMPATIBLE_VERSION};

/// Every version the plugin answers to, oldest first.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used when no config tells otherwise.
pub const CURRENT: &str = "1.1.0";

/// A parsed, supported CNI version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(u8, u8, u8);

impl Version {
    /// Parses and checks that `s` is one of [`SUPPORTED`].
    pub fn parse(s: &str) -> Result<Self, CniError> {
        if !SUPPORTED.contains(&s) {
            return Err(CniError::new(
                INCOMPATIBLE_VERSION,
                format!("incompatible CNI version {s:?}"),
            )
            .with_details(format!("trellis supports {}", SUPPORTED.join(", "))));
        }
        let mut parts = s.split('.').map(|p| p.parse::<u8>().unwrap_or(0));
        Ok(Self(
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        ))
    }

    /// The 1.x result shape (no `version` in ips, `interface` index kept).
    pub fn is_1x(self) -> bool {
        self.0 >= 1
    }

    /// CHECK exists from 0.4.0 on.
    pub fn allows_check(self) -> bool {
        self >= Self(0, 4, 0)
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn allows_status_gc(self) -> bool {
        self >= Self(1, 1, 0)
    }

    /// Interfaces carry `mtu` from 1.1.0 on.
    pub fn has_iface_mtu(self) -> bool {
        self >= Self(1, 1, 0)
    }
}

/// The VERSION answer.
pub fn version_info() -> serde_json::Value {
    serde_json::json!({ "cniVersion": CURRENT, "supportedVersions": SUPPORTED })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_and_rejects_others() {
        for v in SUPPORTED {
            assert!(Version::parse(v).is_ok(), "{v}");
        }
        for v in ["0.1.0", "0.2.0", "1.2.0", "", "1.0", "x"] {
            assert_eq!(Version::parse(v).map_err(|e| e.code), Err(1), "{v}");
        }
        assert!(!Version::parse("0.3.1").expect("v").allows_check());
        assert!(Version::parse("0.4.0").expect("v").allows_check());
        assert!(!Version::parse("1.0.0").expect("v").allows_status_gc());
        assert!(Version::parse("1.1.0").expect("v").allows_status_gc());
    }
}
