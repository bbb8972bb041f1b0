//! Keeps a standby table in the shape the source's relation message describes: creates it when
//! missing, follows a rename of the same relation, renames, adds and drops columns, changes
//! column types, and empties it at its first sight in a resync.
//!
//! # Renamed or dropped?
//!
//! A relation message names its columns but does not say what happened to the ones that are
//! gone: `RENAME COLUMN v TO val` and `DROP COLUMN v, ADD COLUMN val` look alike, and taking a
//! rename for a drop loses the column's data. The agent therefore sends each column's source
//! attribute number (which a rename keeps and a drop never hands out again), and the standby
//! remembers, per table, which source attribute each of its columns holds
//! (`lockstep.source_columns`, keyed by the standby table's OID, so it follows table renames,
//! and written in the same transaction as the DDL). Columns are matched by attribute number
//! first: a match under another name is renamed, an attribute the source no longer has is
//! dropped. When the agent could not tell the attribute numbers (the source's catalog moved on
//! before it read this point of the stream), columns are matched by name, and a standby
//! column that matches nothing is *kept*, renamed aside (`<name>_lockstep_kept`) and reported
//! at ERROR, rather than dropped: a person decides what it is.

use std::collections::HashSet;

use lockstep_common::proto::{PgColumn, PgRelation};
use tokio_postgres::Client;
use tracing::{error, info, warn};

use super::db_err;
use super::sql::{self, ident, qualified};
use crate::applier::ApplyError;

/// The attribute number recorded for a column kept aside: it holds no source column any more,
/// so it is never matched, renamed or dropped again (a resync, which refills the table,
/// drops it).
const KEPT: i16 = 0;

/// A standby column as the catalog has it.
#[derive(Clone, Debug)]
struct StandbyColumn {
    name: String,
    type_text: String,
    type_oid: u32,
    generated: bool,
    /// NOT NULL that can be dropped (not part of the primary key, not an identity column).
    droppable_not_null: bool,
    /// The source attribute number it was last matched with (`lockstep.source_columns`);
    /// [`KEPT`] for a column kept aside.
    attnum: Option<i16>,
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

/// Whose tables a target writes: the (agent, source) pair it replicates.
pub type Owner<'a> = (&'a str, &'a str);

/// Makes the standby table match `rel` (already checked with [`sql::check_relation`]).
///
/// The standby table is found by the source relation's OID first (`lockstep.source_tables`:
/// a table renamed on the source is renamed here, even after either side restarted), then by
/// name. `previous`: the name the same source relation had before, if the session saw it
/// change. `clear`: empty the table (first sight in a resync) before its columns are
/// adjusted; a resync takes whatever table has the name and renames nothing.
pub async fn ensure_table(
    client: &Client,
    owner: Owner<'_>,
    rel: &PgRelation,
    previous: Option<(&str, &str)>,
    clear: bool,
) -> Result<(), ApplyError> {
    let table = qualified(&rel.schema, &rel.name);
    let oid = locate_table(client, owner, rel, previous, clear).await?;
    let Some(oid) = oid else {
        ensure_schema(client, &rel.schema).await?;
        let stmt = sql::create_table(rel);
        client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("create table {table}")))?;
        info!(table = %table, "standby table created");
        let oid = table_oid(client, &rel.schema, &rel.name)
            .await?
            .ok_or_else(|| super::target_err(format!("create table {table}"), "the new table is not in the catalog"))?;
        record_table(client, owner, rel.id, oid, &table).await?;
        // Also clears what a dropped table with the same OID may have left.
        record_mapping(client, oid, &table, &plan_columns(&[], rel, true).mapping).await?;
        return Ok(());
    };
    if clear {
        clear_table(client, oid, &table).await?;
    }
    let standby = standby_columns(client, oid, &table).await?;
    let plan = plan_columns(&standby, rel, clear);
    for (from, to) in &plan.aside {
        error!(
            table = %table, column = %from, kept_as = %to,
            "the source's relation no longer has this column and lockstep cannot tell whether it was renamed or \
             dropped at this point of the stream; its data is kept on the standby under the new name — compare \
             with the source, then move or drop it by hand"
        );
    }
    let mut statements = Vec::new();
    for name in &plan.drops {
        statements.push(format!("ALTER TABLE {table} DROP COLUMN {}", ident(name)));
    }
    for (from, to) in &plan.aside {
        statements.push(format!("ALTER TABLE {table} RENAME COLUMN {} TO {}", ident(from), ident(to)));
        // The source sends no value for it any more.
        if standby.iter().any(|s| &s.name == from && s.droppable_not_null) {
            statements.push(format!("ALTER TABLE {table} ALTER COLUMN {} DROP NOT NULL", ident(to)));
        }
    }
    for step in &plan.renames {
        for (from, to) in step {
            statements.push(format!("ALTER TABLE {table} RENAME COLUMN {} TO {}", ident(from), ident(to)));
        }
    }
    let mut clauses = Vec::new();
    // Defaults that only gave existing rows their value (a separate statement: in one, ALTER
    // TABLE drops defaults before it adds columns).
    let mut drop_defaults = Vec::new();
    for &i in &plan.adds {
        let c = &rel.columns[i];
        clauses.push(sql::add_column(c));
        if c.missing_value.is_some() {
            drop_defaults.push(sql::drop_default(c));
        }
    }
    for &(i, j) in &plan.kept {
        let (c, s) = (&rel.columns[i], &standby[j]);
        if s.type_text != c.type_name && type_differs(client, &c.type_name, s).await? {
            clauses.push(sql::alter_type(c));
        }
    }
    if !clauses.is_empty() {
        statements.push(format!("ALTER TABLE {table} {}", clauses.join(", ")));
    }
    if !drop_defaults.is_empty() {
        statements.push(format!("ALTER TABLE {table} {}", drop_defaults.join(", ")));
    }
    for stmt in &statements {
        client.execute(stmt.as_str(), &[]).await.map_err(db_err(format!("alter table {table} ({stmt})")))?;
    }
    if !statements.is_empty() {
        info!(table = %table, change = %statements.join("; "), "standby table altered to match the source");
    }
    if plan.mapping != current_mapping(&standby) {
        record_mapping(client, oid, &table, &plan.mapping).await?;
    }
    Ok(())
}

/// The standby table that holds source relation `rel`, renamed to `rel`'s name if the source
/// renamed it; `None` when there is none yet (see [`ensure_table`]).
async fn locate_table(
    client: &Client,
    owner: Owner<'_>,
    rel: &PgRelation,
    previous: Option<(&str, &str)>,
    clear: bool,
) -> Result<Option<u32>, ApplyError> {
    let table = qualified(&rel.schema, &rel.name);
    let by_name = table_oid(client, &rel.schema, &rel.name).await?;
    let mapped = mapped_table(client, owner, rel.id).await?;
    let mapped_oid = mapped.as_ref().map(|m| m.0);
    let oid = match (by_name, mapped) {
        (Some(n), Some((m, ..))) if n == m => Some(n),
        (Some(n), _) if clear => Some(n),
        (None, _) if clear => None,
        (None, Some((m, schema, name))) => {
            rename(client, &schema, &name, rel).await?;
            Some(m)
        }
        (Some(n), mapped) => {
            // The name is held by another table: one another source relation of this owner
            // had (renamed or dropped on the source since) is kept, under another name, for
            // that relation or for a person to look at; one from before lockstep recorded
            // owners (or made by hand) is taken over.
            let holder = table_source(client, owner, n).await?;
            match holder {
                Some(other) if other != rel.id => {
                    let kept = keep_table_aside(client, n, &rel.schema, &rel.name).await?;
                    warn!(
                        table = %table, kept_as = %kept,
                        "the standby table with this name belongs to a source table that no longer has it \
                         (renamed or dropped on the source); kept under another name"
                    );
                    match mapped {
                        Some((m, schema, name)) => {
                            rename(client, &schema, &name, rel).await?;
                            Some(m)
                        }
                        None => None,
                    }
                }
                _ => Some(n),
            }
        }
        (None, None) => match previous {
            Some((old_schema, old_name)) => match table_oid(client, old_schema, old_name).await? {
                Some(old) => {
                    rename(client, old_schema, old_name, rel).await?;
                    Some(old)
                }
                None => None,
            },
            None => None,
        },
    };
    if let Some(oid) = oid {
        if mapped_oid != Some(oid) {
            record_table(client, owner, rel.id, oid, &table).await?;
        }
    }
    Ok(oid)
}

/// The standby table recorded for source relation `src_relid`, if it still exists: its OID,
/// schema and name.
async fn mapped_table(
    client: &Client,
    owner: Owner<'_>,
    src_relid: u32,
) -> Result<Option<(u32, String, String)>, ApplyError> {
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text FROM lockstep.source_tables t \
             JOIN pg_catalog.pg_class c ON c.oid = t.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE t.agent = $1 AND t.source = $2 AND t.src_relid = $3 AND c.relkind IN ('r', 'p')",
            &[&owner.0, &owner.1, &src_relid],
        )
        .await
        .map_err(db_err("look up the standby table of a source relation"))?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// The source relation (of `owner`) recorded for standby table `oid`, if any.
async fn table_source(client: &Client, owner: Owner<'_>, oid: u32) -> Result<Option<u32>, ApplyError> {
    let row = client
        .query_opt(
            "SELECT src_relid FROM lockstep.source_tables WHERE agent = $1 AND source = $2 AND relid = $3",
            &[&owner.0, &owner.1, &oid],
        )
        .await
        .map_err(db_err("look up the source relation of a standby table"))?;
    Ok(row.map(|r| r.get(0)))
}

/// Records that standby table `oid` holds source relation `src_relid`.
async fn record_table(
    client: &Client,
    owner: Owner<'_>,
    src_relid: u32,
    oid: u32,
    table: &str,
) -> Result<(), ApplyError> {
    let ctx = || format!("record the source relation of {table}");
    // One row per standby table, too: a table taken over from another relation is no longer its.
    client
        .execute(
            "DELETE FROM lockstep.source_tables WHERE agent = $1 AND source = $2 AND relid = $3 AND src_relid <> $4",
            &[&owner.0, &owner.1, &oid, &src_relid],
        )
        .await
        .map_err(db_err(ctx()))?;
    client
        .execute(
            "INSERT INTO lockstep.source_tables (agent, source, src_relid, relid) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (agent, source, src_relid) DO UPDATE SET relid = EXCLUDED.relid",
            &[&owner.0, &owner.1, &src_relid, &oid],
        )
        .await
        .map_err(db_err(ctx()))?;
    Ok(())
}

/// Renames table `oid` (`schema.name`) to `<name>_lockstep_kept[_n]`; returns the new name.
async fn keep_table_aside(client: &Client, oid: u32, schema: &str, name: &str) -> Result<String, ApplyError> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1",
            &[&schema],
        )
        .await
        .map_err(db_err(format!("list the tables of schema {}", ident(schema))))?;
    let taken: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let kept = aside_name(name, &taken);
    let stmt = format!("ALTER TABLE {} RENAME TO {}", qualified(schema, name), ident(&kept));
    client
        .execute(stmt.as_str(), &[])
        .await
        .map_err(db_err(format!("rename table {} (OID {oid}) aside", qualified(schema, name))))?;
    Ok(qualified(schema, &kept))
}

/// The standby table's columns (generated ones included) with the source attributes they hold.
async fn standby_columns(client: &Client, oid: u32, table: &str) -> Result<Vec<StandbyColumn>, ApplyError> {
    let rows = client
        .query(
            "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid, a.attgenerated <> '', \
                    a.attnotnull AND a.attidentity = '' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                        WHERE i.indrelid = a.attrelid AND i.indisprimary AND a.attnum = ANY(i.indkey)), \
                    s.src_attnum \
             FROM pg_catalog.pg_attribute a \
             LEFT JOIN lockstep.source_columns s ON s.relid = a.attrelid AND s.attname = a.attname::text \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(db_err(format!("read the columns of {table}")))?;
    Ok(rows
        .iter()
        .map(|r| StandbyColumn {
            name: r.get(0),
            type_text: r.get(1),
            type_oid: r.get(2),
            generated: r.get(3),
            droppable_not_null: r.get(4),
            attnum: r.get(5),
        })
        .collect())
}

/// What must happen to a standby table's columns to match a relation message.
#[derive(Debug, Default, PartialEq)]
struct ColumnPlan {
    /// Standby columns the source dropped (or, in a resync, that it does not have).
    drops: Vec<String>,
    /// Standby columns nothing matches, kept under a new name: (name, new name).
    aside: Vec<(String, String)>,
    /// Renames of matched columns, in steps run in order (through temporary names when one
    /// column takes another's name).
    renames: Vec<Vec<(String, String)>>,
    /// Message columns (indexes) the standby lacks.
    adds: Vec<usize>,
    /// Matched columns: (message index, standby index).
    kept: Vec<(usize, usize)>,
    /// The standby's column → source attribute map afterwards.
    mapping: Vec<(String, i16)>,
}

/// Matches a standby table's columns to a relation message's (see the module docs). `clear`:
/// the table was emptied for a resync, so dropping a column loses nothing.
fn plan_columns(standby: &[StandbyColumn], rel: &PgRelation, clear: bool) -> ColumnPlan {
    let exact = !rel.columns.is_empty() && rel.columns.iter().all(|c| c.attnum > 0);
    let attnum_of = |c: &PgColumn| i16::try_from(c.attnum).ok().filter(|&a| a > 0);
    let mut matched: Vec<Option<usize>> = vec![None; rel.columns.len()];
    let mut used = vec![false; standby.len()];
    if exact {
        for (i, c) in rel.columns.iter().enumerate() {
            let candidate = |j: usize| !used[j] && !standby[j].generated && standby[j].attnum == attnum_of(c);
            if let Some(j) = (0..standby.len()).find(|&j| candidate(j)) {
                matched[i] = Some(j);
                used[j] = true;
            }
        }
    }
    for (i, c) in rel.columns.iter().enumerate() {
        if matched[i].is_some() {
            continue;
        }
        // With attribute numbers, a same-named column holding another attribute is a column the
        // source dropped (and added again under the same name): not this one.
        let candidate = |j: usize| {
            !used[j]
                && standby[j].name == c.name
                && standby[j].attnum != Some(KEPT)
                && (!exact || standby[j].attnum.is_none())
        };
        if let Some(j) = (0..standby.len()).find(|&j| candidate(j)) {
            matched[i] = Some(j);
            used[j] = true;
        }
    }
    let mut plan = ColumnPlan::default();
    // Names in use once drops and asides are done (renames and adds must avoid them).
    let mut taken: HashSet<String> = standby.iter().map(|s| s.name.clone()).collect();
    taken.extend(rel.columns.iter().map(|c| c.name.clone()));
    for (j, s) in standby.iter().enumerate() {
        // Generated columns are not replicated (the standby computes them).
        if used[j] || s.generated {
            continue;
        }
        if clear || (exact && s.attnum.is_some_and(|a| a != KEPT)) {
            plan.drops.push(s.name.clone());
        } else if s.attnum == Some(KEPT) {
            plan.mapping.push((s.name.clone(), KEPT));
        } else {
            let to = aside_name(&s.name, &taken);
            taken.insert(to.clone());
            plan.mapping.push((to.clone(), KEPT));
            plan.aside.push((s.name.clone(), to));
        }
    }
    // Renames: straight when no remaining column holds the new name, else every rename goes
    // through a temporary name first.
    let renames: Vec<(usize, usize)> = (0..rel.columns.len())
        .filter_map(|i| matched[i].map(|j| (i, j)))
        .filter(|&(i, j)| standby[j].name != rel.columns[i].name)
        .collect();
    let remaining: HashSet<&str> =
        (0..standby.len()).filter(|&j| used[j] || standby[j].generated).map(|j| standby[j].name.as_str()).collect();
    let clash = renames.iter().any(|&(i, _)| remaining.contains(rel.columns[i].name.as_str()));
    if clash {
        let mut first = Vec::new();
        let mut second = Vec::new();
        for &(i, j) in &renames {
            let tmp = aside_name(&format!("lockstep_rename_{j}"), &taken);
            taken.insert(tmp.clone());
            first.push((standby[j].name.clone(), tmp.clone()));
            second.push((tmp, rel.columns[i].name.clone()));
        }
        plan.renames = vec![first, second];
    } else if !renames.is_empty() {
        plan.renames =
            vec![renames.iter().map(|&(i, j)| (standby[j].name.clone(), rel.columns[i].name.clone())).collect()];
    }
    for (i, c) in rel.columns.iter().enumerate() {
        let attnum = match matched[i] {
            Some(j) => {
                plan.kept.push((i, j));
                if exact {
                    attnum_of(c)
                } else {
                    standby[j].attnum
                }
            }
            None => {
                plan.adds.push(i);
                attnum_of(c).filter(|_| exact)
            }
        };
        if let Some(a) = attnum {
            plan.mapping.push((c.name.clone(), a));
        }
    }
    plan.mapping.sort();
    plan
}

/// The standby's column → source attribute map as it is.
fn current_mapping(standby: &[StandbyColumn]) -> Vec<(String, i16)> {
    let mut m: Vec<(String, i16)> =
        standby.iter().filter(|s| !s.generated).filter_map(|s| Some((s.name.clone(), s.attnum?))).collect();
    m.sort();
    m
}

/// A name for a kept column that no column has: `<name>_lockstep_kept`, then `_2`, `_3`...,
/// cut to fit PostgreSQL's 63-byte identifiers.
fn aside_name(name: &str, taken: &HashSet<String>) -> String {
    (1..)
        .map(|n| {
            let suffix = if n == 1 { "_lockstep_kept".to_string() } else { format!("_lockstep_kept_{n}") };
            let mut base = name.to_string();
            while base.len() + suffix.len() > 63 {
                base.pop();
            }
            base + &suffix
        })
        .find(|candidate| !taken.contains(candidate))
        .expect("an unused name")
}

/// Replaces the table's column → source attribute map.
async fn record_mapping(client: &Client, oid: u32, table: &str, mapping: &[(String, i16)]) -> Result<(), ApplyError> {
    let names: Vec<&str> = mapping.iter().map(|(n, _)| n.as_str()).collect();
    let attnums: Vec<i16> = mapping.iter().map(|(_, a)| *a).collect();
    let ctx = || format!("record the source columns of {table}");
    client.execute("DELETE FROM lockstep.source_columns WHERE relid = $1", &[&oid]).await.map_err(db_err(ctx()))?;
    if !mapping.is_empty() {
        client
            .execute(
                "INSERT INTO lockstep.source_columns (relid, attname, src_attnum) \
                 SELECT $1, n, a FROM unnest($2::text[], $3::int2[]) AS m(n, a)",
                &[&oid, &names, &attnums],
            )
            .await
            .map_err(db_err(ctx()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(cols: &[(&str, Option<i16>)]) -> Vec<StandbyColumn> {
        cols.iter()
            .map(|&(name, attnum)| StandbyColumn {
                name: name.into(),
                type_text: "text".into(),
                type_oid: 25,
                generated: false,
                droppable_not_null: false,
                attnum,
            })
            .collect()
    }

    fn rel(cols: &[(&str, i32)]) -> PgRelation {
        PgRelation {
            columns: cols
                .iter()
                .map(|&(name, attnum)| PgColumn {
                    name: name.into(),
                    type_name: "text".into(),
                    attnum,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    fn mapping(v: &[(&str, i16)]) -> Vec<(String, i16)> {
        let mut m: Vec<(String, i16)> = v.iter().map(|(a, n)| (a.to_string(), *n)).collect();
        m.sort();
        m
    }

    #[test]
    fn a_renamed_column_is_renamed_not_dropped() {
        let s = standby(&[("id", Some(1)), ("v", Some(2)), ("x", Some(3))]);
        let p = plan_columns(&s, &rel(&[("id", 1), ("val", 2), ("x", 3)]), false);
        assert_eq!(p.renames, vec![pairs(&[("v", "val")])]);
        assert!(p.drops.is_empty() && p.aside.is_empty() && p.adds.is_empty());
        assert_eq!(p.mapping, mapping(&[("id", 1), ("val", 2), ("x", 3)]));
    }

    #[test]
    fn a_dropped_column_is_dropped_and_a_readded_one_is_new() {
        let s = standby(&[("id", Some(1)), ("v", Some(2))]);
        let p = plan_columns(&s, &rel(&[("id", 1)]), false);
        assert_eq!(p.drops, vec!["v".to_string()]);
        let p = plan_columns(&s, &rel(&[("id", 1), ("v", 3)]), false);
        assert_eq!(p.drops, vec!["v".to_string()]);
        assert_eq!(p.adds, vec![1]);
        assert!(p.renames.is_empty());
        assert_eq!(p.mapping, mapping(&[("id", 1), ("v", 3)]));
    }

    #[test]
    fn swapped_names_go_through_temporary_names() {
        let s = standby(&[("a", Some(1)), ("b", Some(2))]);
        let p = plan_columns(&s, &rel(&[("b", 1), ("a", 2)]), false);
        assert_eq!(p.renames.len(), 2);
        let tmp: Vec<&String> = p.renames[0].iter().map(|(_, t)| t).collect();
        assert!(tmp.iter().all(|t| *t != "a" && *t != "b"));
        let finals: Vec<(&String, &String)> = p.renames[1].iter().map(|(f, t)| (f, t)).collect();
        assert_eq!(finals.len(), 2);
        assert_eq!(p.mapping, mapping(&[("a", 2), ("b", 1)]));
    }

    #[test]
    fn without_attribute_numbers_an_unmatched_column_is_kept_aside() {
        let s = standby(&[("id", Some(1)), ("v", Some(2))]);
        let p = plan_columns(&s, &rel(&[("id", 0), ("val", 0)]), false);
        assert!(p.drops.is_empty());
        assert_eq!(p.aside, pairs(&[("v", "v_lockstep_kept")]));
        assert_eq!(p.adds, vec![1]);
        // What is known stays known; the new column's attribute is not; the kept one is marked.
        assert_eq!(p.mapping, mapping(&[("id", 1), ("v_lockstep_kept", KEPT)]));
        // Later relations leave the kept column alone, with or without attribute numbers...
        let s = standby(&[("id", Some(1)), ("v_lockstep_kept", Some(KEPT)), ("val", None)]);
        for r in [rel(&[("id", 0), ("val", 0)]), rel(&[("id", 1), ("val", 2)])] {
            let p = plan_columns(&s, &r, false);
            assert!(p.drops.is_empty() && p.aside.is_empty() && p.renames.is_empty() && p.adds.is_empty(), "{p:?}");
            assert!(p.mapping.contains(&("v_lockstep_kept".into(), KEPT)));
        }
        // ...but a resync, which refills the table, drops it.
        let p = plan_columns(&s, &rel(&[("id", 1), ("val", 2)]), true);
        assert_eq!(p.drops, vec!["v_lockstep_kept".to_string()]);
    }

    #[test]
    fn a_standby_from_before_attribute_numbers_adopts_them_by_name() {
        let s = standby(&[("id", None), ("v", None)]);
        let p = plan_columns(&s, &rel(&[("id", 1), ("v", 2)]), false);
        assert_eq!(
            p,
            ColumnPlan { kept: vec![(0, 0), (1, 1)], mapping: mapping(&[("id", 1), ("v", 2)]), ..Default::default() }
        );
        // One it cannot place is kept, not dropped.
        let p = plan_columns(&s, &rel(&[("id", 1), ("val", 2)]), false);
        assert_eq!(p.aside, pairs(&[("v", "v_lockstep_kept")]));
        assert!(p.drops.is_empty());
    }

    #[test]
    fn a_resync_drops_what_the_snapshot_lacks() {
        let s = standby(&[("id", None), ("v", Some(2)), ("old", None)]);
        let p = plan_columns(&s, &rel(&[("id", 1), ("v", 2)]), true);
        assert_eq!(p.drops, vec!["old".to_string()]);
        assert!(p.aside.is_empty());
    }

    #[test]
    fn generated_standby_columns_are_left_alone() {
        let mut s = standby(&[("id", Some(1)), ("g", None)]);
        s[1].generated = true;
        let p = plan_columns(&s, &rel(&[("id", 1)]), false);
        assert_eq!(p, ColumnPlan { kept: vec![(0, 0)], mapping: mapping(&[("id", 1)]), ..Default::default() });
    }

    #[test]
    fn kept_names_fit_and_do_not_collide() {
        let taken: HashSet<String> = ["v_lockstep_kept".to_string()].into();
        assert_eq!(aside_name("v", &taken), "v_lockstep_kept_2");
        let long = "x".repeat(63);
        let n = aside_name(&long, &HashSet::new());
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("_lockstep_kept"));
    }
}
