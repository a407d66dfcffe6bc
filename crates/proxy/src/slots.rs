//! Where each endpoint chain's endpoints live in the table's one
//! `endpoints` map: a block of consecutive keys, `numgen random mod N
//! offset BASE` picking one of the first N. One map for every Service
//! means the number of sets does not grow with Services (named sets load
//! in O(n²) in this kernel: FACTS.md).
//!
//! Blocks have power-of-two sizes (at least [`MIN_BLOCK`]) aligned to
//! their size. A chain keeps its block while its endpoints fit, so an
//! endpoint change touches only its elements; a chain that outgrows its
//! block moves to a bigger one (one transaction: the old keys deleted, the
//! new added, the rule's offset changed). Freed blocks are reused by size.

use std::collections::{BTreeMap, HashMap};

/// The smallest block (endpoints of a small Service port).
pub const MIN_BLOCK: u32 = 16;

/// A block: its first key and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Block {
    /// The first key (`offset`).
    pub base: u32,
    /// The number of keys it holds.
    pub cap: u32,
}

/// Blocks of keys in `0..2^32`, by owner (the endpoint map's logical
/// name: `eps-ID`, `leps-ID`).
#[derive(Debug, Default, Clone)]
pub struct Slots {
    by_owner: HashMap<String, Block>,
    /// free blocks by size
    free: BTreeMap<u32, Vec<u32>>,
    /// keys from here on were never handed out
    next: u64,
}

/// The size of the block for `n` endpoints (`None`: more than 2^31).
fn size_for(n: usize) -> Option<u32> {
    let n = u32::try_from(n.max(1)).ok()?;
    n.checked_next_power_of_two().map(|c| c.max(MIN_BLOCK))
}

impl Slots {
    /// The block of `owner`, which now has `n` endpoints: its own while
    /// they fit, else a new one (the old is free). `None`: no room left
    /// (2^32 keys in use).
    pub fn get(&mut self, owner: &str, n: usize) -> Option<Block> {
        let need = size_for(n)?;
        if let Some(b) = self.by_owner.get(owner) {
            if b.cap >= need {
                return Some(*b);
            }
        }
        let block = self.take(need)?;
        if let Some(old) = self.by_owner.insert(owner.to_string(), block) {
            self.give(old);
        }
        Some(block)
    }

    fn take(&mut self, cap: u32) -> Option<Block> {
        // the smallest free block that fits, split
        let size = self.free.range(cap..).next().map(|(s, _)| *s);
        if let Some(size) = size {
            if let Some(list) = self.free.get_mut(&size) {
                if let Some(base) = list.pop() {
                    if list.is_empty() {
                        self.free.remove(&size);
                    }
                    let (b, c, s) = (u64::from(base), u64::from(cap), u64::from(size));
                    self.free_range(b + c, b + s);
                    return Some(Block { base, cap });
                }
            }
        }
        // aligned to its size
        let c = u64::from(cap);
        let base = self.next.div_ceil(c) * c;
        if base + c > 1 << 32 {
            return None;
        }
        // the gap alignment skipped is free for smaller blocks
        self.free_range(self.next, base);
        self.next = base + c;
        Some(Block {
            base: u32::try_from(base).ok()?,
            cap,
        })
    }

    fn give(&mut self, b: Block) {
        self.free.entry(b.cap).or_default().push(b.base);
    }

    /// `[from, to)` as free blocks: the biggest aligned block that fits
    /// at each point.
    fn free_range(&mut self, mut from: u64, to: u64) {
        while to - from >= u64::from(MIN_BLOCK) {
            let align = if from == 0 {
                1 << 31
            } else {
                1u64 << from.trailing_zeros().min(31)
            };
            let mut size = align;
            while size > to - from {
                size >>= 1;
            }
            if size < u64::from(MIN_BLOCK) {
                break;
            }
            self.free.entry(size as u32).or_default().push(from as u32);
            from += size;
        }
    }

    /// `owner` no longer has endpoints in the map.
    pub fn release(&mut self, owner: &str) {
        if let Some(b) = self.by_owner.remove(owner) {
            self.give(b);
        }
    }

    /// The kernel holds `owner`'s endpoints in `block` (restored from a
    /// journal). Call [`Self::settle`] after the last.
    pub fn restore(&mut self, owner: &str, block: Block) {
        self.by_owner.insert(owner.to_string(), block);
        self.next = self.next.max(u64::from(block.base) + u64::from(block.cap));
    }

    /// After [`Self::restore`]: what no block holds below the highest is
    /// free.
    pub fn settle(&mut self) {
        self.free.clear();
        let mut used: Vec<Block> = self.by_owner.values().copied().collect();
        used.sort_by_key(|b| b.base);
        let mut at = 0u64;
        for b in used {
            let base = u64::from(b.base);
            if base > at {
                self.free_range(at, base);
            }
            at = at.max(base + u64::from(b.cap));
        }
    }

    /// Owners that hold overlapping blocks (a journal that does not
    /// describe one table: it is then loaded whole).
    pub fn overlapping(&self) -> bool {
        let mut used: Vec<Block> = self.by_owner.values().copied().collect();
        used.sort_by_key(|b| b.base);
        used.windows(2)
            .any(|w| u64::from(w[0].base) + u64::from(w[0].cap) > u64::from(w[1].base))
    }

    /// The block of `owner`, if it has one.
    pub fn of(&self, owner: &str) -> Option<Block> {
        self.by_owner.get(owner).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_keeps_its_block_while_its_endpoints_fit() {
        let mut s = Slots::default();
        let a = s.get("eps-a", 3).expect("room");
        assert_eq!(a, Block { base: 0, cap: 16 });
        assert_eq!(s.get("eps-a", 16), Some(a));
        let b = s.get("eps-b", 1).expect("room");
        assert_eq!(b, Block { base: 16, cap: 16 });
        // outgrown: a bigger block, aligned; the old is reused
        let a2 = s.get("eps-a", 17).expect("room");
        assert_eq!(a2, Block { base: 32, cap: 32 });
        assert_eq!(s.get("eps-c", 2), Some(Block { base: 0, cap: 16 }));
        s.release("eps-b");
        assert_eq!(s.get("eps-d", 10), Some(Block { base: 16, cap: 16 }));
    }

    #[test]
    fn alignment_gaps_and_restored_holes_are_reused() {
        let mut s = Slots::default();
        s.get("a", 1).expect("room"); // 0..16
        s.get("big", 100).expect("room"); // 128..256, gap 16..128
        let small: Vec<u32> = (0..7)
            .map(|i| s.get(&format!("s{i}"), 1).expect("room").base)
            .collect();
        let mut sorted = small.clone();
        sorted.sort();
        assert_eq!(sorted, vec![16, 32, 48, 64, 80, 96, 112], "{small:?}");
        assert_eq!(s.get("next", 1).expect("room").base, 256);

        let mut r = Slots::default();
        r.restore("x", Block { base: 64, cap: 16 });
        r.restore(
            "y",
            Block {
                base: 256,
                cap: 256,
            },
        );
        r.settle();
        assert!(!r.overlapping());
        let mut got: Vec<u32> = (0..4)
            .map(|i| r.get(&format!("n{i}"), 20).expect("room").base)
            .collect();
        got.sort();
        // 32-blocks in the holes 0..64 and 96..256, none over x or y
        assert_eq!(got, vec![0, 32, 96, 128]);
        r.restore("z", Block { base: 70, cap: 16 });
        assert!(r.overlapping());
    }

    #[test]
    fn the_key_space_has_an_end() {
        let mut s = Slots::default();
        assert_eq!(
            s.get("huge", 1 << 31),
            Some(Block {
                base: 0,
                cap: 1 << 31
            })
        );
        assert_eq!(
            s.get("huge2", 1 << 31),
            Some(Block {
                base: 1 << 31,
                cap: 1 << 31
            })
        );
        assert_eq!(s.get("more", 1), None);
        assert_eq!(s.get("too-big", (1usize << 31) + 1), None);
    }
}
