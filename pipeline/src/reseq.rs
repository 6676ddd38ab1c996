//! Restores per-device sequence order after a parallel stage, within a bounded window.

use std::collections::BTreeMap;

/// A sequence number arrived that cannot be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// Already delivered or already waiting.
    #[error("sequence {seq} arrived twice (next expected {next})")]
    Duplicate {
        /// The sequence number.
        seq: u64,
        /// The next one expected.
        next: u64,
    },
    /// Further ahead of the next expected number than the window allows.
    #[error("sequence {seq} is beyond the window of {window} after {next}")]
    OutOfWindow {
        /// The sequence number.
        seq: u64,
        /// The next one expected.
        next: u64,
        /// The window.
        window: u64,
    },
}

/// Items of one device, released strictly in sequence order.
#[derive(Debug)]
pub(crate) struct Resequencer<T> {
    next: u64,
    window: u64,
    waiting: BTreeMap<u64, T>,
}

impl<T> Resequencer<T> {
    /// Accepts sequence numbers in `[next, next + window)`.
    pub fn new(window: u64) -> Resequencer<T> {
        Resequencer {
            next: 0,
            window: window.max(1),
            waiting: BTreeMap::new(),
        }
    }

    /// Parks `item` until every earlier sequence number has been popped.
    pub fn push(&mut self, seq: u64, item: T) -> Result<(), SequenceError> {
        if seq < self.next || self.waiting.contains_key(&seq) {
            return Err(SequenceError::Duplicate {
                seq,
                next: self.next,
            });
        }
        if seq - self.next >= self.window {
            return Err(SequenceError::OutOfWindow {
                seq,
                next: self.next,
                window: self.window,
            });
        }
        self.waiting.insert(seq, item);
        Ok(())
    }

    /// The next item in order, if it has arrived.
    pub fn pop(&mut self) -> Option<T> {
        let item = self.waiting.remove(&self.next)?;
        self.next += 1;
        Some(item)
    }

    /// Items parked.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The next sequence number expected.
    #[cfg(test)]
    pub fn next_seq(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_in_sequence_order_whatever_the_arrival_order() {
        let mut r = Resequencer::new(8);
        for s in [2u64, 0, 3, 1] {
            r.push(s, s).unwrap();
        }
        let out: Vec<u64> = std::iter::from_fn(|| r.pop()).collect();
        assert_eq!(out, [0, 1, 2, 3]);
        assert_eq!(r.next_seq(), 4);
    }

    #[test]
    fn duplicates_and_far_future_numbers_are_refused() {
        let mut r = Resequencer::new(4);
        r.push(0, ()).unwrap();
        assert!(r.pop().is_some());
        assert_eq!(
            r.push(0, ()),
            Err(SequenceError::Duplicate { seq: 0, next: 1 })
        );
        r.push(2, ()).unwrap();
        assert!(matches!(
            r.push(2, ()),
            Err(SequenceError::Duplicate { .. })
        ));
        assert!(matches!(
            r.push(5, ()),
            Err(SequenceError::OutOfWindow { .. })
        ));
        assert_eq!(r.waiting(), 1);
    }

    proptest::proptest! {
        /// Any arrival order that stays within the window comes out in sequence order.
        #[test]
        fn any_order_within_the_window_comes_out_in_sequence(
            keys in proptest::collection::vec(proptest::num::u32::ANY, 1..200),
            window in 1u64..64,
        ) {
            // A permutation of 0..n that never runs more than `window` ahead of what is popped:
            // sort by (block of `window`, random key).
            let n = keys.len() as u64;
            let mut order: Vec<(u64, u32)> = (0..n).zip(keys).collect();
            order.sort_by_key(|&(s, key)| (s / window, key));
            let order = order.into_iter().map(|(s, _)| s);
            let mut r = Resequencer::new(window);
            let mut out = Vec::new();
            for s in order {
                r.push(s, s).unwrap();
                while let Some(x) = r.pop() {
                    out.push(x);
                }
            }
            proptest::prop_assert_eq!(out, (0..n).collect::<Vec<_>>());
        }
    }
}
