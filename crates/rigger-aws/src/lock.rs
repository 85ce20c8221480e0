//! The deploy lock on AWS: one deploy or database operation at a time per environment. It is
//! the object `deploy/lock.json` in the environment's bucket ([`crate::releases`]), holding the
//! [`LockHolder`] as JSON, and it changes only by S3's conditional requests, each a
//! compare-and-swap S3 decides on its side:
//!
//! - a free lock is taken with `PutObject` and `If-None-Match: *`, which fails (412) when the
//!   object exists: of any number of racing takers exactly one writes it;
//! - a stale lock is taken over, a held one renewed, and released, with `PutObject` or
//!   `DeleteObject` and `If-Match: <the ETag read or written last>`, which fails when the
//!   object changed since: two takers of the same stale lock cannot both replace it, a holder
//!   whose lock was taken over learns it at its next renewal instead of writing again, and a
//!   release deletes its own lock only. Every record carries a random id (and a renewal a new
//!   expiry), so no two writes have the same content, hence ETag: a changed lock never
//!   matches an old ETag again.
//!
//! S3 answers 409 (ConditionalRequestConflict) to a conditional request racing another on
//! the same key, and 404 to `If-Match` on a missing object: like 412, they mean "look again".
//! Conditional deletes came to general purpose buckets in September 2025; moto 5.2 implements
//! all three conditions.
//!
//! [`LockKeeper`] renews a held lock every [`LOCK_RENEWAL`] from the moment it is taken (before
//! the upload and the migrations, through the rollout) until it is released, from a thread and
//! a connection pool of its own, so it keeps renewing whatever its caller's runtime does
//! (blocks on SSH, is dropped and replaced).

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use rigger_plan::deploys::{LOCK_RENEWAL, LOCK_TTL, LockHolder};

use crate::Clients;
use crate::environment::AwsEnvironment;
use crate::error::{AwsError, Context as _, ErrorKind};

/// The lock's key in the environment's bucket.
pub const LOCK_KEY: &str = "deploy/lock.json";

/// How many times taking, renewing or releasing looks again after losing a race (each loss is
/// another caller's progress, so this bounds a storm, not a wait).
const ATTEMPTS: usize = 8;

/// Who asks for the deploy lock: `user@host`, the asking process, and how to tell whether a
/// process of this host still runs (a lock whose holder ended on this host is taken over at
/// once: its operation was interrupted).
#[derive(Debug, Clone)]
pub struct Requester {
    pub who: String,
    pub pid: i32,
    pub process_alive: fn(i32) -> bool,
}

impl Requester {
    fn host(&self) -> &str {
        rigger_plan::deploys::host_of(&self.who)
    }
}

/// The lock as its holder knows it: the record, where it is, and the version of the object the
/// holder wrote last (S3's ETag), which every later change is conditional on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLock {
    pub holder: LockHolder,
    pub bucket: String,
    etag: String,
}

/// The lock, taken.
#[derive(Debug, Clone)]
pub struct Acquired {
    pub lock: HeldLock,
    /// The stale lock this one replaced: an operation that was interrupted (its process ended,
    /// or its lock expired).
    pub interrupted: Option<LockHolder>,
}

/// The lock object as read: its holder (`None` when unreadable) and version.
struct Current {
    holder: Option<LockHolder>,
    etag: String,
}

impl Current {
    fn describe(&self) -> String {
        self.holder
            .as_ref()
            .map_or_else(|| "an unreadable record".to_owned(), LockHolder::to_string)
    }
}

fn location(bucket: &str) -> String {
    format!("s3://{bucket}/{LOCK_KEY}")
}

/// The environment's bucket, which holds the lock.
async fn lock_bucket(env: &AwsEnvironment, clients: &Clients) -> Result<String, AwsError> {
    crate::releases::find(env, clients).await?.ok_or_else(|| {
        AwsError::precondition(
            "(deploy lock)",
            env.parameter(crate::releases::BUCKET_PARAMETER),
            "the environment has no bucket, which holds its deploy lock",
            "run `rigger up` first",
        )
    })
}

/// Did a conditional request fail on its condition (rather than for another reason)?
fn condition_failed(error: &AwsError) -> bool {
    matches!(
        error.code(),
        Some("PreconditionFailed" | "ConditionalRequestConflict" | "NoSuchKey")
    )
}

async fn read(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<Option<Current>, AwsError> {
    let answer = match s3
        .get_object()
        .bucket(bucket)
        .key(LOCK_KEY)
        .send()
        .await
        .op("GetObject", location(bucket))
    {
        Ok(answer) => answer,
        Err(error) if error.kind() == ErrorKind::NotFound || error.code() == Some("NoSuchKey") => {
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    let etag = answer.e_tag().unwrap_or_default().to_owned();
    let body = answer.body.collect().await.map_err(|e| {
        AwsError::precondition(
            "GetObject",
            location(bucket),
            format!("reading the lock: {e}"),
            "run the command again",
        )
    })?;
    Ok(Some(Current {
        holder: serde_json::from_slice(&body.into_bytes()).ok(),
        etag,
    }))
}

/// What a conditional write requires of the object.
enum Condition<'a> {
    Absent,
    Version(&'a str),
}

/// Writes `holder` if `condition` holds; its new ETag, `None` when the condition failed.
async fn write(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    holder: &LockHolder,
    condition: Condition<'_>,
) -> Result<Option<String>, AwsError> {
    let body = serde_json::to_vec(holder).expect("serializable");
    let put = s3
        .put_object()
        .bucket(bucket)
        .key(LOCK_KEY)
        .content_type("application/json")
        .body(body.into());
    let put = match condition {
        Condition::Absent => put.if_none_match("*"),
        Condition::Version(etag) => put.if_match(etag),
    };
    match put.send().await.op("PutObject", location(bucket)) {
        Ok(answer) => Ok(Some(answer.e_tag().unwrap_or_default().to_owned())),
        Err(error) if condition_failed(&error) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Deletes the lock if it is still version `etag`; whether it did.
async fn delete(s3: &aws_sdk_s3::Client, bucket: &str, etag: &str) -> Result<bool, AwsError> {
    match s3
        .delete_object()
        .bucket(bucket)
        .key(LOCK_KEY)
        .if_match(etag)
        .send()
        .await
        .op("DeleteObject", location(bucket))
    {
        Ok(_) => Ok(true),
        Err(error) if condition_failed(&error) => Ok(false),
        Err(error) => Err(error),
    }
}

/// The lock's holder, if anyone holds it.
pub async fn lock_holder(
    env: &AwsEnvironment,
    clients: &Clients,
) -> Result<Option<LockHolder>, AwsError> {
    let Some(bucket) = crate::releases::find(env, clients).await? else {
        return Ok(None);
    };
    Ok(read(&clients.s3, &bucket)
        .await?
        .and_then(|current| current.holder))
}

/// Takes the lock for `operation`; refuses, naming the holder and its id, when someone holds a
/// lock that is not stale (an expired one, or one whose process ended on this host, is taken
/// over and returned as `interrupted`).
pub async fn acquire_lock(
    env: &AwsEnvironment,
    clients: &Clients,
    requester: &Requester,
    operation: &str,
    now: u64,
) -> Result<Acquired, AwsError> {
    let bucket = lock_bucket(env, clients).await?;
    let holder = LockHolder::new(
        crate::releases::random_bytes()?,
        &requester.who,
        requester.pid,
        operation,
        now,
    );
    for _ in 0..ATTEMPTS {
        if let Some(etag) = write(&clients.s3, &bucket, &holder, Condition::Absent).await? {
            return Ok(Acquired {
                lock: HeldLock {
                    holder,
                    bucket,
                    etag,
                },
                interrupted: None,
            });
        }
        let Some(current) = read(&clients.s3, &bucket).await? else {
            continue; // released meanwhile
        };
        if let Some(other) = &current.holder
            && !other.is_stale(now, requester.host(), requester.process_alive)
        {
            return Err(AwsError::precondition(
                "PutObject",
                location(&bucket),
                format!("the deploy lock is held by {other}"),
                format!(
                    "wait for it to finish; `rigger lock release` removes the lock once its \
                     holder is gone (expired, or its process ended), `rigger lock release --id \
                     {}` even while it is not",
                    other.id
                ),
            ));
        }
        // Stale or unreadable: replaced only if it is still the version just read.
        let replaced = Condition::Version(&current.etag);
        if let Some(etag) = write(&clients.s3, &bucket, &holder, replaced).await? {
            return Ok(Acquired {
                lock: HeldLock {
                    holder,
                    bucket,
                    etag,
                },
                interrupted: current.holder,
            });
        }
    }
    Err(AwsError::precondition(
        "PutObject",
        location(&bucket),
        format!("the deploy lock changed hands {ATTEMPTS} times while rigger tried to take it"),
        "run the command again",
    ))
}

/// Renews `held` to `now` + [`LOCK_TTL`]: the renewed lock, or why it is no longer ours.
async fn renew(
    s3: &aws_sdk_s3::Client,
    held: &HeldLock,
    now: u64,
) -> Result<Result<HeldLock, String>, AwsError> {
    let renewed = LockHolder {
        expires: now + LOCK_TTL.as_secs(),
        ..held.holder.clone()
    };
    for _ in 0..ATTEMPTS {
        let ours = Condition::Version(&held.etag);
        if let Some(etag) = write(s3, &held.bucket, &renewed, ours).await? {
            return Ok(Ok(HeldLock {
                holder: renewed,
                bucket: held.bucket.clone(),
                etag,
            }));
        }
        match read(s3, &held.bucket).await? {
            // Unchanged: the condition lost a race with a request that changed nothing.
            Some(current) if current.etag == held.etag => {}
            Some(current) => {
                return Ok(Err(format!(
                    "the deploy lock is now held by {}",
                    current.describe()
                )));
            }
            None => return Ok(Err("the deploy lock was released by someone else".into())),
        }
    }
    Err(AwsError::precondition(
        "PutObject",
        location(&held.bucket),
        format!("renewing the deploy lock lost {ATTEMPTS} races"),
        "it is renewed again at the next interval",
    ))
}

/// Pushes the expiry of `held` (the caller's lock) to `now` + [`LOCK_TTL`]; refuses when the
/// lock is no longer the caller's (it was taken over, or released by someone else).
pub async fn renew_lock(
    clients: &Clients,
    held: &HeldLock,
    now: u64,
) -> Result<HeldLock, AwsError> {
    renew(&clients.s3, held, now).await?.map_err(|lost| {
        AwsError::precondition(
            "PutObject",
            location(&held.bucket),
            lost,
            "check `rigger lock status`; this operation goes on, but is no longer exclusive",
        )
    })
}

/// Deletes `held` if it is still the lock (compare-and-delete); whether it was.
async fn release(s3: &aws_sdk_s3::Client, held: &HeldLock) -> Result<bool, AwsError> {
    for _ in 0..ATTEMPTS {
        if delete(s3, &held.bucket, &held.etag).await? {
            return Ok(true);
        }
        match read(s3, &held.bucket).await? {
            Some(current) if current.etag == held.etag => {}
            _ => return Ok(false),
        }
    }
    Err(AwsError::precondition(
        "DeleteObject",
        location(&held.bucket),
        format!("releasing the deploy lock lost {ATTEMPTS} races"),
        "`rigger lock status` shows it; `rigger lock release --id ID` removes it",
    ))
}

/// Releases `held` if it is still the caller's lock; whether it was (a lock taken over since
/// is left to its new holder).
pub async fn release_lock(clients: &Clients, held: &HeldLock) -> Result<bool, AwsError> {
    release(&clients.s3, held).await
}

/// `rigger lock release [--id ID]`: removes the lock if [`LockHolder::may_release`] allows it
/// (with `--id`, only that lock; without, only a stale one), by compare-and-delete; returns
/// what it removed, `None` when the lock was free.
pub async fn release_lock_by_id(
    env: &AwsEnvironment,
    clients: &Clients,
    id: Option<&str>,
    requester: &Requester,
    now: u64,
) -> Result<Option<String>, AwsError> {
    let Some(bucket) = crate::releases::find(env, clients).await? else {
        return Ok(None);
    };
    for _ in 0..ATTEMPTS {
        let Some(current) = read(&clients.s3, &bucket).await? else {
            return Ok(None);
        };
        let allowed = match (&current.holder, id) {
            (Some(holder), _) => {
                holder.may_release(id, now, requester.host(), requester.process_alive)
            }
            (None, Some(_)) => Err(
                "the deploy lock is an unreadable record, which has no id: `rigger lock \
                 release` without --id removes it"
                    .to_owned(),
            ),
            (None, None) => Ok(()),
        };
        if let Err(refused) = allowed {
            return Err(AwsError::precondition(
                "DeleteObject",
                location(&bucket),
                refused,
                "`rigger lock status` shows the lock",
            ));
        }
        if delete(&clients.s3, &bucket, &current.etag).await? {
            return Ok(Some(current.describe()));
        }
        // Renewed or replaced since it was read: decide again.
    }
    Err(AwsError::precondition(
        "DeleteObject",
        location(&bucket),
        format!("the deploy lock changed {ATTEMPTS} times while rigger released it"),
        "run the command again",
    ))
}

/// What the keeper's thread and its owner share.
#[derive(Debug)]
struct Kept {
    held: HeldLock,
    /// Why the lock is no longer ours, once a renewal found it taken over or released.
    lost: Option<String>,
}

/// Keeps a held lock alive: renews it every `every` from a thread of its own, from the moment
/// it is taken until [`LockKeeper::release`]. Dropped without a release, it stops renewing and
/// leaves the lock, as a killed process would (the next operation takes it over: at once from
/// this host, after its expiry from another).
pub struct LockKeeper {
    kept: Arc<Mutex<Kept>>,
    /// Sent: stop and release; dropped: stop and leave the lock.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The release's result.
    released: Option<tokio::sync::oneshot::Receiver<Result<bool, AwsError>>>,
}

impl std::fmt::Debug for LockKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockKeeper")
            .field("kept", &self.kept)
            .finish_non_exhaustive()
    }
}

impl LockKeeper {
    /// Starts renewing `held` every `every`.
    pub fn start(
        clients: &Clients,
        held: HeldLock,
        every: Duration,
    ) -> Result<LockKeeper, AwsError> {
        let kept = Arc::new(Mutex::new(Kept { held, lost: None }));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (done, released) = tokio::sync::oneshot::channel();
        // Connections of its own: the caller's pool may belong to a runtime that ends first.
        let s3 = clients.separate_s3();
        let keeping = Arc::clone(&kept);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                AwsError::precondition(
                    "(deploy lock)",
                    "renewal",
                    format!("starting the renewal's runtime: {e}"),
                    "run the command again",
                )
            })?;
        std::thread::Builder::new()
            .name("deploy-lock".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let release = loop {
                        tokio::select! {
                            stop = &mut stopped => break stop.is_ok(),
                            () = tokio::time::sleep(every) => {}
                        }
                        let held = keeping
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .held
                            .clone();
                        match renew(&s3, &held, rigger_engine::clock::unix_now()).await {
                            Ok(Ok(renewed)) => {
                                keeping.lock().unwrap_or_else(|e| e.into_inner()).held = renewed;
                            }
                            Ok(Err(lost)) => {
                                tracing::warn!(
                                    "lost the deploy lock: {lost}; this operation goes on, but \
                                     is no longer exclusive"
                                );
                                keeping.lock().unwrap_or_else(|e| e.into_inner()).lost = Some(lost);
                                break (&mut stopped).await.is_ok();
                            }
                            // Renewed again at the next interval (the lock lives 30 minutes).
                            Err(error) => {
                                tracing::warn!("could not renew the deploy lock: {error}");
                            }
                        }
                    };
                    if release {
                        let (held, lost) = {
                            let kept = keeping.lock().unwrap_or_else(|e| e.into_inner());
                            (kept.held.clone(), kept.lost.is_some())
                        };
                        let result = if lost {
                            Ok(false)
                        } else {
                            self::release(&s3, &held).await
                        };
                        let _ = done.send(result);
                    }
                });
            })
            .map_err(|e| {
                AwsError::precondition(
                    "(deploy lock)",
                    "renewal",
                    format!("starting the renewal's thread: {e}"),
                    "run the command again",
                )
            })?;
        Ok(LockKeeper {
            kept,
            stop: Some(stop),
            released: Some(released),
        })
    }

    /// The lock as it is now (its expiry moves with each renewal).
    pub fn holder(&self) -> LockHolder {
        self.held().holder
    }

    /// The lock and its current version.
    pub fn held(&self) -> HeldLock {
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .clone()
    }

    /// Why the lock is no longer ours, once a renewal found it taken over or released.
    pub fn lost(&self) -> Option<String> {
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lost
            .clone()
    }

    /// Stops renewing (after a renewal under way) and deletes the lock if it is still ours;
    /// whether it was.
    pub async fn release(mut self) -> Result<bool, AwsError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let released = self.released.take().expect("released once");
        released.await.unwrap_or_else(|_| {
            Err(AwsError::precondition(
                "(deploy lock)",
                "renewal",
                "the lock's renewal ended before releasing it",
                "`rigger lock status` shows the lock; `rigger lock release --id ID` removes it",
            ))
        })
    }
}
