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
    /// Sources being reseeded from a snapshot, in the order they are sent, until the receiver
    /// reports each one's snapshot committed.
    resyncs: Vec<Resync>,
    /// Resyncs of the current session the receiver has confirmed (and removed from `resyncs`).
    resyncs_confirmed: u64,
}

/// A source being reseeded: the standby lacks what changed before `since_us` and is not yet
/// in the snapshot's committed part.
#[derive(Debug, Clone)]
struct Resync {
    source: String,
    since_us: i64,
    events_sent: u64,
    bytes_sent: u64,
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
    /// Highest seq removed from the journal: a record reported durable after its removal
    /// (the reports travel apart from shipping and acknowledgement) is not tracked again.
    truncated: u64,
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
        let removed = g.truncated;
        for m in metas.iter().filter(|m| m.seq.0 > removed) {
            g.records
                .insert(m.seq.0, Rec { source: m.source.clone(), captured_at_us: m.captured_at_us, bytes: m.bytes });
        }
    }

    /// Records removed from the journal.
    pub fn truncated(&self, through: Seq) {
        let mut g = self.lock();
        let keep = g.records.split_off(&(through.0 + 1));
        g.records = keep;
        g.truncated = g.truncated.max(through.0);
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

    /// A new session will reseed these sources, in this order. A source still being reseeded
    /// from an earlier session keeps its start time, so its lag keeps growing across reconnects.
    pub fn begin_resyncs(&self, receiver: &str, sources: &[String], now_us: i64) {
        if let Some(st) = self.lock().receivers.get_mut(receiver) {
            let old = std::mem::take(&mut st.resyncs);
            st.resyncs = sources
                .iter()
                .map(|s| Resync {
                    source: s.clone(),
                    since_us: old.iter().find(|r| &r.source == s).map_or(now_us, |r| r.since_us),
                    events_sent: 0,
                    bytes_sent: 0,
                })
                .collect();
            st.resyncs_confirmed = 0;
        }
    }

    /// Snapshot entries of `source` sent to `receiver` (not yet committed there).
    pub fn resync_sent(&self, receiver: &str, source: &str, events: u64, bytes: u64) {
        if let Some(r) =
            self.lock().receivers.get_mut(receiver).and_then(|st| st.resyncs.iter_mut().find(|r| r.source == source))
        {
            r.events_sent += events;
            r.bytes_sent += bytes;
        }
    }

    /// The receiver reports `total` resyncs of this session committed.
    pub fn resyncs_committed(&self, receiver: &str, total: u64) {
        if let Some(st) = self.lock().receivers.get_mut(receiver) {
            let n = total.saturating_sub(st.resyncs_confirmed).min(st.resyncs.len() as u64);
            st.resyncs.drain(..n as usize);
            st.resyncs_confirmed += n;
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
            // Per source: oldest unacknowledged time, events, bytes, whether anything is behind.
            let mut per: BTreeMap<&str, (i64, u64, u64, bool)> = BTreeMap::new();
            for s in &st.sources {
                per.insert(s.as_str(), (0, 0, 0, false));
            }
            let mut oldest: Option<i64> = None;
            let (mut events, mut bytes) = (0u64, 0u64);
            // A source being reseeded is behind by its unconfirmed snapshot, since it began.
            for r in &st.resyncs {
                let Some(p) = per.get_mut(r.source.as_str()) else { continue };
                p.0 = if p.3 { p.0.min(r.since_us) } else { r.since_us };
                p.1 += r.events_sent;
                p.2 += r.bytes_sent;
                p.3 = true;
                oldest = Some(oldest.map_or(r.since_us, |o| o.min(r.since_us)));
                events += r.events_sent;
                bytes += r.bytes_sent;
            }
            for (_, r) in g.records.range(st.acked.0 + 1..) {
                let Some(p) = per.get_mut(&*r.source) else { continue };
                p.0 = if p.3 { p.0.min(r.captured_at_us) } else { r.captured_at_us };
                p.1 += 1;
                p.2 += r.bytes;
                p.3 = true;
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
                resyncing: st.resyncs.first().map(|r| r.source.clone()),
                sources: per
                    .into_iter()
                    .map(|(s, (t, n, b, behind))| SourceLag {
                        name: s.to_string(),
                        acked_seq: st.acked.0,
                        lag_seconds: if behind { age(t) } else { 0.0 },
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

    #[test]
    fn a_record_reported_after_its_removal_is_not_tracked() {
        let t = Tracker::new();
        t.add_receiver("r", ["a".to_string()], Seq(0));
        let m = |s: u64| RecordMeta { seq: Seq(s), source: "a".into(), captured_at_us: 1_000_000, bytes: 10 };
        t.recorded(&[m(1)]);
        t.set_acked("r", Seq(2));
        t.truncated(Seq(2));
        // Seq 2 was shipped, acknowledged and removed before its durable report arrived.
        t.recorded(&[m(2), m(3)]);
        assert_eq!(t.lock().records.keys().copied().collect::<Vec<_>>(), vec![3]);
        let s = &t.snapshot(4_000_000)[0];
        assert_eq!((s.events_behind, s.bytes_behind), (1, 10));
    }

    #[test]
    fn a_resync_is_behind_until_the_receiver_confirms_it() {
        let t = Tracker::new();
        t.add_receiver("r", ["a".to_string(), "b".to_string()], Seq(5));
        t.begin_resyncs("r", &["a".to_string(), "b".to_string()], 1_000_000);
        t.resync_sent("r", "a", 3, 300);
        let s = &t.snapshot(3_000_000)[0];
        assert_eq!(s.resyncing.as_deref(), Some("a"));
        assert_eq!((s.events_behind, s.bytes_behind), (3, 300));
        assert!((s.lag_seconds - 2.0).abs() < 1e-9);
        let b = s.sources.iter().find(|x| x.name == "b").unwrap();
        assert!((b.lag_seconds - 2.0).abs() < 1e-9, "b waits for its turn and is behind too");
        // A reconnect restarts the resync of b only; it keeps its start time.
        t.begin_resyncs("r", &["b".to_string()], 2_500_000);
        t.resync_sent("r", "b", 1, 10);
        let s = &t.snapshot(3_000_000)[0];
        assert_eq!(s.resyncing.as_deref(), Some("b"));
        assert_eq!(s.sources.iter().find(|x| x.name == "a").unwrap().lag_seconds, 0.0);
        t.resyncs_committed("r", 1);
        let s = &t.snapshot(3_000_000)[0];
        assert_eq!((s.resyncing.as_deref(), s.events_behind, s.lag_seconds), (None, 0, 0.0));
        // Repeated acknowledgements of the same count change nothing.
        t.begin_resyncs("r", &["a".to_string()], 4_000_000);
        t.resyncs_committed("r", 0);
        assert_eq!(t.snapshot(4_000_000)[0].resyncing.as_deref(), Some("a"));
        t.resyncs_committed("r", 1);
        t.resyncs_committed("r", 1);
        assert_eq!(t.snapshot(4_000_000)[0].resyncing, None);
    }
}
