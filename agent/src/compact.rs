//! Compact storage for the per-record state of 100k remote nodes: filling a
//! `BTreeMap` in bulk so that its nodes end up full, and short lists whose
//! single element lives inline ([`Few`]).
//!
//! std's B-tree splits a full node in the middle, so keys inserted one by one
//! in ascending order (a remote cluster's list, in key order; a batch of
//! routes, in CIDR order) leave nearly every node half full: 100k remote nodes
//! took about 1.8 times the memory their entries need. `BTreeMap::append`
//! builds the merged tree from sorted input with full nodes instead. Doing so
//! only for batches that are large next to the map keeps the rebuild cost
//! amortised constant per element.

use std::{collections::BTreeMap, ops::Deref};

/// Smallest batch merged by a rebuild.
const MIN_BATCH: usize = 64;

/// Inserts `items` into `map` (a later value wins, as with `insert`). A batch
/// of at least a quarter of the map's length (and [`MIN_BATCH`]) is merged by
/// rebuilding the tree with full nodes; a smaller one is inserted in place.
pub fn extend<K: Ord, V>(map: &mut BTreeMap<K, V>, items: Vec<(K, V)>) {
    if items.len() >= MIN_BATCH && items.len() * 4 >= map.len() {
        // `FromIterator` keeps the last of equal keys, `append` the value from
        // its argument: both as `insert` would.
        let mut batch: BTreeMap<K, V> = items.into_iter().collect();
        map.append(&mut batch);
    } else {
        map.extend(items);
    }
}

/// An immutable list that keeps a single element inline. A node record
/// nearly always has one address and one Pod CIDR; a heap allocation for
/// each (plus the allocator's own overhead) cost some 3 MB per field at 100k
/// remote nodes.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub enum Few<T> {
    /// No element.
    #[default]
    Empty,
    /// One element, inline.
    One(T),
    /// Two or more.
    Many(Box<[T]>),
}

impl<T> Deref for Few<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Self::Empty => &[],
            Self::One(t) => std::slice::from_ref(t),
            Self::Many(b) => b,
        }
    }
}

impl<T> From<Vec<T>> for Few<T> {
    fn from(mut v: Vec<T>) -> Self {
        match v.len() {
            0 => Self::Empty,
            1 => Self::One(v.pop().expect("one element")),
            _ => Self::Many(v.into_boxed_slice()),
        }
    }
}

impl<'a, T> IntoIterator for &'a Few<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Few<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_is_the_list_it_was_made_from() {
        for v in [vec![], vec![1u32], vec![1, 2], vec![3, 1, 2]] {
            let f = Few::from(v.clone());
            assert_eq!(&*f, v.as_slice());
            assert_eq!(f.iter().count(), v.len());
            assert_eq!(format!("{f:?}"), format!("{v:?}"));
        }
        assert!(matches!(Few::from(vec![7u32]), Few::One(7)));
    }

    #[test]
    fn same_contents_as_inserting_one_by_one() {
        for (start, batch) in [(0, 10), (0, 1000), (5000, 100), (100, 1000), (1000, 1000)] {
            let mut a: BTreeMap<u32, u32> = (0..start).map(|k| (k * 2, k)).collect();
            let mut b = a.clone();
            // Overlapping keys, a repeated key inside the batch, unsorted order.
            let items: Vec<(u32, u32)> = (0..batch)
                .map(|i| ((i * 7919) % (batch * 3), i))
                .chain([(1, 1), (1, 2)])
                .collect();
            for (k, v) in items.clone() {
                a.insert(k, v);
            }
            extend(&mut b, items);
            assert_eq!(a, b, "start {start}, batch {batch}");
        }
    }
}
