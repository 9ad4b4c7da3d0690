//! The readahead cache: segments of the remote file, each fetched by one
//! request, kept in memory in least-recently-used order. A read inside a
//! ready segment is served from it; a read inside a segment still being
//! fetched waits for that fetch instead of sending its own request.

use crate::io::Buf;
use std::sync::Arc;

pub struct Cache<W> {
    segs: Vec<Segment<W>>,
    next_id: u64,
    clock: u64,
    max_segments: usize,
    max_bytes: u64,
}

struct Segment<W> {
    id: u64,
    start: u64,
    len: u64,
    used: u64,
    state: State<W>,
}

enum State<W> {
    Fetching(Vec<W>),
    Ready(Arc<Buf>),
}

pub enum Lookup<W> {
    /// The data is here: the range starts `at` bytes into `data`.
    Hit {
        waiter: W,
        data: Arc<Buf>,
        at: usize,
    },
    /// A fetch that covers the range is on its way; the waiter joined it.
    Queued,
    /// Nothing covers the range: fetch `len` bytes at `start`, then
    /// [`Cache::finish`] segment `id`. The waiter is the fetch's first.
    Fetch { id: u64, start: u64, len: u64 },
}

impl<W> Cache<W> {
    /// Keeps at most `max_segments` ready segments and `max_bytes` of data
    /// (fetches in flight come on top: their callers own that memory).
    pub fn new(max_segments: usize, max_bytes: u64) -> Cache<W> {
        Cache {
            segs: Vec::new(),
            next_id: 0,
            clock: 0,
            max_segments,
            max_bytes,
        }
    }

    /// A read of `len` bytes at `offset`; on a miss the segment to fetch
    /// is `fetch_len` bytes from `offset` (the read and its readahead).
    pub fn lookup(&mut self, offset: u64, len: u64, fetch_len: u64, waiter: W) -> Lookup<W> {
        self.clock += 1;
        let end = offset + len;
        if let Some(s) = self
            .segs
            .iter_mut()
            .find(|s| s.start <= offset && end <= s.start + s.len)
        {
            s.used = self.clock;
            return match &mut s.state {
                State::Ready(data) => Lookup::Hit {
                    waiter,
                    data: data.clone(),
                    at: (offset - s.start) as usize,
                },
                State::Fetching(waiters) => {
                    waiters.push(waiter);
                    Lookup::Queued
                }
            };
        }
        let id = self.next_id;
        self.next_id += 1;
        let len = fetch_len.max(len);
        self.segs.push(Segment {
            id,
            start: offset,
            len,
            used: self.clock,
            state: State::Fetching(vec![waiter]),
        });
        Lookup::Fetch {
            id,
            start: offset,
            len,
        }
    }

    /// The fetch of segment `id` ended with `data` (None: it failed, and
    /// the segment is dropped). Returns the reads that waited for it.
    pub fn finish(&mut self, id: u64, data: Option<Arc<Buf>>) -> Vec<W> {
        let Some(i) = self.segs.iter().position(|s| s.id == id) else {
            return Vec::new();
        };
        let waiters = match data {
            Some(data) => match std::mem::replace(&mut self.segs[i].state, State::Ready(data)) {
                State::Fetching(w) => w,
                State::Ready(_) => Vec::new(),
            },
            None => match self.segs.remove(i).state {
                State::Fetching(w) => w,
                State::Ready(_) => Vec::new(),
            },
        };
        self.evict();
        waiters
    }

    fn evict(&mut self) {
        loop {
            let ready = self
                .segs
                .iter()
                .filter(|s| matches!(s.state, State::Ready(_)));
            let (count, bytes) = ready.fold((0, 0), |(n, b), s| (n + 1, b + s.len));
            if count <= self.max_segments && bytes <= self.max_bytes {
                return;
            }
            let oldest = self
                .segs
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s.state, State::Ready(_)))
                .min_by_key(|(_, s)| s.used)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => drop(self.segs.remove(i)),
                None => return,
            }
        }
    }

    #[cfg(test)]
    fn ready_ranges(&self) -> Vec<(u64, u64)> {
        let mut r: Vec<_> = self
            .segs
            .iter()
            .filter(|s| matches!(s.state, State::Ready(_)))
            .map(|s| (s.start, s.len))
            .collect();
        r.sort();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, fill: u8) -> Option<Arc<Buf>> {
        let mut b = Buf::zeroed(len);
        b.fill(fill);
        Some(Arc::new(b))
    }

    fn fetch<W>(l: Lookup<W>) -> (u64, u64, u64) {
        match l {
            Lookup::Fetch { id, start, len } => (id, start, len),
            _ => panic!("expected a fetch"),
        }
    }

    #[test]
    fn hits_queue_and_misses() {
        let mut c: Cache<u32> = Cache::new(8, 1 << 20);
        let (id, start, len) = fetch(c.lookup(100, 10, 50, 1));
        assert_eq!((start, len), (100, 50));
        // Inside the fetch in flight: waits for it.
        assert!(matches!(c.lookup(120, 30, 50, 2), Lookup::Queued));
        // Past its end: a fetch of its own.
        let (id2, _, _) = fetch(c.lookup(140, 20, 50, 3));
        assert_eq!(c.finish(id, data(50, 7)), vec![1, 2]);
        match c.lookup(110, 40, 50, 4) {
            Lookup::Hit { waiter, data, at } => {
                assert_eq!((waiter, at, data[at]), (4, 10, 7));
            }
            _ => panic!("expected a hit"),
        }
        // A failed fetch hands back its waiters and leaves nothing behind.
        assert_eq!(c.finish(id2, None), vec![3]);
        assert_eq!(c.ready_ranges(), vec![(100, 50)]);
        assert!(c.finish(id2, None).is_empty());
    }

    #[test]
    fn a_read_longer_than_the_fetch_asked_is_fetched_whole() {
        let mut c: Cache<()> = Cache::new(8, 1 << 20);
        assert_eq!(fetch(c.lookup(0, 100, 10, ())).2, 100);
    }

    #[test]
    fn least_recently_used_goes_first() {
        let mut c: Cache<()> = Cache::new(2, 1 << 20);
        for start in [0, 100, 200] {
            if start == 200 {
                // Touch the first segment so the second is the oldest.
                assert!(matches!(c.lookup(0, 1, 1, ()), Lookup::Hit { .. }));
            }
            let (id, _, _) = fetch(c.lookup(start, 10, 100, ()));
            c.finish(id, data(100, 0));
        }
        assert_eq!(c.ready_ranges(), vec![(0, 100), (200, 100)]);
        // The byte bound holds too.
        let mut c: Cache<()> = Cache::new(8, 150);
        for start in [0, 100] {
            let (id, _, _) = fetch(c.lookup(start, 10, 100, ()));
            c.finish(id, data(100, 0));
        }
        assert_eq!(c.ready_ranges(), vec![(100, 100)]);
    }
}
