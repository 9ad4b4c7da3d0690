//! A bitmap of fixed-size chunks of a device: mirror's dirty chunks,
//! backup's copied ones.

#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    granularity: u64,
    chunks: u64,
}

impl Bitmap {
    /// Covers `size` bytes in chunks of `granularity` (a power of two).
    pub fn new(size: u64, granularity: u64) -> Bitmap {
        let chunks = size.div_ceil(granularity);
        Bitmap {
            words: vec![0; chunks.div_ceil(64) as usize],
            granularity,
            chunks,
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The chunks `offset..offset+len` touches.
    pub fn chunk_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset / self.granularity;
        let end = (offset + len).div_ceil(self.granularity).min(self.chunks);
        first.min(end)..end
    }

    pub fn get(&self, chunk: u64) -> bool {
        chunk < self.chunks && self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    pub fn set(&mut self, chunk: u64, on: bool) {
        if chunk >= self.chunks {
            return;
        }
        let w = &mut self.words[(chunk / 64) as usize];
        if on {
            *w |= 1 << (chunk % 64);
        } else {
            *w &= !(1 << (chunk % 64));
        }
    }

    /// Sets or clears every chunk `offset..offset+len` touches.
    pub fn set_range(&mut self, offset: u64, len: u64, on: bool) {
        for c in self.chunk_range(offset, len) {
            self.set(c, on);
        }
    }

    /// The first set chunk at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut c = from;
        while c < self.chunks {
            let word = self.words[(c / 64) as usize] >> (c % 64);
            if word != 0 {
                let found = c + word.trailing_zeros() as u64;
                return (found < self.chunks).then_some(found);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    /// Number of set chunks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_find_count() {
        let mut b = Bitmap::new(1000 * 4096 + 1, 4096);
        assert_eq!(b.chunks(), 1001);
        assert_eq!(b.next_set(0), None);
        b.set_range(4095, 2, true);
        assert_eq!((b.get(0), b.get(1), b.get(2)), (true, true, false));
        b.set(1000, true);
        b.set(1001, true); // past the end: ignored
        assert_eq!(b.count(), 3);
        assert_eq!(b.next_set(2), Some(1000));
        assert_eq!(b.next_set(1001), None);
        b.set_range(0, 1001 * 4096, false);
        assert_eq!(b.count(), 0);
        assert_eq!(b.chunk_range(8192, 0), 2..2);
    }
}
