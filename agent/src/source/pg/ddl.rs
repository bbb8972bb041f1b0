//! Column identity across DDL: which source attribute (`pg_attribute.attnum`) each column of a
//! relation message is, so that the receiver can tell `RENAME COLUMN v TO val` from `DROP
//! COLUMN v, ADD COLUMN val` (the messages look alike, and taking a rename for a drop loses the
//! column's data on the standby).
//!
//! pgoutput's relation messages name columns but carry no attribute numbers, and the catalog
//! the agent can query is the *current* one, which may be ahead of the point of the stream
//! being decoded (a backlog after an outage). Two sources of truth, in order:
//!
//! 1. **An event trigger on the source** (`lockstep_columns`, on `ddl_command_end`): every DDL
//!    command on a table emits, inside its own transaction, a transactional logical message
//!    (prefix [`PREFIX`]) listing the table's columns with their attribute numbers as they are
//!    right after the command. The message is decoded in commit order with the rows, so the
//!    agent knows each table's columns exactly at every point of the stream. Creating an event
//!    trigger needs a superuser: the agent installs it when its role is one, and otherwise
//!    uses it when an operator installed it ([`INSTALL_SQL`], also in the README).
//! 2. **The current catalog**, trusted only when its live columns are exactly the message's
//!    (see `catalog::stream_attnums`).
//!
//! When neither can tell, the relation goes out without attribute numbers and the receiver
//! keeps any column it can no longer match (renamed aside) rather than dropping it.
//!
//! The trigger never makes the user's DDL fail: an error inside it is turned into a warning.
//! The messages are consumed here and never journaled.

use std::collections::HashMap;

use tokio_postgres::Client;

/// Prefix of the trigger's logical messages.
pub(crate) const PREFIX: &str = "lockstep.columns";

/// The event trigger and its function. Idempotent; run by the agent when its role is a
/// superuser, or by an operator (`psql -d <db> -f`) otherwise.
pub(crate) const INSTALL_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS lockstep;
CREATE OR REPLACE FUNCTION lockstep.emit_columns() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
  t oid;
BEGIN
  FOR t IN SELECT DISTINCT c.objid FROM pg_event_trigger_ddl_commands() c
           JOIN pg_class k ON k.oid = c.objid
           WHERE c.classid = 'pg_class'::regclass AND k.relkind IN ('r', 'p')
  LOOP
    PERFORM pg_logical_emit_message(true, 'lockstep.columns', json_build_object(
      'relid', t::bigint,
      'columns', (SELECT coalesce(json_agg(json_build_array(a.attnum, a.atttypid::bigint, a.atttypmod, a.attname) ORDER BY a.attnum), '[]')
                  FROM pg_attribute a
                  WHERE a.attrelid = t AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''))::text);
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'lockstep: could not record the columns after this DDL (%); a renamed column may be kept aside on standbys', SQLERRM;
END
$fn$;
DO $do$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'lockstep_columns') THEN
    CREATE EVENT TRIGGER lockstep_columns ON ddl_command_end
      WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
      EXECUTE FUNCTION lockstep.emit_columns();
  END IF;
END
$do$;
"#;

/// Whether the trigger is in place (and enabled).
pub(crate) async fn trigger_installed(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'lockstep_columns' AND evtenabled <> 'D')",
            &[],
        )
        .await?
        .get(0))
}

/// Installs the trigger when it is missing and the role may (a superuser); says what it did.
pub(crate) async fn ensure_trigger(client: &Client, source: &str) -> Result<(), tokio_postgres::Error> {
    if trigger_installed(client).await? {
        return Ok(());
    }
    let superuser: bool =
        client.query_one("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user", &[]).await?.get(0);
    if !superuser {
        tracing::warn!(
            source = %source,
            "the event trigger lockstep_columns is not installed and this role may not create it (it needs a \
             superuser): a column renamed while the agent is behind, in a table changed again before the agent \
             catches up, is kept aside on the standby instead of renamed there; install it as a superuser (README, \
             \"Schema changes on PostgreSQL sources\")"
        );
        return Ok(());
    }
    client.batch_execute(INSTALL_SQL).await?;
    tracing::info!(source = %source, "installed the event trigger lockstep_columns (records column identities at each DDL)");
    Ok(())
}

/// A live column as the trigger recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Column {
    pub attnum: i16,
    pub type_oid: u32,
    pub type_mod: i32,
    pub name: String,
}

/// Each table's live columns as of the point of the stream decoded last (from the trigger's
/// messages), by relation OID.
#[derive(Default)]
pub(crate) struct Columns {
    tables: HashMap<u32, Vec<Column>>,
}

impl Columns {
    /// Takes in one trigger message. A malformed one is ignored with a warning (the relation
    /// then falls back to the catalog).
    pub(crate) fn record(&mut self, content: &[u8]) {
        match parse(content) {
            Some((relid, cols)) => {
                self.tables.insert(relid, cols);
            }
            None => tracing::warn!("ignoring a malformed {PREFIX} message"),
        }
    }

    /// The recorded columns of `relid`, if any.
    pub(crate) fn get(&self, relid: u32) -> Option<&[Column]> {
        self.tables.get(&relid).map(Vec::as_slice)
    }
}

fn parse(content: &[u8]) -> Option<(u32, Vec<Column>)> {
    let v: serde_json::Value = serde_json::from_slice(content).ok()?;
    let relid = u32::try_from(v.get("relid")?.as_u64()?).ok()?;
    let cols = v
        .get("columns")?
        .as_array()?
        .iter()
        .map(|c| {
            let a = c.as_array()?;
            Some(Column {
                attnum: i16::try_from(a.first()?.as_i64()?).ok()?,
                type_oid: u32::try_from(a.get(1)?.as_u64()?).ok()?,
                type_mod: i32::try_from(a.get(2)?.as_i64()?).ok()?,
                name: a.get(3)?.as_str()?.to_string(),
            })
        })
        .collect::<Option<Vec<Column>>>()?;
    Some((relid, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_messages_parse() {
        let (relid, cols) = parse(br#"{"relid" : 16385, "columns" : [[1,23,-1,"id"],[3,1043,24,"a \"b\""]]}"#).unwrap();
        assert_eq!(relid, 16385);
        assert_eq!(
            cols,
            vec![
                Column { attnum: 1, type_oid: 23, type_mod: -1, name: "id".into() },
                Column { attnum: 3, type_oid: 1043, type_mod: 24, name: "a \"b\"".into() },
            ]
        );
        assert!(parse(br#"{"relid": 1, "columns": []}"#).is_some());
        assert!(parse(b"not json").is_none());
        assert!(parse(br#"{"relid": -1, "columns": []}"#).is_none());
        assert!(parse(br#"{"relid": 1, "columns": [[1, 23, -1]]}"#).is_none());
    }
}
