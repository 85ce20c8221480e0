//! `rigger.toml`: parsing, validation with located diagnostics, and the validated model.
//!
//! Everything else in rigger reads its configuration through [`load`] (or the pure [`parse`])
//! and gets a [`Config`] whose values have all been checked and defaulted, so no other crate
//! validates or applies defaults. When the file is wrong, the error is [`Diagnostics`]: every
//! problem of the file at once, each pointing at the offending text with a `help:` line, rendered
//! like rustc's errors. Start reading at [`parse`]; the walk over the document is in
//! `validate.rs`, the types in `model.rs`, and docs/config.md describes the format for users.
//!
//! Architecture invariant: nothing here does I/O except [`load`], which only reads the file.

mod cidr;
mod defaults;
mod diagnostic;
mod model;
mod rules;
mod starter;
mod suggest;
mod syntax;
mod validate;

use std::path::{Path, PathBuf};

pub use cidr::CidrError;
pub use diagnostic::{Diagnostic, Diagnostics};
pub use model::{
    AwsConfig, Bastion, CacheConfig, Cidr, Config, DatabaseConfig, Environment, GroupSizing, Hsts,
    KeyPair, LaunchKind, LoadBalancerKind, LocalConfig, Project, ProviderConfig, ProviderKind,
};
pub use starter::starter;

/// Why [`load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("could not read `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config; displays every diagnostic, without color.
    #[error(transparent)]
    Invalid(Diagnostics),
}

/// Parses and validates the text of a `rigger.toml`. `file_name` is only used in diagnostics.
///
/// On error, [`Diagnostics`] holds every problem found in the file; a TOML syntax error stops
/// the parser, so it is then the only one.
pub fn parse(source: &str, file_name: &str) -> Result<Config, Diagnostics> {
    let items = match toml_edit::Document::parse(source) {
        Err(err) => vec![syntax::diagnose(&err, source)],
        Ok(doc) => match validate::validate(&doc) {
            Ok(config) => return Ok(config),
            Err(items) => items,
        },
    };
    Err(Diagnostics::new(file_name, source, items))
}

/// Reads the file at `path` and [`parse`]s it, naming it in diagnostics as `path` is written.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let source = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(&source, &path.display().to_string()).map_err(LoadError::Invalid)
}
