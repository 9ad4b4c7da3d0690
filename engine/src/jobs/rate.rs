//! The `speed` of a job: bytes per second, 0 for no limit.
//!
//! Virtual time: every chunk moves the time the next one may start by its
//! share of a second, so the rate holds exactly over any stretch longer
//! than a chunk; idle time earns at most one slice of credit (a burst).

use std::time::{Duration, Instant};

/// Credit a job may build up while it does not copy (QEMU's slice).
const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct RateLimit {
    next: Option<Instant>,
}

impl RateLimit {
    pub fn new() -> RateLimit {
        RateLimit { next: None }
    }

    /// How long to wait before `bytes` more may go at `speed`, then counts
    /// them as sent once the wait is over.
    pub fn delay(&mut self, now: Instant, speed: u64, bytes: u64) -> Duration {
        if speed == 0 {
            self.next = None;
            return Duration::ZERO;
        }
        let start = match self.next {
            Some(n) if n + SLICE > now => n,
            _ => now.checked_sub(SLICE).unwrap_or(now),
        };
        if start > now {
            return start - now;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / speed as f64);
        self.next = Some(start + cost);
        Duration::ZERO
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `total` bytes in `chunk`s at `speed` on a fake clock; returns the elapsed time.
    fn simulate(speed: u64, chunk: u64, total: u64) -> Duration {
        let mut r = RateLimit::new();
        let t0 = Instant::now();
        let mut now = t0;
        let mut sent = 0;
        while sent < total {
            let d = r.delay(now, speed, chunk);
            if d.is_zero() {
                sent += chunk;
            } else {
                now += d;
            }
        }
        now - t0
    }

    #[test]
    fn holds_the_rate() {
        // 100 MiB at 10 MiB/s in 64 KiB chunks: 10 s, less the first slice's credit.
        let t = simulate(10 << 20, 64 << 10, 100 << 20).as_secs_f64();
        assert!((9.8..=10.0).contains(&t), "{t}");
        let t = simulate(1 << 20, 1 << 20, 8 << 20).as_secs_f64();
        assert!((6.8..=7.0).contains(&t), "{t}");
    }

    #[test]
    fn no_limit_and_bounded_credit() {
        let mut r = RateLimit::new();
        let now = Instant::now();
        assert_eq!(r.delay(now, 0, 1 << 30), Duration::ZERO);
        // After a long idle time only one slice of credit remains.
        assert_eq!(r.delay(now, 1000, 100), Duration::ZERO);
        let later = now + Duration::from_secs(60);
        assert_eq!(r.delay(later, 1000, 100), Duration::ZERO);
        assert_eq!(r.delay(later, 1000, 100), Duration::ZERO);
        assert!(r.delay(later, 1000, 100) > Duration::ZERO);
    }
}
