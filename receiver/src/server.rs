//! The gRPC `Replication` service: authenticates the agent by its client certificate, maps
//! each of its sources to a configured target (refusing anything else), answers `Welcome` with
//! the targets' committed positions, then runs a session that verifies, applies in order,
//! commits and acknowledges. A failure ends the session with a gRPC status whose code and
//! message come from the retry policy (`lockstep_common::retry`): the agent shows the cause in
//! its status, and one that needs a person (a full or unwritable standby) is logged at ERROR.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream};
use lockstep_common::event::{open_event, EventError, JournalId, Seq};
use lockstep_common::proto::agent_message::Msg as AMsg;
use lockstep_common::proto::receiver_message::Msg as RMsg;
use lockstep_common::proto::replication_server::Replication;
use lockstep_common::proto::{self, AgentMessage, ReceiverMessage};
use lockstep_common::relpath::RelPath;
use lockstep_common::retry::{self, Remedy};
use lockstep_common::tls::{self, Reason, TlsProblem};
use lockstep_common::{now_us, PROTOCOL_VERSION};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error, info, warn, Instrument};

use crate::applier::{Applier, ApplyError, CommitFn, Position};
use crate::metrics as m;
use crate::refusals::Refusals;
use crate::target::Target;

/// Most bytes of batches gathered into one apply + commit + ack round.
const GROUP_BYTES: usize = 32 << 20;
/// Idle targets (no events in a round) get their position moved at most this often.
const IDLE_COMMIT: Duration = Duration::from_secs(1);

/// The service shared by all sessions.
pub struct ReplicationService {
    pub receiver_id: String,
    pub targets: Arc<BTreeMap<(String, String), Arc<Target>>>,
    /// Where refused identities are counted and logged (as refused handshakes are).
    pub refusals: Arc<Refusals>,
}

type ApplierGuard = OwnedMutexGuard<Option<Box<dyn Applier>>>;

struct SessionTarget {
    target: Arc<Target>,
    guard: ApplierGuard,
    /// Highest seq applied (or known to contain nothing for this source).
    applied: Seq,
    committed: Seq,
    dirty: bool,
    resyncing: bool,
    /// Counts this target's resyncs on the stream; a commit carries the generation it was
    /// prepared in, so one prepared before a resync never confirms it.
    resync_gen: u64,
    /// A resync has ended but no commit prepared after its end has landed yet: the standby
    /// may still lack part of the snapshot.
    resync_unconfirmed: bool,
    last_commit: Instant,
}

impl SessionTarget {
    fn applier(&mut self) -> &mut dyn Applier {
        self.guard.as_deref_mut().expect("opened before the session starts")
    }
}

struct Session {
    agent: String,
    journal_id: JournalId,
    targets: HashMap<String, SessionTarget>,
    /// Highest journal seq seen on this stream; journal records must arrive strictly increasing.
    last_seq: Seq,
    batches: u64,
    /// Resyncs on this stream whose snapshot and position are durable.
    resyncs_committed: u64,
    /// Repair requests to send once the session is up.
    repairs: Vec<proto::Repair>,
}

/// What one round of applying produced.
struct Round {
    repairs: Vec<proto::Repair>,
    result: Result<(), Status>,
    commit: Option<PendingCommit>,
    /// Messages after a ResyncEnd, for the next round.
    rest: Vec<AgentMessage>,
}

impl Session {
    /// Counts an apply error for `source` (status and metric) and hands `status` back.
    fn fail(&mut self, source: &str, status: Status) -> Status {
        self.count_error(source, status.message());
        status
    }

    fn count_error(&mut self, source: &str, message: &str) {
        if let Some(t) = self.targets.get(source) {
            let mut st = t.target.status();
            st.apply_errors += 1;
            st.last_error = Some(message.to_string());
        }
        metrics::counter!(m::APPLY_ERRORS_TOTAL, m::L_AGENT => self.agent.clone(), m::L_SOURCE => source.to_string())
            .increment(1);
    }

    fn apply_event(&mut self, ev: proto::Event, repairs: &mut Vec<proto::Repair>) -> Result<(), Status> {
        let source = ev.source.clone();
        if !self.targets.contains_key(&source) {
            return Err(Status::invalid_argument(format!(
                "event for source {source:?}, which was not announced in hello"
            )));
        }
        let change = match open_event(&ev) {
            Ok(c) => c,
            Err(e @ EventError::Checksum { .. }) => {
                metrics::counter!(m::CORRUPT_RECORDS_TOTAL, m::L_AGENT => self.agent.clone(), m::L_SOURCE => source.clone()).increment(1);
                warn!(source = %source, seq = ev.seq, error = %e, "corrupt record refused; the agent will re-send it");
                return Err(Status::data_loss(format!("{e}; re-send")));
            }
            Err(e) => {
                return Err(
                    self.fail(&source, Status::invalid_argument(format!("source {source} seq {}: {e}", ev.seq)))
                );
            }
        };
        let seq = Seq(ev.seq);
        let t = self.targets.get_mut(&source).expect("checked above");
        if seq == Seq::ZERO {
            if !t.resyncing {
                return Err(Status::invalid_argument(format!("snapshot entry for {source} outside a resync")));
            }
        } else {
            if seq <= self.last_seq {
                return Err(Status::invalid_argument(format!("seq {seq} after {}: out of order", self.last_seq)));
            }
            if t.resyncing {
                return Err(Status::invalid_argument(format!("journal record for {source} during its resync")));
            }
            if seq <= t.applied {
                self.last_seq = seq;
                return Ok(()); // already applied before a reconnect or crash
            }
        }
        match t.applier().apply(seq, change) {
            Ok(outcome) => {
                // Only now does the stream position cover this record: a failed apply must
                // not let idle targets (or this one) move past it.
                if seq > Seq::ZERO {
                    t.applied = seq;
                    self.last_seq = seq;
                }
                t.dirty = true;
                repairs.extend(outcome.repairs.into_iter().map(|r| repair_msg(&source, r)));
                {
                    let mut st = t.target.status();
                    st.events_applied += 1;
                    st.last_apply_at_us = Some(now_us());
                    st.applied_seq = t.applied.0;
                }
                metrics::counter!(m::EVENTS_APPLIED_TOTAL, m::L_AGENT => self.agent.clone(), m::L_SOURCE => source.clone()).increment(1);
                if let Some(why) = outcome.skipped {
                    warn!(source = %source, seq = %seq, reason = %why, "change skipped");
                    self.count_error(&source, &why);
                }
                Ok(())
            }
            // Logged where the session ends, at the level the retry policy gives it.
            Err(ApplyError::Refused(why)) => {
                Err(self.fail(&source, Status::permission_denied(format!("source {source} seq {seq} refused: {why}"))))
            }
            Err(e @ ApplyError::Io { .. }) => {
                Err(self.fail(&source, target_failure(&source, &format!("applying seq {seq}"), &e)))
            }
        }
    }

    fn handle(&mut self, msg: AgentMessage, repairs: &mut Vec<proto::Repair>) -> Result<(), Status> {
        match msg.msg {
            Some(AMsg::Batch(b)) => {
                for ev in b.events {
                    self.apply_event(ev, repairs)?;
                }
                self.batches += 1;
                Ok(())
            }
            Some(AMsg::Heartbeat(h)) => {
                // Everything up to the agent's durable end has been sent before this heartbeat.
                let end = Seq(h.last_seq);
                if end > self.last_seq {
                    self.last_seq = end;
                }
                Ok(())
            }
            Some(AMsg::ResyncBegin(r)) => {
                let t = self
                    .targets
                    .get_mut(&r.source)
                    .ok_or_else(|| Status::invalid_argument("resync of unknown source"))?;
                info!(source = %r.source, seq = r.seq, "resync begins");
                t.applier().begin_resync().map_err(|e| target_failure(&r.source, "starting a resync", &e))?;
                t.resyncing = true;
                t.resync_gen += 1;
                t.resync_unconfirmed = true;
                t.target.status().resyncing = true;
                Ok(())
            }
            Some(AMsg::ResyncEnd(r)) => {
                let t = self
                    .targets
                    .get_mut(&r.source)
                    .ok_or_else(|| Status::invalid_argument("resync of unknown source"))?;
                if !t.resyncing {
                    return Err(Status::invalid_argument("resync end without begin"));
                }
                t.applier().end_resync().map_err(|e| target_failure(&r.source, "ending a resync", &e))?;
                let late = t.applier().take_deferred();
                repairs.extend(late.repairs.into_iter().map(|p| repair_msg(&r.source, p)));
                if let Some(why) = late.skipped {
                    warn!(source = %r.source, reason = %why, "change skipped");
                }
                t.resyncing = false;
                t.applied = Seq(r.seq);
                t.dirty = true;
                // Status and acknowledgement say "resyncing" until its commit lands.
                info!(source = %r.source, seq = r.seq, "resync applied; committing");
                Ok(())
            }
            Some(AMsg::Hello(_)) | None => Err(Status::invalid_argument("unexpected message in stream")),
        }
    }

    /// Starts committing what was applied: settles each due target and collects the durable
    /// halves, to run off this thread. Targets that saw nothing still move to the stream's
    /// position (all records up to it were delivered), at most once a second.
    fn prepare_commits(&mut self) -> Result<PendingCommit, Status> {
        let last = self.last_seq;
        let mut fns = Vec::new();
        // The committed position of targets in the middle of a transaction: the acknowledgement
        // (which the agent's lag and `acked_seq` show) must not pass it, or lag would read 0
        // while the standby has not committed a large transaction yet.
        let mut open_tx: Option<Seq> = None;
        for (source, t) in self.targets.iter_mut() {
            if t.resyncing {
                continue;
            }
            if last > t.applied {
                t.applied = last;
            }
            let due = t.dirty || (t.applied > t.committed && t.last_commit.elapsed() >= IDLE_COMMIT);
            if !due {
                continue;
            }
            let pos = Position { journal_id: self.journal_id, seq: t.applied };
            match t.applier().prepare_commit(pos) {
                Ok(Some(f)) => fns.push(((source.clone(), t.applied, t.resync_gen), f)),
                // Mid-transaction: stays dirty, committed with a later round.
                Ok(None) => {
                    open_tx = Some(open_tx.map_or(t.committed, |s| s.min(t.committed)));
                    continue;
                }
                Err(e) => {
                    let mut st = t.target.status();
                    st.apply_errors += 1;
                    st.last_error = Some(e.to_string());
                    return Err(target_failure(source, "committing", &e));
                }
            }
            t.dirty = false;
            t.last_commit = Instant::now();
            t.target.status().applied_seq = t.applied.0;
        }
        let ack_seq = self.targets.values().filter(|t| !t.resyncing).map(|t| t.applied).min().unwrap_or(self.last_seq);
        let ack_seq = open_tx.map_or(ack_seq, |s| ack_seq.min(s));
        Ok(PendingCommit { fns, ack_seq: ack_seq.min(self.last_seq), batches: self.batches })
    }

    /// Records commits that finished.
    fn committed(&mut self, done: &[Committed]) {
        for (source, seq, gen) in done {
            let Some(t) = self.targets.get_mut(source) else { continue };
            t.committed = t.committed.max(*seq);
            let confirms_resync = t.resync_unconfirmed && *gen == t.resync_gen;
            if confirms_resync {
                t.resync_unconfirmed = false;
                self.resyncs_committed += 1;
                info!(source = %source, seq = seq.0, "resync complete: snapshot committed");
            }
            {
                let mut st = t.target.status();
                st.committed_seq = t.committed.0;
                st.last_commit_at_us = Some(lockstep_common::now_us());
                if confirms_resync {
                    st.resyncing = false;
                }
            }
            metrics::gauge!(m::APPLIED_SEQ, m::L_AGENT => self.agent.clone(), m::L_SOURCE => source.clone())
                .set(t.committed.0 as f64);
        }
    }

    fn ack(&self, seq: Seq, batches: u64) -> ReceiverMessage {
        ReceiverMessage {
            msg: Some(RMsg::Ack(proto::Ack {
                seq: seq.0,
                positions: self
                    .targets
                    .iter()
                    .map(|(s, t)| proto::SourcePosition {
                        source: s.clone(),
                        seq: t.committed.0,
                        known: !t.resyncing && !t.resync_unconfirmed,
                    })
                    .collect(),
                batches,
                resyncs_committed: self.resyncs_committed,
            })),
        }
    }

    /// Applies `msgs` and prepares the commit. A round ends at a `ResyncEnd`: the rest waits
    /// for the next round (returned in `Round::rest`), so a snapshot commits before anything
    /// after it is applied (see `applier::pg::copiers`).
    fn round(&mut self, msgs: Vec<AgentMessage>) -> Round {
        let mut repairs = Vec::new();
        let mut result = Ok(());
        let t0 = Instant::now();
        let n = msgs.len();
        tracing::trace!(messages = n, "round begins");
        let mut msgs = msgs.into_iter();
        for msg in msgs.by_ref() {
            let resync_end = matches!(msg.msg, Some(AMsg::ResyncEnd(_)));
            if let Err(s) = self.handle(msg, &mut repairs) {
                result = Err(s);
                break;
            }
            if resync_end {
                break;
            }
        }
        let rest: Vec<AgentMessage> = if result.is_ok() { msgs.collect() } else { Vec::new() };
        let applied = t0.elapsed();
        // Commit what was applied even when the round failed part-way: it is all valid.
        let prepared = self.prepare_commits();
        tracing::trace!(last_seq = self.last_seq.0, "round applied and visible");
        if t0.elapsed() > SLOW_ROUND {
            debug!(
                messages = n,
                apply_ms = applied.as_millis() as u64,
                commit_ms = (t0.elapsed() - applied).as_millis() as u64,
                "slow round"
            );
        }
        match prepared {
            Ok(p) => Round { repairs, result, commit: Some(p), rest },
            Err(e) => Round { repairs, result: result.and(Err(e)), commit: None, rest: Vec::new() },
        }
    }
}

/// The status that ends a session after the target of `source` failed while doing `what`:
/// its code and remedy come from the retry policy, its message says what failed and, when
/// retrying cannot help, what a person should do.
fn target_failure(source: &str, what: &str, e: &ApplyError) -> Status {
    match e {
        ApplyError::Refused(why) => Status::permission_denied(format!("target {source}: {what} refused: {why}")),
        ApplyError::Io { error, .. } => {
            let v = retry::local_io(error);
            let message = match v.remedy {
                Remedy::Person => {
                    format!("target {source}: {what} failed: {e}; {}; replication resumes by itself", v.fix)
                }
                Remedy::Retry => format!("target {source}: {what} failed: {e}"),
            };
            Status::new(v.code, message)
        }
    }
}

/// The request asking the agent to re-send `path` of `source` whole.
fn repair_msg(source: &str, (path, reason): (RelPath, String)) -> proto::Repair {
    proto::Repair { source: source.to_string(), path: path.into_bytes().into(), reason }
}

/// Rounds slower than this are logged at debug level.
const SLOW_ROUND: std::time::Duration = std::time::Duration::from_millis(20);

/// The durable halves of one round's commits, and the acknowledgement they earn.
struct PendingCommit {
    fns: Vec<(Committed, CommitFn)>,
    ack_seq: Seq,
    batches: u64,
}

/// A commit that landed: source, position, and the resync generation it was prepared in.
type Committed = (String, Seq, u64);

/// A finished [`PendingCommit`].
struct CommitDone {
    done: Vec<Committed>,
    result: Result<(), Status>,
    ack_seq: Seq,
    batches: u64,
}

impl PendingCommit {
    /// Runs the commits in order (blocking I/O).
    fn run(self) -> CommitDone {
        let mut done = Vec::new();
        let mut result = Ok(());
        for (commit, f) in self.fns {
            match f() {
                Ok(()) => done.push(commit),
                Err(e) => {
                    result = Err(target_failure(&commit.0, "committing", &e));
                    break;
                }
            }
        }
        CommitDone { done, result, ack_seq: self.ack_seq, batches: self.batches }
    }
}

fn approx_size(m: &AgentMessage) -> usize {
    match &m.msg {
        Some(AMsg::Batch(b)) => b.events.iter().map(|e| e.payload.len() + 64).sum(),
        _ => 64,
    }
}

impl ReplicationService {
    async fn start(&self, req: Request<Streaming<AgentMessage>>) -> Result<(Session, Streaming<AgentMessage>), Status> {
        let ids = tls::peer_identities(&req).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
            Ok(Ok(Some(AgentMessage { msg: Some(AMsg::Hello(h)) }))) => h,
            Ok(Err(s)) => return Err(s),
            Err(_) => return Err(Status::deadline_exceeded("no hello within 30 s")),
            _ => return Err(Status::invalid_argument("first message must be hello")),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent speaks protocol {}, receiver {} speaks {PROTOCOL_VERSION}; upgrade one side",
                hello.protocol_version, self.receiver_id
            )));
        }
        if !ids.contains(&hello.agent_id) {
            return Err(Status::permission_denied(format!(
                "the client certificate names {ids:?} but the agent says it is {:?}",
                hello.agent_id
            )));
        }
        let agent = hello.agent_id.clone();
        let journal_id = JournalId::from_slice(&hello.journal_id)
            .ok_or_else(|| Status::invalid_argument("journal id must be 16 bytes"))?;
        let mut wanted = Vec::new();
        let mut seen = HashSet::new();
        for s in &hello.sources {
            if !seen.insert(s.name.clone()) {
                return Err(Status::invalid_argument(format!("source {} announced twice", s.name)));
            }
            let Some(t) = self.targets.get(&(agent.clone(), s.name.clone())) else {
                return Err(Status::permission_denied(format!(
                    "receiver {} has no target for agent {agent:?} source {:?}; add a [[targets]] entry with agent = {agent:?}, source = {:?} to receiver.toml (or list only the sources it should get under the agent's [[receivers]].sources)",
                    self.receiver_id, s.name, s.name
                )));
            };
            let kind = proto::SourceKind::try_from(s.kind)
                .ok()
                .and_then(|k| lockstep_common::event::SourceKind::try_from(k).ok());
            if kind != Some(t.cfg.kind) {
                return Err(Status::failed_precondition(format!(
                    "agent source {:?} is of kind {:?} but the receiver's target is {}",
                    s.name, kind, t.cfg.kind
                )));
            }
            wanted.push((s.name.clone(), t.clone()));
        }
        wanted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut targets = HashMap::new();
        let mut repairs = Vec::new();
        for (name, t) in wanted {
            let lock = t.applier.clone().lock_owned();
            let mut guard = tokio::time::timeout(Duration::from_secs(15), lock).await.map_err(|_| {
                Status::unavailable(format!(
                    "source {name} of agent {agent} is still being applied by another session; retry"
                ))
            })?;
            if guard.is_none() {
                let t2 = t.clone();
                let opened = tokio::task::spawn_blocking(move || t2.open_applier())
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
                match opened {
                    Ok(a) => *guard = Some(a),
                    Err(e) => {
                        t.status().last_error = Some(e.to_string());
                        return Err(target_failure(&name, "opening", &e));
                    }
                }
            }
            // Whatever a previous session applied without committing is discarded; it is sent
            // again from the committed position.
            let mut applier = guard.take().expect("opened above");
            let (applier, started) = tokio::task::spawn_blocking(move || {
                let r = applier.session_start(journal_id).map(|()| applier.take_deferred());
                (applier, r)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            let recovered = match started {
                Ok(r) => r,
                Err(e) => {
                    // Dropped: the next session opens it afresh.
                    t.status().last_error = Some(e.to_string());
                    return Err(match &e {
                        ApplyError::Io { error, .. } if retry::local_io(error).remedy == Remedy::Retry => {
                            Status::unavailable(format!("target for source {name}: {e}; retry"))
                        }
                        _ => target_failure(&name, "starting a session", &e),
                    });
                }
            };
            // Repairs asked for before a restart, which may not have reached the agent.
            repairs.extend(recovered.repairs.into_iter().map(|r| repair_msg(&name, r)));
            *guard = Some(applier);
            let pos = guard.as_ref().and_then(|a| a.position()).filter(|p| p.journal_id == journal_id).map(|p| p.seq);
            {
                let mut st = t.status();
                st.connected = true;
                // A resync cut short shows again when the agent restarts it.
                st.resyncing = false;
                st.journal_id = Some(journal_id.to_string());
                st.committed_seq = pos.unwrap_or_default().0;
                st.applied_seq = st.committed_seq;
            }
            targets.insert(
                name,
                SessionTarget {
                    target: t,
                    guard,
                    applied: pos.unwrap_or_default(),
                    committed: pos.unwrap_or_default(),
                    dirty: false,
                    resyncing: false,
                    resync_gen: 0,
                    resync_unconfirmed: false,
                    last_commit: Instant::now(),
                },
            );
        }
        Ok((
            Session { agent, journal_id, targets, last_seq: Seq::ZERO, batches: 0, resyncs_committed: 0, repairs },
            inbound,
        ))
    }
}

async fn run_session(
    receiver_id: String,
    mut session: Session,
    mut inbound: Streaming<AgentMessage>,
    out: mpsc::Sender<Result<ReceiverMessage, Status>>,
) {
    // Sent from here, not before the response: the outbound channel is only drained once the
    // response is returned.
    for r in std::mem::take(&mut session.repairs) {
        info!(source = %r.source, path = %String::from_utf8_lossy(&r.path), reason = %r.reason, "repair asked for again after a restart");
        let _ = out.send(Ok(ReceiverMessage { msg: Some(RMsg::Repair(r)) })).await;
    }
    let end = session_loop(&mut session, &mut inbound, &out).await;
    if let Err(s) = &end {
        match Remedy::of_grpc(s.code()) {
            Remedy::Person => error!(
                code = ?s.code(),
                error = %s.message(),
                "session ended by a failure retrying cannot fix; the agent retries every 30 s until it is fixed"
            ),
            Remedy::Retry => info!(code = ?s.code(), error = %s.message(), "session ended"),
        }
        // The agent shows this in its status: say which receiver it comes from.
        let _ = out.send(Err(Status::new(s.code(), format!("receiver {receiver_id}: {}", s.message())))).await;
    } else {
        debug!("session closed by agent");
    }
    for t in session.targets.values() {
        let mut st = t.target.status();
        st.connected = false;
        if let Err(s) = &end {
            st.last_error = Some(s.message().to_string());
        }
    }
}

/// Commits queued behind the one running before a round waits for room.
const COMMIT_QUEUE: usize = 16;

/// Gathers what has arrived and applies it in place (`block_in_place`: no hand-off to another
/// thread on the way to visibility). Each round's commit (the durable half) is queued to a
/// commit task that runs them one at a time, in order, on blocking threads — while later
/// rounds are gathered and applied, so a slow flush delays acknowledgements, never the next
/// apply. An acknowledgement goes out when its commit is durable. A failed commit stops the
/// queue: nothing after it is committed.
async fn session_loop(
    session: &mut Session,
    inbound: &mut Streaming<AgentMessage>,
    out: &mpsc::Sender<Result<ReceiverMessage, Status>>,
) -> Result<(), Status> {
    let (ptx, prx) = mpsc::channel::<PendingCommit>(COMMIT_QUEUE);
    let (dtx, mut drx) = mpsc::channel::<CommitDone>(COMMIT_QUEUE);
    let task = tokio::spawn(commit_task(prx, dtx));
    let mut result = session_rounds(session, inbound, out, &ptx, &mut drx).await;
    drop(ptx);
    // Let queued commits finish before the targets are released to another session, so
    // positions are never written out of order.
    while let Some(done) = drx.recv().await {
        if result.is_ok() {
            result = finish_commit(session, done, out).await;
        } else {
            session.committed(&done.done);
        }
    }
    let _ = task.await;
    result
}

/// Runs queued commits in order; stops after the first failure.
async fn commit_task(mut rx: mpsc::Receiver<PendingCommit>, done: mpsc::Sender<CommitDone>) {
    while let Some(p) = rx.recv().await {
        let (ack_seq, batches) = (p.ack_seq, p.batches);
        let d = tokio::task::spawn_blocking(move || p.run()).await.unwrap_or_else(|e| CommitDone {
            done: Vec::new(),
            result: Err(Status::internal(format!("commit thread failed: {e}"))),
            ack_seq,
            batches,
        });
        let failed = d.result.is_err();
        if done.send(d).await.is_err() || failed {
            return;
        }
    }
}

async fn session_rounds(
    session: &mut Session,
    inbound: &mut Streaming<AgentMessage>,
    out: &mpsc::Sender<Result<ReceiverMessage, Status>>,
    commits: &mpsc::Sender<PendingCommit>,
    done: &mut mpsc::Receiver<CommitDone>,
) -> Result<(), Status> {
    // Messages a round left for the next one (it ended at a ResyncEnd).
    let mut carried: Vec<AgentMessage> = Vec::new();
    let mut closed = false;
    loop {
        let mut msgs = std::mem::take(&mut carried);
        if msgs.is_empty() {
            if closed {
                return Ok(());
            }
            // Wait for the next message; meanwhile acknowledge commits as they land.
            let first = loop {
                let next = tokio::time::timeout(Duration::from_secs(120), inbound.message());
                tokio::select! {
                    Some(d) = done.recv() => finish_commit(session, d, out).await?,
                    m = next => break m,
                }
            };
            match first {
                Err(_) => return Err(Status::deadline_exceeded("agent silent for 120 s")),
                Ok(Err(s)) => return Err(s),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(m))) => msgs.push(m),
            }
        }
        let mut bytes: usize = msgs.iter().map(approx_size).sum();
        while bytes < GROUP_BYTES && !closed {
            match inbound.message().now_or_never() {
                Some(Ok(Some(m))) => {
                    bytes += approx_size(&m);
                    msgs.push(m);
                }
                Some(Ok(None)) => closed = true,
                Some(Err(_)) | None => break,
            }
        }
        let round = tokio::task::block_in_place(|| session.round(msgs));
        for r in round.repairs {
            if out.send(Ok(ReceiverMessage { msg: Some(RMsg::Repair(r)) })).await.is_err() {
                return Ok(());
            }
        }
        if let Some(p) = round.commit {
            // Queue it behind the commits still running; acknowledge those that land while
            // waiting for room.
            let permit = loop {
                tokio::select! {
                    biased;
                    Some(d) = done.recv() => finish_commit(session, d, out).await?,
                    r = commits.reserve() => break r.map_err(|_| Status::internal("commit queue stopped"))?,
                }
            };
            permit.send(p);
        }
        round.result?;
        carried = round.rest;
    }
}

/// Records a finished commit and acknowledges it.
async fn finish_commit(
    session: &mut Session,
    done: CommitDone,
    out: &mpsc::Sender<Result<ReceiverMessage, Status>>,
) -> Result<(), Status> {
    session.committed(&done.done);
    done.result?;
    // A closed outbound stream means the agent is gone; the next session starts from the
    // committed positions anyway.
    let _ = out.send(Ok(session.ack(done.ack_seq, done.batches))).await;
    Ok(())
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    type ReplicateStream = Pin<Box<dyn Stream<Item = Result<ReceiverMessage, Status>> + Send + 'static>>;

    async fn replicate(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let peer = req.remote_addr();
        let subject = tls::peer_subject(&req);
        let (session, inbound) = match self.start(req).await {
            Ok(s) => s,
            Err(s) => {
                metrics::counter!(m::SESSIONS_REFUSED_TOTAL).increment(1);
                match s.code() {
                    // The certificate was fine, the identity is not one with targets here.
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => self.refusals.record(
                        peer,
                        &TlsProblem { reason: Reason::UnknownAgent, message: s.message().to_string(), subject },
                    ),
                    code if Remedy::of_grpc(code) == Remedy::Person => {
                        error!(peer = ?peer, code = ?code, error = %s.message(), "session refused")
                    }
                    code => warn!(peer = ?peer, code = ?code, error = %s.message(), "session refused"),
                }
                return Err(s);
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let welcome = proto::Welcome {
            protocol_version: PROTOCOL_VERSION,
            receiver_id: self.receiver_id.clone(),
            positions: session
                .targets
                .iter()
                .map(|(s, t)| {
                    let known =
                        t.guard.as_ref().and_then(|a| a.position()).is_some_and(|p| p.journal_id == session.journal_id);
                    proto::SourcePosition { source: s.clone(), seq: t.committed.0, known }
                })
                .collect(),
        };
        info!(agent = %session.agent, peer = ?peer, sources = session.targets.len(), "session started");
        let _ = tx.send(Ok(ReceiverMessage { msg: Some(RMsg::Welcome(welcome)) })).await;
        let span = tracing::info_span!("session", agent = %session.agent);
        tokio::spawn(run_session(self.receiver_id.clone(), session, inbound, tx).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_standby_reaches_the_agent_as_resource_exhausted_with_the_fix() {
        let e = ApplyError::Io {
            context: "write /srv/standby/www/big.bin".into(),
            error: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let s = target_failure("www", "applying seq 7", &e);
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "target www: applying seq 7 failed: write /srv/standby/www/big.bin: No space left on device (os error 28); \
             free space on the standby's filesystem; replication resumes by itself"
        );
        assert_eq!(Remedy::of_grpc(s.code()), Remedy::Person);
        // Unwritable: a person too, as a failed precondition.
        let e = ApplyError::Io {
            context: "create directory /srv/x".into(),
            error: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        let s = target_failure("www", "applying seq 8", &e);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("give the receiver's user write access"), "{}", s.message());
        // An error a retry may fix stays INTERNAL, without a call for a person.
        let e = ApplyError::Io { context: "read /srv/x".into(), error: std::io::Error::from_raw_os_error(libc::EIO) };
        let s = target_failure("www", "applying seq 9", &e);
        assert_eq!((s.code(), Remedy::of_grpc(s.code())), (tonic::Code::Internal, Remedy::Retry));
        assert!(!s.message().contains("resumes by itself"), "{}", s.message());
    }
}
