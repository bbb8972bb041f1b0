//! The postgres source: change data capture from PostgreSQL's write-ahead log through logical
//! replication (`pgoutput`).
//!
//! - [`catalog`]: the control connection — preflight checks that refuse a server we cannot
//!   follow (with the fix in the message), publication and slot creation, type names, the
//!   slot's retained WAL.
//! - [`stream`]: the long-lived [`Source`]: reads the slot through `pgwire-replication`,
//!   decodes pgoutput ([`pgoutput`]), turns each committed transaction into one journal event
//!   (large ones into chunks) and confirms the slot's flush position only once the journal
//!   holds the transaction durably — so the journal, not the slot, absorbs slow receivers.
//!   On PostgreSQL 14+ large transactions arrive while they run ([`streamed`]) and are kept
//!   in scratch files until their commit.
//! - [`ddl`]: column identities across DDL (an event trigger's logical messages, else the
//!   catalog), so the receiver can tell a renamed column from a dropped one.
//! - [`snapshot`]: the [`Snapshotter`] that seeds a receiver: a temporary slot exports a
//!   snapshot, every published table is copied inside it, and a closing `PgSnapshotEnd` tells
//!   the receiver which transactions the copy already holds (commit LSN below the slot's
//!   consistent point); journal events after that are deduplicated on commit LSN.

mod catalog;
mod ddl;
pub mod pgoutput;
mod snapshot;
mod stream;
mod streamed;

use std::sync::Arc;

use futures::future::BoxFuture;
use lockstep_common::config::SourceConfig;
use lockstep_common::event::SourceKind;
use tokio::sync::watch;

use super::{Snapshotter, Source, SourceContext, SourceError};

/// The walsender's `logical_decoding_work_mem` when it streams to the agent.
const STREAM_WORK_MEM: &str = "8MB";

/// Where and as whom to connect, parsed from the source's `dsn`.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub pg: lockstep_common::pgtls::PgConn,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
}

impl ConnInfo {
    fn parse(source: &str, dsn: &str) -> Result<ConnInfo, SourceError> {
        let bad = |problem: String| SourceError::Other { source_name: source.to_string(), problem };
        let pg = lockstep_common::pgtls::PgConn::parse(dsn)
            .map_err(|e| bad(format!("dsn {dsn:?} is not a valid connection string: {e}")))?;
        let host = match pg.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = pg.config.get_ports().first().copied().unwrap_or(5432);
        let user = pg
            .config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .ok_or_else(|| bad(format!("dsn {dsn:?} names no user; add user=...")))?;
        let password = pg.config.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
        let dbname = pg.config.get_dbname().map(str::to_string).unwrap_or_else(|| user.clone());
        Ok(ConnInfo { pg, host, port, user, password, dbname })
    }

    /// `host:port/db` for messages.
    pub fn server(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }

    /// A replication-protocol session configuration for `slot`; `streaming` asks for large
    /// transactions while they run (PostgreSQL 14+).
    pub fn replication(&self, slot: &str, publication: &str, streaming: bool) -> pgwire_replication::ReplicationConfig {
        // Streaming starts once a transaction's decoded changes outgrow the walsender's
        // logical_decoding_work_mem; what is left at its commit is decoded and sent only then.
        // A smaller budget for this session's walsender than the server default (64 MB)
        // leaves less of that after the commit. The dsn's own `options` come after, so an
        // operator's setting there wins.
        let mut options =
            if streaming { format!("-c logical_decoding_work_mem={STREAM_WORK_MEM}") } else { String::new() };
        if let Some(o) = self.pg.config.get_options() {
            options.push(' ');
            options.push_str(o);
        }
        let cfg = pgwire_replication::ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.dbname.clone(),
            slot.to_string(),
            publication.to_string(),
        )
        .with_port(self.port)
        .with_application_name("lockstep")
        .with_tls(self.replication_tls())
        .with_streaming(streaming);
        match options.trim() {
            "" => cfg,
            o => cfg.with_options(o),
        }
    }

    /// The dsn's TLS settings for the replication connection (same semantics as libpq's).
    fn replication_tls(&self) -> pgwire_replication::TlsConfig {
        use lockstep_common::pgtls::SslMode as M;
        use pgwire_replication::config::SslMode as R;
        let t = &self.pg.tls;
        let mode = match (t.mode, &t.root_cert) {
            (M::Disable, _) => R::Disable,
            (M::Prefer, _) => R::Prefer,
            // As libpq: `require` with a root certificate verifies the chain.
            (M::Require, None) => R::Require,
            (M::Require, Some(_)) | (M::VerifyCa, _) => R::VerifyCa,
            (M::VerifyFull, _) => R::VerifyFull,
        };
        pgwire_replication::TlsConfig {
            mode,
            ca_pem_path: t.root_cert.clone(),
            // An IP address is checked against the certificate's IP names; the crate wants
            // that spelled out for verify-full.
            sni_hostname: self.host.parse::<std::net::IpAddr>().is_ok().then(|| self.host.clone()),
            client_cert_pem_path: t.client_cert.clone(),
            client_key_pem_path: t.client_key.clone(),
        }
    }
}

/// What the stream and the snapshotter share.
pub(crate) struct Shared {
    pub name: Arc<str>,
    pub conn: ConnInfo,
    pub publication: String,
    pub slot: String,
    /// True once the source's slot exists: a snapshot taken before it would miss whatever
    /// commits between the snapshot and the slot's creation.
    pub slot_ready: watch::Sender<bool>,
}

impl Shared {
    pub fn err(&self, problem: impl Into<String>) -> SourceError {
        SourceError::Other { source_name: self.name.to_string(), problem: problem.into() }
    }
}

/// A configured postgres source, ready to run.
pub struct PgSource {
    shared: Arc<Shared>,
}

impl PgSource {
    /// Builds the source from its config (`kind = "postgres"`, `dsn`, optional `publication`
    /// and `slot`). Does not connect yet.
    pub fn new(cfg: &SourceConfig) -> Result<PgSource, SourceError> {
        let other = |problem: String| SourceError::Other { source_name: cfg.name.clone(), problem };
        if cfg.kind != SourceKind::Postgres {
            return Err(other(format!("kind is {}, not postgres", cfg.kind)));
        }
        let dsn = cfg.dsn.as_deref().ok_or_else(|| other("dsn is required for a postgres source".into()))?;
        let conn = ConnInfo::parse(&cfg.name, dsn)?;
        let publication = cfg.publication.clone().unwrap_or_else(|| "lockstep".to_string());
        let slot = cfg.slot.clone().unwrap_or_else(|| default_slot(&cfg.name));
        for (what, v) in [("publication", &publication), ("slot", &slot)] {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
                return Err(other(format!(
                    "{what} name {v:?} must be lower-case letters, digits and underscores (PostgreSQL's rule for slot names)"
                )));
            }
        }
        let (slot_ready, _) = watch::channel(false);
        Ok(PgSource {
            shared: Arc::new(Shared { name: cfg.name.as_str().into(), conn, publication, slot, slot_ready }),
        })
    }

    /// The snapshotter that seeds receivers with a consistent copy of every published table.
    pub fn snapshotter(&self) -> Arc<dyn Snapshotter> {
        Arc::new(snapshot::PgSnapshotter { shared: self.shared.clone() })
    }
}

/// `lockstep_<source name>`, reduced to what a slot name may hold.
fn default_slot(source: &str) -> String {
    let mut s = String::from("lockstep_");
    s.extend(source.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }));
    s.truncate(63);
    s
}

impl Source for PgSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(stream::run(self.shared, ctx))
    }
}

/// Quotes an SQL identifier.
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
