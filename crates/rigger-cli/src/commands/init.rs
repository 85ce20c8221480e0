//! `rigger init`: write a commented starter configuration that validates.

use anyhow::{Context as _, anyhow};

use crate::args::InitArgs;
use crate::{Failure, Settings};

pub(crate) fn run(args: InitArgs, settings: &Settings) -> Result<(), Failure> {
    let InitArgs { name, force } = args;
    let path = &settings.config_path;
    if path.exists() && !force {
        return Err(Failure::Usage(anyhow!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        )));
    }
    let name = match name {
        Some(name) => name,
        None => project_name_from_directory(path),
    };
    let text = rigger_config::starter(&name);
    // The starter must itself be valid, or `init` would hand the user a broken file.
    rigger_config::parse(&text, &path.display().to_string()).map_err(|diagnostics| {
        Failure::Usage(anyhow!(
            "project name `{name}` is not valid:\n{diagnostics}"
        ))
    })?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    if settings.verbosity >= 0 {
        eprintln!(
            "wrote {}; next: `rigger validate`, then `rigger plan`",
            path.display()
        );
    }
    Ok(())
}

/// The directory holding the config file, lower-cased, with anything invalid turned into `-`.
fn project_name_from_directory(config_path: &std::path::Path) -> String {
    let directory = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(std::path::Path::to_path_buf)
        .or_else(|| std::env::current_dir().ok())
        .and_then(|p| std::fs::canonicalize(p).ok());
    let raw = directory
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches('-').to_owned();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name = format!("site-{name}").trim_end_matches('-').to_owned();
    }
    name.truncate(31);
    name.trim_end_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    use super::project_name_from_directory;

    #[test]
    fn directory_names_become_valid_project_names() {
        let dir = std::env::temp_dir().join("My_Site 2");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            project_name_from_directory(&dir.join("rigger.toml")),
            "my-site-2"
        );
        let dir = std::env::temp_dir().join("2fast");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            project_name_from_directory(&dir.join("rigger.toml")),
            "site-2fast"
        );
    }
}
