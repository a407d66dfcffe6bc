//! The runtime's `CNI_*` environment, decoded and validated.

use crate::error::{CniError, INVALID_ENV};
use serde::{Deserialize, Serialize};

/// The CNI operation asked for in `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container (idempotent).
    Del,
    /// Verify an attachment.
    Check,
    /// Report readiness.
    Status,
    /// Free attachments the runtime no longer knows.
    Gc,
    /// Report supported versions.
    Version,
}

impl Command {
    fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            other => {
                return Err(CniError::new(
                    INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not a CNI command"),
                )
                .with_details("expected one of ADD, DEL, CHECK, STATUS, GC, VERSION"))
            }
        })
    }

    /// The name as in `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

/// A validated runtime environment. Fields a command does not need may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: `/var/run/netns/NAME` or `/proc/PID/ns/net`; may be empty on DEL.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH` entries.
    pub path: Vec<String>,
}

impl Env {
    /// Decodes the environment through `get` (usually `std::env::var`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = match get("CNI_COMMAND") {
            Some(c) if !c.is_empty() => Command::parse(&c)?,
            _ => return Err(CniError::new(INVALID_ENV, "CNI_COMMAND is not set")),
        };
        if command == Command::Version {
            // VERSION answers whatever else is set (libcni sends placeholders)
            return Ok(Self {
                command,
                container_id: String::new(),
                netns: String::new(),
                ifname: String::new(),
                args: vec![],
                path: vec![],
            });
        }
        let needs = |var: &str| -> bool {
            match command {
                Command::Add | Command::Check => {
                    matches!(
                        var,
                        "CNI_CONTAINERID" | "CNI_NETNS" | "CNI_IFNAME" | "CNI_PATH"
                    )
                }
                Command::Del => matches!(var, "CNI_CONTAINERID" | "CNI_IFNAME" | "CNI_PATH"),
                Command::Status | Command::Gc | Command::Version => false,
            }
        };
        let var = |name: &str| -> Result<String, CniError> {
            let v = get(name).unwrap_or_default();
            if v.is_empty() && needs(name) {
                return Err(CniError::new(
                    INVALID_ENV,
                    format!("{name} is not set (required for {})", command.as_str()),
                ));
            }
            Ok(v)
        };
        let container_id = var("CNI_CONTAINERID")?;
        let netns = var("CNI_NETNS")?;
        let ifname = var("CNI_IFNAME")?;
        let path = var("CNI_PATH")?;
        if needs("CNI_CONTAINERID") {
            validate_container_id(&container_id)?;
        }
        if needs("CNI_IFNAME") {
            validate_ifname(&ifname)?;
        }
        let uses_netns = matches!(command, Command::Add | Command::Check | Command::Del);
        if uses_netns && !netns.is_empty() && !netns.starts_with('/') {
            return Err(CniError::new(
                INVALID_ENV,
                format!("CNI_NETNS {netns:?} is not an absolute path"),
            ));
        }
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args: parse_args(&get("CNI_ARGS").unwrap_or_default())?,
            path: path
                .split(':')
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect(),
        })
    }

    /// The value of a `CNI_ARGS` key, e.g. `K8S_POD_NAME`.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Container ids: non-empty, alphanumerics plus `_ . -`, as the spec says.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            INVALID_ENV,
            format!("CNI_CONTAINERID {id:?} is invalid"),
        )
        .with_details("it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"))
    }
}

/// Interface names: 1..=15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        Err(CniError::new(
            INVALID_ENV,
            format!("CNI_IFNAME {name:?} is not a valid interface name"),
        )
        .with_details("1 to 15 characters, not '.' or '..', without '/', ':' or spaces"))
    } else {
        Ok(())
    }
}

/// Parses `CNI_ARGS` (`K=V;K2=V2`).
pub fn parse_args(s: &str) -> Result<Vec<(String, String)>, CniError> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::new(
                INVALID_ENV,
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-1"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAME=web-1;K8S_POD_NAMESPACE=default",
        ),
    ];

    #[test]
    fn add_decodes() {
        let e = env(ADD).expect("env");
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.arg("K8S_POD_NAME"), Some("web-1"));
        assert_eq!(e.path.len(), 2);
    }

    #[test]
    fn missing_and_invalid_vars_are_code_4() {
        for drop in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_PATH",
        ] {
            let v: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != drop).collect();
            let err = env(&v).expect_err(drop);
            assert_eq!(err.code, 4);
            assert!(err.msg.contains(drop), "{}", err.msg);
        }
        for (k, bad) in [
            ("CNI_COMMAND", "FROB"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "this-is-too-long-0"),
            ("CNI_IFNAME", ".."),
            ("CNI_NETNS", "relative/path"),
            ("CNI_ARGS", "novalue"),
        ] {
            let mut v: Vec<_> = ADD.iter().copied().filter(|(kk, _)| *kk != k).collect();
            v.push((k, bad));
            assert_eq!(env(&v).expect_err(bad).code, 4, "{k}={bad}");
        }
    }

    #[test]
    fn del_allows_empty_netns() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_NETNS", ""),
        ])
        .expect("env");
        assert!(e.netns.is_empty());
    }

    #[test]
    fn version_ignores_the_rest() {
        // libcni validates configs by calling VERSION with CNI_NETNS=dummy
        let e = env(&[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy"),
        ]);
        assert!(e.is_ok(), "{e:?}");
    }

    #[test]
    fn status_and_gc_need_nothing_else() {
        assert!(env(&[("CNI_COMMAND", "STATUS")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "GC")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
    }
}
