//! [`Allocator`] plus its state on disk: `DIR/<ip>` holds the owner as JSON,
//! `DIR/last_reserved` the round-robin cursor.

use crate::allocator::{Allocator, IpamError, Owner, OwnerKey};
use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use trellis_model::HostRange;

/// Pool failures.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Allocation refused.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The state directory could not be read or written.
    #[error("ipam state {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PoolError + '_ {
    move |source| PoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A persisted allocator.
#[derive(Debug)]
pub struct Pool {
    dir: PathBuf,
    alloc: Allocator,
    /// Files that could not be understood; their addresses stay reserved.
    pub warnings: Vec<String>,
}

const CURSOR: &str = "last_reserved";

impl Pool {
    /// Opens (creating if needed) the state in `dir` and restores every
    /// allocation found there.
    pub fn open(dir: &Path, range: HostRange) -> Result<Self, PoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut alloc = Allocator::new(range);
        let mut warnings = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            let path = entry.path();
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let owner = serde_json::from_str::<Owner>(&text).unwrap_or_else(|e| {
                warnings.push(format!(
                    "{}: unreadable owner ({e}); address kept reserved",
                    path.display()
                ));
                Owner {
                    network: String::new(),
                    container_id: format!("unknown-{name}"),
                    ifname: String::new(),
                    pod: None,
                }
            });
            if !range.is_pod_address(ip) {
                warnings.push(format!(
                    "{}: {ip} is outside {}",
                    path.display(),
                    range.net()
                ));
            }
            alloc.insert(ip, owner);
        }
        let cursor = std::fs::read_to_string(dir.join(CURSOR))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        alloc.set_last(cursor);
        Ok(Self {
            dir: dir.to_path_buf(),
            alloc,
            warnings,
        })
    }

    /// The in-memory view.
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// Allocates for `owner` and records it on disk before returning.
    pub fn allocate(&mut self, owner: Owner) -> Result<IpAddr, PoolError> {
        let previous = self.alloc.last();
        let ip = self.alloc.allocate(owner.clone())?;
        let path = self.dir.join(ip.to_string());
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| {
                let body = serde_json::to_vec(&owner).map_err(std::io::Error::other)?;
                f.write_all(&body)
            });
        if let Err(e) = written {
            // a partial file would reserve the address forever; drop it
            if e.kind() != ErrorKind::AlreadyExists {
                let _ = std::fs::remove_file(&path);
            }
            self.alloc.remove_ip(ip);
            self.alloc.set_last(previous);
            return Err(io(&path)(e));
        }
        // the cursor is a hint: losing it only changes which address comes next
        let _ = std::fs::write(self.dir.join(CURSOR), ip.to_string());
        Ok(ip)
    }

    /// Frees the address of `key` (nothing to do when it holds none).
    pub fn release(&mut self, key: &OwnerKey) -> Result<Option<IpAddr>, PoolError> {
        let Some(ip) = self.alloc.lookup(key) else {
            return Ok(None);
        };
        self.release_ip(ip)?;
        Ok(Some(ip))
    }

    /// Frees `ip` whoever holds it.
    pub fn release_ip(&mut self, ip: IpAddr) -> Result<(), PoolError> {
        let path = self.dir.join(ip.to_string());
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        self.alloc.remove_ip(ip);
        Ok(())
    }

    /// Allocations of `network` the runtime no longer lists.
    pub fn stale(&self, network: &str, valid: &HashSet<(String, String)>) -> Vec<(IpAddr, Owner)> {
        self.alloc.stale(network, valid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owner(c: &str) -> Owner {
        Owner {
            network: "n".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
            pod: Some("default/web".into()),
        }
    }

    fn range() -> HostRange {
        HostRange::new("10.9.0.0/28".parse().expect("net")).expect("range")
    }

    fn snapshot(p: &Pool) -> Vec<(IpAddr, Owner)> {
        p.allocator()
            .allocations()
            .map(|(i, o)| (*i, o.clone()))
            .collect()
    }

    #[test]
    fn restores_after_reopen_and_keeps_cursor() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut p = Pool::open(dir.path(), range()).expect("open");
        let a = p.allocate(owner("a")).expect("a");
        let b = p.allocate(owner("b")).expect("b");
        p.release(&owner("a").key()).expect("rel");
        let q = Pool::open(dir.path(), range()).expect("reopen");
        assert_eq!(snapshot(&q), vec![(b, owner("b"))]);
        let mut q = q;
        let c = q.allocate(owner("c")).expect("c");
        assert!(c != a && c != b, "cursor restored: {c}");
    }

    #[test]
    fn unreadable_file_keeps_address_reserved() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("10.9.0.2"), "garbage").expect("write");
        let mut p = Pool::open(dir.path(), range()).expect("open");
        assert_eq!(p.warnings.len(), 1);
        assert_ne!(p.allocate(owner("a")).expect("a").to_string(), "10.9.0.2");
    }

    #[test]
    fn gc_lists_only_unlisted_of_this_network() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut p = Pool::open(dir.path(), range()).expect("open");
        p.allocate(owner("keep")).expect("a");
        let gone = p.allocate(owner("gone")).expect("b");
        let mut other = owner("other");
        other.network = "m".into();
        p.allocate(other).expect("c");
        let valid = HashSet::from([("keep".to_string(), "eth0".to_string())]);
        let stale = p.stale("n", &valid);
        assert_eq!(stale, vec![(gone, owner("gone"))]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn disk_restores_exactly(ops in proptest::collection::vec((any::<bool>(), 0u8..20), 1..60)) {
            let dir = tempfile::tempdir().expect("tmp");
            let mut p = Pool::open(dir.path(), range()).expect("open");
            for (add, who) in ops {
                let o = owner(&who.to_string());
                if add { let _ = p.allocate(o); } else { p.release(&o.key()).expect("release"); }
                let q = Pool::open(dir.path(), range()).expect("reopen");
                prop_assert_eq!(snapshot(&q), snapshot(&p));
                prop_assert_eq!(q.allocator().last(), p.allocator().last());
            }
        }
    }
}
