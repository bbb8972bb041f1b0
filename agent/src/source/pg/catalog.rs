//! The control connection: preflight checks, publication and slot setup, type names, and the
//! slot's health.

use std::collections::HashMap;

use lockstep_common::proto;
use tokio_postgres::Client;

use super::{ddl, pgoutput};
use super::{ident, Shared};
use crate::source::SourceError;

/// Why the source cannot run right now.
pub(crate) enum Refusal {
    /// The server is misconfigured for us; retrying will not help until an operator acts.
    Fatal(SourceError),
    /// Probably transient (server down, a broken stream).
    Retry(SourceError),
    /// The slot is held by another session — after a kill -9 possibly our own previous one,
    /// until the server notices; retried for a while, then fatal.
    SlotBusy(SourceError),
}

/// Opens a SQL connection (TLS per the dsn's `sslmode`); the connection task runs until the client is dropped.
pub(crate) async fn connect(shared: &Shared) -> Result<Client, SourceError> {
    let (client, conn) = shared.conn.pg.connect().await.map_err(|e| {
        shared.err(format!("cannot connect to PostgreSQL at {} as {}: {e}", shared.conn.server(), shared.conn.user))
    })?;
    let name = shared.name.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(source = %name, error = %e, "control connection ended");
        }
    });
    Ok(client)
}

fn sql_err<'a>(shared: &'a Shared, what: &str) -> impl Fn(tokio_postgres::Error) -> SourceError + 'a {
    let what = what.to_string();
    move |e| shared.err(format!("{what} on {}: {}", shared.conn.server(), db_message(&e)))
}

/// The server's message for an error (tokio-postgres' Display of a DbError is just "db error").
pub(crate) fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// The slot as the server sees it.
pub(crate) struct SlotInfo {
    pub confirmed_flush: u64,
}

/// Checks everything logical replication needs, creating the publication (FOR ALL TABLES) and
/// the slot when missing. Returns the slot's state.
/// `will_recreate` runs before a slot this source used is replaced (dropped as invalidated, or
/// created anew because it is gone): it records durably that the receivers need a resync, so a
/// crash between the new slot's creation and the resync's start does not lose the gap.
pub(crate) async fn preflight(
    shared: &Shared,
    client: &Client,
    used_before: bool,
    will_recreate: &(dyn Fn() -> Result<(), String> + Sync),
) -> Result<SlotInfo, Refusal> {
    let fatal = |p: String| Refusal::Fatal(shared.err(p));
    let retry = |e: SourceError| Refusal::Retry(e);
    let server = shared.conn.server();

    let wal_level: String =
        client.query_one("SHOW wal_level", &[]).await.map_err(|e| retry(sql_err(shared, "SHOW wal_level")(e)))?.get(0);
    if wal_level != "logical" {
        return Err(fatal(format!(
            "wal_level is {wal_level:?} on {server}; logical replication needs wal_level = logical: set it in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
        )));
    }
    let row = client
        .query_one("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .map_err(|e| retry(sql_err(shared, "read role")(e)))?;
    if !row.get::<_, bool>(0) {
        let user = &shared.conn.user;
        return Err(fatal(format!(
            "role {user:?} lacks the REPLICATION attribute on {server}; run ALTER ROLE {} REPLICATION as a superuser",
            ident(user)
        )));
    }

    // The publication: created FOR ALL TABLES when missing; an existing one must cover every table.
    let pubname = &shared.publication;
    let all = client
        .query_opt("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[pubname])
        .await
        .map_err(|e| retry(sql_err(shared, "read publications")(e)))?;
    match all {
        None => {
            client
                .batch_execute(&format!("CREATE PUBLICATION {} FOR ALL TABLES", ident(pubname)))
                .await
                .map_err(|e| fatal(format!("create publication {pubname:?} on {server}: {} (create it yourself: CREATE PUBLICATION {} FOR ALL TABLES)", db_message(&e), ident(pubname))))?;
            tracing::info!(source = %shared.name, publication = %pubname, "created publication FOR ALL TABLES");
        }
        Some(row) if row.get::<_, bool>(0) => {}
        Some(_) => {
            let names = user_tables(
                client,
                "NOT EXISTS (SELECT 1 FROM pg_publication_tables p
                             WHERE p.pubname = $1 AND p.schemaname = n.nspname AND p.tablename = c.relname)",
                &[pubname],
            )
            .await
            .map_err(|e| retry(sql_err(shared, "read publication tables")(e)))?;
            if !names.is_empty() {
                return Err(fatal(format!(
                    "publication {pubname:?} on {server} does not include table(s) {}; their changes would not be replicated. Run ALTER PUBLICATION {} ADD TABLE {} (or recreate it FOR ALL TABLES)",
                    names.join(", "),
                    ident(pubname),
                    names.join(", ")
                )));
            }
        }
    }

    // Column identities across DDL (see `ddl`); without the trigger, lockstep still works.
    if let Err(e) = ddl::ensure_trigger(client, &shared.name).await {
        tracing::warn!(source = %shared.name, error = %db_message(&e),
            "could not install the event trigger lockstep_columns; a renamed column may be kept aside on standbys");
    }

    // Tables whose updates and deletes cannot be replicated: PostgreSQL itself refuses those
    // statements on a published table without a replica identity, so only inserts flow.
    let keyless = user_tables(
        client,
        "(c.relreplident = 'n'
          OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))",
        &[],
    )
    .await
    .map_err(|e| retry(sql_err(shared, "read replica identities")(e)))?;
    for t in keyless {
        tracing::warn!(source = %shared.name, table = %t,
            "table has no primary key and no replica identity: only its inserts are replicated (PostgreSQL refuses UPDATE and DELETE on it while it is published); add a primary key or run ALTER TABLE {t} REPLICA IDENTITY FULL");
    }

    // The slot.
    let slot = &shared.slot;
    let row = client
        .query_opt(
            "SELECT plugin, slot_type, database, active, active_pid, wal_status, confirmed_flush_lsn::text
             FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(|e| retry(sql_err(shared, "read replication slots")(e)))?;
    let lost = row.as_ref().is_some_and(|r| r.get::<_, Option<String>>(5).as_deref() == Some("lost"));
    if lost || (row.is_none() && used_before) {
        will_recreate().map_err(|e| fatal(format!("record that receivers need a resync: {e}")))?;
    }
    if lost {
        tracing::error!(source = %shared.name, slot = %slot, server = %server,
            "replication slot was invalidated: PostgreSQL removed WAL it still needed (raise max_slot_wal_keep_size, or keep the agent running); the changes in between are lost to the stream. Dropping the invalid slot, creating a new one and resyncing every receiver of this source from a fresh snapshot");
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .map_err(|e| fatal(format!("drop the invalidated slot {slot:?} on {server}: {}", db_message(&e))))?;
    }
    let row = if lost { None } else { row };
    let Some(row) = row else {
        if used_before && !lost {
            tracing::error!(source = %shared.name, slot = %slot, server = %server,
                "the replication slot this source used is gone (dropped by someone?); changes since are lost to the stream. Creating a new slot and resyncing every receiver of this source from a fresh snapshot");
        }
        let r = client
            .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[slot])
            .await
            .map_err(|e| fatal(format!("create replication slot {slot:?} on {server}: {}", db_message(&e))))?;
        let lsn: String = r.get(0);
        tracing::info!(source = %shared.name, slot = %slot, lsn = %lsn, "created logical replication slot");
        return Ok(SlotInfo { confirmed_flush: parse_lsn(&lsn).unwrap_or(0) });
    };
    let plugin: Option<String> = row.get(0);
    let slot_type: String = row.get(1);
    let database: Option<String> = row.get(2);
    let active: bool = row.get(3);
    let pid: Option<i32> = row.get(4);
    let confirmed: Option<String> = row.get(6);
    if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
        return Err(fatal(format!(
            "slot {slot:?} on {server} is a {slot_type} slot with plugin {plugin:?}, not a logical pgoutput slot; configure another slot name"
        )));
    }
    if database.as_deref() != Some(shared.conn.dbname.as_str()) {
        return Err(fatal(format!(
            "slot {slot:?} on {server} belongs to database {database:?}, not {:?}; configure another slot name",
            shared.conn.dbname
        )));
    }
    if active {
        return Err(Refusal::SlotBusy(shared.err(format!(
            "slot {slot:?} on {server} is in use by another session (pid {}); stop that consumer or configure another slot name",
            pid.map_or("?".to_string(), |p| p.to_string())
        ))));
    }
    Ok(SlotInfo { confirmed_flush: confirmed.as_deref().and_then(parse_lsn).unwrap_or(0) })
}

/// The user's tables (`schema.table`, quoted as needed, in name order) that meet `condition`
/// (SQL over `c` = pg_class, `n` = pg_namespace).
async fn user_tables(
    client: &Client,
    condition: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'lockstep') AND n.nspname NOT LIKE 'pg\\_%'
           AND {condition}
         ORDER BY 1"
    );
    Ok(client.query(&sql, params).await?.iter().map(|r| r.get(0)).collect())
}

/// Parses PostgreSQL's `X/Y` LSN text.
pub(crate) fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The server's `server_version_num` (e.g. 150004).
pub(crate) async fn server_version(shared: &Shared, client: &Client) -> Result<i32, SourceError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(sql_err(shared, "read server_version_num"))?;
    Ok(row.get(0))
}

/// Bytes of WAL the slot holds back, and its `wal_status`.
pub(crate) async fn retained_wal(shared: &Shared, client: &Client) -> Result<Option<(i64, String)>, SourceError> {
    let row = client
        .query_opt(
            "SELECT COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint, COALESCE(wal_status, '')
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&shared.slot],
        )
        .await
        .map_err(sql_err(shared, "read slot"))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Resolves type OIDs (with modifiers) to SQL type names, caching them.
#[derive(Default)]
pub(crate) struct TypeNames {
    cache: HashMap<(u32, i32), String>,
}

impl TypeNames {
    pub async fn name(
        &mut self,
        shared: &Shared,
        client: &Client,
        oid: u32,
        typmod: i32,
    ) -> Result<String, SourceError> {
        if let Some(n) = self.cache.get(&(oid, typmod)) {
            return Ok(n.clone());
        }
        let row = client
            .query_one("SELECT format_type($1::oid, $2::int4)", &[&oid, &typmod])
            .await
            .map_err(sql_err(shared, "look up a column type"))?;
        let n: String = row.get(0);
        self.cache.insert((oid, typmod), n.clone());
        Ok(n)
    }

    /// The protocol form of a relation from the stream (no catalog extras), with each
    /// column's attribute number when it is known (see [`stream_attnums`]). `recorded`: the
    /// table's columns as the DDL trigger last recorded them in the stream (see `ddl`).
    pub async fn relation(
        &mut self,
        shared: &Shared,
        client: &Client,
        r: &pgoutput::Relation,
        recorded: Option<&[ddl::Column]>,
    ) -> Result<proto::PgRelation, SourceError> {
        let attrs: Vec<Attribute> = client
            .query(
                "SELECT attnum, attname::text, atttypid, atttypmod, attisdropped OR attgenerated <> '',
                        CASE WHEN atthasmissing AND NOT attisdropped THEN (attmissingval::text::text[])[1] END
                 FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attnum > 0 ORDER BY attnum",
                &[&r.id],
            )
            .await
            .map_err(sql_err(shared, "read the columns of a relation"))?
            .into_iter()
            .map(|row| Attribute {
                attnum: row.get(0),
                name: row.get(1),
                type_oid: row.get(2),
                type_mod: row.get(3),
                hidden: row.get(4),
                missing_value: row.get(5),
            })
            .collect();
        let attnums = stream_attnums(r, recorded, &attrs);
        if attnums.is_none() {
            tracing::warn!(
                table = %format!("{}.{}", r.namespace, r.name),
                "the table's columns changed again after this point of the stream; the standby matches its columns by name here and keeps any it can no longer match (renamed aside) instead of dropping them"
            );
        }
        let mut columns = Vec::with_capacity(r.columns.len());
        for (i, c) in r.columns.iter().enumerate() {
            let attnum = attnums.as_ref().map_or(0, |a| a[i]);
            // Values of columns added with a default, held by rows that predate them.
            let missing_value = attrs
                .iter()
                .find(|a| if attnum != 0 { a.attnum == attnum } else { !a.hidden && a.name == c.name })
                .and_then(|a| a.missing_value.clone());
            columns.push(proto::PgColumn {
                missing_value,
                name: c.name.clone(),
                type_name: self.name(shared, client, c.type_oid, c.type_mod).await?,
                type_oid: c.type_oid,
                type_mod: c.type_mod,
                key: c.key,
                not_null: false,
                default_expr: String::new(),
                attnum: i32::from(attnum),
            });
        }
        Ok(proto::PgRelation {
            id: r.id,
            schema: if r.namespace.is_empty() { "pg_catalog".into() } else { r.namespace.clone() },
            name: r.name.clone(),
            columns,
            replica_identity: (r.replica_identity as char).to_string(),
            primary_key: Vec::new(),
        })
    }
}

/// One row of `pg_attribute` as the agent reads it now.
struct Attribute {
    attnum: i16,
    name: String,
    type_oid: u32,
    type_mod: i32,
    /// Dropped or generated: never in a relation message.
    hidden: bool,
    /// `attmissingval` in text form (columns added with a default).
    missing_value: Option<String>,
}

/// The attribute numbers of a stream relation's columns: from the DDL trigger's record of the
/// table at this point of the stream (`recorded`) when it describes these columns, else from
/// the catalog as it is *now* (`attrs`), which may be ahead of the point of the stream the
/// message describes (a backlog). Either is trusted only when its live columns are exactly the
/// message's — same names, types and modifiers, in the same order: for the catalog, any
/// rename, drop, add or type change since then makes them differ, and the receiver is told
/// nothing rather than something wrong (`None`). What the catalog alone cannot see is a column
/// dropped and re-added under the same name and type since that point.
fn stream_attnums(r: &pgoutput::Relation, recorded: Option<&[ddl::Column]>, attrs: &[Attribute]) -> Option<Vec<i16>> {
    let same = |live: &mut dyn Iterator<Item = (&str, u32, i32)>| {
        let mut n = 0;
        for (a, c) in live.zip(&r.columns) {
            n += 1;
            if a != (c.name.as_str(), c.type_oid, c.type_mod) {
                return false;
            }
        }
        n == r.columns.len()
    };
    if let Some(rec) = recorded {
        if rec.len() == r.columns.len() && same(&mut rec.iter().map(|a| (a.name.as_str(), a.type_oid, a.type_mod))) {
            return Some(rec.iter().map(|a| a.attnum).collect());
        }
    }
    let live: Vec<&Attribute> = attrs.iter().filter(|a| !a.hidden).collect();
    (live.len() == r.columns.len() && same(&mut live.iter().map(|a| (a.name.as_str(), a.type_oid, a.type_mod))))
        .then(|| live.iter().map(|a| a.attnum).collect())
}

/// First OID of user-created objects; lower ones are built in.
const FIRST_NORMAL_OID: u32 = 16384;

/// Definitions of the user-defined types behind `oids` (enums and domains, with the types they
/// build on first, element types of arrays included), skipping built-ins and `seen` ones.
pub(crate) async fn type_defs(
    shared: &Shared,
    client: &Client,
    oids: Vec<u32>,
    seen: &mut std::collections::HashSet<u32>,
) -> Result<Vec<proto::PgTypeDef>, SourceError> {
    let mut out = Vec::new();
    for oid in oids {
        type_def(shared, client, oid, seen, &mut out).await?;
    }
    Ok(out)
}

fn type_def<'a>(
    shared: &'a Shared,
    client: &'a Client,
    oid: u32,
    seen: &'a mut std::collections::HashSet<u32>,
    out: &'a mut Vec<proto::PgTypeDef>,
) -> futures::future::BoxFuture<'a, Result<(), SourceError>> {
    Box::pin(type_def_inner(shared, client, oid, seen, out))
}

async fn type_def_inner(
    shared: &Shared,
    client: &Client,
    oid: u32,
    seen: &mut std::collections::HashSet<u32>,
    out: &mut Vec<proto::PgTypeDef>,
) -> Result<(), SourceError> {
    if oid < FIRST_NORMAL_OID || !seen.insert(oid) {
        return Ok(());
    }
    let Some(t) = client
        .query_opt(
            "SELECT t.typtype::text, n.nspname::text, t.typname::text, t.typelem, t.typbasetype,
                    format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
            &[&oid],
        )
        .await
        .map_err(sql_err(shared, "read a column type"))?
    else {
        return Ok(());
    };
    let kind: String = t.get(0);
    let schema: String = t.get(1);
    let name: String = t.get(2);
    let elem: u32 = t.get(3);
    let base: u32 = t.get(4);
    let qualified = format!("{}.{}", ident(&schema), ident(&name));
    let mut enum_labels = Vec::new();
    let create_sql = match kind.as_str() {
        "b" if elem != 0 => return type_def(shared, client, elem, seen, out).await,
        "e" => {
            enum_labels = enum_labels_of(shared, client, oid).await?;
            let quoted: Vec<String> = enum_labels.iter().map(|l| super::literal(l)).collect();
            format!("CREATE TYPE {qualified} AS ENUM ({})", quoted.join(", "))
        }
        "d" => {
            type_def(shared, client, base, seen, out).await?;
            let base_name: String = t.get(5);
            let mut sql = format!("CREATE DOMAIN {qualified} AS {base_name}");
            if let Some(d) = t.get::<_, Option<String>>(7) {
                sql.push_str(&format!(" DEFAULT {d}"));
            }
            if t.get::<_, bool>(6) {
                sql.push_str(" NOT NULL");
            }
            let checks = client
                .query(
                    "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = $1 AND contype = 'c' ORDER BY conname",
                    &[&oid],
                )
                .await
                .map_err(sql_err(shared, "read domain constraints"))?;
            for c in checks {
                sql.push_str(&format!(" CONSTRAINT {} {}", ident(&c.get::<_, String>(0)), c.get::<_, String>(1)));
            }
            sql
        }
        // Composite, range and base types from extensions are not recreated: the standby
        // needs them installed (the receiver reports the missing type by name).
        _ => return Ok(()),
    };
    out.push(proto::PgTypeDef { schema, name, create_sql, enum_labels, labels_current: false });
    Ok(())
}

/// The labels of enum type `oid`, in sort order. Labels are only ever added (or renamed), so
/// the catalog's current list covers every label a decoded row can carry.
pub(crate) async fn enum_labels_of(shared: &Shared, client: &Client, oid: u32) -> Result<Vec<String>, SourceError> {
    let rows = client
        .query("SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder", &[&oid])
        .await
        .map_err(sql_err(shared, "read enum labels"))?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// What a column of type `oid` holds, as far as enum labels go: `Some((enum oid, is_array))`
/// for an enum or a one-level array of one, else `None`.
pub(crate) async fn enum_column(
    shared: &Shared,
    client: &Client,
    oid: u32,
) -> Result<Option<(u32, bool)>, SourceError> {
    if oid < FIRST_NORMAL_OID {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT t.typtype::text, t.typelem, coalesce(e.typtype::text, '') \
             FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem WHERE t.oid = $1",
            &[&oid],
        )
        .await
        .map_err(sql_err(shared, "read a column type"))?;
    Ok(row.and_then(|r| {
        let (kind, elem, elem_kind): (String, u32, String) = (r.get(0), r.get(1), r.get(2));
        match (kind.as_str(), elem_kind.as_str()) {
            ("e", _) => Some((oid, false)),
            ("b", "e") => Some((elem, true)),
            _ => None,
        }
    }))
}

/// A published table as the snapshot copies it: its definition from the catalog.
pub(crate) async fn table_relation(
    shared: &Shared,
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<proto::PgRelation, SourceError> {
    let rel = client
        .query_one(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(sql_err(shared, "read table"))?;
    let oid: u32 = rel.get(0);
    let ident_kind: String = rel.get(1);
    // Columns in attnum order (as COPY writes them); generated columns are neither copied nor
    // published.
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, a.atttypmod, a.attnotnull,
                    COALESCE(pg_get_expr(d.adbin, d.adrelid), ''),
                    COALESCE((SELECT true FROM pg_index i WHERE i.indrelid = a.attrelid
                              AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))
                              AND a.attnum = ANY(i.indkey)), c.relreplident = 'f'),
                    a.attnum
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(sql_err(shared, "read columns"))?;
    let columns = cols
        .iter()
        .map(|r| {
            let default: String = r.get(5);
            proto::PgColumn {
                name: r.get(0),
                type_name: r.get(1),
                type_oid: r.get(2),
                type_mod: r.get(3),
                not_null: r.get(4),
                default_expr: if safe_default(&default) { default } else { String::new() },
                key: r.get(6),
                // A snapshot copies every row as it is.
                missing_value: None,
                // Read inside the snapshot, so exactly the snapshot's columns.
                attnum: i32::from(r.get::<_, i16>(7)),
            }
        })
        .collect();
    let pk = client
        .query(
            "SELECT a.attname::text FROM pg_index i
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await
        .map_err(sql_err(shared, "read primary key"))?;
    Ok(proto::PgRelation {
        id: oid,
        schema: schema.to_string(),
        name: table.to_string(),
        columns,
        replica_identity: ident_kind,
        primary_key: pk.iter().map(|r| r.get(0)).collect(),
    })
}

/// A default the standby can evaluate on its own: constants and built-in functions, not
/// sequences (which the standby may lack) or user functions.
fn safe_default(expr: &str) -> bool {
    if expr.is_empty() || expr.contains("nextval(") {
        return false;
    }
    // Schema-qualified calls are user functions (built-ins print unqualified).
    !expr.contains('.') || expr.starts_with('\'')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x"), None);
    }

    #[test]
    fn defaults() {
        assert!(safe_default("0"));
        assert!(safe_default("'x'::text"));
        assert!(safe_default("now()"));
        assert!(!safe_default("nextval('t_id_seq'::regclass)"));
        assert!(!safe_default("app.make_id()"));
        assert!(!safe_default(""));
    }
}
