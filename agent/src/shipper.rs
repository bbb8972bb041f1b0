//! One shipper per receiver: connects over gRPC with mutual TLS, learns the receiver's applied
//! position from its `Welcome`, resyncs sources whose position is no longer in the journal,
//! then streams journal records from there, within a window of unacknowledged bytes, with
//! heartbeats when idle. Reconnects as the retry policy says (`lockstep_common::retry`):
//! with backoff after a transient failure, every 30 s after one a person must fix (a
//! certificate, an identity the receiver refuses, a full standby) — which is logged at ERROR
//! and shown, with its cause and fix, in `status` — and always resumes from the receiver's
//! own position, never from a local guess.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep_common::config::{ReceiverEndpoint, TlsConfig};
use lockstep_common::event::{Change, Seq, SourceKind};
use lockstep_common::proto::agent_message::Msg as AMsg;
use lockstep_common::proto::receiver_message::Msg as RMsg;
use lockstep_common::proto::replication_client::ReplicationClient;
use lockstep_common::proto::{self, AgentMessage};
use lockstep_common::relpath::RelPath;
use lockstep_common::retry::{self, Remedy};
use lockstep_common::tls::{self, TlsProblem};
use lockstep_common::{now_us, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::journal::JournalStore;
use crate::lag::Tracker;
use crate::metrics as m;
use crate::source::{RepairRequest, SourceHandle};

/// Records this close to the durable end are read on the async thread, up to
/// `LIVE_TAIL_BYTES` at a time (see `send_all`).
const LIVE_TAIL: u64 = 16;
const LIVE_TAIL_BYTES: usize = 1 << 20;
/// Most payload bytes in one `EventBatch`.
const BATCH_BYTES: usize = 4 << 20;
const BATCH_EVENTS: usize = 1024;

/// Why a session with a receiver ended. Whether a retry can fix it is
/// [`ShipError::remedy`]'s answer, from the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("connect to {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    /// This agent's TLS material is unusable (unreadable, wrong key).
    #[error("{0}")]
    LocalTls(#[from] tls::TlsError),
    /// A TLS handshake failed: either side's verdict on the other's certificate.
    #[error("{0}")]
    Tls(TlsProblem),
    /// The receiver ended the stream with a status a person must act on; its message names
    /// the cause and the fix.
    #[error("{message}")]
    Receiver { code: tonic::Code, message: String },
    #[error("receiver refused the stream: {0}")]
    Refused(String),
    #[error("stream broken: {0}")]
    Stream(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
    #[error("snapshot of {source_name}: {detail}")]
    Snapshot { source_name: String, detail: String },
    #[error("shutting down")]
    Cancelled,
}

impl ShipError {
    /// Whether retrying can fix this, or a person must act first.
    pub fn remedy(&self) -> Remedy {
        match self {
            ShipError::LocalTls(_) | ShipError::Refused(_) => Remedy::Person,
            ShipError::Tls(p) => Remedy::of_tls(p.reason),
            ShipError::Receiver { code, .. } => Remedy::of_grpc(*code),
            _ => Remedy::Retry,
        }
    }
}

/// Flow control shared between the sender and the acknowledgement reader.
#[derive(Default)]
struct Flow {
    sent_batches: AtomicU64,
    inflight: Mutex<VecDeque<(u64, u64)>>,
    inflight_bytes: AtomicU64,
    room: Notify,
}

impl Flow {
    fn sent(&self, bytes: u64) {
        let n = self.sent_batches.fetch_add(1, Ordering::SeqCst) + 1;
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).push_back((n, bytes));
        self.inflight_bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    fn acked(&self, batches: u64) {
        let mut q = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        while q.front().is_some_and(|(n, _)| *n <= batches) {
            let (_, b) = q.pop_front().expect("front exists");
            self.inflight_bytes.fetch_sub(b, Ordering::SeqCst);
        }
        drop(q);
        self.room.notify_waiters();
    }

    async fn wait_room(&self, window: u64, dead: &CancellationToken) -> Result<(), ShipError> {
        loop {
            let notified = self.room.notified();
            if self.inflight_bytes.load(Ordering::SeqCst) < window {
                return Ok(());
            }
            tokio::select! {
                _ = notified => {}
                _ = dead.cancelled() => return Err(ShipError::Stream("receiver stream closed".into())),
            }
        }
    }
}

/// The per-receiver shipping task.
pub struct Shipper {
    pub agent_id: String,
    pub endpoint: ReceiverEndpoint,
    pub tls: TlsConfig,
    pub store: Arc<dyn JournalStore>,
    pub durable: watch::Receiver<Seq>,
    /// The journal's appended end: records of `early` sources go out from here, before
    /// they are durable (see `send_all`).
    pub appended: watch::Receiver<Seq>,
    pub sources: Vec<Arc<SourceHandle>>,
    pub tracker: Arc<Tracker>,
    pub heartbeat: Duration,
    pub cancel: CancellationToken,
    pub resync_floor: Arc<crate::source::ResyncFloor>,
}

impl Shipper {
    /// Runs until cancelled; every failure is logged and retried as the retry policy says.
    pub async fn run(self) -> Result<(), ShipError> {
        let span = tracing::info_span!("shipper", receiver = %self.endpoint.name);
        async move {
            let mut pacer = retry::Pacer::default();
            loop {
                let started = Instant::now();
                let result = self.session().await;
                let remedy = result.as_ref().err().map_or(Remedy::Retry, ShipError::remedy);
                let shown = result.as_ref().err().map(|e| format!("{e}{}", remedy.note()));
                self.tracker.set_connected(&self.endpoint.name, false, shown.clone());
                metrics::gauge!(m::RECEIVER_CONNECTED, m::L_RECEIVER => self.endpoint.name.clone()).set(0.0);
                if self.cancel.is_cancelled() {
                    return Ok(());
                }
                match (&result, remedy) {
                    (Err(_), Remedy::Person) => {
                        error!(error = %shown.unwrap_or_default(), "replication to this receiver needs a person to act")
                    }
                    (Err(e), Remedy::Retry) => info!(error = %e, "replication session ended; reconnecting"),
                    (Ok(()), _) => info!("replication session closed by receiver; reconnecting"),
                }
                if started.elapsed() > Duration::from_secs(30) {
                    pacer.reset();
                }
                let delay = pacer.next(remedy);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.cancel.cancelled() => return Ok(()),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Connects with this session's TLS (its certificates are read afresh, so renewed files
    /// are picked up on the next attempt).
    async fn connect(&self, tls: &tls::ClientTls) -> Result<ReplicationClient<tonic::transport::Channel>, ShipError> {
        let ep = &self.endpoint;
        let cerr = |detail: String| ShipError::Connect { endpoint: ep.endpoint.clone(), detail };
        let channel = tonic::transport::Endpoint::from_shared(tls::plain_uri(&ep.endpoint).map_err(cerr)?)
            .map_err(|e| cerr(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(Some(64 << 20))
            .initial_connection_window_size(Some(128 << 20))
            .connect_with_connector(tls.connector())
            .await
            .map_err(|e| match tls::problem_in_chain(&e) {
                Some(p) => ShipError::Tls(p),
                None => cerr(format!("{e}: {}", source_chain(&e))),
            })?;
        Ok(ReplicationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// One session. A TLS problem seen on its connection explains whatever error tonic
    /// made of it: with TLS 1.3 the receiver's verdict on this agent's certificate arrives
    /// only after the handshake, and surfaces as a broken stream.
    async fn session(&self) -> Result<(), ShipError> {
        let ep = &self.endpoint;
        let server_name = ep.server_name.clone().unwrap_or_else(|| ep.name.clone());
        let tls = tls::ClientTls::new(&self.tls, &server_name, &format!("receiver {}", ep.name))?;
        let result = self.session_with(&tls).await;
        match (result, tls.problem()) {
            (Err(ShipError::Cancelled), _) => Err(ShipError::Cancelled),
            (Err(_), Some(p)) => Err(ShipError::Tls(p)),
            (result, _) => result,
        }
    }

    async fn session_with(&self, tls: &tls::ClientTls) -> Result<(), ShipError> {
        let name = self.endpoint.name.clone();
        let mut client = tokio::select! {
            c = self.connect(tls) => c?,
            _ = self.cancel.cancelled() => return Err(ShipError::Cancelled),
        };
        let (tx, rx) = mpsc::channel::<AgentMessage>(8);
        let hello = proto::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.agent_id.clone(),
            journal_id: self.store.journal_id().0.to_vec().into(),
            sources: self
                .sources
                .iter()
                .map(|s| proto::SourceInfo { name: s.name.to_string(), kind: proto::SourceKind::from(s.kind) as i32 })
                .collect(),
            last_seq: self.store.last_seq().0,
            epoch: 0,
        };
        tx.send(AgentMessage { msg: Some(AMsg::Hello(hello)) })
            .await
            .map_err(|_| ShipError::Stream("send hello".into()))?;
        let mut inbound = client.replicate(ReceiverStream::new(rx)).await.map_err(status_err)?.into_inner();
        let welcome = match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
            Err(_) => return Err(ShipError::Protocol("no welcome within 30 s".into())),
            Ok(Err(s)) => return Err(status_err(s)),
            Ok(Ok(None)) => return Err(ShipError::Stream("closed before welcome".into())),
            Ok(Ok(Some(proto::ReceiverMessage { msg: Some(RMsg::Welcome(w)) }))) => w,
            Ok(Ok(Some(_))) => return Err(ShipError::Protocol("first message was not a welcome".into())),
        };
        if welcome.protocol_version != PROTOCOL_VERSION {
            return Err(ShipError::Refused(format!(
                "receiver speaks protocol {}, we speak {PROTOCOL_VERSION}",
                welcome.protocol_version
            )));
        }

        // Decide where each source resumes. A receiver may hold records that were shipped
        // before they were durable: anything up to the journal's last seq is in the journal
        // (or, lost to a crash, in a gap it skipped).
        let first = self.store.first_seq();
        let last_now = self.store.last_seq();
        let reported: HashMap<String, proto::SourcePosition> =
            welcome.positions.into_iter().map(|p| (p.source.clone(), p)).collect();
        let mut positions: HashMap<Arc<str>, Seq> = HashMap::new();
        let mut resync = Vec::new();
        for s in &self.sources {
            let floor = self.resync_floor.get(&s.name);
            // A position inside a range of seqs the journal skipped (records shipped early,
            // then lost to a crash here) stands for the end of that range: the source
            // captures those changes again above it, and the receiver skips what it has.
            let at = reported.get(&*s.name).map(|p| self.store.skip_gap(Seq(p.seq).next()).prev());
            match reported.get(&*s.name) {
                Some(p) if p.known && p.seq < floor.0 && p.seq <= last_now.0 => {
                    warn!(source = %s.name, position = p.seq, floor = floor.0,
                        "the source lost changes upstream after this receiver's position; resyncing it from a new snapshot");
                    resync.push(s.clone());
                }
                Some(p) if p.known && at.is_some_and(|at| at.next() >= first && at <= last_now) => {
                    positions.insert(s.name.clone(), at.expect("checked"));
                }
                Some(p) => {
                    if p.known {
                        warn!(source = %s.name, position = p.seq, journal_first = first.0, journal_last = last_now.0,
                            "receiver position is outside the journal (it lagged past the size cap, or was restored from another copy); resyncing");
                    } else {
                        info!(source = %s.name, "receiver has no position in this journal; seeding it with a full snapshot");
                    }
                    resync.push(s.clone());
                }
                None => return Err(ShipError::Protocol(format!("welcome lacks source {}", s.name))),
            }
        }
        let acked_now = positions.values().copied().min().unwrap_or(*self.durable.borrow());
        self.tracker.reset_acked(&name, acked_now);
        // Mark the resync before "connected", so status never shows a connected, caught-up
        // receiver that is about to be reseeded.
        let names: Vec<String> = resync.iter().map(|s| s.name.to_string()).collect();
        self.tracker.begin_resyncs(&name, &names, now_us());
        info!(receiver_id = %welcome.receiver_id, resync = resync.len(), "connected");
        self.tracker.set_connected(&name, true, None);
        metrics::gauge!(m::RECEIVER_CONNECTED, m::L_RECEIVER => name.clone()).set(1.0);

        // Acknowledgements and repair requests arrive on their own task.
        let flow = Arc::new(Flow::default());
        let dead = CancellationToken::new();
        let reader = {
            let flow = flow.clone();
            let dead = dead.clone();
            let tracker = self.tracker.clone();
            let store = self.store.clone();
            let name = name.clone();
            let repairs: HashMap<String, mpsc::Sender<RepairRequest>> =
                self.sources.iter().map(|s| (s.name.to_string(), s.repair_tx.clone())).collect();
            let idle_limit = self.heartbeat * 3 + Duration::from_secs(10);
            tokio::spawn(async move {
                let r = read_acks(&mut inbound, &flow, &tracker, &*store, &name, &repairs, idle_limit).await;
                dead.cancel();
                r
            })
        };
        let result = self.send_all(&tx, &flow, &dead, resync, positions).await;
        dead.cancel();
        drop(tx);
        let reader_result = reader.await.unwrap_or(Ok(()));
        // When the receiver ended the stream, the sender only saw it close; the reader holds
        // the receiver's status, which names the cause.
        match (result, reader_result) {
            (Err(ShipError::Cancelled), _) => Err(ShipError::Cancelled),
            (_, Err(e)) => Err(e),
            (result, Ok(())) => result,
        }
    }

    async fn send_all(
        &self,
        tx: &mpsc::Sender<AgentMessage>,
        flow: &Flow,
        dead: &CancellationToken,
        resync: Vec<Arc<SourceHandle>>,
        mut positions: HashMap<Arc<str>, Seq>,
    ) -> Result<(), ShipError> {
        let window = self.endpoint.window_bytes;
        let name = &self.endpoint.name;
        let send = |msg: AMsg| async move {
            tokio::select! {
                r = tx.send(AgentMessage { msg: Some(msg) }) => r.map_err(|_| ShipError::Stream("outbound closed".into())),
                _ = dead.cancelled() => Err(ShipError::Stream("receiver stream closed".into())),
                _ = self.cancel.cancelled() => Err(ShipError::Cancelled),
            }
        };
        let send_batch = |events: Vec<proto::Event>| async move {
            let bytes: u64 = events.iter().map(|e| e.payload.len() as u64 + 64).sum();
            flow.wait_room(window, dead).await?;
            flow.sent(bytes);
            metrics::counter!(m::BYTES_SENT_TOTAL, m::L_RECEIVER => name.clone()).increment(bytes);
            send(AMsg::Batch(proto::EventBatch { events })).await
        };

        for s in resync {
            let at = *self.durable.borrow();
            info!(source = %s.name, seq = at.0, "resync: sending a full snapshot");
            metrics::counter!(m::RESYNCS_TOTAL, m::L_RECEIVER => name.clone()).increment(1);
            let _running = s.status.snapshot_started();
            send(AMsg::ResyncBegin(proto::ResyncBegin { source: s.name.to_string(), seq: at.0 })).await?;
            let (stx, mut srx) = mpsc::channel::<Change>(256);
            let snap = {
                let snapshotter = s.snapshotter.clone();
                tokio::spawn(async move { snapshotter.snapshot(stx).await })
            };
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let source: &str = &s.name;
            let send_snapshot = |batch: Vec<proto::Event>, bytes: usize| async move {
                let events = batch.len() as u64;
                send_batch(batch).await?;
                self.tracker.resync_sent(name, source, events, bytes as u64);
                Ok::<(), ShipError>(())
            };
            while let Some(change) = srx.recv().await {
                let payload = change.encode();
                bytes += payload.len();
                batch.push(lockstep_common::event::make_event(Seq::ZERO, source, now_us(), payload));
                if bytes >= BATCH_BYTES || batch.len() >= BATCH_EVENTS {
                    send_snapshot(std::mem::take(&mut batch), bytes).await?;
                    bytes = 0;
                }
            }
            if !batch.is_empty() {
                send_snapshot(batch, bytes).await?;
            }
            match snap.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(ShipError::Snapshot { source_name: s.name.to_string(), detail: e.to_string() })
                }
                Err(e) => return Err(ShipError::Snapshot { source_name: s.name.to_string(), detail: e.to_string() }),
            }
            send(AMsg::ResyncEnd(proto::ResyncEnd { source: s.name.to_string(), seq: at.0 })).await?;
            positions.insert(s.name.clone(), at);
            // Status keeps showing the resync until the receiver reports it committed.
            info!(source = %s.name, seq = at.0, "resync: snapshot sent");
        }

        let mut kick = self.resync_floor.subscribe();
        kick.mark_unchanged();
        let mut next = positions.values().copied().min().unwrap_or(Seq::ZERO).next();
        let mut durable = self.durable.clone();
        let mut appended = self.appended.clone();
        // Sources whose records may go out before they are durable. A crash can then lose
        // a record here that a receiver has applied; the source captures that change again
        // (its upstream position had not moved past it) under a new seq, so the receiver
        // must recognise it: PostgreSQL transactions carry their commit LSN, which the
        // applier skips when already applied.
        let early: std::collections::HashSet<&str> =
            self.sources.iter().filter(|s| s.kind == SourceKind::Postgres).map(|s| &*s.name).collect();
        let wanted: std::collections::HashSet<&str> = self.sources.iter().map(|s| &*s.name).collect();
        let mut last_sent = Instant::now();
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.cancel.is_cancelled() {
                return Err(ShipError::Cancelled);
            }
            let durable_end = *durable.borrow_and_update();
            let appended_end = *appended.borrow_and_update();
            let end =
                if early.is_empty() { durable_end } else { durable_end.max(appended_end.min(self.store.ship_limit())) };
            next = self.store.skip_gap(next);
            if next <= end {
                let from = next;
                let events = if end.0 - next.0 < LIVE_TAIL {
                    // Just journaled, so in the journal's cache: read in place, without a
                    // thread hand-off on every small transaction's way out.
                    self.store.read_from(from, LIVE_TAIL as usize, LIVE_TAIL_BYTES)?
                } else {
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || store.read_from(from, BATCH_EVENTS, BATCH_BYTES))
                        .await
                        .map_err(|e| ShipError::Stream(e.to_string()))??
                };
                let mut events: Vec<proto::Event> = events.into_iter().filter(|e| e.seq <= end.0).collect();
                let Some(first) = events.first().map(|e| e.seq) else {
                    return Err(ShipError::Protocol(format!(
                        "journal has no record at {next} though {end} is written"
                    )));
                };
                if first != next.0 {
                    // Truncated past this receiver while we were connected (size cap): the
                    // next session resyncs it.
                    return Err(ShipError::Protocol(format!(
                        "journal no longer holds seq {next} (oldest is {first}); reconnecting to resync"
                    )));
                }
                // A record for this receiver that is not durable yet and may not go out early
                // ends the batch; only a flush lets it out.
                let held = events.iter().position(|e| {
                    e.seq > durable_end.0 && wanted.contains(e.source.as_str()) && !early.contains(e.source.as_str())
                });
                if held == Some(0) {
                    tokio::select! {
                        r = durable.changed() => if r.is_err() { return Err(ShipError::Cancelled) },
                        _ = dead.cancelled() => return Err(ShipError::Stream("receiver stream closed".into())),
                        _ = self.cancel.cancelled() => return Err(ShipError::Cancelled),
                    }
                    continue;
                }
                if let Some(h) = held {
                    events.truncate(h);
                }
                let resume = Seq(events.last().expect("non-empty").seq + 1);
                // Records of sources this receiver does not get are passed over.
                events.retain(|e| wanted.contains(e.source.as_str()));
                // A source that lost changes upstream after this session's starting point
                // (its resync floor rose past it): nothing more may go out before a resync.
                // The floor is raised before any record above it is journaled, so it is seen
                // here before such a record could be sent.
                for (source, pos) in &positions {
                    if self.resync_floor.get(source) > *pos {
                        return Err(ShipError::Stream(format!(
                            "source {source} lost changes upstream; reconnecting to resync this receiver"
                        )));
                    }
                }
                next = resume;
                if events.is_empty() {
                    // Only other sources' records: nothing goes out, but a long run of them
                    // must not leave the receiver without word (it would time out) or its
                    // idle position behind (every session would pass over them again).
                    // Everything of its sources below `resume` has been sent.
                    if last_sent.elapsed() >= self.heartbeat {
                        send(AMsg::Heartbeat(proto::Heartbeat { sent_at_us: now_us(), last_seq: resume.prev().0 }))
                            .await?;
                        last_sent = Instant::now();
                    }
                    continue;
                }
                tracing::trace!(first, last = next.0 - 1, "sending batch");
                send_batch(events).await?;
                last_sent = Instant::now();
                continue;
            }
            tokio::select! {
                r = durable.changed() => if r.is_err() { return Err(ShipError::Cancelled) },
                r = appended.changed(), if !early.is_empty() => if r.is_err() { return Err(ShipError::Cancelled) },
                _ = kick.changed() => {
                    return Err(ShipError::Stream("a source needs its receivers resynced; reconnecting".into()))
                }
                _ = tick.tick() => {
                    if last_sent.elapsed() >= self.heartbeat {
                        send(AMsg::Heartbeat(proto::Heartbeat { sent_at_us: now_us(), last_seq: durable_end.0 })).await?;
                        last_sent = Instant::now();
                        debug!("heartbeat");
                    }
                }
                _ = dead.cancelled() => return Err(ShipError::Stream("receiver stream closed".into())),
                _ = self.cancel.cancelled() => return Err(ShipError::Cancelled),
            }
        }
    }
}

async fn read_acks(
    inbound: &mut tonic::Streaming<proto::ReceiverMessage>,
    flow: &Flow,
    tracker: &Tracker,
    store: &dyn JournalStore,
    name: &str,
    repairs: &HashMap<String, mpsc::Sender<RepairRequest>>,
    idle_limit: Duration,
) -> Result<(), ShipError> {
    let mut last_cursor = Seq::ZERO;
    loop {
        let msg = match tokio::time::timeout(idle_limit, inbound.message()).await {
            Err(_) => return Err(ShipError::Stream(format!("no word from receiver for {idle_limit:?}"))),
            Ok(Err(s)) => return Err(status_err(s)),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(m))) => m,
        };
        match msg.msg {
            Some(RMsg::Ack(a)) => {
                flow.acked(a.batches);
                tracker.resyncs_committed(name, a.resyncs_committed);
                tracker.set_acked(name, Seq(a.seq));
                // The journal may drop only what every target has *committed*.
                let seq = a.positions.iter().map(|p| Seq(p.seq)).min().unwrap_or(Seq(a.seq));
                tracker.set_committed(name, seq);
                if seq > last_cursor {
                    // Durable with the journal's next flush; a stale cursor only delays truncation.
                    store.put_meta(&cursor_key(name), &seq.0.to_be_bytes())?;
                    last_cursor = seq;
                }
            }
            Some(RMsg::Repair(r)) => {
                let Ok(path) = RelPath::new(r.path.to_vec()) else {
                    warn!(source = %r.source, "receiver asked to repair an invalid path; ignored");
                    continue;
                };
                match repairs.get(&r.source) {
                    Some(tx) => {
                        debug!(source = %r.source, path = %path, reason = %r.reason, "repair requested");
                        // Waits for room rather than dropping it: a lost repair leaves the
                        // standby different for good. Acknowledgements wait meanwhile.
                        let req = RepairRequest { path: path.clone(), reason: r.reason };
                        if !matches!(tokio::time::timeout(Duration::from_secs(60), tx.send(req)).await, Ok(Ok(()))) {
                            warn!(source = %r.source, path = %path, "repair request could not be queued (the source is not taking them); reconnecting");
                            return Err(ShipError::Stream("repair request not queued".into()));
                        }
                    }
                    None => warn!(source = %r.source, "repair for a source this receiver does not get; ignored"),
                }
            }
            Some(RMsg::Welcome(_)) | None => {
                return Err(ShipError::Protocol("unexpected message from receiver".into()))
            }
        }
    }
}

/// Journal metadata key holding a receiver's acknowledged position.
pub fn cursor_key(receiver: &str) -> String {
    format!("cursor/{receiver}")
}

fn status_err(s: tonic::Status) -> ShipError {
    match Remedy::of_grpc(s.code()) {
        Remedy::Person => ShipError::Receiver { code: s.code(), message: s.message().to_string() },
        Remedy::Retry => ShipError::Stream(format!("{}: {}", s.code(), s.message())),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_status_a_person_must_fix_is_shown_whole_and_retried_slowly() {
        let msg = "receiver eu-west: target www: applying seq 7 failed: write /srv/standby/big.bin: No space left on device (os error 28); free space on the standby's filesystem; replication resumes by itself";
        let e = status_err(tonic::Status::resource_exhausted(msg));
        assert_eq!(e.remedy(), Remedy::Person);
        assert_eq!(format!("{e}{}", e.remedy().note()), format!("{msg}; retrying every 30 s"));
        let e = status_err(tonic::Status::permission_denied("receiver eu-west has no target for agent \"x\""));
        assert_eq!(e.remedy(), Remedy::Person);
        // A receiver restarting, a reset link: retried with backoff, no call for a person.
        let e = status_err(tonic::Status::unavailable("target busy; retry"));
        assert_eq!((e.remedy(), e.remedy().note()), (Remedy::Retry, ""));
        let e = ShipError::Connect { endpoint: "https://r:1".into(), detail: "Connection refused".into() };
        assert_eq!(e.remedy(), Remedy::Retry);
    }
}
