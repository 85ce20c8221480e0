//! `rigger db status`, written once for every provider: what the primary says of its
//! replicas (one SQL statement, [`REPLICATION_STATUS_SQL`]), the replicas the environment has
//! that the primary does not see streaming, and each app server's PgBouncer pools. A provider
//! says which database servers there are and runs the statement and PgBouncer's `SHOW POOLS`
//! ([`DatabaseView`]); the parsing and the shape of the answer are here.

use std::future::Future;

/// `rigger db status`: the primary, each replica (state, lag in bytes and seconds, slot),
/// and each PgBouncer's client and server connections.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DbStatus {
    pub primary: Option<String>,
    pub replicas: Vec<DbReplica>,
    pub pgbouncers: Vec<PgBouncerPools>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DbReplica {
    pub id: String,
    pub state: String,
    pub lag_bytes: Option<i64>,
    /// `replay_lag` while WAL is left to replay, 0 once everything is replayed (so an idle
    /// primary does not look lagged).
    pub lag_seconds: Option<f64>,
    pub slot: Option<String>,
    pub slot_active: Option<bool>,
}

impl DbReplica {
    /// A replica known to the environment whose state is `state` and nothing else is known.
    pub fn unseen(id: &str, state: &str) -> DbReplica {
        DbReplica {
            id: id.to_owned(),
            state: state.to_owned(),
            lag_bytes: None,
            lag_seconds: None,
            slot: None,
            slot_active: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PgBouncerPools {
    pub server: String,
    pub client_connections: i64,
    pub server_connections: i64,
    pub error: Option<String>,
}

/// A database server as the environment knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseServer {
    /// What PostgreSQL knows it by (`application_name`, its slot): its recipe id.
    pub id: String,
    /// What rigger shows and selects it by (the same locally; on AWS the name it has now,
    /// which after a failover differs from its recipe id).
    pub name: String,
}

/// How a provider reaches its databases and pools for [`db_status`].
pub trait DatabaseView: Send {
    type Error: Send;

    /// One SQL statement as the superuser on a database server (by name); its output, rows
    /// `|`-separated (psql `-XAtq -F '|'`).
    fn query(
        &mut self,
        server: &str,
        sql: &str,
    ) -> impl Future<Output = Result<String, Self::Error>> + Send;
    /// PgBouncer's `SHOW POOLS` on every web and worker server: each server with its rows
    /// (`|`-separated), or why it could not be asked.
    fn show_pools(&mut self) -> impl Future<Output = Vec<(String, Result<String, String>)>> + Send;
}

/// The primary's view of its replicas, with every replica of the environment listed (by its
/// name; `not streaming` when the primary does not see it), and every pool's connections.
pub async fn db_status<T: DatabaseView>(
    view: &mut T,
    primary: Option<&DatabaseServer>,
    replicas: &[DatabaseServer],
) -> Result<DbStatus, T::Error> {
    let mut seen = match primary {
        Some(primary) => parse_replicas(&view.query(&primary.name, REPLICATION_STATUS_SQL).await?),
        None => Vec::new(),
    };
    for replica in replicas {
        match seen.iter_mut().find(|r| r.id == replica.id) {
            Some(row) => row.id.clone_from(&replica.name),
            None => seen.push(DbReplica::unseen(&replica.name, "not streaming")),
        }
    }
    let pgbouncers = view
        .show_pools()
        .await
        .into_iter()
        .map(|(server, rows)| {
            let (client_connections, server_connections) =
                rows.as_deref().map_or((0, 0), pool_counts);
            PgBouncerPools {
                server,
                client_connections,
                server_connections,
                error: rows.err(),
            }
        })
        .collect();
    Ok(DbStatus {
        primary: primary.map(|p| p.name.clone()),
        replicas: seen,
        pgbouncers,
    })
}

/// Waits (bounded, looking every `poll`) until each of `replicas` streams from `primary`:
/// what a reseed ends with on every provider, so that it returns a copy that follows the
/// primary, not one still connecting or catching up. A query that fails (a primary busy for a
/// moment) counts as not yet; what it waits for is said whenever it changes.
pub async fn wait_streaming<T: DatabaseView>(
    view: &mut T,
    primary: &DatabaseServer,
    replicas: &[DatabaseServer],
    poll: std::time::Duration,
    timeout: std::time::Duration,
    progress: &dyn crate::progress::Progress,
) -> Result<(), String> {
    let started = tokio::time::Instant::now();
    let mut said = String::new();
    loop {
        let seen = view
            .query(&primary.name, REPLICATION_STATUS_SQL)
            .await
            .map(|rows| parse_replicas(&rows));
        let waiting: Vec<String> = replicas
            .iter()
            .filter_map(|replica| {
                let state = match &seen {
                    Ok(rows) => rows
                        .iter()
                        .find(|row| row.id == replica.id)
                        .map_or("not connected", |row| row.state.as_str()),
                    Err(_) => "unknown: the primary did not answer",
                };
                (state != "streaming").then(|| format!("{} ({state})", replica.name))
            })
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let line = format!(
            "waiting for {} to stream from {}",
            waiting.join(", "),
            primary.name
        );
        if line != said {
            progress.report(&line);
            said = line;
        }
        if started.elapsed() >= timeout {
            return Err(format!("after {} s, still {said}", timeout.as_secs()));
        }
        tokio::time::sleep(poll).await;
    }
}

/// What the primary says of its replicas, one `|`-separated row each (psql `-XAtq -F '|'`):
/// name, state, lag in bytes and in seconds, slot and whether it is active. Both providers ask
/// it ([`parse_replicas`] reads the answer). The lag in seconds is `replay_lag` while the
/// replica has WAL left to replay, and 0 once it has replayed everything: PostgreSQL keeps
/// showing the last measured `replay_lag` for a while after the primary goes idle, which would
/// make an idle primary look lagged.
pub const REPLICATION_STATUS_SQL: &str = "SELECT r.application_name, r.state, COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn), 0)::bigint, \
     CASE WHEN r.replay_lsn >= pg_current_wal_lsn() THEN 0 ELSE COALESCE(EXTRACT(EPOCH FROM r.replay_lag), 0) END::float8, \
     s.slot_name, s.active \
     FROM pg_stat_replication r LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid ORDER BY 1";

/// The rows of [`REPLICATION_STATUS_SQL`]; malformed lines are skipped.
pub fn parse_replicas(rows: &str) -> Vec<DbReplica> {
    rows.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('|').collect();
            let [id, state, bytes, seconds, slot, active] = fields[..] else {
                return None;
            };
            Some(DbReplica {
                id: id.to_owned(),
                state: state.to_owned(),
                lag_bytes: bytes.parse().ok(),
                lag_seconds: seconds.parse().ok(),
                slot: (!slot.is_empty()).then(|| slot.to_owned()),
                slot_active: (!active.is_empty()).then_some(active == "t"),
            })
        })
        .collect()
}

/// Client and server connections in PgBouncer's `SHOW POOLS` (psql `-XAtq -F '|'`), summed
/// over its pools. Columns: database|user|cl_active|cl_waiting|cl_active_cancel_req|
/// cl_waiting_cancel_req|sv_active|sv_active_cancel|sv_being_canceled|sv_idle|sv_used|
/// sv_tested|sv_login|...
pub fn pool_counts(rows: &str) -> (i64, i64) {
    let (mut clients, mut servers) = (0, 0);
    for line in rows.lines() {
        let numbers: Vec<i64> = line
            .split('|')
            .skip(2)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if numbers.len() >= 11 {
            clients += numbers[0] + numbers[1];
            servers += numbers[4..11].iter().sum::<i64>();
        }
    }
    (clients, servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary that sees `db-replica2` streaming (shown as `db-replica1` after a failover
    /// renamed it) and two app servers, one of which cannot be asked.
    struct Recorded {
        asked: Vec<String>,
    }

    impl DatabaseView for Recorded {
        type Error = String;

        async fn query(&mut self, server: &str, sql: &str) -> Result<String, String> {
            assert_eq!(sql, REPLICATION_STATUS_SQL);
            self.asked.push(server.to_owned());
            Ok("db-replica2|streaming|0|0|rigger_db_replica2|t\n".into())
        }

        async fn show_pools(&mut self) -> Vec<(String, Result<String, String>)> {
            vec![
                (
                    "web-1".into(),
                    Ok("surveys|surveys|3|1|0|0|2|0|0|4|0|0|0|0|0|0|0|session\n".into()),
                ),
                ("worker-1".into(), Err("connection refused".into())),
            ]
        }
    }

    fn server(id: &str, name: &str) -> DatabaseServer {
        DatabaseServer {
            id: id.into(),
            name: name.into(),
        }
    }

    #[tokio::test]
    async fn replicas_by_their_names_the_unseen_ones_not_streaming_and_every_pool() {
        let mut view = Recorded { asked: Vec::new() };
        let status = db_status(
            &mut view,
            Some(&server("db-replica1", "db-primary")),
            &[
                server("db-replica2", "db-replica1"),
                server("db-replica3", "db-replica2"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(view.asked, ["db-primary"]);
        assert_eq!(status.primary.as_deref(), Some("db-primary"));
        let replicas: Vec<(&str, &str, Option<bool>)> = status
            .replicas
            .iter()
            .map(|r| (r.id.as_str(), r.state.as_str(), r.slot_active))
            .collect();
        assert_eq!(
            replicas,
            [
                ("db-replica1", "streaming", Some(true)),
                ("db-replica2", "not streaming", None)
            ]
        );
        assert_eq!(
            status.pgbouncers,
            [
                PgBouncerPools {
                    server: "web-1".into(),
                    client_connections: 4,
                    server_connections: 6,
                    error: None,
                },
                PgBouncerPools {
                    server: "worker-1".into(),
                    client_connections: 0,
                    server_connections: 0,
                    error: Some("connection refused".into()),
                },
            ]
        );
    }

    #[tokio::test]
    async fn without_a_primary_nothing_is_asked_of_postgresql() {
        let mut view = Recorded { asked: Vec::new() };
        let status = db_status(&mut view, None, &[server("db-replica1", "db-replica1")])
            .await
            .unwrap();
        assert!(view.asked.is_empty());
        assert_eq!(status.replicas[0].state, "not streaming");
    }

    /// A primary whose answers are scripted, one per query (the last one for ever).
    struct Scripted(std::collections::VecDeque<Result<&'static str, String>>);

    impl DatabaseView for Scripted {
        type Error = String;

        async fn query(&mut self, _server: &str, _sql: &str) -> Result<String, String> {
            let answer = if self.0.len() > 1 {
                self.0.pop_front().unwrap()
            } else {
                self.0.front().cloned().unwrap()
            };
            answer.map(str::to_owned)
        }

        async fn show_pools(&mut self) -> Vec<(String, Result<String, String>)> {
            Vec::new()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebuilt_replica_is_waited_for_until_it_streams() {
        let mut view = Scripted(
            [
                Err("connection refused".into()),
                Ok(""),
                Ok("db-replica2|catchup|9000|1|rigger_db_replica2|t\n"),
                Ok("db-replica2|streaming|0|0|rigger_db_replica2|t\n"),
            ]
            .into(),
        );
        let lines = std::sync::Mutex::new(Vec::new());
        let progress = |line: &str| lines.lock().unwrap().push(line.to_owned());
        let started = tokio::time::Instant::now();
        wait_streaming(
            &mut view,
            &server("db-primary", "db-primary"),
            &[server("db-replica2", "db-replica2")],
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
            &progress,
        )
        .await
        .unwrap();
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(3));
        assert_eq!(
            lines.into_inner().unwrap(),
            [
                "waiting for db-replica2 (unknown: the primary did not answer) to stream from db-primary",
                "waiting for db-replica2 (not connected) to stream from db-primary",
                "waiting for db-replica2 (catchup) to stream from db-primary",
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_that_never_streams_times_out_exactly_saying_its_state() {
        let mut view = Scripted([Ok("db-replica1|startup|0|0||f\n")].into());
        let started = tokio::time::Instant::now();
        let error = wait_streaming(
            &mut view,
            &server("db-primary", "db-primary"),
            &[server("db-replica1", "db-replica1")],
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(30),
            &crate::progress::Silent,
        )
        .await
        .unwrap_err();
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(30));
        assert_eq!(
            error,
            "after 30 s, still waiting for db-replica1 (startup) to stream from db-primary"
        );
    }
}
