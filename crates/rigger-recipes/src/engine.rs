//! The template engine: minijinja with every template embedded at compile time, strict about
//! undefined variables (a typo in a template is an error, never an empty string), and a few
//! filters that quote values for the file format they land in.

use std::sync::OnceLock;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};

use crate::error::RenderError;
use crate::{envfile, sql};

/// Every template, by name. Names are the file names under `templates/`.
const TEMPLATES: &[(&str, &str)] = &[
    ("app.env", include_str!("../templates/app.env.j2")),
    (
        "pgbouncer-admin.env",
        include_str!("../templates/pgbouncer-admin.env.j2"),
    ),
    ("nginx.conf", include_str!("../templates/nginx.conf.j2")),
    (
        "pgbouncer.ini",
        include_str!("../templates/pgbouncer.ini.j2"),
    ),
    ("userlist.txt", include_str!("../templates/userlist.txt.j2")),
    ("stunnel.conf", include_str!("../templates/stunnel.conf.j2")),
    ("redis.conf", include_str!("../templates/redis.conf.j2")),
    (
        "rabbitmq.conf",
        include_str!("../templates/rabbitmq.conf.j2"),
    ),
    (
        "postgresql.conf",
        include_str!("../templates/postgresql.conf.j2"),
    ),
    ("pg_hba.conf", include_str!("../templates/pg_hba.conf.j2")),
    ("primary.sql", include_str!("../templates/primary.sql.j2")),
    ("haproxy.cfg", include_str!("../templates/haproxy.cfg.j2")),
    (
        "systemd.service",
        include_str!("../templates/systemd.service.j2"),
    ),
    (
        "openssl-ca.cnf",
        include_str!("../templates/openssl-ca.cnf.j2"),
    ),
    (
        "openssl-leaf.cnf",
        include_str!("../templates/openssl-leaf.cnf.j2"),
    ),
];

/// Renders template `name` with `ctx`.
pub(crate) fn render(name: &str, ctx: Value) -> Result<String, RenderError> {
    let wrap = |source| RenderError::Template {
        template: name.to_owned(),
        source,
    };
    let template = environment().get_template(name).map_err(wrap)?;
    template.render(ctx).map_err(wrap)
}

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Config files are not HTML: never escape.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(true)
                .build()
                .expect("static syntax config is valid"),
        );
        env.add_filter("pgconf", |v: &str| pg_conf_literal(v));
        env.add_filter("sql_literal", |v: &str| sql::quote_literal(v));
        env.add_filter("sql_ident", |v: &str| sql::quote_ident(v));
        env.add_filter("redis_quote", |v: &str| redis_quote(v));
        env.add_filter("userlist_quote", |v: &str| userlist_quote(v));
        env.add_filter("envquote", |v: &str| {
            envfile::quote(v).ok_or_else(|| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "a control character cannot go into an environment file",
                )
            })
        });
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .unwrap_or_else(|e| panic!("embedded template {name} does not parse: {e:#}"));
        }
        env
    })
}

/// A string in `postgresql.conf`: single quotes, `'` doubled, `\` escaped (the file format
/// processes C-style backslash escapes inside quotes).
pub(crate) fn pg_conf_literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', r"\\").replace('\'', "''"))
}

/// A Redis config argument in double quotes.
pub(crate) fn redis_quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', r"\\").replace('"', "\\\""))
}

/// A field of PgBouncer's `auth_file`: double quotes, `"` doubled.
pub(crate) fn userlist_quote(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// A value in a libpq connection string: bare when it can be, else single-quoted with `\`
/// and `'` escaped by a backslash.
pub(crate) fn conninfo_value(value: &str) -> String {
    let bare = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if bare {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', r"\\").replace('\'', r"\'"))
    }
}

/// A field of a libpq password file: `\` and `:` escaped by a backslash.
pub(crate) fn pgpass_field(value: &str) -> String {
    value.replace('\\', r"\\").replace(':', r"\:")
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for URL user-info and
/// paths.
pub(crate) fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    #[test]
    fn undefined_variable_is_an_error() {
        let err = render("pgbouncer.ini", context! {}).unwrap_err();
        let RenderError::Template { template, source } = &err else {
            panic!("expected a template error, got {err:?}");
        };
        assert_eq!(template, "pgbouncer.ini");
        assert_eq!(source.kind(), ErrorKind::UndefinedError);
    }

    #[test]
    fn undefined_variable_in_a_condition_is_an_error() {
        let env = environment();
        let err = env
            .render_str("{% if missing %}x{% endif %}", context! {})
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UndefinedError);
    }

    #[test]
    fn every_template_parses() {
        for (name, _) in TEMPLATES {
            environment().get_template(name).unwrap();
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(pg_conf_literal(r"it's a \ path"), r"'it''s a \\ path'");
        assert_eq!(redis_quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(userlist_quote(r#"a"b"#), r#""a""b""#);
        assert_eq!(conninfo_value("/plain/path"), "/plain/path");
        assert_eq!(conninfo_value("a b'c"), r"'a b\'c'");
        assert_eq!(conninfo_value(""), "''");
        assert_eq!(pgpass_field(r"a:b\c"), r"a\:b\\c");
        assert_eq!(percent_encode("p@ss/w:rd %"), "p%40ss%2Fw%3Ard%20%25");
    }
}
