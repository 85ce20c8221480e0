//! Putting a rendered recipe on this machine: directories and files with their owners and
//! modes, and one-shot steps run as their users.

use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context as _, bail};
use rigger_recipes::{Command, DirSpec, FileSpec, StepSpec};
use tokio::io::AsyncWriteExt as _;

/// Is rigger running as root (and so able to give files and processes to service users)?
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chown(path: &Path, owner: &str) -> anyhow::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let user = nix::unistd::User::from_name(owner)
        .with_context(|| format!("looking up user `{owner}`"))?
        .with_context(|| format!("user `{owner}` does not exist; is its package installed? (scripts/install-packages.sh)"))?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("giving {} to {owner}", path.display()))
}

pub fn ensure_dir(dir: &DirSpec) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir.path)
        .with_context(|| format!("creating {}", dir.path.display()))?;
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(dir.mode))
        .with_context(|| format!("setting the mode of {}", dir.path.display()))?;
    chown(&dir.path, &dir.owner)
}

/// Writes the file if its content, mode or owner differ; returns whether anything changed.
/// Created with its final mode before any byte is written, then renamed into place, so a
/// secret is never readable by others, even for an instant.
pub fn ensure_file(file: &FileSpec) -> anyhow::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let path = &file.path;
    if let Ok(existing) = std::fs::read(path) {
        let metadata = std::fs::metadata(path)?;
        let owner_ok = !is_root()
            || nix::unistd::User::from_name(&file.owner)
                .ok()
                .flatten()
                .is_some_and(|u| u.uid.as_raw() == metadata.uid());
        if existing == file.contents.as_bytes() && metadata.mode() & 0o7777 == file.mode && owner_ok
        {
            return Ok(false);
        }
    }
    let parent = path.parent().context("a file path has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let temporary = parent.join(format!(
        ".{}.rigger-tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&temporary);
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(file.mode)
        .open(&temporary)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut handle, file.contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    drop(handle);
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(file.mode))?;
    chown(&temporary, &file.owner)?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
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
    let mut log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
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
