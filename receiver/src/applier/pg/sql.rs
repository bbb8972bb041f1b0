//! SQL text built from what the agent sends: quoted identifiers, checked type names and
//! default expressions, and the statements the applier runs (CREATE TABLE, COPY, UPDATE,
//! DELETE).
//!
//! Names are always double-quoted. Type names and default expressions are SQL text the agent
//! took from its catalog (`format_type`, `pg_get_expr`); they are checked here against a small
//! grammar before they are put into a statement, and type names are only ever used where the
//! grammar admits nothing but a type (`CAST(x AS <type>)`, a column definition), so a hostile
//! agent cannot smuggle an expression into the applier's statements.

use lockstep_common::proto::{PgColumn, PgRelation};

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1); longer ones cannot come from a real
/// source catalog.
const MAX_IDENT_BYTES: usize = 63;
/// Longest type name or default expression accepted.
const MAX_SQL_TEXT: usize = 1024;

/// Schemas the agent may not write to: the applier's own bookkeeping and the system's.
pub fn reserved_schema(schema: &str) -> bool {
    schema == "lockstep" || schema == "information_schema" || schema.starts_with("pg_")
}

/// `name` as a double-quoted identifier.
pub fn ident(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    s.push('"');
    for c in name.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// Checks a schema, table or column name.
pub fn check_ident(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("empty {what} name"));
    }
    if name.len() > MAX_IDENT_BYTES {
        return Err(format!("{what} name {name:?} is longer than {MAX_IDENT_BYTES} bytes"));
    }
    if name.contains('\0') {
        return Err(format!("{what} name {name:?} contains NUL"));
    }
    Ok(())
}

/// Checks a type name from `format_type()`: words (plain or double-quoted identifiers)
/// separated by spaces or dots, type modifiers of digits in parentheses, array brackets of
/// digits. Operators, literals, commas outside a modifier and unbalanced parentheses are
/// refused.
pub fn check_type_name(t: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("type name {t:?} refused: {why}"));
    if t.trim().is_empty() {
        return bad("empty");
    }
    if t.len() > MAX_SQL_TEXT {
        return bad("too long");
    }
    let mut chars = t.chars().peekable();
    // Inside "(...)" or "[...]": only digits, commas (in parentheses) and spaces.
    let mut group: Option<char> = None;
    while let Some(c) = chars.next() {
        match group {
            Some(close) => {
                if c == close {
                    group = None;
                } else if !(c.is_ascii_digit() || c == ' ' || (c == ',' && close == ')')) {
                    return bad("only digits may stand in a type modifier or array bound");
                }
            }
            None => match c {
                '"' => loop {
                    match chars.next() {
                        None => return bad("unterminated quoted identifier"),
                        Some('\0') => return bad("NUL"),
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                        }
                        Some('"') => break,
                        Some(_) => {}
                    }
                },
                '(' => group = Some(')'),
                '[' => group = Some(']'),
                c if c.is_alphanumeric() || c == '_' || c == ' ' || c == '.' => {}
                _ => return bad("unexpected character"),
            },
        }
    }
    if group.is_some() {
        return bad("unbalanced parentheses or brackets");
    }
    Ok(())
}

/// Checks a column default expression: balanced parentheses and quotes, no statement
/// separator, no comma outside parentheses (so it cannot add columns or constraints to the
/// definition it is put into).
pub fn check_default_expr(e: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("default expression {e:?} refused: {why}"));
    if e.len() > MAX_SQL_TEXT {
        return bad("too long");
    }
    let mut depth = 0usize;
    let mut chars = e.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => loop {
                match chars.next() {
                    None => return bad("unterminated quote"),
                    Some(q) if q == c && chars.peek() == Some(&c) => {
                        chars.next();
                    }
                    Some(q) if q == c => break,
                    Some('\0') => return bad("NUL"),
                    Some(_) => {}
                }
            },
            '(' => depth += 1,
            ')' => {
                if depth == 0 {
                    return bad("unbalanced parentheses");
                }
                depth -= 1;
            }
            ',' if depth == 0 => return bad("comma outside parentheses"),
            ';' | '\0' | '$' => return bad("unexpected character"),
            '-' if chars.peek() == Some(&'-') => return bad("comment"),
            '/' if chars.peek() == Some(&'*') => return bad("comment"),
            _ => {}
        }
    }
    if depth != 0 {
        return bad("unbalanced parentheses");
    }
    Ok(())
}

/// Checks every name, type and default of a relation.
pub fn check_relation(rel: &PgRelation) -> Result<(), String> {
    check_ident("schema", &rel.schema)?;
    check_ident("table", &rel.name)?;
    if reserved_schema(&rel.schema) {
        return Err(format!("relation {}.{} is in a reserved schema", rel.schema, rel.name));
    }
    let mut names = std::collections::HashSet::new();
    for c in &rel.columns {
        check_ident("column", &c.name)?;
        if !names.insert(c.name.as_str()) {
            return Err(format!("relation {}.{} lists column {:?} twice", rel.schema, rel.name, c.name));
        }
        check_type_name(&c.type_name)?;
        if !c.default_expr.is_empty() {
            check_default_expr(&c.default_expr)?;
        }
    }
    for k in &rel.primary_key {
        if !names.contains(k.as_str()) {
            return Err(format!(
                "relation {}.{}: primary key column {k:?} is not one of its columns",
                rel.schema, rel.name
            ));
        }
    }
    Ok(())
}

/// The primary key a table created from `rel` gets: the catalog's when the relation carries
/// it (snapshots), else the replica identity's key columns for identity default or index.
pub fn primary_key(rel: &PgRelation) -> Vec<&str> {
    if !rel.primary_key.is_empty() {
        return rel.primary_key.iter().map(String::as_str).collect();
    }
    if rel.replica_identity == "d" || rel.replica_identity == "i" {
        return rel.columns.iter().filter(|c| c.key).map(|c| c.name.as_str()).collect();
    }
    Vec::new()
}

fn column_def(c: &PgColumn, with_constraints: bool) -> String {
    let mut s = format!("{} {}", ident(&c.name), c.type_name);
    if with_constraints {
        if c.not_null {
            s.push_str(" NOT NULL");
        }
        if !c.default_expr.is_empty() {
            s.push_str(" DEFAULT ");
            s.push_str(&c.default_expr);
        }
    }
    s
}

/// `CREATE TABLE` for `rel` (checked with [`check_relation`]).
pub fn create_table(rel: &PgRelation) -> String {
    let mut parts: Vec<String> = rel.columns.iter().map(|c| column_def(c, true)).collect();
    let pk = primary_key(rel);
    if !pk.is_empty() {
        parts.push(format!("PRIMARY KEY ({})", pk.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ")));
    }
    format!("CREATE TABLE {} ({})", qualified(&rel.schema, &rel.name), parts.join(", "))
}

/// `ADD COLUMN` clause for a column new to an existing table (no constraints: existing rows
/// would violate them). Existing rows get the value the source's rows that predate the
/// column hold, as a default (dropped again by [`drop_default`]).
pub fn add_column(c: &PgColumn) -> String {
    match &c.missing_value {
        Some(v) => format!("ADD COLUMN {} DEFAULT {}::{}", column_def(c, false), literal(v), c.type_name),
        None => format!("ADD COLUMN {}", column_def(c, false)),
    }
}

/// `ALTER COLUMN ... DROP DEFAULT` clause, after [`add_column`] gave existing rows a value.
pub fn drop_default(c: &PgColumn) -> String {
    format!("ALTER COLUMN {} DROP DEFAULT", ident(&c.name))
}

/// `ALTER COLUMN ... TYPE` clause converting through the text form.
pub fn alter_type(c: &PgColumn) -> String {
    format!("ALTER COLUMN {col} TYPE {t} USING CAST(CAST({col} AS text) AS {t})", col = ident(&c.name), t = c.type_name)
}

/// `COPY "s"."t" ("c1", ...) FROM STDIN` (text format).
pub fn copy_in(rel: &PgRelation) -> String {
    let table = qualified(&rel.schema, &rel.name);
    if rel.columns.is_empty() {
        return format!("COPY {table} FROM STDIN");
    }
    let cols: Vec<String> = rel.columns.iter().map(|c| ident(&c.name)).collect();
    format!("COPY {table} ({}) FROM STDIN", cols.join(", "))
}

/// `$n` parameter (sent as text) converted to the column's type.
fn param(n: usize, c: &PgColumn) -> String {
    format!("CAST(${n}::text AS {})", c.type_name)
}

/// How a row is found on the standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    /// By the replica identity's key columns (`col = value`).
    Key,
    /// By every column of the old row (replica identity full), comparing text forms (works for
    /// types without an equality operator, e.g. json or point) and treating NULLs as equal;
    /// only one row is touched even if several are identical.
    Full,
}

/// The WHERE condition for `cols` (indexes into the relation's columns), with parameters
/// numbered from `first`.
fn condition(rel: &PgRelation, cols: &[usize], first: usize, how: Match) -> String {
    let table = qualified(&rel.schema, &rel.name);
    let parts: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let col = &rel.columns[c];
            match how {
                Match::Key => format!("{} = {}", ident(&col.name), param(first + i, col)),
                Match::Full => format!(
                    "CAST({} AS text) IS NOT DISTINCT FROM CAST({} AS text)",
                    ident(&col.name),
                    param(first + i, col)
                ),
            }
        })
        .collect();
    let cond = if parts.is_empty() { "true".to_string() } else { parts.join(" AND ") };
    match how {
        Match::Key => cond,
        Match::Full => format!("ctid = (SELECT ctid FROM {table} WHERE {cond} LIMIT 1)"),
    }
}

/// `UPDATE` setting `set` from parameters `$1..` and finding the row by `by` from the
/// parameters after them.
pub fn update(rel: &PgRelation, set: &[usize], by: &[usize], how: Match) -> String {
    let assignments: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("{} = {}", ident(&rel.columns[c].name), param(i + 1, &rel.columns[c])))
        .collect();
    format!(
        "UPDATE {} SET {} WHERE {}",
        qualified(&rel.schema, &rel.name),
        assignments.join(", "),
        condition(rel, by, set.len() + 1, how)
    )
}

/// `INSERT` of `rows` rows of every column, from parameters `$1..` (row after row).
pub fn insert(rel: &PgRelation, rows: usize) -> String {
    let cols: Vec<String> = rel.columns.iter().map(|c| ident(&c.name)).collect();
    let n = rel.columns.len();
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let v: Vec<String> = rel.columns.iter().enumerate().map(|(i, c)| param(r * n + i + 1, c)).collect();
            format!("({})", v.join(", "))
        })
        .collect();
    format!("INSERT INTO {} ({}) VALUES {}", qualified(&rel.schema, &rel.name), cols.join(", "), values.join(", "))
}

/// Splits COPY text-format `data` into rows of `width` values (`None` for `\N`), undoing the
/// escapes the agent writes (`\\`, `\n`, `\r`, `\t`). `None` when the data holds anything
/// else (other escapes, a row of another width): the caller then COPYs it as it is.
pub fn parse_copy_rows(data: &[u8], width: usize) -> Option<Vec<Vec<Option<String>>>> {
    let mut rows = Vec::new();
    for line in data.strip_suffix(b"\n")?.split(|&b| b == b'\n') {
        let mut row = Vec::with_capacity(width);
        for field in line.split(|&b| b == b'\t') {
            if field == b"\\N" {
                row.push(None);
                continue;
            }
            let mut out = Vec::with_capacity(field.len());
            let mut it = field.iter();
            while let Some(&b) = it.next() {
                if b != b'\\' {
                    out.push(b);
                    continue;
                }
                out.push(match it.next()? {
                    b'\\' => b'\\',
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    _ => return None,
                });
            }
            row.push(Some(String::from_utf8(out).ok()?));
        }
        if row.len() != width {
            return None;
        }
        rows.push(row);
    }
    Some(rows)
}

/// `DELETE` finding the row by `by` from parameters `$1..`.
pub fn delete(rel: &PgRelation, by: &[usize], how: Match) -> String {
    format!("DELETE FROM {} WHERE {}", qualified(&rel.schema, &rel.name), condition(rel, by, 1, how))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn copy_rows() {
        assert_eq!(
            parse_copy_rows(b"1\ta\\tb\n2\t\\N\n", 2),
            Some(vec![vec![Some("1".into()), Some("a\tb".into())], vec![Some("2".into()), None]])
        );
        assert_eq!(parse_copy_rows(b"x\\\\N\n", 1), Some(vec![vec![Some("x\\N".into())]]));
        assert_eq!(parse_copy_rows(b"1\n", 2), None, "wrong width");
        assert_eq!(parse_copy_rows(b"\\101\n", 1), None, "escapes the agent does not write");
        assert_eq!(parse_copy_rows(b"1", 1), None, "unterminated");
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("a"), "\"a\"");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(qualified("s", "t"), "\"s\".\"t\"");
    }

    #[test]
    fn type_names() {
        for ok in [
            "integer",
            "numeric(10,2)",
            "text[]",
            "integer[3]",
            "timestamp(3) with time zone",
            "character varying(20)",
            "public.mood",
            "\"My \"\"Type\"\"\"[]",
            "interval day to second(3)",
            "double precision",
        ] {
            check_type_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "int) OR (true",
            "int; drop table x",
            "int, x int",
            "int + 1",
            "int(pg_read_file(1))",
            "\"unterminated",
            "int(",
            "int = 1",
            "int'x'",
        ] {
            assert!(check_type_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults() {
        for ok in ["0", "'a,b'::text", "now()", "nextval('s'::regclass)", "(1 + 2)", "'it''s'::text"] {
            check_default_expr(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["0, x int", "0); drop table t; --", "1 -- c", "(1", "1)", "'x", "$$x$$"] {
            assert!(check_default_expr(bad).is_err(), "{bad:?} accepted");
        }
    }
}

// ---------------------------------------------------------------- user-defined types

/// A token of the small SQL subset type definitions are checked in.
#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// A bare word (lowercased, as PostgreSQL folds it) or a quoted identifier (as written).
    Word {
        text: String,
        quoted: bool,
    },
    Str(String),
    Num,
    Punct(char),
    Op,
}

fn tokens(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '\'' | '"' => {
                let mut text = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated quote".into()),
                        Some('\0') => return Err("NUL".into()),
                        Some(q) if q == c && chars.peek() == Some(&c) => {
                            chars.next();
                            text.push(c);
                        }
                        Some(q) if q == c => break,
                        Some(other) => text.push(other),
                    }
                }
                out.push(if c == '\'' { Tok::Str(text) } else { Tok::Word { text, quoted: true } });
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut text = c.to_lowercase().to_string();
                while let Some(&n) = chars.peek() {
                    if n.is_alphanumeric() || n == '_' {
                        text.extend(n.to_lowercase());
                        chars.next();
                    } else if n == '$' {
                        return Err("'$' in a word".into());
                    } else {
                        break;
                    }
                }
                out.push(Tok::Word { text, quoted: false });
            }
            c if c.is_ascii_digit() => {
                while chars.peek().is_some_and(|n| n.is_ascii_alphanumeric() || *n == '.') {
                    chars.next();
                }
                out.push(Tok::Num);
            }
            '(' | ')' | '[' | ']' | ',' | '.' => out.push(Tok::Punct(c)),
            '-' if chars.peek() == Some(&'-') => return Err("comment".into()),
            '/' if chars.peek() == Some(&'*') => return Err("comment".into()),
            '+' | '-' | '*' | '/' | '<' | '>' | '=' | '~' | '!' | '@' | '#' | '%' | '^' | '&' | '|' | '?' | ':' => {
                out.push(Tok::Op)
            }
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

/// Functions a domain definition (its CHECK constraints and default) may call: side-effect
/// free, so evaluating them while applying changes can do nothing but compute.
const SAFE_FUNCTIONS: &[&str] = &[
    "abs",
    "array_length",
    "array_lower",
    "array_ndims",
    "array_upper",
    "bit_length",
    "btrim",
    "cardinality",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "clock_timestamp",
    "coalesce",
    "date_part",
    "date_trunc",
    "extract",
    "floor",
    "gen_random_uuid",
    "greatest",
    "isempty",
    "isfinite",
    "json_array_length",
    "json_typeof",
    "jsonb_array_length",
    "jsonb_typeof",
    "least",
    "left",
    "length",
    "lower",
    "lower_inf",
    "ltrim",
    "make_date",
    "mod",
    "nextval",
    "now",
    "nullif",
    "num_nonnulls",
    "num_nulls",
    "octet_length",
    "position",
    "regexp_like",
    "right",
    "round",
    "rtrim",
    "sign",
    "starts_with",
    "statement_timestamp",
    "strpos",
    "substr",
    "substring",
    "to_char",
    "to_date",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "trim",
    "trunc",
    "upper",
    "upper_inf",
];

/// Keywords and type names that may stand before a parenthesis without being a call.
const PAREN_WORDS: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "bit",
    "bpchar",
    "case",
    "cast",
    "char",
    "character",
    "check",
    "dec",
    "decimal",
    "default",
    "else",
    "float",
    "ilike",
    "in",
    "interval",
    "is",
    "like",
    "not",
    "numeric",
    "or",
    "row",
    "second",
    "similar",
    "some",
    "then",
    "time",
    "timestamp",
    "timestamptz",
    "timetz",
    "varbit",
    "varchar",
    "varying",
    "when",
    "with",
    "zone",
];

/// Parses `"schema"."name"` (or bare words) at the start of `toks`; returns it and the rest.
fn qualified_name(toks: &[Tok]) -> Option<((String, String), &[Tok])> {
    match toks {
        [Tok::Word { text: s, .. }, Tok::Punct('.'), Tok::Word { text: n, .. }, rest @ ..] => {
            Some(((s.clone(), n.clone()), rest))
        }
        _ => None,
    }
}

fn is_word(t: &Tok, w: &str) -> bool {
    matches!(t, Tok::Word { text, quoted: false } if text == w)
}

/// A string literal (standard_conforming_strings, the default since PostgreSQL 9.1).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Statements that make enum `q`, having labels `have` (in sort order), carry the source's
/// labels `want` (in order).
///
/// PostgreSQL never drops or reorders enum labels, so a standby label the source no longer has
/// was renamed there (`ALTER TYPE ... RENAME VALUE`, which renames the value of every row
/// holding it): it is renamed to the label the source has in its place — between the same
/// neighbours common to both, pairing them in order. The source's other new labels are then
/// added, each after its predecessor in `want` (or before its successor when it is first).
/// Empty when the labels already agree.
pub fn sync_enum_labels(q: &str, have: &[String], want: &[String]) -> Vec<String> {
    let mut have = have.to_vec();
    let mut out = Vec::new();
    // Labels both sides have, in an order both agree on: the fixed points between which
    // renames are looked for.
    let mut anchors: Vec<(usize, usize)> = Vec::new();
    for (w, label) in want.iter().enumerate() {
        if let Some(h) = have.iter().position(|l| l == label) {
            if anchors.last().is_none_or(|&(_, last)| h > last) {
                anchors.push((w, h));
            }
        }
    }
    let mut bounds = vec![(0, 0)];
    bounds.extend(anchors.iter().map(|&(w, h)| (w + 1, h + 1)));
    let mut ends: Vec<(usize, usize)> = anchors.clone();
    ends.push((want.len(), have.len()));
    for (&(w0, h0), &(w1, h1)) in bounds.iter().zip(&ends) {
        let gone: Vec<usize> = (h0..h1.max(h0)).filter(|&h| !want.contains(&have[h])).collect();
        let new: Vec<&String> = want[w0..w1.max(w0)].iter().filter(|l| !have.contains(l)).collect();
        for (&h, &label) in gone.iter().zip(&new) {
            out.push(format!("ALTER TYPE {q} RENAME VALUE {} TO {}", literal(&have[h]), literal(label)));
        }
        for (&h, &label) in gone.iter().zip(&new) {
            have[h] = label.clone();
        }
    }
    out.extend(add_enum_labels(q, &have, want));
    out
}

/// `ALTER TYPE q ADD VALUE` statements that give enum `q`, having labels `have`, every label
/// of `want` (the source's labels in order), each placed after its predecessor in `want` (or
/// before its successor when it is first). Labels `have` holds beyond `want` stay where they
/// are. Empty when nothing is missing.
pub fn add_enum_labels(q: &str, have: &[String], want: &[String]) -> Vec<String> {
    let mut present: Vec<&str> = have.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for (i, label) in want.iter().enumerate() {
        if present.contains(&label.as_str()) {
            continue;
        }
        let place = match i.checked_sub(1).map(|p| &want[p]) {
            Some(prev) => format!(" AFTER {}", literal(prev)),
            None => match want.iter().skip(1).find(|l| present.contains(&l.as_str())) {
                Some(next) => format!(" BEFORE {}", literal(next)),
                None => String::new(),
            },
        };
        out.push(format!("ALTER TYPE {q} ADD VALUE IF NOT EXISTS {}{place}", literal(label)));
        present.push(label);
    }
    out
}

/// Checks a type definition from the agent (`CREATE TYPE ... AS ENUM (...)` or `CREATE DOMAIN`)
/// for `schema.name` and returns the statement to run: enums are rebuilt from their labels;
/// domains may call only [`SAFE_FUNCTIONS`] (their CHECK constraints run while changes are
/// applied).
pub fn type_def(schema: &str, name: &str, create_sql: &str) -> Result<String, String> {
    let q = qualified(schema, name);
    if create_sql.len() > 16 * MAX_SQL_TEXT {
        return Err("definition too long".into());
    }
    let toks = tokens(create_sql)?;
    let (kind, rest) = match toks.as_slice() {
        [c, k, rest @ ..] if is_word(c, "create") && (is_word(k, "type") || is_word(k, "domain")) => (k, rest),
        _ => return Err("not a CREATE TYPE or CREATE DOMAIN statement".into()),
    };
    let Some(((s, n), rest)) = qualified_name(rest) else {
        return Err("the type name is not schema-qualified".into());
    };
    if s != schema || n != name {
        return Err(format!("it defines {} instead", qualified(&s, &n)));
    }
    if is_word(kind, "type") {
        let labels = match rest {
            [a, e, Tok::Punct('('), body @ .., Tok::Punct(')')] if is_word(a, "as") && is_word(e, "enum") => body,
            _ => return Err("only enum types (AS ENUM (...)) are created".into()),
        };
        let mut out = Vec::new();
        for (i, t) in labels.iter().enumerate() {
            match (i % 2, t) {
                (0, Tok::Str(l)) => out.push(literal(l)),
                (1, Tok::Punct(',')) => {}
                _ => return Err("enum labels must be string literals".into()),
            }
        }
        if labels.len() % 2 == 0 && !labels.is_empty() {
            return Err("enum labels must be string literals".into());
        }
        return Ok(format!("CREATE TYPE {q} AS ENUM ({})", out.join(", ")));
    }
    // Domains are run as sent, so they must have exactly the form the agent writes.
    let prefix = format!("CREATE DOMAIN {q} AS ");
    let Some(body) = create_sql.strip_prefix(prefix.as_str()) else {
        return Err(format!("a domain definition must begin with {prefix:?}"));
    };
    let rest = tokens(body)?;
    for (i, t) in rest.iter().enumerate() {
        let Tok::Word { text, quoted } = t else { continue };
        if rest.get(i + 1) != Some(&Tok::Punct('(')) {
            continue;
        }
        let qualified_call = i >= 2 && rest[i - 1] == Tok::Punct('.');
        let allowed = if qualified_call {
            matches!(&rest[i - 2], Tok::Word { text, .. } if text == "pg_catalog")
                && SAFE_FUNCTIONS.contains(&text.as_str())
        } else {
            SAFE_FUNCTIONS.contains(&text.as_str()) || (!quoted && PAREN_WORDS.contains(&text.as_str()))
        };
        if !allowed {
            return Err(format!("it calls {text}(), which is not known to be free of side effects"));
        }
    }
    Ok(create_sql.to_string())
}

#[cfg(test)]
mod type_defs {
    use super::type_def;

    #[test]
    fn enums_are_rebuilt() {
        assert_eq!(
            type_def("public", "mood", r#"CREATE TYPE "public"."mood" AS ENUM ('sad', 'it''s ok', 'happy')"#).unwrap(),
            r#"CREATE TYPE "public"."mood" AS ENUM ('sad', 'it''s ok', 'happy')"#
        );
        assert!(type_def("public", "mood", r#"CREATE TYPE "public"."other" AS ENUM ('a')"#).is_err());
        assert!(type_def("public", "mood", r#"CREATE TYPE "public"."mood" AS ENUM ('a'); DROP TABLE x"#).is_err());
        assert!(type_def("public", "mood", r#"CREATE TYPE "public"."mood" AS (a int)"#).is_err());
        assert!(type_def("public", "mood", r#"CREATE TYPE "public"."mood" AS ENUM ('a' 'b')"#).is_err());
    }

    #[test]
    fn domains_may_call_only_safe_functions() {
        let ok = r#"CREATE DOMAIN "app"."email" AS character varying(200) DEFAULT 'x'::character varying NOT NULL CONSTRAINT "email_check" CHECK (((VALUE)::text ~ '^[^@]+@'::text) AND (char_length((VALUE)::text) > 3))"#;
        assert_eq!(type_def("app", "email", ok).unwrap(), ok);
        let ok2 = r#"CREATE DOMAIN "public"."pos" AS numeric(10,2) CONSTRAINT "c" CHECK ((VALUE > (0)::numeric))"#;
        assert!(type_def("public", "pos", ok2).is_ok());
        for bad in [
            r#"CREATE DOMAIN "public"."d" AS integer CONSTRAINT "c" CHECK ((pg_terminate_backend(VALUE)))"#,
            r#"CREATE DOMAIN "public"."d" AS integer CONSTRAINT "c" CHECK (("pg_sleep"(VALUE) IS NULL))"#,
            r#"CREATE DOMAIN "public"."d" AS integer CONSTRAINT "c" CHECK ((evil.length(VALUE) > 0))"#,
            r#"CREATE DOMAIN "public"."d" AS integer CONSTRAINT "c" CHECK ((VALUE OPERATOR(pg_catalog.+) 1 > 0))"#,
            r#"CREATE DOMAIN "public"."d" AS integer; DROP TABLE t"#,
            r#"CREATE DOMAIN "public"."d" AS integer -- x"#,
            r#"CREATE DOMAIN "public"."e" AS integer"#,
        ] {
            assert!(type_def("public", "d", bad).is_err(), "{bad} accepted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{add_enum_labels, sync_enum_labels};

    fn v(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn enum_labels_are_added_in_the_sources_order() {
        let q = r#""public"."mood""#;
        assert!(add_enum_labels(q, &v(&["a", "b"]), &v(&["a", "b"])).is_empty());
        assert_eq!(
            add_enum_labels(q, &v(&["b", "d"]), &v(&["a", "b", "c", "d", "it's"])),
            [
                r#"ALTER TYPE "public"."mood" ADD VALUE IF NOT EXISTS 'a' BEFORE 'b'"#,
                r#"ALTER TYPE "public"."mood" ADD VALUE IF NOT EXISTS 'c' AFTER 'b'"#,
                r#"ALTER TYPE "public"."mood" ADD VALUE IF NOT EXISTS 'it''s' AFTER 'd'"#,
            ]
        );
        // Nothing to place against: appended.
        assert_eq!(
            add_enum_labels(q, &v(&[]), &v(&["y"])),
            [r#"ALTER TYPE "public"."mood" ADD VALUE IF NOT EXISTS 'y'"#]
        );
    }

    #[test]
    fn renamed_labels_are_renamed_not_added() {
        let q = r#""public"."mood""#;
        assert!(sync_enum_labels(q, &v(&["a", "b"]), &v(&["a", "b"])).is_empty());
        assert_eq!(
            sync_enum_labels(q, &v(&["sad", "ok", "happy"]), &v(&["sad", "fine", "happy"])),
            [r#"ALTER TYPE "public"."mood" RENAME VALUE 'ok' TO 'fine'"#]
        );
        // A rename at each end, and a label added next to a renamed one.
        assert_eq!(
            sync_enum_labels(q, &v(&["a", "b", "c"]), &v(&["A", "b", "C", "d"])),
            [
                r#"ALTER TYPE "public"."mood" RENAME VALUE 'a' TO 'A'"#,
                r#"ALTER TYPE "public"."mood" RENAME VALUE 'c' TO 'C'"#,
                r#"ALTER TYPE "public"."mood" ADD VALUE IF NOT EXISTS 'd' AFTER 'C'"#,
            ]
        );
        // Renamed and added between the same neighbours: paired in order.
        assert_eq!(
            sync_enum_labels(q, &v(&["a", "x", "z"]), &v(&["a", "y", "n", "z"])),
            [
                r#"ALTER TYPE "public"."mood" RENAME VALUE 'x' TO 'y'"#,
                r#"ALTER TYPE "public"."mood" ADD VALUE IF NOT EXISTS 'n' AFTER 'y'"#,
            ]
        );
    }
}
