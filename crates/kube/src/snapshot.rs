//! What the resumable watches ([`KubeSource::watch_resumable`]) held,
//! saved when the agent stops cleanly and read when it starts: each kind
//! starts from its saved objects and watches from its saved
//! resourceVersion, so a restart (an upgrade) costs what changed while the
//! agent was down instead of listing every object again (at 30,000
//! Services and their EndpointSlices the listing alone takes seconds).
//!
//! A watch from a resourceVersion gets every change after it, or 410
//! Expired when the API server no longer has that history (or "too large
//! resource version" when the server never had it): then the kind lists
//! as if there were no snapshot. Until that answer comes the kind shows
//! the snapshot's objects, so a snapshot is trusted only where it can be
//! right: written by the same build (`identity`: what a kind shows may
//! change between builds), on the same boot (after a reboot the kernel's
//! tables are gone and pods have other addresses), for the same API
//! server (the caller puts all three in `identity`), and at most
//! [`MAX_AGE`] ago. It is used once (removed when read).
//!
//! Format, line by line: `trellis-watch-snapshot 1<TAB>identity<TAB>unix
//! seconds when written`; per
//! kind `kind<TAB>id<TAB>resourceVersion<TAB>count`, then `count` lines
//! `name<TAB>key<TAB>value` (values are compact JSON: no raw tab or
//! newline); last `end` (a file cut short is refused).

use crate::source::{KubeSource, State};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;

const MAGIC: &str = "trellis-watch-snapshot 1";

/// How old a snapshot may be: a restart (an upgrade) takes seconds; older
/// ones would most likely meet a 410 anyway.
pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// One kind as saved: its objects (name -> key, value) at `rv`.
#[derive(Debug, Default, PartialEq)]
pub struct Seed {
    /// the resourceVersion the objects are at
    pub rv: String,
    /// name -> (key, value), as the kind shows them
    pub objects: HashMap<String, (String, Vec<u8>)>,
}

fn clean(s: &[u8]) -> bool {
    !s.contains(&b'\t') && !s.contains(&b'\n')
}

/// Writes what the resumable kinds of `st` hold; returns how many kinds
/// and objects were written. A kind that has not listed yet, or holds a
/// name, key or value the format cannot carry, is left out.
fn write(
    st: &State,
    out: &mut impl Write,
    identity: &str,
    now: u64,
) -> std::io::Result<(usize, usize)> {
    writeln!(out, "{MAGIC}\t{identity}\t{now}")?;
    let (mut kinds, mut objects) = (0, 0);
    for k in &st.kinds {
        let Some((id, Some(rv))) = &k.resumable else {
            continue;
        };
        if rv.is_empty() {
            continue;
        }
        let fits = clean(id.as_bytes())
            && clean(rv.as_bytes())
            && k.objects.iter().all(|(n, (key, v))| {
                clean(n.as_bytes()) && clean(key.as_bytes()) && clean(&v.bytes())
            });
        if !fits {
            tracing::warn!(kind = %k.name, "not saved in the watch snapshot: a tab or newline in an object");
            continue;
        }
        writeln!(out, "kind\t{id}\t{rv}\t{}", k.objects.len())?;
        for (name, (key, value)) in &k.objects {
            out.write_all(name.as_bytes())?;
            out.write_all(b"\t")?;
            out.write_all(key.as_bytes())?;
            out.write_all(b"\t")?;
            out.write_all(&value.bytes())?;
            out.write_all(b"\n")?;
        }
        kinds += 1;
        objects += k.objects.len();
    }
    writeln!(out, "end")?;
    Ok((kinds, objects))
}

/// Reads a snapshot written by [`write`] with the same `identity`, at
/// most [`MAX_AGE`] before `now`.
fn read(input: impl BufRead, identity: &str, now: u64) -> Result<HashMap<String, Seed>, String> {
    let mut lines = input.split(b'\n').enumerate();
    let mut next = || -> Result<(usize, Vec<u8>), String> {
        match lines.next() {
            Some((n, Ok(l))) => Ok((n + 1, l)),
            Some((n, Err(e))) => Err(format!("line {}: {e}", n + 1)),
            None => Err("cut short (no `end` line)".into()),
        }
    };
    let (_, head) = next()?;
    let head = String::from_utf8_lossy(&head);
    match head.split('\t').collect::<Vec<_>>().as_slice() {
        [MAGIC, id, _] if *id != identity => {
            return Err(format!(
                "written by another build, boot or API server ({id}; now {identity})"
            ))
        }
        [MAGIC, _, at] => {
            let at: u64 = at
                .parse()
                .map_err(|_| format!("line 1: time {at:?} is not a number"))?;
            if at > now + 60 || now.saturating_sub(at) > MAX_AGE.as_secs() {
                return Err(format!(
                    "written {}s ago (used within {}s)",
                    now as i64 - at as i64,
                    MAX_AGE.as_secs()
                ));
            }
        }
        _ => return Err("not a watch snapshot (first line)".into()),
    }
    let mut seeds = HashMap::new();
    loop {
        let (n, line) = next()?;
        if line == b"end" {
            return Ok(seeds);
        }
        let line = String::from_utf8(line).map_err(|_| format!("line {n}: not UTF-8"))?;
        let f: Vec<&str> = line.split('\t').collect();
        let (id, rv, count) = match f.as_slice() {
            ["kind", id, rv, count] => (
                id.to_string(),
                rv.to_string(),
                count
                    .parse::<usize>()
                    .map_err(|e| format!("line {n}: count {count:?}: {e}"))?,
            ),
            _ => return Err(format!("line {n}: expected `kind` or `end`")),
        };
        let mut objects = HashMap::with_capacity(count.min(1 << 20));
        for _ in 0..count {
            let (n, line) = next()?;
            let mut parts = line.splitn(3, |b| *b == b'\t');
            let (Some(name), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("line {n}: expected name, key and value"));
            };
            let text = |b: &[u8]| {
                String::from_utf8(b.to_vec()).map_err(|_| format!("line {n}: not UTF-8"))
            };
            objects.insert(text(name)?, (text(key)?, value.to_vec()));
        }
        seeds.insert(id, Seed { rv, objects });
    }
}

impl KubeSource {
    /// Saves what the resumable kinds hold to `path` (written beside it,
    /// then renamed: a crash leaves the old file or none, never half of
    /// one). Returns how many objects were saved.
    pub fn save_snapshot(&self, path: &Path, identity: &str) -> Result<usize, String> {
        let tmp = path.with_extension("tmp");
        let written = (|| {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            let (kinds, objects) = write(&self.lock(), &mut f, identity, unix_now())?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok::<_, std::io::Error>((kinds, objects))
        })();
        match written {
            Ok((kinds, objects)) => {
                tracing::info!(path = %path.display(), kinds, objects, "saved the watch snapshot");
                Ok(objects)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(format!("writing {}: {e}", path.display()))
            }
        }
    }

    /// Reads the snapshot at `path`, if there is one, for the resumable
    /// watches started after this; removes the file (it is used once). A
    /// snapshot that cannot be used is reported and ignored: every kind
    /// lists. Returns how many objects it seeds.
    pub fn load_snapshot(&self, path: &Path, identity: &str) -> usize {
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "watch snapshot not read; listing everything");
                return 0;
            }
        };
        let read = read(std::io::BufReader::new(f), identity, unix_now());
        let _ = std::fs::remove_file(path);
        match read {
            Ok(seeds) => {
                let objects = seeds.values().map(|s| s.objects.len()).sum();
                tracing::info!(path = %path.display(), kinds = seeds.len(), objects, "read the watch snapshot");
                self.lock().seeds = seeds;
                objects
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "watch snapshot not used; listing everything");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::Packed;
    use crate::source::Kind;

    fn state() -> State {
        let mut st = State::default();
        let objects: HashMap<String, (String, Packed)> = [
            (
                "ns/a".to_string(),
                ("/s/ns/a".to_string(), Packed::new(br#"{"x":"a\tb"}"#)),
            ),
            (
                "ns/b".to_string(),
                ("/s/ns/b".to_string(), Packed::new(b"{}")),
            ),
        ]
        .into();
        st.kinds.push(Kind {
            name: "services".into(),
            objects: objects.clone(),
            resumable: Some(("services|sel".into(), Some("42".into()))),
            ..Default::default()
        });
        // not listed yet: not saved
        st.kinds.push(Kind {
            name: "slices".into(),
            objects,
            resumable: Some(("slices|sel".into(), None)),
            ..Default::default()
        });
        // not resumable: not saved
        st.kinds.push(Kind {
            name: "nodes".into(),
            ..Default::default()
        });
        st
    }

    #[test]
    fn round_trip_keeps_listed_resumable_kinds_only() {
        let st = state();
        let mut buf = Vec::new();
        assert_eq!(write(&st, &mut buf, "v1", 1000).expect("write"), (1, 2));
        let seeds = read(&buf[..], "v1", 1000 + MAX_AGE.as_secs()).expect("read");
        assert_eq!(seeds.len(), 1);
        let s = &seeds["services|sel"];
        assert_eq!(s.rv, "42");
        let held: HashMap<String, (String, Vec<u8>)> = st.kinds[0]
            .objects
            .iter()
            .map(|(n, (k, v))| (n.clone(), (k.clone(), v.bytes())))
            .collect();
        assert_eq!(s.objects, held);
    }

    #[test]
    fn refuses_other_builds_cut_files_and_garbage() {
        let st = state();
        let mut buf = Vec::new();
        write(&st, &mut buf, "v1", 1000).expect("write");
        let e = read(&buf[..], "v2", 1000).expect_err("other build");
        assert!(e.contains("another build"), "{e}");
        let e = read(&buf[..], "v1", 1001 + MAX_AGE.as_secs()).expect_err("too old");
        assert!(e.contains("601s ago"), "{e}");
        let e = read(&buf[..], "v1", 900).expect_err("from the future");
        assert!(e.contains("-100s ago"), "{e}");
        let cut = &buf[..buf.len() - 4];
        let e = read(cut, "v1", 1000).expect_err("cut");
        assert!(e.contains("cut short"), "{e}");
        let e = read(&b"hello\n"[..], "v1", 1000).expect_err("garbage");
        assert!(e.contains("not a watch snapshot"), "{e}");
        let bad = format!("{MAGIC}\tv1\tsoon\nend\n");
        let e = read(bad.as_bytes(), "v1", 1000).expect_err("bad time");
        assert!(e.contains("soon"), "{e}");
        let bad = format!("{MAGIC}\tv1\t1000\nkind\tx\t1\tmany\nend\n");
        let e = read(bad.as_bytes(), "v1", 1000).expect_err("bad count");
        assert!(e.contains("line 2") && e.contains("many"), "{e}");
        let bad = format!("{MAGIC}\tv1\t1000\nkind\tx\t1\t1\nonlyname\nend\n");
        let e = read(bad.as_bytes(), "v1", 1000).expect_err("short object");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_raw_tab_in_a_value_leaves_the_kind_out() {
        let mut st = state();
        st.kinds[0]
            .objects
            .insert("ns/c".into(), ("/s/ns/c".into(), Packed::new(b"a\tb")));
        let mut buf = Vec::new();
        assert_eq!(write(&st, &mut buf, "v1", 1000).expect("write"), (0, 0));
    }
}
