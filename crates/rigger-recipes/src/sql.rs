//! SQL built from values: one quoting discipline for every statement rigger sends to
//! PostgreSQL, whether a template renders it (the `sql_literal`/`sql_ident` filters) or an
//! operation formats it (failover, lag, replication slots).
//!
//! A value never goes into SQL bare or with characters stripped: it is a literal
//! ([`quote_literal`]) or an identifier ([`quote_ident`]), quoted as PostgreSQL's own
//! `quote_literal()`/`quote_ident()` do, so no value can end its literal and add SQL of its own,
//! whatever `standard_conforming_strings` says. Values rigger reads from elsewhere (a replica's
//! id from AWS tags, an LSN printed by the primary) are no exception.

/// `value` as an SQL string literal: in single quotes with `'` doubled; when it holds a
/// backslash, as an escape string (`E'...'`) with `\` doubled too, so the text is the same
/// with `standard_conforming_strings` on or off (what PostgreSQL's `quote_literal()` does).
pub fn quote_literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', r"\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// `value` as an SQL quoted identifier: in double quotes with `"` doubled. Always quoted, so
/// the name is taken as written (case and all) and is never a keyword.
pub fn quote_ident(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// Whether `lsn` is a WAL position as PostgreSQL prints one (`hex/hex`).
pub fn is_lsn(lsn: &str) -> bool {
    lsn.split_once('/').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.len() <= 8
            && b.len() <= 8
            && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
    })
}

/// SQL that promotes a server only while it is still in recovery (waiting up to 30 s for the
/// promotion): asked again after an interrupted failover, it does nothing and says `t`.
pub const PROMOTE_IF_IN_RECOVERY: &str = "SELECT CASE WHEN pg_is_in_recovery() \
     THEN pg_promote(wait => true, wait_seconds => 30) ELSE true END";

/// SQL asked of the primary: its current WAL position (`hex/hex`).
pub const CURRENT_WAL_POSITION: &str = "SELECT pg_current_wal_lsn()";

/// SQL asked of a replica: whether it has replayed up to `lsn` (`t` or `f`). `None` when
/// `lsn` is not a WAL position (`hex/hex`): what the primary printed is then not a position,
/// and the caller says so rather than asking.
pub fn replayed_up_to(lsn: &str) -> Option<String> {
    is_lsn(lsn).then(|| {
        format!(
            "SELECT pg_last_wal_replay_lsn() >= {}::pg_lsn",
            quote_literal(lsn)
        )
    })
}

/// SQL asked of a replica whose primary is gone: the last WAL position it received and how
/// many seconds before now it replayed its last transaction (empty when it never replayed
/// one), as `0/3000060 12`: what a forced failover tells of the writes that may be lost.
pub const LAST_RECEIVED: &str = "SELECT pg_last_wal_receive_lsn() || ' ' || \
     COALESCE(floor(extract(epoch FROM now() - pg_last_xact_replay_timestamp()))::text, '')";

/// SQL asked of the primary: how many bytes of WAL the replica streaming as
/// `application_name` (its server id) has yet to replay; no row when it is not streaming.
pub fn replica_lag_bytes(application_name: &str) -> String {
    format!(
        "SELECT COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint \
         FROM pg_stat_replication WHERE application_name = {}",
        quote_literal(application_name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `sql` as PostgreSQL's lexer would into text outside literals and the literals'
    /// values (standard strings, and `E'...'` escape strings with `\` escapes).
    fn literals(sql: &str) -> (String, Vec<String>) {
        let mut outside = String::new();
        let mut values = Vec::new();
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            let escape = (c == 'E' || c == 'e') && chars.peek() == Some(&'\'');
            if c != '\'' && !escape {
                outside.push(c);
                continue;
            }
            if escape {
                chars.next();
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => panic!("unterminated literal in {sql}"),
                    Some('\\') if escape => value.push(chars.next().expect("escaped char")),
                    Some('\'') if chars.peek() == Some(&'\'') => {
                        chars.next();
                        value.push('\'');
                    }
                    Some('\'') => break,
                    Some(other) => value.push(other),
                }
            }
            values.push(value);
        }
        (outside, values)
    }

    const HOSTILE: &[&str] = &[
        "db-replica1",
        "x'; DROP TABLE t; --",
        "x\\'; DROP TABLE t; --",
        "x\\",
        "'",
        "''",
        "\\'",
        "it's\nnew line",
        "\"quoted\"",
        "",
    ];

    #[test]
    fn a_hostile_value_cannot_end_its_literal() {
        for value in HOSTILE {
            let sql = replica_lag_bytes(value);
            let (outside, values) = literals(&sql);
            assert_eq!(values, [value.to_string()], "{sql}");
            assert_eq!(
                outside,
                "SELECT COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint \
                 FROM pg_stat_replication WHERE application_name = ",
                "{sql}"
            );
        }
    }

    #[test]
    fn literals_match_postgresqls_quote_literal() {
        assert_eq!(quote_literal("db-replica1"), "'db-replica1'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        // A backslash would escape the closing quote with standard_conforming_strings off.
        assert_eq!(quote_literal(r"x\"), r"E'x\\'");
        assert_eq!(quote_literal(r"x\'; --"), r"E'x\\''; --'");
        assert_eq!(quote_literal(""), "''");
    }

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("surveys"), "\"surveys\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_ident("select"), "\"select\"");
    }

    #[test]
    fn only_a_wal_position_is_asked_about() {
        assert_eq!(
            replayed_up_to("0/3000148").as_deref(),
            Some("SELECT pg_last_wal_replay_lsn() >= '0/3000148'::pg_lsn")
        );
        for bad in [
            "",
            "0/",
            "/1",
            "x/1",
            "0/1'; DROP TABLE t; --",
            "ERROR",
            "0/1/2",
            "123456789/1",
        ] {
            assert_eq!(replayed_up_to(bad), None, "{bad}");
        }
    }
}
