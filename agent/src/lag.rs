//! Lag accounting on the agent's own clock: which journal records each receiver has not yet
//! acknowledged, how old the oldest of them is, and how many events and bytes are behind.
//! Clock skew between regions cannot distort it, because both ends of every measurement are
//! taken here (capture time and acknowledgement arrival).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use lockstep_common::event::Seq;
use serde::Serialize;

use crate::journal::RecordMeta;

#[derive(Debug, Clone)]
struct Rec {
    source: Arc<str>,
    captured_at_us: i64,
    bytes: u64,
}

#[derive(Debug, Default, Clone)]
struct ReceiverState {
    sources: HashSet<String>,
    acked: Seq,
    /// Committed (persisted) position on the receiver: what the journal may drop.
    committed: Seq,
    connected: bool,
    last_error: Option<String>,
    resyncing: Option<String>,
}

/// Per-source part of a receiver's status.
#[derive(Debug, Clone, Serialize)]
pub struct SourceLag {
    pub name: String,
    pub acked_seq: u64,
    pub lag_seconds: f64,
    pub events_behind: u64,
    pub bytes_behind: u64,
}

/// A receiver's status as shown by `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiverLag {
    pub name: String,
    pub connected: bool,
    pub acked_seq: u64,
    pub lag_seconds: f64,
    pub events_behind: u64,
    pub bytes_behind: u64,
    pub last_error: Option<String>,
    pub resyncing: Option<String>,
    pub sources: Vec<SourceLag>,
}

/// Shared lag state: the journal's records (seq → source, capture time, size) and each
/// receiver's acknowledged position.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: BTreeMap<u64, Rec>,
    receivers: HashMap<String, ReceiverState>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a receiver and the sources shipped to it, with its last known cursor.
    pub fn add_receiver(&self, name: &str, sources: impl IntoIterator<Item = String>, acked: Seq) {
        let mut g = self.lock();
        let st = g.receivers.entry(name.to_string()).or_default();
        st.sources = sources.into_iter().collect();
        st.acked = acked;
        st.committed = acked;
    }

    /// Records that became durable in the journal.
    pub fn recorded(&self, metas: &[RecordMeta]) {
        let mut g = self.lock();
        for m in metas {
            g.records
                .insert(m.seq.0, Rec { source: m.source.clone(), captured_at_us: m.captured_at_us, bytes: m.bytes });
        }
    }

    /// Records removed from the journal.
    pub fn truncated(&self, through: Seq) {
        let mut g = self.lock();
        let keep = g.records.split_off(&(through.0 + 1));
        g.records = keep;
    }

    pub fn set_acked(&self, receiver: &str, seq: Seq) {
        if let Some(st) = self.lock().receivers.get_mut(receiver) {
            st.acked = st.acked.max(seq);
        }
    }

    pub fn set_committed(&self, receiver: &str, seq: Seq) {
        if let Some(st) = self.lock().receivers.get_mut(receiver) {
            st.committed = st.committed.max(seq);
        }
    }

    /// Forces the acknowledged position (a receiver that came back with an older position).
    pub fn reset_acked(&self, receiver: &str, seq: Seq) {
        if let Some(st) = self.lock().receivers.get_mut(receiver) {
            st.acked = seq;
            st.committed = seq;
        }
    }

    pub fn set_connected(&self, receiver: &str, connected: bool, error: Option<String>) {
        if let Some(st) = self.lock().receivers.get_mut(receiver) {
            st.connected = connected;
            if connected {
                st.last_error = None;
            } else if error.is_some() {
                st.last_error = error;
            }
        }
    }

    pub fn set_resyncing(&self, receiver: &str, source: Option<String>) {
        if let Some(st) = self.lock().receivers.get_mut(receiver) {
            st.resyncing = source;
        }
    }

    /// Lowest committed position over all receivers (what the journal may drop).
    pub fn min_committed(&self) -> Option<Seq> {
        self.lock().receivers.values().map(|r| r.committed).min()
    }

    /// Receivers whose committed position is below `seq`.
    pub fn behind(&self, seq: Seq) -> Vec<String> {
        self.lock().receivers.iter().filter(|(_, r)| r.committed < seq).map(|(n, _)| n.clone()).collect()
    }

    /// Current lag of every receiver, sorted by name.
    pub fn snapshot(&self, now_us: i64) -> Vec<ReceiverLag> {
        let g = self.lock();
        let mut out = Vec::new();
        for (name, st) in &g.receivers {
            let mut per: BTreeMap<&str, (i64, u64, u64)> = BTreeMap::new();
            for s in &st.sources {
                per.insert(s.as_str(), (0, 0, 0));
            }
            let mut oldest: Option<i64> = None;
            let (mut events, mut bytes) = (0u64, 0u64);
            for (_, r) in g.records.range(st.acked.0 + 1..) {
                let Some(p) = per.get_mut(&*r.source) else { continue };
                if p.1 == 0 {
                    p.0 = r.captured_at_us;
                }
                p.1 += 1;
                p.2 += r.bytes;
                oldest = Some(oldest.map_or(r.captured_at_us, |o| o.min(r.captured_at_us)));
                events += 1;
                bytes += r.bytes;
            }
            let age = |t: i64| ((now_us - t).max(0) as f64) / 1e6;
            out.push(ReceiverLag {
                name: name.clone(),
                connected: st.connected,
                acked_seq: st.acked.0,
                lag_seconds: oldest.map(age).unwrap_or(0.0),
                events_behind: events,
                bytes_behind: bytes,
                last_error: st.last_error.clone(),
                resyncing: st.resyncing.clone(),
                sources: per
                    .into_iter()
                    .map(|(s, (t, n, b))| SourceLag {
                        name: s.to_string(),
                        acked_seq: st.acked.0,
                        lag_seconds: if n == 0 { 0.0 } else { age(t) },
                        events_behind: n,
                        bytes_behind: b,
                    })
                    .collect(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_age_of_oldest_unacked() {
        let t = Tracker::new();
        t.add_receiver("r", ["a".to_string(), "b".to_string()], Seq(0));
        let m =
            |s: u64, src: &str, at: i64| RecordMeta { seq: Seq(s), source: src.into(), captured_at_us: at, bytes: 10 };
        t.recorded(&[m(1, "a", 1_000_000), m(2, "b", 2_000_000), m(3, "c", 500_000)]);
        let s = &t.snapshot(4_000_000)[0];
        assert_eq!(s.events_behind, 2, "source c is not shipped to r");
        assert!((s.lag_seconds - 3.0).abs() < 1e-9);
        t.set_acked("r", Seq(1));
        let s = &t.snapshot(4_000_000)[0];
        assert!((s.lag_seconds - 2.0).abs() < 1e-9);
        assert_eq!(s.sources.iter().find(|x| x.name == "a").unwrap().events_behind, 0);
        t.set_acked("r", Seq(3));
        let s = &t.snapshot(4_000_000)[0];
        assert_eq!((s.events_behind, s.lag_seconds), (0, 0.0));
    }
}
