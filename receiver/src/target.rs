//! Targets: the configured standbys, each with its applier (opened on first use and then kept,
//! so its in-memory state survives reconnects) and the status shown by `status`.
//!
//! A target's applier sits behind an async mutex: one session at a time applies to it. A
//! reconnecting agent whose old session has not yet noticed the cut waits for it briefly.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lockstep_common::config::TargetConfig;
use lockstep_common::event::SourceKind;
use serde::Serialize;

use crate::applier::fs::FsReport;
use crate::applier::{Applier, ApplyError};

/// Live status of one target.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TargetStatus {
    pub connected: bool,
    pub applied_seq: u64,
    pub committed_seq: u64,
    pub journal_id: Option<String>,
    pub last_apply_at_us: Option<i64>,
    pub events_applied: u64,
    pub apply_errors: u64,
    pub resyncing: bool,
    /// When a commit (the durable position) last landed, in µs since the epoch.
    pub last_commit_at_us: Option<i64>,
    pub last_error: Option<String>,
}

/// One configured standby.
pub struct Target {
    pub cfg: TargetConfig,
    pub applier: Arc<tokio::sync::Mutex<Option<Box<dyn Applier>>>>,
    pub status: Mutex<TargetStatus>,
    /// fs targets: what the standby leaves out (skipped symlinks, metadata not reproduced);
    /// kept across reopenings of the applier, read by `status` without its lock.
    pub fs_report: Arc<FsReport>,
    position_file: PathBuf,
}

impl Target {
    pub fn new(cfg: TargetConfig, data_dir: &Path) -> Self {
        let position_file = data_dir.join("positions").join(&cfg.agent).join(format!("{}.pos", cfg.source));
        let fs_report = Arc::new(FsReport::new(cfg.agent.clone(), cfg.source.clone()));
        Target { cfg, applier: Arc::default(), status: Mutex::default(), fs_report, position_file }
    }

    pub fn status(&self) -> std::sync::MutexGuard<'_, TargetStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the applier for this target's kind (blocking I/O).
    pub fn open_applier(&self) -> Result<Box<dyn Applier>, ApplyError> {
        match self.cfg.kind {
            SourceKind::Fs => {
                let root = self.cfg.path.clone().expect("validated: fs target has a path");
                Ok(Box::new(crate::applier::fs::FsApplier::open(
                    root,
                    self.position_file.clone(),
                    self.cfg.fs_options(),
                    self.fs_report.clone(),
                )?))
            }
            SourceKind::Postgres => Ok(Box::new(crate::applier::pg::PgApplier::open(&self.cfg)?)),
            SourceKind::Sqlite => {
                let standby = self.cfg.path.clone().expect("validated: sqlite target has a path");
                Ok(Box::new(crate::applier::sqlite::SqliteApplier::open(standby, self.position_file.clone())?))
            }
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let st = self.status().clone();
        let mut v = serde_json::to_value(st).unwrap_or_default();
        v["agent"] = self.cfg.agent.clone().into();
        v["source"] = self.cfg.source.clone().into();
        v["kind"] = self.cfg.kind.as_str().into();
        if let Some(p) = &self.cfg.path {
            v["path"] = p.display().to_string().into();
        }
        if self.cfg.kind == SourceKind::Fs {
            if let (Some(v), serde_json::Value::Object(fs)) = (v.as_object_mut(), self.fs_report.json()) {
                v.extend(fs);
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use lockstep_common::event::{Change, FsOp, Seq};
    use lockstep_common::relpath::RelPath;

    use super::*;

    #[test]
    fn fs_status_shows_what_the_standby_leaves_out() {
        let t = tempfile::tempdir().unwrap();
        let cfg = TargetConfig {
            agent: "web-1".into(),
            source: "www".into(),
            kind: SourceKind::Fs,
            path: Some(t.path().join("standby")),
            dsn: None,
            safe_links: Some(true),
            allow_external_symlinks: None,
            owners: None,
            numeric_ids: None,
            xattrs: None,
            acls: None,
            sparse: None,
            hard_links: None,
            specials: None,
            devices: Some(false),
        };
        let target = Target::new(cfg, &t.path().join("data"));
        let mut a = target.open_applier().unwrap();
        let op = |op| Change::Fs(op);
        let rp = |s: &str| RelPath::new(s.as_bytes().to_vec()).unwrap();
        a.apply(Seq(1), op(FsOp::Symlink { path: rp("l"), target: b"/etc".to_vec(), meta: None })).unwrap();
        let dev = FsOp::Special {
            path: rp("null"),
            kind: lockstep_common::event::SpecialKind::CharDevice,
            mode: 0o666,
            rdev: 0x103,
            meta: None,
        };
        a.apply(Seq(2), op(dev)).unwrap();
        let v = target.json();
        assert_eq!(v["skipped_symlinks"]["count"], 1, "{v}");
        assert_eq!(v["skipped_symlinks"]["examples"], serde_json::json!(["l"]));
        assert_eq!(v["metadata_not_applied"]["device"], 1, "{v}");
        assert_eq!(v["kind"], "fs");
    }
}
