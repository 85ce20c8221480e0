//! Deploys' records, shared by both providers. [`LockHolder`]: which lock (a random id), who
//! holds it, from where, since when, for what, and until when (the local provider keeps it in
//! the state directory, the AWS provider as an object in the environment's bucket; both change
//! it only by compare-and-swap, decide staleness with [`LockHolder::is_stale`] and what
//! `rigger lock release [--id ID]` may remove with [`LockHolder::may_release`]).
//! [`DeployRecord`]: one deploy in the environment's history (`rigger releases`), and
//! [`rollback_target`]: which release `rigger rollback` goes to.
//!
//! Pure like the rest of this crate: the clock, the host name and "is this process alive" are
//! the caller's arguments.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a deploy lock lives unless renewed: long enough for a deploy, short enough that a
/// lock left by a machine that vanished does not block the team for long.
pub const LOCK_TTL: Duration = Duration::from_secs(30 * 60);

/// How often a holder pushes its lock's expiry forward, from the moment it takes the lock until
/// it releases it: well within [`LOCK_TTL`], so a long build, migration or rollout never looks
/// abandoned.
pub const LOCK_RENEWAL: Duration = Duration::from_secs(5 * 60);

/// Who holds the deploy lock, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// Random, one per acquisition (kept when renewed): what `rigger lock release --id`
    /// names, and what makes two holders' records differ even when everything else is equal.
    #[serde(default)]
    pub id: String,
    /// `user@host`.
    pub who: String,
    /// The holder's process on its host.
    #[serde(default)]
    pub pid: i32,
    /// What they are doing: `deploy 20261127T204012Z-1a2b3c4d5e6f`.
    pub operation: String,
    /// Unix seconds.
    pub since: u64,
    /// Unix seconds after which the lock is stale, whoever holds it.
    pub expires: u64,
}

impl LockHolder {
    /// A lock for `operation` taken at `now` by process `pid` of `who`, for [`LOCK_TTL`];
    /// `random` (from the system's random source: this crate does no I/O) becomes its id.
    pub fn new(random: [u8; 8], who: &str, pid: i32, operation: &str, now: u64) -> LockHolder {
        LockHolder {
            id: random.iter().map(|b| format!("{b:02x}")).collect(),
            who: who.to_owned(),
            pid,
            operation: operation.to_owned(),
            since: now,
            expires: now + LOCK_TTL.as_secs(),
        }
    }

    /// Is the holder gone? Past its expiry, or its process no longer runs on this host
    /// (`this_host`, where `process_alive` can tell). A holder on another host is trusted
    /// until it expires.
    pub fn is_stale(&self, now: u64, this_host: &str, process_alive: impl Fn(i32) -> bool) -> bool {
        let host = host_of(&self.who);
        let same_host = !host.is_empty() && host == this_host;
        now >= self.expires || (same_host && !process_alive(self.pid))
    }

    /// May `rigger lock release` remove this lock? With `--id`, exactly when the id is this
    /// lock's (a live holder is never removed otherwise); without, only when it is stale (an
    /// expired lock or a dead process on this host, which the next deploy would take over
    /// anyway). The refusal says who holds it and the `--id` to pass.
    pub fn may_release(
        &self,
        id: Option<&str>,
        now: u64,
        this_host: &str,
        process_alive: impl Fn(i32) -> bool,
    ) -> Result<(), String> {
        match id {
            Some(id) if id == self.id => Ok(()),
            Some(id) => Err(format!(
                "the deploy lock is held by {self}, not by lock {id}: nothing released \
                 (`rigger lock status` shows the current one)"
            )),
            None if self.is_stale(now, this_host, process_alive) => Ok(()),
            None => Err(format!(
                "the deploy lock is held by {self}, which is not known to be gone (it has not \
                 expired{}). If it must stop being exclusive anyway: `rigger lock release --id {}`",
                if host_of(&self.who) == this_host {
                    " and its process still runs"
                } else {
                    ""
                },
                self.id
            )),
        }
    }
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) since {} UTC, for `{}`; expires at {} UTC; lock id {}",
            self.who,
            self.pid,
            utc_timestamp(self.since),
            self.operation,
            utc_timestamp(self.expires),
            self.id
        )
    }
}

/// One deploy in the environment's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub release: String,
    pub revision: String,
    pub by: String,
    /// Unix seconds.
    pub started: u64,
    pub finished: u64,
    /// `succeeded`, `rolled back`, `failed`, `interrupted`.
    pub result: String,
    #[serde(default)]
    pub reason: String,
}

/// One database operation (`db promote`, `db reseed`) in an environment's history, as
/// [`DeployRecord`] is one deploy: what `rigger db history` lists, an interrupted one too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRecord {
    /// `db promote`, `db reseed`.
    pub operation: String,
    /// The server it was asked for (`db-replica1`); empty when none was named.
    #[serde(default)]
    pub server: String,
    pub by: String,
    /// Unix seconds.
    pub started: u64,
    pub finished: u64,
    /// `succeeded`, `failed`, `interrupted`.
    pub result: String,
    #[serde(default)]
    pub reason: String,
}

/// The release `up` starts an environment with (the working tree when it was first brought
/// up), before any deploy: it is in no history, and a rollback may go back to it.
pub const INITIAL_RELEASE: &str = "initial";

/// Why [`rollback_target`] found no release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRollbackTarget {
    /// `--to ID` names a release that was never deployed here.
    NotInHistory(String),
    /// Nothing ran before the current release.
    NothingBefore(String),
}

impl NoRollbackTarget {
    /// What is wrong.
    pub fn problem(&self) -> String {
        match self {
            NoRollbackTarget::NotInHistory(id) => {
                format!("release {id} was never deployed to this environment")
            }
            NoRollbackTarget::NothingBefore(current) => {
                format!("no release before {current} to roll back to")
            }
        }
    }

    /// What to do.
    pub fn help(&self) -> &'static str {
        match self {
            NoRollbackTarget::NotInHistory(_) => "`rigger releases` lists them",
            NoRollbackTarget::NothingBefore(_) => {
                "`rigger releases` lists them, `--to ID` picks one"
            }
        }
    }
}

impl std::fmt::Display for NoRollbackTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.problem(), self.help())
    }
}

/// The release `rigger rollback` goes to, the same rule on every provider: `to` when given
/// (a release of the history, or [`INITIAL_RELEASE`]); otherwise the last release that
/// succeeded before `current` was first deployed (the initial one counting as succeeded
/// first), so that rolling back twice goes further back instead of forward again to the
/// release the first rollback left. When `current` is in no successful record (a deploy cut
/// off, or one that failed), the last release that succeeded is the one to go back to.
pub fn rollback_target(
    history: &[DeployRecord],
    current: &str,
    to: Option<&str>,
) -> Result<String, NoRollbackTarget> {
    if let Some(id) = to {
        return if id == INITIAL_RELEASE || history.iter().any(|r| r.release == id) {
            Ok(id.to_owned())
        } else {
            Err(NoRollbackTarget::NotInHistory(id.to_owned()))
        };
    }
    let mut succeeded: Vec<&str> = std::iter::once(INITIAL_RELEASE)
        .chain(
            history
                .iter()
                .filter(|r| r.result == "succeeded")
                .map(|r| r.release.as_str()),
        )
        .collect();
    succeeded.dedup();
    let before = match succeeded.iter().position(|id| *id == current) {
        Some(index) => &succeeded[..index],
        None => &succeeded[..],
    };
    before
        .iter()
        .rev()
        .find(|id| **id != current)
        .map(|id| (*id).to_owned())
        .ok_or_else(|| NoRollbackTarget::NothingBefore(current.to_owned()))
}

/// The host of `user@host` (empty without one).
pub fn host_of(who: &str) -> &str {
    who.rsplit_once('@').map_or("", |(_, host)| host)
}

/// Unix seconds as `YYYYMMDDTHHMMSSZ` (UTC): release ids and the times rigger prints.
pub fn utc_timestamp(unix_seconds: u64) -> String {
    let (year, month, day, seconds) = civil(unix_seconds);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        seconds / 3600,
        (seconds % 3600) / 60,
        seconds % 60
    )
}

/// Unix seconds as ISO 8601 `YYYY-MM-DDTHH:MM:SSZ` (UTC), as AWS APIs write times.
pub fn utc_iso8601(unix_seconds: u64) -> String {
    let (year, month, day, seconds) = civil(unix_seconds);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        (seconds % 3600) / 60,
        seconds % 60
    )
}

/// (year, month, day, seconds into the day) of a Unix time, by Howard Hinnant's
/// civil-from-days.
fn civil(unix_seconds: u64) -> (i64, i64, i64, u64) {
    let days = i64::try_from(unix_seconds / 86_400).unwrap_or(0);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, unix_seconds % 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployed(release: &str, result: &str) -> DeployRecord {
        DeployRecord {
            release: release.into(),
            revision: String::new(),
            by: "alice@laptop".into(),
            started: 0,
            finished: 0,
            result: result.into(),
            reason: String::new(),
        }
    }

    #[test]
    fn a_rollback_goes_to_the_last_release_that_succeeded_before_the_current_one() {
        let history = [
            deployed("r1", "succeeded"),
            deployed("r2", "rolled back"),
            deployed("r3", "succeeded"),
            deployed("r4", "succeeded"),
            // A rollback to r3 is recorded as a deploy of r3.
            deployed("r3", "succeeded"),
        ];
        let target = |current, to| rollback_target(&history, current, to);
        // After rolling back to r3, the next rollback goes to what ran before that r3: r1
        // (r2 never served).
        assert_eq!(target("r3", None), Ok("r1".into()));
        assert_eq!(target("r4", None), Ok("r3".into()));
        assert_eq!(target("r1", None), Ok(INITIAL_RELEASE.into()));
        assert_eq!(
            target(INITIAL_RELEASE, None),
            Err(NoRollbackTarget::NothingBefore(INITIAL_RELEASE.into()))
        );
        // A current release no success records (its deploy was cut off): the last good one.
        assert_eq!(target("r5", None), Ok("r3".into()));
        assert_eq!(target("r4", Some("r2")), Ok("r2".into()));
        assert_eq!(target("r4", Some("initial")), Ok("initial".into()));
        assert_eq!(
            target("r4", Some("r9")),
            Err(NoRollbackTarget::NotInHistory("r9".into()))
        );
        assert!(
            target("r4", Some("r9"))
                .unwrap_err()
                .to_string()
                .contains("`rigger releases` lists them")
        );
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "19700101T000000Z");
        assert_eq!(utc_timestamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_timestamp(1_795_811_084), "20261127T202444Z");
    }

    #[test]
    fn a_lock_of_a_dead_process_on_this_host_is_stale() {
        let holder = LockHolder::new([0; 8], "ann@build-1", 4242, "deploy x", 100);
        assert!(holder.is_stale(101, "build-1", |_| false));
        assert!(!holder.is_stale(101, "build-1", |pid| pid == 4242));
        // Another host's process cannot be checked: trusted until it expires.
        assert!(!holder.is_stale(101, "laptop", |_| false));
        assert!(holder.is_stale(100 + LOCK_TTL.as_secs(), "laptop", |_| true));
    }

    #[test]
    fn the_holder_is_described_with_utc_times() {
        let holder = LockHolder::new(
            [0x0f, 1, 2, 3, 4, 5, 6, 0xff],
            "ann@build-1",
            7,
            "deploy 20261127T202444Z-abc",
            0,
        );
        assert_eq!(
            holder.to_string(),
            "ann@build-1 (pid 7) since 19700101T000000Z UTC, for `deploy 20261127T202444Z-abc`; expires at 19700101T003000Z UTC; lock id 0f010203040506ff"
        );
    }

    #[test]
    fn a_live_lock_is_released_only_by_its_id_and_a_stale_one_without() {
        let holder = LockHolder::new([7; 8], "ann@build-1", 4242, "deploy x", 100);
        let alive = |pid: i32| pid == 4242;
        // Live, on another host or this one: refused without the id, naming the id to pass.
        for host in ["laptop", "build-1"] {
            let refused = holder.may_release(None, 101, host, alive).unwrap_err();
            assert!(refused.contains("held by ann@build-1"), "{refused}");
            assert!(
                refused.contains("`rigger lock release --id 0707070707070707`"),
                "{refused}"
            );
        }
        assert_eq!(
            holder.may_release(Some("0707070707070707"), 101, "laptop", alive),
            Ok(())
        );
        // Another id (the lock changed hands since it was looked at): refused.
        let other = holder
            .may_release(Some("0808080808080808"), 101, "laptop", alive)
            .unwrap_err();
        assert!(other.contains("not by lock 0808080808080808"), "{other}");
        // Stale: expired, or its process gone on this host.
        let expired = 100 + LOCK_TTL.as_secs();
        assert_eq!(holder.may_release(None, expired, "laptop", alive), Ok(()));
        assert_eq!(holder.may_release(None, 101, "build-1", |_| false), Ok(()));
        // A stale lock is still not removed by someone else's id.
        assert!(
            holder
                .may_release(Some("0808080808080808"), expired, "laptop", alive)
                .is_err()
        );
    }
}
