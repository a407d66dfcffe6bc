//! What the Service proxy applied, kept in `dataDir/proxy.journal` so that
//! a restarted agent with the table still in the kernel (an upgrade, a
//! crash) applies only what changed while it was down, instead of loading
//! the whole table again (kube-proxy: 12 s at 5,000 Services).
//!
//! One JSON record per line: `Full` (a whole-table load with the stamp it
//! wrote into the table's `stamp` set), `Put` (a Service as the kernel
//! holds it after the sync, `null`: gone, with the fingerprint of what it
//! was rendered from: `trellis_proxy::stored::inputs`), `Same` (a Service
//! rendered again to what the kernel holds, from inputs with this new
//! fingerprint), `Done` (the kernel took the records before it), `Abort`
//! (it refused them). `Svc` (a `Put` without fingerprint, written before
//! fingerprints existed) is still read. Records are written
//! before the transaction and `Done` after it: a journal whose last
//! records have no `Done` does not say what the kernel holds and is not
//! used. It grows by what changes; once it is twice the size of the state
//! it describes (plus 1 MiB), it is rewritten whole.
//!
//! Trust: the journal describes the table only if the table carries the
//! journal's stamp (checked at start); otherwise the table is loaded whole.

use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use trellis_proxy::render::Fragment;
use trellis_proxy::stored::{Inputs, Restored, Stored};

/// A record as read: fragments as the JSON they are (a restart takes them
/// as they are: `Stored::from_json`, 5,000 Services in tens of ms instead
/// of hundreds to build every fragment and serialize it again).
#[derive(serde::Deserialize)]
enum Record {
    Full(u32),
    Svc(String, Option<Box<RawValue>>),
    Put(String, Inputs, Option<Box<RawValue>>),
    Same(String, Inputs),
    Done,
    Abort,
}

/// A record as written (the same JSON, borrowed).
#[derive(serde::Serialize)]
enum Rec<'a> {
    Full(u32),
    Put(&'a str, Inputs, Option<&'a Fragment>),
    Same(&'a str, Inputs),
    Done,
    Abort,
}

/// What a journal says the kernel holds: the table's stamp and every
/// Service's objects, with the fingerprint of what they were rendered
/// from (`(0, 0)`: unknown).
pub type Saved = (u32, Vec<Restored>);

/// A confirmed change of a Service's record.
enum Pending {
    Put(String, Inputs, Option<Box<RawValue>>),
    Same(String, Inputs),
}

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
    let mut state: BTreeMap<String, (Inputs, Box<RawValue>)> = BTreeMap::new();
    let mut pending: Vec<Pending> = Vec::new();
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
            Record::Svc(k, f) => pending.push(Pending::Put(k, (0, 0), f)),
            Record::Put(k, i, f) => pending.push(Pending::Put(k, i, f)),
            Record::Same(k, i) => pending.push(Pending::Same(k, i)),
            Record::Done => {
                for p in pending.drain(..) {
                    match p {
                        Pending::Put(k, i, Some(f)) => {
                            state.insert(k, (i, f));
                        }
                        Pending::Put(k, _, None) => {
                            state.remove(&k);
                        }
                        Pending::Same(k, i) => {
                            if let Some(s) = state.get_mut(&k) {
                                s.0 = i;
                            }
                        }
                    }
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
    let Some(stamp) = stamp else { return Ok(None) };
    let mut all = Vec::with_capacity(state.len());
    for (key, (inputs, f)) in state {
        let (stored, shared, ids) =
            Stored::from_json(f.get()).map_err(|e| format!("the objects of {key}: {e}"))?;
        all.push(Restored {
            key,
            inputs,
            stored,
            shared,
            ids,
        });
    }
    Ok(Some((stamp, all)))
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
    /// journal over; `puts` are the Services it changes (with their
    /// inputs' fingerprint), `same` those rendered again unchanged from
    /// inputs with a new fingerprint.
    pub fn begin<'a>(
        &mut self,
        full: Option<u32>,
        puts: impl IntoIterator<Item = (&'a str, Inputs, Option<Fragment>)>,
        same: &[(String, Inputs)],
    ) {
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
        for (k, i, f) in puts {
            line(&mut buf, &Rec::Put(k, i, f.as_ref()));
            // written as it grows: a full plan's records never all at once
            if buf.len() >= 1 << 20 {
                self.append(&buf);
                buf.clear();
            }
        }
        for (k, i) in same {
            line(&mut buf, &Rec::Same(k, *i));
        }
        self.append(&buf);
    }

    /// The kernel took the transaction; `all` gives everything applied,
    /// for a rewrite when the journal has grown.
    pub fn done<'a, I>(&mut self, full: bool, all: impl FnOnce() -> I)
    where
        I: IntoIterator<Item = (&'a String, Inputs, Fragment)>,
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

    fn compact<'a>(&mut self, all: impl IntoIterator<Item = (&'a String, Inputs, Fragment)>) {
        let mut buf = Vec::new();
        line(&mut buf, &Rec::Full(self.stamp));
        for (k, i, f) in all {
            line(&mut buf, &Rec::Put(k, i, Some(&f)));
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

    /// What a journal read gives for `f`.
    fn r(key: &str, inputs: Inputs, f: Fragment) -> Restored {
        let json = serde_json::to_string(&f).expect("json");
        let (stored, shared, ids) = Stored::from_json(&json).expect("a fragment");
        Restored {
            key: key.into(),
            inputs,
            stored,
            shared,
            ids,
        }
    }

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
        let (f1, f2, f3, f5) = (frag(1), frag(2), frag(3), frag(5));
        j.begin(
            Some(7),
            [
                ("a/x", (1, 1), Some(f1.clone())),
                ("a/y", (2, 2), Some(f2.clone())),
            ],
            &[],
        );
        j.done(true, Vec::new);
        j.begin(None, [("a/x", (0, 0), None)], &[]);
        j.done(false, Vec::new);
        j.begin(None, [("a/y", (5, 5), Some(f5.clone()))], &[]);
        j.abort();
        let (_, saved) = Journal::open(path.clone());
        assert_eq!(saved, Ok(Some((7, vec![r("a/y", (2, 2), frag(2))]))));
        // a Service rendered again unchanged from new inputs: its new
        // fingerprint counts once confirmed
        let (mut j, _) = Journal::open(path.clone());
        j.begin(None, [], &[("a/y".to_string(), (9, 9))]);
        j.done(false, Vec::new);
        let (_, saved) = Journal::open(path.clone());
        assert_eq!(saved, Ok(Some((7, vec![r("a/y", (9, 9), frag(2))]))));
        // a journal written before fingerprints: read, inputs unknown
        let old = format!(
            "{{\"Full\":4}}\n{{\"Svc\":[\"a/q\",null]}}\n{{\"Svc\":[\"a/w\",{}]}}\n\"Done\"\n",
            serde_json::to_string(&frag(2)).expect("json")
        );
        std::fs::write(&path, old).expect("write");
        let (_, saved) = Journal::open(path.clone());
        assert_eq!(saved, Ok(Some((4, vec![r("a/w", (0, 0), frag(2))]))));
        // records without their Done: the journal says nothing sure
        let (mut j, _) = Journal::open(path.clone());
        j.begin(None, [("a/z", (3, 3), Some(f3.clone()))], &[]);
        let (_, saved) = Journal::open(path.clone());
        assert!(saved.expect_err("unconfirmed").contains("never confirmed"));
        // a fragment of another shape (another version's) names its Service
        std::fs::write(
            &path,
            "{\"Full\":1}\n{\"Put\":[\"a/v\",[1,1],{\"chains\":{}}]}\n\"Done\"\n",
        )
        .expect("write");
        let (_, saved) = Journal::open(path.clone());
        let e = saved.expect_err("another shape");
        assert!(e.contains("a/v") && e.contains("missing field"), "{e}");
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
        j.begin(Some(3), [(key.as_str(), (3, 3), Some(big.clone()))], &[]);
        j.done(true, Vec::new);
        for _ in 0..40 {
            j.begin(None, [(key.as_str(), (4, 4), Some(big.clone()))], &[]);
            j.done(false, || vec![(&key, (4, 4), big.clone())]);
        }
        let size = std::fs::metadata(&path).expect("meta").len();
        assert!(size < 3 * 1024 * 1024, "rewritten: {size} bytes");
        let (_, saved) = Journal::open(path);
        assert_eq!(saved, Ok(Some((3, vec![r(&key, (4, 4), big)]))));
    }
}
