//! What an fs target leaves out, for the operator: symlinks skipped under `safe_links`, and
//! metadata that could not be (or, switched off, is not) reproduced. Shown as metrics, in the
//! receiver's `status --json` (the target owns the report and reads it without the applier's
//! lock), and in the log: once per target and kind at WARN, then at DEBUG.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Mutex;

use tracing::{debug, warn};

use crate::metrics as m;

/// Paths shown in `status` as examples of skipped symlinks.
const EXAMPLES: usize = 5;

/// What could not be reproduced (the `what` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum What {
    Owner,
    Xattr,
    Acl,
    Device,
    Fifo,
}

impl What {
    pub fn as_str(self) -> &'static str {
        match self {
            What::Owner => "owner",
            What::Xattr => "xattr",
            What::Acl => "acl",
            What::Device => "device",
            What::Fifo => "fifo",
        }
    }
}

/// The report of one fs target, shared by its applier (and the applier's workers) and the
/// target's status.
pub struct FsReport {
    agent: String,
    source: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Symlinks currently skipped, and a few of their paths.
    skipped: usize,
    examples: Vec<String>,
    /// Counts by kind since the receiver started.
    not_applied: BTreeMap<What, u64>,
    /// Kinds (and one-off notices) already logged at WARN.
    warned: HashSet<&'static str>,
}

impl FsReport {
    pub fn new(agent: impl Into<String>, source: impl Into<String>) -> FsReport {
        FsReport { agent: agent.into(), source: source.into(), state: Mutex::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `notice` is logged for the first time for this target (then the caller logs it
    /// at WARN).
    pub(super) fn first_time(&self, notice: &'static str) -> bool {
        self.state().warned.insert(notice)
    }

    /// The set of skipped symlinks now has `count` entries; `examples` are some of their paths.
    pub(super) fn skipped_symlinks(&self, count: usize, examples: impl Iterator<Item = String>) {
        {
            let mut st = self.state();
            st.skipped = count;
            st.examples = examples.take(EXAMPLES).collect();
        }
        metrics::gauge!(m::SYMLINKS_SKIPPED, m::L_AGENT => self.agent.clone(), m::L_SOURCE => self.source.clone())
            .set(count as f64);
    }

    /// `what` of `path` could not be reproduced because of `error`: counted; logged at WARN the
    /// first time for this target and kind, with `fix`, else at DEBUG. Never logs values.
    pub(super) fn not_applied(&self, what: What, path: &dyn fmt::Display, error: &dyn fmt::Display, fix: &str) {
        self.count(what);
        if self.first_time(what.as_str()) {
            warn!(
                agent = %self.agent, source = %self.source, what = what.as_str(), path = %path, error = %error,
                fix, "metadata not reproduced on the standby (counted in lockstep_receiver_metadata_not_applied_total; \
                 further cases of this kind are logged at DEBUG)"
            );
        } else {
            debug!(agent = %self.agent, source = %self.source, what = what.as_str(), path = %path, error = %error,
                "metadata not reproduced");
        }
    }

    /// `what` of `path` is left out for a reason the operator was already told about (the
    /// target's configuration switches it off, or the privilege is missing and that was
    /// logged when the target opened): counted, logged at DEBUG only.
    pub(super) fn left_out(&self, what: What, path: &dyn fmt::Display, why: &str) {
        self.count(what);
        debug!(agent = %self.agent, source = %self.source, what = what.as_str(), path = %path, why,
            "not reproduced on the standby");
    }

    /// Counts one case.
    fn count(&self, what: What) {
        *self.state().not_applied.entry(what).or_default() += 1;
        metrics::counter!(m::METADATA_NOT_APPLIED_TOTAL, m::L_AGENT => self.agent.clone(),
            m::L_SOURCE => self.source.clone(), m::L_WHAT => what.as_str())
        .increment(1);
    }

    /// Currently skipped symlinks.
    pub fn skipped_count(&self) -> usize {
        self.state().skipped
    }

    /// How often `what` was not reproduced since the receiver started.
    pub fn not_applied_count(&self, what: What) -> u64 {
        self.state().not_applied.get(&what).copied().unwrap_or(0)
    }

    /// The target's `status --json` fields.
    pub fn json(&self) -> serde_json::Value {
        let st = self.state();
        let not_applied: serde_json::Map<String, serde_json::Value> =
            st.not_applied.iter().map(|(w, n)| (w.as_str().to_string(), (*n).into())).collect();
        serde_json::json!({
            "skipped_symlinks": { "count": st.skipped, "examples": st.examples },
            "metadata_not_applied": not_applied,
        })
    }
}
