//! The event bus: every negotiated QMP client gets every event.

use parking_lot::Mutex;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// A subscriber receives serialised event lines.
pub type Subscriber = crossbeam_channel::Sender<String>;

#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<(u64, Subscriber)>>,
    next_id: Mutex<u64>,
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

    /// Sends an event to everyone; never blocks on a slow client.
    pub fn emit(&self, name: &str, data: Value) {
        let line = event_json(name, data).to_string();
        self.subscribers
            .lock()
            .retain(|(_, tx)| tx.send(line.clone()).is_ok());
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
}
