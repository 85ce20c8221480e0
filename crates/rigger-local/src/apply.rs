//! Putting a rendered recipe on this machine: directories and files with their owners and
//! modes, and one-shot steps run as their users.
//!
//! Directories and files are reached and changed through handles ([`crate::safe_fs`]), never
//! by path twice: some live in directories service users own, and a symbolic link planted
//! there must not turn root's `chmod`, `chown` or write onto a file of root's.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context as _, bail};
use rigger_recipes::{Command, DirSpec, FileSpec, StepSpec};
use tokio::io::AsyncWriteExt as _;

use crate::safe_fs;

/// Is rigger running as root (and so able to give files and processes to service users)?
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The user and group ids `owner` (a user, or `user:group`) stands for when rigger is root;
/// without a group, the user's primary group (of the same name for service users). `None`
/// when rigger is not root and so cannot give files away.
pub fn owner_ids(owner: &str) -> anyhow::Result<Option<safe_fs::Owner>> {
    if !is_root() {
        return Ok(None);
    }
    let (user_name, group_name) = owner
        .split_once(':')
        .map_or((owner, None), |(user, group)| (user, Some(group)));
    let user = nix::unistd::User::from_name(user_name)
        .with_context(|| format!("looking up user `{user_name}`"))?
        .with_context(|| format!("user `{user_name}` does not exist; is its package installed? (scripts/install-packages.sh)"))?;
    let gid = match group_name {
        None => user.gid,
        Some(group_name) => {
            nix::unistd::Group::from_name(group_name)
                .with_context(|| format!("looking up group `{group_name}`"))?
                .with_context(|| format!("group `{group_name}` does not exist; is its package installed? (scripts/install-packages.sh)"))?
                .gid
        }
    };
    Ok(Some((user.uid, gid)))
}

pub fn ensure_dir(dir: &DirSpec) -> anyhow::Result<()> {
    let owner = owner_ids(&dir.owner)?;
    let handle = safe_fs::Dir::create(&dir.path)
        .with_context(|| format!("creating {}", dir.path.display()))?;
    handle.set_owner_and_mode(owner, dir.mode).with_context(|| {
        format!(
            "giving {} to {} with mode {:04o}",
            dir.path.display(),
            dir.owner,
            dir.mode
        )
    })
}

/// Writes the file if its content, mode or owner differ; returns whether anything changed.
/// Written whole to a new private file beside it, given its owner and mode, then renamed into
/// place, so a secret is never readable by others, even for an instant.
pub fn ensure_file(file: &FileSpec) -> anyhow::Result<bool> {
    let path = &file.path;
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        bail!("{} is not a file path", path.display());
    };
    let owner = owner_ids(&file.owner)?;
    let dir =
        safe_fs::Dir::create(parent).with_context(|| format!("creating {}", parent.display()))?;
    if let Some((existing, metadata)) = dir.read_file(name)? {
        let owner_ok = owner.is_none_or(|(uid, gid)| {
            metadata.st_uid == uid.as_raw() && metadata.st_gid == gid.as_raw()
        });
        if existing == file.contents.as_bytes()
            && metadata.st_mode & 0o7777 == file.mode
            && owner_ok
        {
            return Ok(false);
        }
    }
    dir.write_file(name, file.contents.as_bytes(), file.mode, owner)?;
    Ok(true)
}

/// Runs a step unless what it creates already exists. The output goes to `log`; a failure
/// quotes its last lines.
pub async fn run_step(step: &StepSpec, log: &Path) -> anyhow::Result<bool> {
    if let Some(creates) = &step.creates
        && creates.exists()
    {
        return Ok(false);
    }
    run_command(&step.command, step.stdin_file.as_deref(), log)
        .await
        .with_context(|| format!("step `{}`", step.name))?;
    Ok(true)
}

/// Runs `command` to completion as its user, with exactly its environment (plus a PATH).
pub async fn run_command(
    command: &Command,
    stdin_file: Option<&Path>,
    log: &Path,
) -> anyhow::Result<()> {
    let mut process = match (&command.user, is_root()) {
        (Some(user), true) => {
            let user_record = nix::unistd::User::from_name(user)?
                .with_context(|| format!("user `{user}` does not exist"))?;
            let mut process = tokio::process::Command::new("setpriv");
            process
                .arg(format!("--reuid={}", user_record.uid))
                .arg(format!("--regid={}", user_record.gid))
                .arg("--init-groups")
                .arg("--")
                .arg(&command.program);
            process
        }
        _ => tokio::process::Command::new(&command.program),
    };
    process.args(&command.args).env_clear().envs(&command.env);
    if !command.env.contains_key("PATH") {
        process.env("PATH", crate::process::DEFAULT_PATH);
    }
    if let Some(cwd) = &command.cwd {
        process.current_dir(cwd);
    }
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)?;
    }
    process.stdin(if stdin_file.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    process
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = process
        .spawn()
        .with_context(|| format!("starting `{command}`"))?;
    if let Some(path) = stdin_file {
        let input = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut stdin = child.stdin.take().context("stdin is piped")?;
        stdin.write_all(&input).await?;
        drop(stdin);
    }
    let output = child.wait_with_output().await?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let mut log_file = crate::files::open_private_log(log)?;
    std::io::Write::write_all(&mut log_file, format!("$ {command}\n{text}").as_bytes())?;
    if !output.status.success() {
        let tail: Vec<&str> = text
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "`{command}` failed ({}):\n  {}",
            output.status,
            tail.join("\n  ")
        );
    }
    Ok(())
}
