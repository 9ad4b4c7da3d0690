//! I/O throttling with QEMU's leaky buckets.
//!
//! Six buckets (bytes and operations, each total / read / write) leak at
//! their average rate. A request may start while every bucket it charges is
//! at or below its burst size (`max`, or avg/10 without one); it is then
//! charged in full, so the level may briefly exceed the burst. The math is
//! pure (time is passed in); [`Throttle`] adds the FIFO queues and timers.

use super::timer;
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

pub const BPS_TOTAL: usize = 0;
pub const BPS_READ: usize = 1;
pub const BPS_WRITE: usize = 2;
pub const IOPS_TOTAL: usize = 3;
pub const IOPS_READ: usize = 4;
pub const IOPS_WRITE: usize = 5;

/// QMP member names of the limits, in bucket order.
pub const AVG_NAMES: [&str; 6] = ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"];
pub const MAX_NAMES: [&str; 6] = [
    "bps_max",
    "bps_rd_max",
    "bps_wr_max",
    "iops_max",
    "iops_rd_max",
    "iops_wr_max",
];

const NS_PER_SEC: f64 = 1e9;

/// The limits as the user gave them (zero = no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    pub avg: [u64; 6],
    pub max: [u64; 6],
    /// Requests larger than this count as size/iops_size operations.
    pub iops_size: u64,
}

impl ThrottleConfig {
    /// The limits as block_set_io_throttle and query-block name them: the
    /// averages always, the bursts and `iops_size` only when set.
    pub fn to_qmp(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        for i in 0..6 {
            m.insert(AVG_NAMES[i].into(), self.avg[i].into());
            if self.max[i] != 0 {
                m.insert(MAX_NAMES[i].into(), self.max[i].into());
            }
        }
        if self.iops_size != 0 {
            m.insert("iops_size".into(), self.iops_size.into());
        }
        m
    }

    /// Builds a config from signed values, checking them as QEMU does.
    pub fn new(avg: [i64; 6], max: [i64; 6], iops_size: i64) -> Result<ThrottleConfig> {
        if avg.iter().chain(&max).any(|v| *v < 0) || iops_size < 0 {
            return Err(Error::generic("bps/iops/max values must be 0 or greater"));
        }
        for (total, rd, wr) in [
            (BPS_TOTAL, BPS_READ, BPS_WRITE),
            (IOPS_TOTAL, IOPS_READ, IOPS_WRITE),
        ] {
            let conflict = |v: &[i64; 6]| v[total] != 0 && (v[rd] != 0 || v[wr] != 0);
            if conflict(&avg) || conflict(&max) {
                return Err(Error::generic(
                    "bps/iops/max total values and read/write values cannot be used at the same time",
                ));
            }
        }
        for i in 0..6 {
            if max[i] != 0 && avg[i] == 0 {
                return Err(Error::generic(format!(
                    "{} requires {} to be set",
                    MAX_NAMES[i], AVG_NAMES[i]
                )));
            }
            if max[i] != 0 && max[i] < avg[i] {
                return Err(Error::generic(format!(
                    "{} cannot be lower than {}",
                    MAX_NAMES[i], AVG_NAMES[i]
                )));
            }
        }
        Ok(ThrottleConfig {
            avg: avg.map(|v| v as u64),
            max: max.map(|v| v as u64),
            iops_size: iops_size as u64,
        })
    }

    pub fn enabled(&self) -> bool {
        self.avg.iter().any(|v| *v != 0)
    }
}

/// Bucket levels at a point in time; all arithmetic, no clock.
#[derive(Debug, Clone)]
pub struct Buckets {
    avg: [f64; 6],
    burst: [f64; 6],
    iops_size: u64,
    level: [f64; 6],
    last_leak_ns: u64,
}

impl Buckets {
    pub fn new(cfg: &ThrottleConfig, now_ns: u64) -> Buckets {
        let avg = cfg.avg.map(|v| v as f64);
        let mut burst = [0.0; 6];
        for i in 0..6 {
            burst[i] = if cfg.max[i] != 0 {
                cfg.max[i] as f64
            } else {
                avg[i] / 10.0
            };
        }
        Buckets {
            avg,
            burst,
            iops_size: cfg.iops_size,
            level: [0.0; 6],
            last_leak_ns: now_ns,
        }
    }

    fn charged(write: bool) -> [usize; 4] {
        if write {
            [BPS_TOTAL, BPS_WRITE, IOPS_TOTAL, IOPS_WRITE]
        } else {
            [BPS_TOTAL, BPS_READ, IOPS_TOTAL, IOPS_READ]
        }
    }

    /// Lets every bucket drain for the time since the last leak.
    pub fn leak(&mut self, now_ns: u64) {
        let delta = now_ns.saturating_sub(self.last_leak_ns) as f64;
        self.last_leak_ns = self.last_leak_ns.max(now_ns);
        for i in 0..6 {
            self.level[i] = (self.level[i] - self.avg[i] * delta / NS_PER_SEC).max(0.0);
        }
    }

    /// Nanoseconds until a request in this direction may start (0 = now).
    pub fn wait_ns(&self, write: bool) -> u64 {
        Self::charged(write)
            .iter()
            .filter(|&&i| self.avg[i] > 0.0)
            .map(|&i| {
                let extra = self.level[i] - self.burst[i];
                if extra <= 0.0 {
                    0
                } else {
                    (extra * NS_PER_SEC / self.avg[i]).ceil() as u64
                }
            })
            .max()
            .unwrap_or(0)
    }

    /// Charges a request that is starting.
    pub fn account(&mut self, write: bool, bytes: u64) {
        let ops = if self.iops_size != 0 && bytes > self.iops_size {
            bytes as f64 / self.iops_size as f64
        } else {
            1.0
        };
        let [bt, bd, ot, od] = Self::charged(write);
        self.level[bt] += bytes as f64;
        self.level[bd] += bytes as f64;
        self.level[ot] += ops;
        self.level[od] += ops;
    }
}

pub type Job = Box<dyn FnOnce() + Send + 'static>;

struct State {
    cfg: ThrottleConfig,
    buckets: Buckets,
    /// Waiting requests per direction (read, write), in arrival order.
    queues: [VecDeque<(u64, Job)>; 2],
    timer_armed: [bool; 2],
}

/// A device's throttle: requests start in order, at the configured rates.
pub struct Throttle {
    /// `cfg.enabled()`, readable without the lock: unthrottled devices skip it.
    enabled: AtomicBool,
    state: Mutex<State>,
    epoch: Instant,
    me: Weak<Throttle>,
}

impl Throttle {
    pub fn new(cfg: ThrottleConfig) -> Arc<Throttle> {
        Arc::new_cyclic(|me| Throttle {
            enabled: AtomicBool::new(cfg.enabled()),
            state: Mutex::new(State {
                cfg,
                buckets: Buckets::new(&cfg, 0),
                queues: Default::default(),
                timer_armed: [false; 2],
            }),
            epoch: Instant::now(),
            me: me.clone(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether any limit is set (requests may have to wait).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn config(&self) -> ThrottleConfig {
        self.state.lock().cfg
    }

    /// Replaces the limits; levels start empty. Waiting requests are
    /// re-examined (and all released when throttling is now off).
    pub fn set_config(&self, cfg: ThrottleConfig) {
        {
            let mut s = self.state.lock();
            s.cfg = cfg;
            s.buckets = Buckets::new(&cfg, self.now_ns());
            self.enabled.store(cfg.enabled(), Ordering::Release);
        }
        self.pump(false);
        self.pump(true);
    }

    /// Runs `job` now or once the limits allow; `bytes` is what it transfers.
    pub fn submit(&self, write: bool, bytes: u64, job: Job) {
        let d = write as usize;
        // Requests still queued when throttling was switched off are
        // released by set_config; new ones need not wait behind them.
        if self.is_enabled() {
            let mut s = self.state.lock();
            if s.cfg.enabled() {
                let now = self.now_ns();
                s.buckets.leak(now);
                let wait = s.buckets.wait_ns(write);
                if !s.queues[d].is_empty() || wait > 0 {
                    s.queues[d].push_back((bytes, job));
                    self.arm(&mut s, write, wait);
                    return;
                }
                s.buckets.account(write, bytes);
            }
        }
        job()
    }

    fn arm(&self, s: &mut State, write: bool, wait_ns: u64) {
        let d = write as usize;
        if s.timer_armed[d] {
            return;
        }
        s.timer_armed[d] = true;
        let me = self.me.clone();
        timer::after(Duration::from_nanos(wait_ns.max(1)), move || {
            if let Some(t) = me.upgrade() {
                t.state.lock().timer_armed[d] = false;
                t.pump(write);
            }
        });
    }

    /// Starts the waiting requests of one direction that the limits allow.
    fn pump(&self, write: bool) {
        let d = write as usize;
        let mut ready = Vec::new();
        {
            let mut s = self.state.lock();
            let now = self.now_ns();
            s.buckets.leak(now);
            while let Some((bytes, _)) = s.queues[d].front() {
                let bytes = *bytes;
                if s.cfg.enabled() {
                    let wait = s.buckets.wait_ns(write);
                    if wait > 0 {
                        self.arm(&mut s, write, wait);
                        break;
                    }
                    s.buckets.account(write, bytes);
                }
                if let Some((_, job)) = s.queues[d].pop_front() {
                    ready.push(job);
                }
            }
        }
        for job in ready {
            job();
        }
    }

    /// Requests waiting for their turn.
    pub fn queued(&self) -> usize {
        let s = self.state.lock();
        s.queues[0].len() + s.queues[1].len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn cfg(avg: [i64; 6], max: [i64; 6], size: i64) -> ThrottleConfig {
        ThrottleConfig::new(avg, max, size).unwrap()
    }

    /// Runs requests back to back on a fake clock and returns how many
    /// started within `secs` seconds.
    fn admitted(b: &mut Buckets, write: bool, bytes: u64, secs: u64) -> u64 {
        let (mut now, mut n) = (0, 0);
        while now < secs * SEC {
            b.leak(now);
            let w = b.wait_ns(write);
            if w > 0 {
                now += w;
                continue;
            }
            b.account(write, bytes);
            n += 1;
        }
        n
    }

    #[test]
    fn iops_limit_holds_over_time() {
        let mut b = Buckets::new(&cfg([0, 0, 0, 100, 0, 0], [0; 6], 0), 0);
        let n = admitted(&mut b, false, 4096, 10);
        // 100/s for 10 s plus the default burst of avg/10.
        assert!((1000..=1012).contains(&n), "{n}");
    }

    #[test]
    fn bps_limit_and_burst() {
        let c = cfg([1 << 20, 0, 0, 0, 0, 0], [8 << 20, 0, 0, 0, 0, 0], 0);
        let mut b = Buckets::new(&c, 0);
        // The burst lets 8 MiB (plus one request) through at once.
        let mut at_once = 0;
        while b.wait_ns(true) == 0 {
            b.account(true, 1 << 16);
            at_once += 1;
        }
        assert_eq!(at_once, 129);
        let mut b = Buckets::new(&c, 0);
        let n = admitted(&mut b, true, 1 << 16, 20);
        // 20 s at 1 MiB/s = 320 requests of 64 KiB, plus the 8 MiB burst.
        assert!((448..=451).contains(&n), "{n}");
    }

    #[test]
    fn read_and_write_buckets_are_separate() {
        let mut b = Buckets::new(&cfg([0, 0, 0, 0, 10, 1000], [0; 6], 0), 0);
        b.account(false, 512);
        b.account(false, 512);
        assert!(b.wait_ns(false) > 0);
        assert_eq!(b.wait_ns(true), 0);
    }

    #[test]
    fn wait_is_extra_over_rate() {
        let mut b = Buckets::new(&cfg([0, 0, 0, 10, 0, 0], [0; 6], 0), 0);
        b.account(true, 1);
        b.account(true, 1);
        // Level 2, burst 1: one op too many at 10/s is 100 ms.
        assert_eq!(b.wait_ns(true), SEC / 10);
        b.leak(SEC / 20);
        assert_eq!(b.wait_ns(true), SEC / 20);
        b.leak(SEC);
        assert_eq!(b.wait_ns(true), 0);
    }

    #[test]
    fn large_requests_count_as_several_ops() {
        let mut b = Buckets::new(&cfg([0, 0, 0, 100, 0, 0], [0; 6], 4096), 0);
        b.account(false, 64 << 10);
        // 16 ops charged: (16 - 10) / 100 s.
        assert_eq!(b.wait_ns(false), 60_000_000);
    }

    #[test]
    fn invalid_configs() {
        let err = |avg, max, size| ThrottleConfig::new(avg, max, size).unwrap_err().msg;
        assert_eq!(
            err([-1, 0, 0, 0, 0, 0], [0; 6], 0),
            "bps/iops/max values must be 0 or greater"
        );
        assert!(err([1, 1, 0, 0, 0, 0], [0; 6], 0).contains("cannot be used at the same time"));
        assert!(err([0, 0, 0, 5, 0, 5], [0; 6], 0).contains("cannot be used at the same time"));
        assert_eq!(
            err([100, 0, 0, 0, 0, 0], [50, 0, 0, 0, 0, 0], 0),
            "bps_max cannot be lower than bps"
        );
        assert_eq!(
            err([0; 6], [0, 0, 0, 0, 7, 0], 0),
            "iops_rd_max requires iops_rd to be set"
        );
        assert!(!cfg([0; 6], [0; 6], 0).enabled());
    }

    #[test]
    fn queue_runs_in_order_and_never_loses_requests() {
        let t = Throttle::new(cfg([0, 0, 0, 200, 0, 0], [0; 6], 0));
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..60 {
            let tx = tx.clone();
            t.submit(i % 2 == 0, 512, Box::new(move || tx.send(i).unwrap()));
        }
        let mut got = Vec::new();
        for _ in 0..60 {
            got.push(rx.recv_timeout(Duration::from_secs(5)).unwrap());
        }
        let evens: Vec<_> = got.iter().filter(|i| *i % 2 == 0).collect();
        let odds: Vec<_> = got.iter().filter(|i| *i % 2 == 1).collect();
        assert!(evens.windows(2).all(|w| w[0] < w[1]));
        assert!(odds.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn disabling_releases_the_queue() {
        let t = Throttle::new(cfg([0, 0, 0, 1, 0, 0], [0; 6], 0));
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..5 {
            let tx = tx.clone();
            t.submit(false, 512, Box::new(move || tx.send(i).unwrap()));
        }
        assert!(t.queued() >= 3);
        t.set_config(ThrottleConfig::default());
        for i in 0..5 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(1)).unwrap(), i);
        }
    }
}
