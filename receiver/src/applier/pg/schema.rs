//! Keeps a standby table in the shape the source's relation message describes: creates it when
//! missing, follows a rename of the same relation, adds and drops columns, changes column
//! types, and empties it at its first sight in a resync.

use std::collections::HashMap;

use lockstep_common::proto::PgRelation;
use tokio_postgres::Client;
use tracing::info;

use super::db_err;
use super::sql::{self, ident, qualified};
use crate::applier::ApplyError;

/// A standby column as the catalog has it.
struct StandbyColumn {
    type_text: String,
    type_oid: u32,
    generated: bool,
}

/// The OID of table `schema.name`, if there is one (ordinary or partitioned).
async fn table_oid(client: &Client, schema: &str, name: &str) -> Result<Option<u32>, ApplyError> {
    let row = client
        .query_opt(
            "SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(db_err(format!("look up table {}", qualified(schema, name))))?;
    Ok(row.map(|r| r.get(0)))
}

/// Creates `schema` unless it exists (checked first: CREATE SCHEMA IF NOT EXISTS wants the
/// CREATE privilege on the database even when the schema is there).
async fn ensure_schema(client: &Client, schema: &str) -> Result<(), ApplyError> {
    let exists: bool = client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)", &[&schema])
        .await
        .map_err(db_err(format!("look up schema {}", ident(schema))))?
        .get(0);
    if !exists {
        let stmt = format!("CREATE SCHEMA IF NOT EXISTS {}", ident(schema));
        client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("create schema {}", ident(schema))))?;
    }
    Ok(())
}

/// Whether the standby has a type `schema.name`.
pub async fn type_exists(client: &Client, schema: &str, name: &str) -> Result<bool, ApplyError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
             WHERE n.nspname = $1 AND t.typname = $2)",
            &[&schema, &name],
        )
        .await
        .map_err(db_err(format!("look up type {}", qualified(schema, name))))?
        .get(0))
}

/// Runs a checked type definition (see [`sql::type_def`]).
pub async fn create_type(client: &Client, schema: &str, stmt: &str, q: &str) -> Result<(), ApplyError> {
    ensure_schema(client, schema).await?;
    client.execute(stmt, &[]).await.map_err(db_err(format!("create type {q}")))?;
    info!(type_name = %q, "standby type created");
    Ok(())
}

/// Makes the standby table match `rel` (already checked with [`sql::check_relation`]).
///
/// `previous`: the name the same source relation had before, if it changed (a rename on the
/// source): the standby table is renamed rather than created afresh. `clear`: empty the table
/// (first sight in a resync) before its columns are adjusted.
pub async fn ensure_table(
    client: &Client,
    rel: &PgRelation,
    previous: Option<(&str, &str)>,
    clear: bool,
) -> Result<(), ApplyError> {
    let table = qualified(&rel.schema, &rel.name);
    let mut oid = table_oid(client, &rel.schema, &rel.name).await?;
    if oid.is_none() {
        if let Some((old_schema, old_name)) = previous {
            if let Some(old) = table_oid(client, old_schema, old_name).await? {
                rename(client, old_schema, old_name, rel).await?;
                oid = Some(old);
            }
        }
    }
    let Some(oid) = oid else {
        ensure_schema(client, &rel.schema).await?;
        let stmt = sql::create_table(rel);
        client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("create table {table}")))?;
        info!(table = %table, "standby table created");
        return Ok(());
    };
    if clear {
        clear_table(client, oid, &table).await?;
    }
    let rows = client
        .query(
            "SELECT attname::text, pg_catalog.format_type(atttypid, atttypmod), atttypid, attgenerated <> '' \
             FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(db_err(format!("read the columns of {table}")))?;
    let standby: HashMap<String, StandbyColumn> = rows
        .iter()
        .map(|r| (r.get(0), StandbyColumn { type_text: r.get(1), type_oid: r.get(2), generated: r.get(3) }))
        .collect();
    let mut clauses = Vec::new();
    // Defaults that only gave existing rows their value (a separate statement: in one, ALTER
    // TABLE drops defaults before it adds columns).
    let mut drop_defaults = Vec::new();
    for c in &rel.columns {
        match standby.get(&c.name) {
            None => {
                clauses.push(sql::add_column(c));
                if c.missing_value.is_some() {
                    drop_defaults.push(sql::drop_default(c));
                }
            }
            Some(s) if s.type_text != c.type_name => {
                if type_differs(client, &c.type_name, s).await? {
                    clauses.push(sql::alter_type(c));
                }
            }
            Some(_) => {}
        }
    }
    for (name, s) in &standby {
        // Generated columns are not replicated (the standby computes them).
        if !s.generated && !rel.columns.iter().any(|c| &c.name == name) {
            clauses.push(format!("DROP COLUMN {}", ident(name)));
        }
    }
    if !clauses.is_empty() {
        let stmt = format!("ALTER TABLE {table} {}", clauses.join(", "));
        client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("alter table {table} ({stmt})")))?;
        info!(table = %table, change = %clauses.join(", "), "standby table altered to match the source");
    }
    if !drop_defaults.is_empty() {
        let stmt = format!("ALTER TABLE {table} {}", drop_defaults.join(", "));
        client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("alter table {table} ({stmt})")))?;
    }
    Ok(())
}

/// Whether the source's `type_name` names another type than the standby column has. Type
/// names are compared as the standby resolves them, so the same type spelled differently
/// (schema-qualified or not) is not taken for a change; a differing modifier is.
async fn type_differs(client: &Client, type_name: &str, s: &StandbyColumn) -> Result<bool, ApplyError> {
    let resolved: Option<u32> = client
        .query_one("SELECT pg_catalog.to_regtype($1)::oid", &[&type_name])
        .await
        .map_err(db_err(format!("resolve type {type_name:?} on the standby")))?
        .get(0);
    Ok(match resolved {
        None => true,
        Some(oid) if oid != s.type_oid => true,
        Some(_) => type_name.contains('(') || s.type_text.contains('('),
    })
}

async fn rename(client: &Client, old_schema: &str, old_name: &str, rel: &PgRelation) -> Result<(), ApplyError> {
    let from = qualified(old_schema, old_name);
    let to = qualified(&rel.schema, &rel.name);
    if old_schema != rel.schema {
        ensure_schema(client, &rel.schema).await?;
        let stmt = format!("ALTER TABLE {from} SET SCHEMA {}", ident(&rel.schema));
        client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("move table {from} to {to}")))?;
    }
    if old_name != rel.name {
        let stmt = format!("ALTER TABLE {} RENAME TO {}", qualified(&rel.schema, old_name), ident(&rel.name));
        client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("rename table {from} to {to}")))?;
    }
    info!(from = %from, to = %to, "standby table renamed like its source");
    Ok(())
}

/// Empties a table for a resync. TRUNCATE refuses a table other tables reference by foreign
/// key (unless they are truncated in the same statement); those are emptied with DELETE,
/// which checks no foreign keys in replica mode. Only the table itself: an inheritance child
/// is a table of its own in the snapshot (and may have been filled already); a partitioned
/// table (published via its root) is emptied with its partitions.
async fn clear_table(client: &Client, oid: u32, table: &str) -> Result<(), ApplyError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE contype = 'f' AND confrelid = $1 AND conrelid <> $1), \
             (SELECT relkind = 'p' FROM pg_catalog.pg_class WHERE oid = $1)",
            &[&oid],
        )
        .await
        .map_err(db_err(format!("look up foreign keys referencing {table}")))?;
    let (referenced, partitioned): (bool, Option<bool>) = (row.get(0), row.get(1));
    let only = if partitioned == Some(true) { "" } else { "ONLY " };
    let stmt = if referenced { format!("DELETE FROM {only}{table}") } else { format!("TRUNCATE {only}{table}") };
    client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("empty {table} for the resync")))?;
    Ok(())
}
