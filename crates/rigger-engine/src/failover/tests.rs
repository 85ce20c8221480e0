//! The failover flow against a recorded cluster, on tokio's paused clock.

use super::*;

/// A primary, a replica and app servers' pools, recording every step.
struct Cluster {
    log: Vec<String>,
    /// App servers whose pool cannot be paused.
    pause_fails_on: Vec<String>,
    /// How long pausing takes (every pool, together).
    pause_takes: Duration,
    /// The replica has replayed the primary's position from this check on (`None`: never).
    caught_up_at_check: Option<u32>,
    replay_checks: u32,
    primary_reachable: bool,
    lag_bytes: i64,
    promote_fails: bool,
    switch_fails: bool,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            log: Vec::new(),
            pause_fails_on: Vec::new(),
            pause_takes: Duration::from_millis(50),
            caught_up_at_check: Some(3),
            replay_checks: 0,
            primary_reachable: true,
            lag_bytes: 0,
            promote_fails: false,
            switch_fails: false,
        }
    }
}

impl FailoverTarget for Cluster {
    type Error = String;
    type Switched = &'static str;

    async fn pause_pools(&mut self) -> Vec<String> {
        tokio::time::sleep(self.pause_takes).await;
        self.log.push("pause".into());
        self.pause_fails_on
            .iter()
            .map(|server| format!("{server}: connection refused"))
            .collect()
    }

    async fn resume_pools(&mut self, reconnect: bool) -> Vec<String> {
        self.log.push(if reconnect {
            "resume, reconnecting".into()
        } else {
            "resume".into()
        });
        Vec::new()
    }

    async fn query(&mut self, server: &str, sql: &str) -> Result<String, String> {
        let primary = server == "db-primary";
        if primary && !self.primary_reachable {
            self.log.push(format!("{server}: unreachable"));
            return Err("connection refused".into());
        }
        if sql == sql::CURRENT_WAL_POSITION {
            self.log.push(format!("{server}: position"));
            return Ok("0/3000060\n".into());
        }
        if sql == sql::PROMOTE_IF_IN_RECOVERY {
            self.log.push(format!("{server}: promote"));
            return if self.promote_fails {
                Err("timed out".into())
            } else {
                Ok("t".into())
            };
        }
        if sql.contains("pg_last_wal_replay_lsn") {
            assert!(sql.contains("'0/3000060'::pg_lsn"), "{sql}");
            self.replay_checks += 1;
            let caught_up = self
                .caught_up_at_check
                .is_some_and(|at| self.replay_checks >= at);
            return Ok(if caught_up { "t" } else { "f" }.into());
        }
        if sql == sql::LAST_RECEIVED {
            self.log.push(format!("{server}: received"));
            return Ok("0/3000060 12\n".into());
        }
        if sql.contains("pg_stat_replication") {
            assert!(sql.contains("'db-replica1'"), "{sql}");
            self.log.push(format!("{server}: lag"));
            return Ok(self.lag_bytes.to_string());
        }
        panic!("unexpected SQL on {server}: {sql}");
    }

    async fn promoting(&mut self) -> Result<(), String> {
        self.log.push("recorded".into());
        Ok(())
    }

    async fn switch(&mut self) -> Result<&'static str, String> {
        self.log.push("switch".into());
        if self.switch_fails {
            Err("stopping the old primary: timed out".into())
        } else {
            Ok("fenced db-primary")
        }
    }

    async fn repoint(&mut self) -> Result<(), String> {
        self.log.push("repoint".into());
        Ok(())
    }

    fn report(&mut self, _message: &str) {}
}

fn planned() -> Failover {
    Failover {
        primary: Some("db-primary".into()),
        replica: "db-replica1".into(),
        replica_application_name: "db-replica1".into(),
        force: false,
    }
}

#[tokio::test(start_paused = true)]
async fn a_planned_failover_waits_for_the_replica_then_promotes_switches_repoints_and_resumes() {
    let mut cluster = Cluster::default();
    let promoted = promote(&mut cluster, &planned()).await.unwrap();
    assert_eq!(
        cluster.log,
        [
            "pause",
            "db-primary: position",
            "recorded",
            "db-replica1: promote",
            "switch",
            "repoint",
            "resume, reconnecting",
        ]
    );
    assert_eq!(cluster.replay_checks, 3);
    assert_eq!(promoted.switched, "fenced db-primary");
    assert_eq!(promoted.lost, "");
    // Pausing, then two polls until the third check says caught up.
    assert_eq!(
        promoted.writes_held,
        Duration::from_millis(50) + 2 * CATCH_UP_POLL
    );
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_cannot_be_paused_stops_a_planned_failover_before_anything_changes() {
    let mut cluster = Cluster {
        pause_fails_on: vec!["web-2".into()],
        ..Cluster::default()
    };
    let error = promote(&mut cluster, &planned()).await.unwrap_err();
    let why = error.why.as_str();
    assert!(!error.changed, "{error:?}");
    assert_eq!(
        why,
        "pausing PgBouncer failed on: web-2: connection refused; nothing was changed, writes resumed"
    );
    assert_eq!(cluster.log, ["pause", "resume"]);
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_does_not_catch_up_in_time_is_not_promoted() {
    let mut cluster = Cluster {
        caught_up_at_check: None,
        ..Cluster::default()
    };
    let started = Instant::now();
    let error = promote(&mut cluster, &planned()).await.unwrap_err();
    let why = error.why.as_str();
    assert!(!error.changed, "{error:?}");
    assert_eq!(
        why,
        "db-replica1 did not replay up to 0/3000060 within 15 s; nothing was changed, writes resumed"
    );
    assert_eq!(cluster.log, ["pause", "db-primary: position", "resume"]);
    let waited = started.elapsed();
    assert!(
        waited > CATCH_UP_TIMEOUT && waited <= CATCH_UP_TIMEOUT + 2 * CATCH_UP_POLL,
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn no_promotion_without_time_left_to_fence_before_the_pools_resume_by_themselves() {
    // Pausing took so long that the deadlines could resume writes onto the old primary while
    // it is being promoted and fenced.
    let mut cluster = Cluster {
        pause_takes: PAUSE_DEADLINE - PROMOTE_BUDGET,
        ..Cluster::default()
    };
    let error = promote(&mut cluster, &planned()).await.unwrap_err();
    let why = error.why.as_str();
    assert!(!error.changed, "{error:?}");
    assert!(
        why.starts_with("pausing and catching up took 60 s of the pools' 120 s pause deadline"),
        "{why}"
    );
    assert!(
        why.ends_with("nothing was changed, writes resumed"),
        "{why}"
    );
    assert!(!cluster.log.iter().any(|step| step.ends_with("promote")));
}

#[tokio::test(start_paused = true)]
async fn a_failed_promotion_changes_nothing() {
    let mut cluster = Cluster {
        promote_fails: true,
        ..Cluster::default()
    };
    let error = promote(&mut cluster, &planned()).await.unwrap_err();
    let why = error.why.as_str();
    assert!(!error.changed, "{error:?}");
    assert_eq!(
        why,
        "promoting db-replica1: timed out; nothing was changed, writes resumed"
    );
    assert_eq!(cluster.log.last().unwrap(), "resume");
    assert!(!cluster.log.contains(&"switch".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_forced_failover_with_the_primary_gone_goes_on_and_says_writes_may_be_lost() {
    let mut cluster = Cluster {
        primary_reachable: false,
        pause_fails_on: vec!["web-1".into()],
        caught_up_at_check: None,
        ..Cluster::default()
    };
    let failover = Failover {
        force: true,
        ..planned()
    };
    let promoted = promote(&mut cluster, &failover).await.unwrap();
    assert_eq!(
        cluster.log,
        [
            "pause",
            "db-primary: unreachable",
            "db-replica1: received",
            "recorded",
            "db-replica1: promote",
            "switch",
            "repoint",
            "resume, reconnecting",
        ]
    );
    assert_eq!(
        promoted.lost,
        "the primary could not be asked how far behind the replica was; the replica had \
         received WAL up to 0/3000060, its last replayed transaction 12 s before this promotion: \
         the writes it acknowledged after that may be lost"
    );
    // With the primary still answering, it says how much.
    let mut cluster = Cluster {
        lag_bytes: 8192,
        ..Cluster::default()
    };
    let promoted = promote(&mut cluster, &failover).await.unwrap();
    assert_eq!(
        promoted.lost,
        "the replica was 8192 bytes of WAL behind: writes after that point are lost"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failover_cut_off_after_fencing_is_finished_by_running_it_again() {
    // The primary was fenced; the replica may or may not be promoted yet.
    let mut cluster = Cluster::default();
    let failover = Failover {
        primary: None,
        ..planned()
    };
    let promoted = promote(&mut cluster, &failover).await.unwrap();
    assert_eq!(
        cluster.log,
        [
            "pause",
            "recorded",
            "db-replica1: promote",
            "switch",
            "repoint",
            "resume, reconnecting"
        ]
    );
    assert_eq!(promoted.lost, "");
}

#[tokio::test(start_paused = true)]
async fn after_the_promotion_the_pools_resume_even_when_switching_fails() {
    let mut cluster = Cluster {
        switch_fails: true,
        ..Cluster::default()
    };
    let error = promote(&mut cluster, &planned()).await.unwrap_err();
    let why = error.why.as_str();
    assert!(error.changed, "{error:?}");
    assert!(
        why.starts_with("db-replica1 is promoted, but fencing the old primary"),
        "{why}"
    );
    assert!(
        why.ends_with("run `rigger db promote` again to finish"),
        "{why}"
    );
    assert_eq!(
        &cluster.log[cluster.log.len() - 2..],
        ["switch", "resume, reconnecting"]
    );
}
