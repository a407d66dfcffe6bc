//! Shared-map keys (a Service address and port, a node port, a hairpin
//! pair...) and the Services claiming them: the first by `namespace/name`
//! holds a key; claimants that want another value are conflicts.

use crate::render::Shared;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// A Service claiming a shared key: its `namespace/name`, one allocation
/// shared by all its claims.
pub(crate) type Claimant = Arc<str>;

/// The Services claiming one shared key, sorted by Service: (Service,
/// value); the first one has it. Nearly always one: kept inline (a
/// `Vec` allocates room for four — at 5,000 Services x 10 endpoints,
/// 60,000 keys, 7.5 MB more, counted with a counting allocator).
pub(crate) type Claimants = smallvec::SmallVec<[(Claimant, Box<str>); 1]>;

/// A shared map's key and its claimants.
pub(crate) type Claims = Vec<((Shared, String), Claimants)>;

/// A shared key claimed by more than one Service with different values:
/// the first by `namespace/name` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    /// The Service that does not get it.
    pub service: String,
    /// The shared map and key.
    pub what: String,
    /// The Service that has it.
    pub owner: String,
}

/// Whether claimants of one key want different values.
pub(crate) fn disputed(v: &[(Claimant, Box<str>)]) -> bool {
    v.split_first()
        .is_some_and(|((_, first), rest)| rest.iter().any(|(_, val)| val != first))
}

/// The claimants of shared key `t` as this plan changes them: taken from
/// what is applied on first use (from nothing in a full plan).
pub(crate) fn claim_entry<'a>(
    claims: &'a mut HashMap<(Shared, String), Claimants>,
    applied: &HashMap<(Shared, String), Claimants>,
    full: bool,
    touched: &mut BTreeSet<(Shared, String)>,
    t: (Shared, String),
) -> &'a mut Claimants {
    touched.insert(t.clone());
    claims.entry(t.clone()).or_insert_with(|| {
        if full {
            Claimants::new()
        } else {
            applied.get(&t).cloned().unwrap_or_default()
        }
    })
}

/// The conflicts among the `contested` keys of `claims`, sorted.
pub(crate) fn conflicts(
    contested: &BTreeSet<(Shared, String)>,
    claims: &HashMap<(Shared, String), Claimants>,
) -> Vec<Conflict> {
    let mut out = Vec::new();
    for ((kind, key), v) in contested
        .iter()
        .filter_map(|k| claims.get(k).map(|v| (k, v)))
    {
        if let Some((owner, value)) = v.first() {
            for (svc, val) in &v[1..] {
                if val != value && svc != owner {
                    out.push(Conflict {
                        service: svc.to_string(),
                        what: format!("{} {key}", kind.name()),
                        owner: owner.to_string(),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.service, &a.what).cmp(&(&b.service, &b.what)));
    out
}
