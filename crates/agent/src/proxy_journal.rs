//! What the Service proxy applied, kept in `dataDir/proxy.journal` so that
//! a restarted agent with the table still in the kernel (an upgrade, a
//! crash) applies only what changed while it was down, instead of loading
//! the whole table again (kube-proxy: 12 s at 5,000 Services).
//!
//! One JSON record per line: `Full` (a whole-table load with the stamp it
//! wrote into the table's `stamp` set), `Svc` (a Service as the kernel
//! holds it after the sync, `null`: gone), `Done` (the kernel took the
//! records before it), `Abort` (it refused them). Records are written
//! before the transaction and `Done` after it: a journal whose last
//! records have no `Done` does not say what the kernel holds and is not
//! used. It grows by what changes; once it is twice the size of the state
//! it describes (plus 1 MiB), it is rewritten whole.
//!
//! Trust: the journal describes the table only if the table carries the
//! journal's stamp (checked at start); otherwise the table is loaded whole.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use trellis_proxy::render::Fragment;

/// A record as read.
#[derive(serde::Deserialize)]
enum Record {
    Full(u32),
    Svc(String, Option<Box<Fragment>>),
    Done,
    Abort,
}

/// A record as written (the same JSON, borrowed).
#[derive(serde::Serialize)]
enum Rec<'a> {
    Full(u32),
    Svc(&'a str, Option<&'a Fragment>),
    Done,
    Abort,
}

/// What a journal says the kernel holds: the table's stamp and every
/// Service's objects.
pub type Saved = (u32, Vec<(String, Fragment)>);

/// The open journal.
pub struct Journal {
    path: PathBuf,
    file: Option<std::fs::File>,
    bytes: u64,
    compact_at: u64,
    stamp: u32,
}

const SLACK: u64 = 1 << 20;

/// Reads `path`: what it describes, if it is complete and well formed.
fn read(path: &PathBuf) -> Result<Option<Saved>, String> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut stamp = None;
    let mut state: BTreeMap<String, Fragment> = BTreeMap::new();
    let mut pending: Vec<(String, Option<Box<Fragment>>)> = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        let rec: Record =
            serde_json::from_str(&line).map_err(|e| format!("line {}: {e}", n + 1))?;
        match rec {
            Record::Full(s) => {
                stamp = Some(s);
                state.clear();
                pending.clear();
            }
            Record::Svc(k, f) => pending.push((k, f)),
            Record::Done => {
                for (k, f) in pending.drain(..) {
                    match f {
                        Some(f) => state.insert(k, *f),
                        None => state.remove(&k),
                    };
                }
            }
            Record::Abort => {
                // a refused whole-table load leaves nothing known
                pending.clear();
            }
        }
    }
    if !pending.is_empty() {
        return Err("its last records were never confirmed (the agent stopped mid-sync)".into());
    }
    Ok(stamp.map(|s| (s, state.into_iter().collect())))
}

fn line(out: &mut Vec<u8>, r: &Rec) {
    if serde_json::to_writer(&mut *out, r).is_ok() {
        out.push(b'\n');
    }
}

impl Journal {
    /// Opens the journal at `path` and says what it describes (`Err`: why
    /// it cannot be used).
    pub fn open(path: PathBuf) -> (Self, Result<Option<Saved>, String>) {
        let saved = read(&path);
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let stamp = saved
            .as_ref()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.0))
            .unwrap_or(0);
        let j = Self {
            path,
            file: None,
            bytes,
            compact_at: bytes * 2 + SLACK,
            stamp,
        };
        (j, saved)
    }

    fn fail(&mut self, e: impl std::fmt::Display) {
        tracing::warn!(path = %self.path.display(), error = %e, "proxy: journal not written; a restart loads the whole table");
        self.file = None;
        let _ = std::fs::remove_file(&self.path);
    }

    fn append(&mut self, buf: &[u8]) {
        if self.file.is_none() {
            match std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&self.path)
            {
                Ok(f) => self.file = Some(f),
                Err(e) => return self.fail(e),
            }
        }
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.write_all(buf) {
                return self.fail(e);
            }
            self.bytes += buf.len() as u64;
        }
    }

    /// Before a transaction: `full` (with the stamp it writes) starts the
    /// journal over; `fragments` are the Services it changes.
    pub fn begin(&mut self, full: Option<u32>, fragments: &[(String, Option<Fragment>)]) {
        let mut buf = Vec::new();
        if let Some(stamp) = full {
            self.stamp = stamp;
            // a new file: what the old one said no longer matters
            self.file = None;
            if let Err(e) = std::fs::write(&self.path, b"") {
                return self.fail(e);
            }
            self.bytes = 0;
            line(&mut buf, &Rec::Full(stamp));
        }
        for (k, f) in fragments {
            line(&mut buf, &Rec::Svc(k, f.as_ref()));
        }
        self.append(&buf);
    }

    /// The kernel took the transaction; `all` gives everything applied,
    /// for a rewrite when the journal has grown.
    pub fn done<'a, I>(&mut self, full: bool, all: impl FnOnce() -> I)
    where
        I: IntoIterator<Item = (&'a String, Fragment)>,
    {
        let mut buf = Vec::new();
        line(&mut buf, &Rec::Done);
        self.append(&buf);
        if full {
            self.compact_at = self.bytes * 2 + SLACK;
        } else if self.bytes > self.compact_at {
            self.compact(all());
        }
    }

    /// The kernel refused the transaction.
    pub fn abort(&mut self) {
        let mut buf = Vec::new();
        line(&mut buf, &Rec::Abort);
        self.append(&buf);
    }

    fn compact<'a>(&mut self, all: impl IntoIterator<Item = (&'a String, Fragment)>) {
        let mut buf = Vec::new();
        line(&mut buf, &Rec::Full(self.stamp));
        for (k, f) in all {
            line(&mut buf, &Rec::Svc(k, Some(&f)));
        }
        line(&mut buf, &Rec::Done);
        let tmp = self.path.with_extension("journal.tmp");
        let r = std::fs::write(&tmp, &buf).and_then(|_| std::fs::rename(&tmp, &self.path));
        self.file = None;
        match r {
            Ok(()) => {
                self.bytes = buf.len() as u64;
                self.compact_at = self.bytes * 2 + SLACK;
            }
            Err(e) => self.fail(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(n: usize) -> Fragment {
        Fragment {
            local_endpoints: n,
            ..Default::default()
        }
    }

    #[test]
    fn only_confirmed_records_count() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("proxy.journal");
        let (mut j, saved) = Journal::open(path.clone());
        assert_eq!(saved, Ok(None));
        j.begin(
            Some(7),
            &[("a/x".into(), Some(frag(1))), ("a/y".into(), Some(frag(2)))],
        );
        j.done(true, Vec::new);
        j.begin(None, &[("a/x".into(), None)]);
        j.done(false, Vec::new);
        j.begin(None, &[("a/y".into(), Some(frag(5)))]);
        j.abort();
        let (_, saved) = Journal::open(path.clone());
        assert_eq!(saved, Ok(Some((7, vec![("a/y".to_string(), frag(2))]))));
        // records without their Done: the journal says nothing sure
        let (mut j, _) = Journal::open(path.clone());
        j.begin(None, &[("a/z".into(), Some(frag(3)))]);
        let (_, saved) = Journal::open(path.clone());
        assert!(saved.expect_err("unconfirmed").contains("never confirmed"));
        // a damaged line names itself
        std::fs::write(&path, "{\"Full\":1}\nnot json\n").expect("write");
        let (_, saved) = Journal::open(path);
        assert!(saved.expect_err("damaged").contains("line 2"));
    }

    #[test]
    fn a_grown_journal_is_rewritten_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("proxy.journal");
        let (mut j, _) = Journal::open(path.clone());
        let key = "a/x".to_string();
        let big = Fragment {
            notes: vec!["n".repeat(100_000)],
            ..Default::default()
        };
        j.begin(Some(3), &[(key.clone(), Some(big.clone()))]);
        j.done(true, Vec::new);
        for _ in 0..40 {
            j.begin(None, &[(key.clone(), Some(big.clone()))]);
            j.done(false, || vec![(&key, big.clone())]);
        }
        let size = std::fs::metadata(&path).expect("meta").len();
        assert!(size < 3 * 1024 * 1024, "rewritten: {size} bytes");
        let (_, saved) = Journal::open(path);
        assert_eq!(saved, Ok(Some((3, vec![(key, big)]))));
    }
}
