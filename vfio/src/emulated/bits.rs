//! A fixed-size bit set with a population count, for per-block flags.

#[derive(Clone, Debug, Default)]
pub(crate) struct BitSet {
    words: Vec<u64>,
    len: u64,
    count: u64,
}

impl BitSet {
    pub(crate) fn new(len: u64) -> BitSet {
        let words = usize::try_from(len.div_ceil(64)).unwrap_or(usize::MAX);
        BitSet {
            words: vec![0; words],
            len,
            count: 0,
        }
    }

    /// All of `0..len` set.
    pub(crate) fn full(len: u64) -> BitSet {
        let mut s = BitSet::new(len);
        s.words.fill(u64::MAX);
        let tail = len % 64;
        if tail != 0 {
            if let Some(last) = s.words.last_mut() {
                *last = (1u64 << tail) - 1;
            }
        }
        s.count = len;
        s
    }

    fn pos(i: u64) -> (usize, u64) {
        // Callers check `i < len`, and `len / 64` words were allocated.
        (
            usize::try_from(i / 64).unwrap_or(usize::MAX),
            1u64 << (i % 64),
        )
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    pub(crate) fn contains(&self, i: u64) -> bool {
        let (w, b) = Self::pos(i);
        i < self.len && self.words.get(w).is_some_and(|x| x & b != 0)
    }

    /// Sets bit `i`; returns whether it was newly set.
    pub(crate) fn insert(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let (w, b) = Self::pos(i);
        match self.words.get_mut(w) {
            Some(x) if *x & b == 0 => {
                *x |= b;
                self.count += 1;
                true
            }
            _ => false,
        }
    }

    /// Clears bit `i`; returns whether it was set.
    pub(crate) fn remove(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let (w, b) = Self::pos(i);
        match self.words.get_mut(w) {
            Some(x) if *x & b != 0 => {
                *x &= !b;
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    /// The first set bit at or after `from`, without wrapping.
    pub(crate) fn next_from(&self, from: u64) -> Option<u64> {
        if from >= self.len || self.count == 0 {
            return None;
        }
        let (mut w, _) = Self::pos(from);
        let mut word = self.words.get(w)? & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let i = (w as u64) * 64 + u64::from(word.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// The first set bit at or after `from`, wrapping to 0.
    pub(crate) fn next_wrapping(&self, from: u64) -> Option<u64> {
        self.next_from(from).or_else(|| self.next_from(0))
    }
}

#[cfg(test)]
mod tests {
    use super::BitSet;

    #[test]
    fn bitset_counts_and_scans() {
        let mut s = BitSet::new(130);
        assert!(s.insert(3) && s.insert(129) && !s.insert(3) && !s.insert(130));
        assert_eq!(s.count(), 2);
        assert_eq!(s.next_from(0), Some(3));
        assert_eq!(s.next_from(4), Some(129));
        assert_eq!(s.next_wrapping(130), Some(3));
        assert!(s.remove(3) && !s.remove(3));
        assert_eq!(s.next_from(0), Some(129));
        let f = BitSet::full(130);
        assert_eq!(f.count(), 130);
        assert_eq!(f.next_from(129), Some(129));
        assert_eq!(f.next_from(130), None);
    }
}
