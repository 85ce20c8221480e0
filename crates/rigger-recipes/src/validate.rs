//! Checks on a [`ServerContext`] before anything is rendered: every value that lands in a
//! config file must not be able to change that file's structure (a `;` in an nginx path, a
//! newline in a password, a quote in a database name). Templates can then insert values
//! without quoting each one for each format.

use std::path::Path;

use crate::error::RenderError;
use crate::{Peer, ServerContext};

pub(crate) fn context(ctx: &ServerContext) -> Result<(), RenderError> {
    name_id("server_id", &ctx.server_id)?;
    let peers = &ctx.peers;
    let all_peers = std::iter::once(&peers.db_primary)
        .chain(&peers.db_replicas)
        .chain(&peers.web_backends);
    for Peer { id, .. } in all_peers {
        name_id("peers.id", id)?;
    }

    for (field, path) in ctx.layout.named_paths() {
        safe_path(field, path)?;
    }
    for (field, user) in ctx.layout.users.named() {
        check(
            field,
            user,
            "a user name (a-z, 0-9, `_`, `-`)",
            |s| s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_'),
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-',
        )?;
    }

    let p = &ctx.project;
    name_id("project.name", &p.name)?;
    name_id("project.environment", &p.environment)?;
    for (field, value) in [
        ("project.wsgi_module", &p.wsgi_module),
        ("project.celery_app", &p.celery_app),
    ] {
        check(
            field,
            value,
            "a Python dotted path (letters, digits, `_`, `.`, `:`)",
            |s| !s.is_empty(),
            |c| c.is_ascii_alphanumeric() || "_.:".contains(c),
        )?;
    }
    if p.domains.is_empty() {
        return Err(RenderError::InvalidValue {
            field: "project.domains".into(),
            value: String::new(),
            expected: "at least one domain",
        });
    }
    for name in p.domains.iter().chain(&p.extra_server_names) {
        check(
            "project.domains",
            name,
            "a host name or address, optionally with a leading `.`",
            |s| {
                let s = s.strip_prefix('.').unwrap_or(s);
                !s.is_empty() && s.split('.').all(|label| !label.is_empty())
            },
            |c| c.is_ascii_alphanumeric() || c == '-' || c == '.',
        )?;
    }
    check(
        "project.health_check_path",
        &p.health_check_path,
        "an absolute URL path (letters, digits, `_`, `.`, `/`, `-`)",
        |s| s.starts_with('/'),
        |c| c.is_ascii_alphanumeric() || "_./-".contains(c),
    )?;
    check(
        "project.release",
        &p.release,
        "a release id (letters, digits, `_`, `.`, `-`)",
        |s| !s.is_empty(),
        |c| c.is_ascii_alphanumeric() || "_.-".contains(c),
    )?;
    for (field, value) in [
        ("project.db_name", &p.db_name),
        ("project.db_user", &p.db_user),
        ("project.replication_user", &p.replication_user),
        ("project.amqp_user", &p.amqp_user),
    ] {
        check(
            field,
            value,
            "an identifier (letters, digits and `_`, not starting with a digit, at most 63)",
            |s| s.len() <= 63 && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'),
            |c| c.is_ascii_alphanumeric() || c == '_',
        )?;
    }
    check(
        "project.amqp_vhost",
        &p.amqp_vhost,
        "a vhost name (letters, digits, `_`, `.`, `/`, `-`)",
        |s| !s.is_empty(),
        |c| c.is_ascii_alphanumeric() || "_./-".contains(c),
    )?;

    for (field, secret) in ctx.secrets.named() {
        let value = secret.expose();
        let ok = if field == "django_secret_key" {
            !value.is_empty() && !value.chars().any(char::is_control)
        } else {
            !value.is_empty()
                && value
                    .chars()
                    .all(|c| c.is_ascii_graphic() && !"\"'\\`$#".contains(c))
        };
        if !ok {
            return Err(RenderError::InvalidValue {
                field: format!("secrets.{field}"),
                value: "(secret)".into(),
                expected: if field == "django_secret_key" {
                    "a non-empty value without control characters"
                } else {
                    "a non-empty value of printable ASCII without spaces or any of \" ' \\ ` $ #"
                },
            });
        }
    }

    let t = &ctx.tuning;
    for (field, value) in [
        ("tuning.gunicorn_workers", t.gunicorn_workers),
        ("tuning.gunicorn_timeout", t.gunicorn_timeout),
        ("tuning.celery_concurrency", t.celery_concurrency),
        (
            "tuning.postgres_max_connections",
            t.postgres_max_connections,
        ),
    ] {
        if value == 0 {
            return Err(RenderError::InvalidValue {
                field: field.into(),
                value: "0".into(),
                expected: "at least 1",
            });
        }
    }
    let sizes = [
        (
            "tuning.postgres_shared_buffers",
            Some(&t.postgres_shared_buffers),
        ),
        (
            "tuning.postgres_max_slot_wal_keep_size",
            Some(&t.postgres_max_slot_wal_keep_size),
        ),
        ("tuning.redis_maxmemory", t.redis_maxmemory.as_ref()),
        (
            "tuning.rabbitmq_memory_limit",
            t.rabbitmq_memory_limit.as_ref(),
        ),
    ];
    for (field, value) in sizes {
        if let Some(value) = value {
            check(
                field,
                value,
                "a size: digits then a unit such as MB",
                |s| {
                    let unit = s.trim_start_matches(|c: char| c.is_ascii_digit());
                    unit.len() < s.len() && unit.len() <= 2
                },
                |c| c.is_ascii_alphanumeric(),
            )?;
        }
    }
    Ok(())
}

/// Ids of servers, projects and environments: used in file names, section names and
/// certificate names.
pub(crate) fn name_id(field: &str, value: &str) -> Result<(), RenderError> {
    check(
        field,
        value,
        "lower-case letters, digits and `-`, starting with a letter or digit, at most 63",
        |s| s.len() <= 63 && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()),
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
    )
}

/// Paths go unquoted into nginx, HAProxy, stunnel, PgBouncer, systemd and tmpfiles.d files.
pub(crate) fn safe_path(field: &str, path: &Path) -> Result<(), RenderError> {
    let text = path.to_str().unwrap_or("\u{fffd}");
    check(
        field,
        text,
        "an absolute UTF-8 path without spaces, quotes or any of \\ $ ; # { } % * ? [ ]",
        |s| s.starts_with('/'),
        |c| !c.is_whitespace() && !c.is_control() && !"\"'`\\$;#{}%*?[]\u{fffd}".contains(c),
    )
}

fn check(
    field: &str,
    value: &str,
    expected: &'static str,
    whole: impl Fn(&str) -> bool,
    each: impl Fn(char) -> bool,
) -> Result<(), RenderError> {
    if !value.is_empty() && whole(value) && value.chars().all(each) {
        Ok(())
    } else {
        Err(RenderError::InvalidValue {
            field: field.to_owned(),
            value: value.to_owned(),
            expected,
        })
    }
}
