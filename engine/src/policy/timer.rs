//! One timer thread for the whole engine: callbacks run at (or just after)
//! their deadline, on the timer thread, so they must not block.

use parking_lot::{Condvar, Mutex};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

type Callback = Box<dyn FnOnce() + Send + 'static>;

struct Entry {
    at: Instant,
    seq: u64,
    cb: Callback,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Default)]
struct Timers {
    heap: Mutex<(BinaryHeap<Reverse<Entry>>, u64)>,
    wake: Condvar,
}

fn timers() -> &'static Timers {
    static T: OnceLock<&'static Timers> = OnceLock::new();
    T.get_or_init(|| {
        let t: &'static Timers = Box::leak(Box::default());
        let spawned = std::thread::Builder::new()
            .name("timer".into())
            .spawn(move || run(t));
        if let Err(e) = spawned {
            log::error!("cannot start the timer thread: {e}");
        }
        t
    })
}

fn run(t: &'static Timers) {
    let mut g = t.heap.lock();
    loop {
        let now = Instant::now();
        match g.0.peek() {
            Some(Reverse(e)) if e.at <= now => {
                if let Some(Reverse(e)) = g.0.pop() {
                    drop(g);
                    (e.cb)();
                    g = t.heap.lock();
                }
            }
            Some(Reverse(e)) => {
                let at = e.at;
                t.wake.wait_until(&mut g, at);
            }
            None => t.wake.wait(&mut g),
        }
    }
}

/// Runs `cb` once `delay` has passed.
pub fn after(delay: Duration, cb: impl FnOnce() + Send + 'static) {
    let t = timers();
    let mut g = t.heap.lock();
    g.1 += 1;
    let seq = g.1;
    g.0.push(Reverse(Entry {
        at: Instant::now() + delay,
        seq,
        cb: Box::new(cb),
    }));
    t.wake.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_deadline_order() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for (i, ms) in [(0, 30u64), (1, 10), (2, 20)] {
            let tx = tx.clone();
            after(Duration::from_millis(ms), move || tx.send(i).unwrap());
        }
        let got: Vec<i32> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(2)).unwrap())
            .collect();
        assert_eq!(got, vec![1, 2, 0]);
    }
}
