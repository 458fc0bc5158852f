//! The JSON groups: which counters form a group, and the values read from them.

use prometheus::{Counter, IntCounter};

/// Where a JSON field's value comes from.
pub(crate) enum Source {
    Int(IntCounter),
    /// A seconds counter, reported in whole microseconds.
    Micros(Counter),
}

impl Source {
    pub(crate) fn value(&self) -> u64 {
        match self {
            Source::Int(c) => c.get(),
            // Non-negative and far below 2^64 µs; `as` saturates anyway.
            Source::Micros(c) => (c.get() * 1e6) as u64,
        }
    }
}

pub(crate) struct Group {
    pub(crate) name: String,
    /// The aggregate group this one also adds into.
    pub(crate) aggregate: Option<&'static str>,
    pub(crate) fields: Vec<(&'static str, Source)>,
}

/// A JSON group's name, its aggregate group, and its fields' current values.
pub(crate) type GroupValues = (String, Option<&'static str>, Vec<(&'static str, u64)>);
