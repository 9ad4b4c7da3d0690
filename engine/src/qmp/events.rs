//! The event bus: every negotiated QMP client gets every event.

use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// At most one event of a rate-limited kind (and key) per this period, as
/// QEMU limits the quorum events.
pub const RATE_PERIOD: Duration = Duration::from_secs(1);

/// A subscriber receives serialised event lines.
pub type Subscriber = crossbeam_channel::Sender<String>;

#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<(u64, Subscriber)>>,
    next_id: Mutex<u64>,
    /// The rate-limited events, by (event, key).
    limited: Mutex<HashMap<(String, String), Limit>>,
}

struct Limit {
    /// When one was last sent.
    last: Instant,
    /// The latest one held back, sent when the period ends.
    pending: Option<Value>,
}

impl EventBus {
    pub fn subscribe(&self, tx: Subscriber) -> u64 {
        let id = {
            let mut n = self.next_id.lock();
            *n += 1;
            *n
        };
        self.subscribers.lock().push((id, tx));
        id
    }

    pub fn unsubscribe(&self, id: u64) {
        self.subscribers.lock().retain(|(i, _)| *i != id);
    }

    /// Sends an event to everyone; never blocks on a slow client. A client
    /// whose queue is full (it does not read) gets no more events.
    pub fn emit(&self, name: &str, data: Value) {
        let line = event_json(name, data).to_string();
        self.subscribers
            .lock()
            .retain(|(id, tx)| match tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(crossbeam_channel::TrySendError::Full(_)) => {
                    log::warn!("QMP client {id} does not read its events: it gets no more");
                    false
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
            });
    }

    /// `emit`, at most once per [`RATE_PERIOD`] for `name` and `key` (a
    /// node name), as QEMU rate-limits the quorum events: a failing disk
    /// must not flood the clients. Within a period the latest event is held
    /// and sent when the period ends; the ones before it are dropped.
    pub fn emit_limited(self: &Arc<Self>, name: &str, key: &str, data: Value) {
        let now = Instant::now();
        let id = (name.to_string(), key.to_string());
        let wait = {
            let mut limited = self.limited.lock();
            let slot = limited.entry(id.clone()).or_insert(Limit {
                last: now - RATE_PERIOD,
                pending: None,
            });
            let since = now.duration_since(slot.last);
            if since >= RATE_PERIOD && slot.pending.is_none() {
                slot.last = now;
                Some(None)
            } else if slot.pending.replace(data.clone()).is_none() {
                Some(Some(RATE_PERIOD.saturating_sub(since)))
            } else {
                // Held in place of the one before; its timer is on its way.
                None
            }
        };
        match wait {
            None => {}
            Some(None) => self.emit(name, data),
            Some(Some(wait)) => {
                let bus = self.clone();
                let spawned = std::thread::Builder::new()
                    .name("qmp-event-timer".into())
                    .spawn(move || {
                        std::thread::sleep(wait);
                        let held = {
                            let mut limited = bus.limited.lock();
                            limited.get_mut(&id).and_then(|slot| {
                                slot.last = Instant::now();
                                slot.pending.take()
                            })
                        };
                        if let Some(data) = held {
                            bus.emit(&id.0, data);
                        }
                    });
                if let Err(e) = spawned {
                    log::warn!("{name}: cannot hold the event back ({e}); it is lost");
                }
            }
        }
    }
}

pub fn event_json(name: &str, data: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_to_live_subscribers_only() {
        let bus = EventBus::default();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let (tx2, rx2) = crossbeam_channel::unbounded();
        bus.subscribe(tx1);
        let id2 = bus.subscribe(tx2);
        drop(rx2);
        bus.emit("X", json!({"a": 1}));
        let v: Value = serde_json::from_str(&rx1.recv().unwrap()).unwrap();
        assert_eq!(v["event"], "X");
        assert_eq!(v["data"]["a"], 1);
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 0);
        bus.unsubscribe(id2);
        assert_eq!(bus.subscribers.lock().len(), 1);
    }

    #[test]
    fn limited_events_send_the_first_and_the_latest_of_a_period() {
        let bus = Arc::new(EventBus::default());
        let (tx, rx) = crossbeam_channel::bounded(16);
        bus.subscribe(tx);
        for i in 0..3 {
            bus.emit_limited("E", "n0", json!({"i": i}));
        }
        // Another key is not held back by n0's.
        bus.emit_limited("E", "n1", json!({"i": 9}));
        let got = |rx: &crossbeam_channel::Receiver<String>| {
            let line = rx.recv_timeout(RATE_PERIOD * 3).unwrap();
            serde_json::from_str::<Value>(&line).unwrap()["data"]["i"].clone()
        };
        assert_eq!(got(&rx), json!(0));
        assert_eq!(got(&rx), json!(9));
        assert_eq!(got(&rx), json!(2), "the latest, once the period is over");
        assert!(rx.recv_timeout(RATE_PERIOD * 2).is_err(), "1 was dropped");
    }
}
