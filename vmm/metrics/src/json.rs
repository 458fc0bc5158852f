//! Firecracker-style metrics lines: one JSON object per flush, each group's counters as the
//! change since the previous flush (Firecracker's `SharedIncMetric` semantics), plus
//! `utc_timestamp_ms`. Per-device groups (`block_<id>`, `net_<id>`) also add into an
//! aggregate group (`block`, `net`) as Firecracker's do.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::registry::VmMetrics;

/// Remembers the values of the previous flush. One per metrics destination.
#[derive(Default)]
pub struct Flusher {
    previous: HashMap<(String, &'static str), u64>,
}

impl Flusher {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next line (without its newline): each counter's change since the previous call.
    pub fn line(&mut self, metrics: &VmMetrics, utc_timestamp_ms: u64) -> String {
        let groups = metrics.snapshot_groups();
        let mut out = Map::new();
        out.insert("utc_timestamp_ms".into(), Value::from(utc_timestamp_ms));
        let mut aggregates: HashMap<&'static str, Map<String, Value>> = HashMap::new();
        for (name, aggregate, values) in groups {
            let mut group = Map::new();
            for (field, now) in values {
                let d = delta(self.previous.entry((name.clone(), field)).or_default(), now);
                group.insert(field.into(), Value::from(d));
                if let Some(agg) = aggregate {
                    let slot = aggregates.entry(agg).or_default();
                    let sum = slot.get(field).and_then(Value::as_u64).unwrap_or(0);
                    slot.insert(field.into(), Value::from(sum.saturating_add(d)));
                }
            }
            out.insert(name, Value::Object(group));
        }
        for (name, group) in aggregates {
            out.insert(name.into(), Value::Object(group));
        }
        Value::Object(out).to_string()
    }
}

/// `now - *previous`, remembering `now`. A counter never goes down; if it did (it cannot with
/// these counters), the change is 0 rather than a wrapped huge number.
pub fn delta(previous: &mut u64, now: u64) -> u64 {
    let d = now.saturating_sub(*previous);
    *previous = now;
    d
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn utc_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
