//! A fixed table of distinct call stacks, filled by code that must not allocate or take a lock:
//! the sampling allocator (the stack of each sampled allocation) and the `pthread_create` hook
//! (the stack that created each thread). Each distinct stack gets an index, which its owner uses
//! to keep counters of its own beside the table.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

/// How long [`StackTable::intern`] waits for another thread writing the entry it looks at (a few
/// dozen stores) before treating that entry as another stack's and probing on. A writer
/// preempted there must not hold up every thread interning a stack for its whole time slice;
/// the price, rarely, is one stack in two entries, which readers of a profile add up anyway.
const WRITER_SPINS: u32 = 1 << 10;

struct Entry<const DEPTH: usize> {
    state: AtomicU8,
    hash: AtomicU64,
    depth: AtomicUsize,
    ips: [AtomicUsize; DEPTH],
}

impl<const DEPTH: usize> Entry<DEPTH> {
    const fn new() -> Self {
        Entry {
            state: AtomicU8::new(EMPTY),
            hash: AtomicU64::new(0),
            depth: AtomicUsize::new(0),
            ips: [const { AtomicUsize::new(0) }; DEPTH],
        }
    }

    /// Whether this (ready) entry holds exactly `ips`.
    fn holds(&self, hash: u64, ips: &[usize]) -> bool {
        self.hash.load(Ordering::Relaxed) == hash
            && self.depth.load(Ordering::Relaxed) == ips.len()
            && self.ips.iter().zip(ips).all(|(slot, &ip)| slot.load(Ordering::Relaxed) == ip)
    }
}

/// Up to `SLOTS` distinct stacks of up to `DEPTH` frames (deeper ones are cut at `DEPTH`),
/// as fixed memory: usable in a `static`, from inside a global allocator or a signal-free hook.
pub struct StackTable<const SLOTS: usize, const DEPTH: usize> {
    entries: [Entry<DEPTH>; SLOTS],
    /// Entries a lookup tries from a stack's home entry before calling the table full.
    probes: usize,
}

impl<const SLOTS: usize, const DEPTH: usize> std::fmt::Debug for StackTable<SLOTS, DEPTH> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackTable").field("slots", &SLOTS).field("depth", &DEPTH).finish_non_exhaustive()
    }
}

impl<const SLOTS: usize, const DEPTH: usize> StackTable<SLOTS, DEPTH> {
    /// An empty table whose lookups try at most `probes` entries (at least 1, at most all):
    /// fewer keep a lookup short when the table is nearly full, all fill it completely.
    pub const fn new(probes: usize) -> Self {
        let probes = if probes == 0 {
            1
        } else if probes > SLOTS {
            SLOTS
        } else {
            probes
        };
        StackTable { entries: [const { Entry::new() }; SLOTS], probes }
    }

    /// The index of `ips` (leaf first, cut at `DEPTH` frames), adding it if it is new; `None`
    /// when no entry within the probe limit is free. No allocation, no lock; it waits only
    /// briefly for another thread filling the same entry (`WRITER_SPINS` spins).
    pub fn intern(&self, ips: &[usize]) -> Option<usize> {
        let ips = &ips[..ips.len().min(DEPTH)];
        let hash = fnv1a(ips);
        let home = hash as usize % SLOTS;
        for probe in 0..self.probes {
            let index = (home + probe) % SLOTS;
            let entry = &self.entries[index];
            let mut spins = 0;
            loop {
                match entry.state.load(Ordering::Acquire) {
                    EMPTY => {
                        if entry.state.compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed).is_err() {
                            continue; // Someone else took it: look at what they write.
                        }
                        for (slot, &ip) in entry.ips.iter().zip(ips) {
                            slot.store(ip, Ordering::Relaxed);
                        }
                        entry.depth.store(ips.len(), Ordering::Relaxed);
                        entry.hash.store(hash, Ordering::Relaxed);
                        entry.state.store(READY, Ordering::Release);
                        return Some(index);
                    }
                    WRITING if spins < WRITER_SPINS => {
                        spins += 1;
                        std::hint::spin_loop();
                    }
                    WRITING => break,
                    _ if entry.holds(hash, ips) => return Some(index),
                    _ => break,
                }
            }
        }
        None
    }

    /// The stack at `index` (leaf first), if one has been stored there.
    pub fn get(&self, index: usize) -> Option<Vec<usize>> {
        let entry = self.entries.get(index)?;
        if entry.state.load(Ordering::Acquire) != READY {
            return None;
        }
        let depth = entry.depth.load(Ordering::Relaxed).min(DEPTH);
        Some(entry.ips[..depth].iter().map(|ip| ip.load(Ordering::Relaxed)).collect())
    }

    /// Empties the table, calling `cleared` with the index of each entry that held a stack (so
    /// the owner resets its counters for it). Writes only those entries, so pages of the table
    /// no stack ever reached stay untouched. Only while no [`StackTable::intern`] runs.
    pub fn clear(&self, cleared: impl FnMut(usize)) {
        self.retain(|_| false, cleared);
    }

    /// Empties the entries whose index `keep` refuses, calling `cleared` with each (as
    /// [`StackTable::clear`]); the kept ones keep their index. A kept stack that a later lookup
    /// no longer finds along its probe sequence (an entry before it was emptied) is added again
    /// in another entry: one stack in two entries, which readers of a profile add up. Only
    /// while no [`StackTable::intern`] runs.
    pub fn retain(&self, mut keep: impl FnMut(usize) -> bool, mut cleared: impl FnMut(usize)) {
        for (index, entry) in self.entries.iter().enumerate() {
            if entry.state.load(Ordering::Relaxed) != EMPTY && !keep(index) {
                entry.state.store(EMPTY, Ordering::Relaxed);
                cleared(index);
            }
        }
    }
}

fn fnv1a(ips: &[usize]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for &ip in ips {
        hash ^= ip as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_keeps_its_index_and_distinct_stacks_get_their_own() {
        let table: StackTable<64, 4> = StackTable::new(64);
        let a = table.intern(&[1, 2, 3]).unwrap();
        let b = table.intern(&[1, 2, 4]).unwrap();
        assert_ne!(a, b);
        assert_eq!(table.intern(&[1, 2, 3]), Some(a));
        // A prefix is another stack.
        let c = table.intern(&[1, 2]).unwrap();
        assert!(c != a && c != b);
        assert_eq!(table.get(a), Some(vec![1, 2, 3]));
        assert_eq!(table.get(c), Some(vec![1, 2]));
        // Deeper stacks are cut at the table's depth, and then are the same stack.
        let deep = table.intern(&[9, 8, 7, 6, 5]).unwrap();
        assert_eq!(table.intern(&[9, 8, 7, 6, 4]), Some(deep));
        assert_eq!(table.get(deep), Some(vec![9, 8, 7, 6]));
    }

    #[test]
    fn a_full_table_says_so_and_a_cleared_one_starts_over() {
        let table: StackTable<8, 2> = StackTable::new(8);
        let indices: Vec<usize> = (0..8).map(|i| table.intern(&[i, i]).unwrap()).collect();
        assert_eq!(table.intern(&[100, 100]), None);
        assert_eq!(table.intern(&[3, 3]), Some(indices[3]));
        let mut cleared = Vec::new();
        table.clear(|index| cleared.push(index));
        cleared.sort();
        assert_eq!(cleared, (0..8).collect::<Vec<_>>());
        assert!((0..8).all(|index| table.get(index).is_none()));
        assert!(table.intern(&[100, 100]).is_some());
    }

    #[test]
    fn retain_empties_only_the_refused_entries() {
        let table: StackTable<8, 2> = StackTable::new(8);
        let indices: Vec<usize> = (0..8).map(|i| table.intern(&[i, i]).unwrap()).collect();
        let mut cleared = Vec::new();
        table.retain(|index| index == indices[2] || index == indices[5], |index| cleared.push(index));
        assert_eq!(cleared.len(), 6);
        assert_eq!(table.get(indices[2]), Some(vec![2, 2]));
        assert_eq!(table.get(indices[5]), Some(vec![5, 5]));
        assert!(table.get(indices[0]).is_none());
        // Room again for six new stacks, beside the two kept.
        assert!((100..106).all(|i| table.intern(&[i, i]).is_some()));
        assert_eq!(table.intern(&[200, 200]), None);
    }

    #[test]
    fn lookups_stop_at_the_probe_limit() {
        let table: StackTable<1024, 1> = StackTable::new(1);
        // With one probe, a stack whose home entry is taken by another finds no room.
        let first = table.intern(&[1]).unwrap();
        let collision = (2..).find(|&ip| fnv1a(&[ip]) as usize % 1024 == first).unwrap();
        assert_eq!(table.intern(&[collision]), None);
        assert_eq!(table.intern(&[1]), Some(first));
    }

    #[test]
    fn threads_interning_the_same_stacks_agree_on_their_indices() {
        static TABLE: StackTable<256, 8> = StackTable::new(256);
        let stacks: Vec<Vec<usize>> = (0..100).map(|i| vec![i, i * 7, i * 13]).collect();
        let per_thread: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| stacks.iter().map(|stack| TABLE.intern(stack).unwrap()).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, stack) in stacks.iter().enumerate() {
            let index = per_thread[0][i];
            assert_eq!(TABLE.get(index).as_ref(), Some(stack));
            // A writer is never preempted for 1024 spins here in practice; if one were, the
            // stack would sit in two entries, each holding it.
            for thread in &per_thread[1..] {
                assert_eq!(TABLE.get(thread[i]).as_ref(), Some(stack));
            }
        }
    }
}
