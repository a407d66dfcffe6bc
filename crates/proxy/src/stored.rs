//! A programmed Service as the proxy keeps it between syncs: its
//! fragment serialized and LZ4-compressed (one allocation instead of a few
//! hundred small strings; a bench-shaped Service with 10 endpoints: 0.7 KB
//! instead of 1.5 KB of JSON — at 5,000 Services, 3.6 MB instead of 7.4). Unchanged Services are found by comparing these bytes; only
//! changed ones are read back.

use crate::model::{NodeFacts, Service, Slice};
use crate::render::{Fragment, Shared};
use serde::de::IgnoredAny;
use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// What a Service's fragment was rendered from, as two independent 64-bit
/// hashes of its Service, its slices, the node's facts and the build: a
/// Service whose inputs have the fingerprint it was applied with is not
/// rendered again (a restart: 5,000 unchanged Services cost no render).
/// `(0, 0)`: unknown (always rendered).
pub type Inputs = (u64, u64);

/// The fingerprint of `svc` with `slices` (in the order rendered) under
/// `salt` (the node's facts and the build, see [`salt`]).
pub fn inputs(salt: u64, svc: &Service, slices: &[&Slice]) -> Inputs {
    let mut a = DefaultHasher::new();
    let mut b = DefaultHasher::new();
    (0u8, salt, svc, slices).hash(&mut a);
    (1u8, salt, svc, slices).hash(&mut b);
    // (0, 0) means unknown: never produced
    (a.finish() | 1, b.finish())
}

/// The salt of [`inputs`]: `node`'s facts and `build` (what identifies the
/// running program: a fingerprint is not trusted across builds, whose
/// rendering may differ; `DefaultHasher` is fixed only within one).
pub fn salt(node: &NodeFacts, build: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (node, build).hash(&mut h);
    h.finish()
}

/// A fragment in its compact form. Serialization and compression are
/// deterministic (maps are ordered), so equal fragments have equal bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored(Box<[u8]>);

impl Stored {
    /// `f`, compact.
    pub fn new(f: &Fragment) -> Self {
        // a Fragment is strings, numbers and ordered maps with string
        // keys: serde_json cannot fail on it
        let json = serde_json::to_vec(f).unwrap_or_default();
        Self(lz4_flex::compress_prepend_size(&json).into_boxed_slice())
    }

    /// A fragment's JSON as [`Stored::new`] serializes it (as a journal
    /// keeps it), without building the fragment: compact, with the shared
    /// keys it claims. Refused unless it has exactly a fragment's fields
    /// (another version's journal is not taken for this one's).
    pub fn from_json(json: &str) -> Result<(Self, SharedKeys, ChainIds), String> {
        let shape: Shape = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let bytes = lz4_flex::compress_prepend_size(json.as_bytes()).into_boxed_slice();
        Ok((Self(bytes), shape.shared, shape.ids.into_iter().collect()))
    }

    /// The fragment back.
    pub fn get(&self) -> Fragment {
        let f = lz4_flex::decompress_size_prepended(&self.0)
            .map_err(|e| e.to_string())
            .and_then(|json| serde_json::from_slice(&json).map_err(|e| e.to_string()));
        debug_assert!(f.is_ok(), "a stored fragment reads back");
        f.unwrap_or_default()
    }
}

/// Shared keys a fragment claims: (map, key, value).
pub type SharedKeys = Vec<(Shared, String, String)>;

/// Chains of a fragment that hold an id: (chain, id).
pub type ChainIds = Vec<(String, u32)>;

/// A Service as a journal says the kernel holds it (see
/// [`crate::Proxy::restore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// `namespace/name`
    pub key: String,
    /// what it was rendered from
    pub inputs: Inputs,
    /// its fragment
    pub stored: Stored,
    /// the shared keys its fragment claims
    pub shared: SharedKeys,
    /// the chain ids its fragment holds
    pub ids: ChainIds,
}

/// A fragment's fields, only `shared` read (see [`Stored::from_json`]).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Shape {
    #[serde(rename = "chains")]
    _chains: IgnoredAny,
    #[serde(rename = "sets")]
    _sets: IgnoredAny,
    shared: SharedKeys,
    #[serde(rename = "problems")]
    _problems: IgnoredAny,
    #[serde(rename = "notes")]
    _notes: IgnoredAny,
    #[serde(rename = "ports")]
    _ports: IgnoredAny,
    ids: BTreeMap<String, u32>,
    #[serde(rename = "local_endpoints")]
    _local_endpoints: IgnoredAny,
    #[serde(rename = "health_check")]
    _health_check: IgnoredAny,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::SetDef;

    #[test]
    fn a_fragment_reads_back_and_equal_fragments_have_equal_bytes() {
        let mut f = Fragment::default();
        f.chains.insert("svc-x".into(), vec!["counter".into()]);
        f.sets.insert(
            "eps-x".into(),
            SetDef {
                decl: "type ipv4_addr;".into(),
                elements: [("1".into(), "2".into()), ("0".into(), "3".into())].into(),
            },
        );
        f.local_endpoints = 3;
        let s = Stored::new(&f);
        assert_eq!(s.get(), f);
        assert_eq!(Stored::new(&f.clone()), s);
        f.local_endpoints = 2;
        assert_ne!(Stored::new(&f), s);
    }

    #[test]
    fn a_fragments_json_is_taken_as_it_is_and_another_shape_is_refused() {
        let mut f = Fragment::default();
        f.shared
            .push((Shared::ClusterIps, "10.96.0.1".into(), String::new()));
        f.health_check = Some(30001);
        let json = serde_json::to_string(&f).expect("json");
        let (s, shared, _) = Stored::from_json(&json).expect("a fragment");
        // the same bytes as a fragment stored directly: equal compares equal
        assert_eq!(s, Stored::new(&f));
        assert_eq!(shared, f.shared);
        // every field of a Fragment is known to Shape, and required
        let json = serde_json::to_string(&Fragment::default()).expect("json");
        assert!(Stored::from_json(&json).is_ok());
        let renamed = json.replace("\"notes\"", "\"remarks\"");
        assert!(Stored::from_json(&renamed).is_err());
        let missing = json.replace(",\"health_check\":null", "");
        assert!(Stored::from_json(&missing).is_err(), "{missing}");
        assert!(Stored::from_json("{\"shared\": 3}").is_err());
    }
}
