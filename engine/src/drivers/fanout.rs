//! One request sent to several children at once and answered when every
//! child is done: the filters that keep copies (blkverify, quorum).

use super::{completes_on_drop, Done};
use crate::error::Result;
use parking_lot::Mutex;
use std::sync::Arc;

struct State<T, F> {
    results: Vec<Option<Result<T>>>,
    left: usize,
    finish: Option<F>,
}

/// Calls `start(i, done)` for `i` in `0..n`, then `finish` with the results
/// in child order, on the thread of the last completion.
pub fn all<T, F>(n: usize, start: impl Fn(usize, Done<T>), finish: F)
where
    T: Send + 'static,
    F: FnOnce(Vec<Result<T>>) + Send + 'static,
{
    if n == 0 {
        return finish(Vec::new());
    }
    let state = Arc::new(Mutex::new(State {
        results: (0..n).map(|_| None).collect(),
        left: n,
        finish: Some(finish),
    }));
    for i in 0..n {
        let state = state.clone();
        start(
            i,
            completes_on_drop(move |r| {
                let ready = {
                    let mut st = state.lock();
                    st.results[i] = Some(r);
                    st.left -= 1;
                    (st.left == 0).then(|| (std::mem::take(&mut st.results), st.finish.take()))
                };
                if let Some((results, Some(finish))) = ready {
                    finish(results.into_iter().flatten().collect());
                }
            }),
        );
    }
}

/// QEMU's sector numbers of a byte range in events: the first sector and
/// the count of sectors it touches.
pub fn sectors(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / 512;
    (first, (offset + len).div_ceil(512) - first)
}

/// Where two copies of the same range first differ.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn results_come_in_child_order_once_all_are_done() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let pending: Mutex<Vec<(usize, Done<usize>)>> = Mutex::default();
        all(
            3,
            |i, d| pending.lock().push((i, d)),
            move |r: Vec<Result<usize>>| {
                let _ = tx.send(r.into_iter().map(|x| x.ok()).collect::<Vec<_>>());
            },
        );
        let mut p = pending.into_inner();
        // Completed out of order; the last one finishes.
        let (i2, d2) = p.remove(2);
        d2(Ok(i2 * 10));
        let (_, d0) = p.remove(0);
        d0(Err(Error::io(libc::EIO, "x")));
        assert!(rx.try_recv().is_err());
        let (i1, d1) = p.remove(0);
        d1(Ok(i1 * 10));
        assert_eq!(rx.recv().ok(), Some(vec![None, Some(10), Some(20)]));
    }

    #[test]
    fn a_dropped_completion_counts_as_an_error() {
        let (tx, rx) = crossbeam_channel::unbounded();
        all(
            2,
            |i, d: Done<usize>| {
                if i == 0 {
                    d(Ok(7))
                }
            },
            move |r| {
                let _ = tx.send(r.iter().map(|x| x.is_ok()).collect::<Vec<_>>());
            },
        );
        assert_eq!(rx.recv().ok(), Some(vec![true, false]));
    }

    #[test]
    fn sector_ranges() {
        assert_eq!(sectors(0, 512), (0, 1));
        assert_eq!(sectors(511, 2), (0, 2));
        assert_eq!(sectors(4096, 4096), (8, 8));
    }

    #[test]
    fn differences() {
        assert_eq!(first_difference(b"abc", b"abc"), None);
        assert_eq!(first_difference(b"abc", b"abd"), Some(2));
        assert_eq!(first_difference(b"ab", b"abc"), Some(2));
    }
}
