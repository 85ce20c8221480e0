//! Environment files: `KEY=value` lines, the subset of systemd's `EnvironmentFile=` syntax
//! that rigger writes, and a parser for exactly that subset so that the local supervisor loads
//! a file the way systemd would.
//!
//! A value made only of `A-Z a-z 0-9 _ @ % + = : , . / -` is written bare; any other value is
//! written in double quotes, with `\`, `"`, `` ` `` and `$` escaped by a backslash (POSIX
//! double-quote rules, which systemd follows). Values cannot contain newlines or other control
//! characters. Blank lines and lines starting with `#` are comments.

use std::collections::BTreeMap;

/// Why a line of an environment file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvFileError {
    #[error("line {line}: expected KEY=value")]
    NoEquals { line: usize },
    #[error("line {line}: `{key}` is not a variable name")]
    BadKey { line: usize, key: String },
    #[error("line {line}: unterminated quoted value")]
    Unterminated { line: usize },
    #[error("line {line}: text after the closing quote")]
    TrailingText { line: usize },
}

/// Formats one `KEY=value` line (with its newline). `None` when the value has a control
/// character, which no environment file can carry on one line.
pub fn line(key: &str, value: &str) -> Option<String> {
    Some(format!("{key}={}\n", quote(value)?))
}

/// The value as it appears after `=`.
pub fn quote(value: &str) -> Option<String> {
    if value.chars().any(char::is_control) {
        return None;
    }
    let bare = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !value.is_empty() && value.chars().all(bare) {
        return Some(value.to_owned());
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '`' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Some(out)
}

/// Reads a file written by [`line()`].
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, EnvFileError> {
    let mut vars = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (key, value) = trimmed
            .split_once('=')
            .ok_or(EnvFileError::NoEquals { line })?;
        let key = key.trim();
        let valid_key = key.chars().next().is_some_and(|c| !c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            return Err(EnvFileError::BadKey {
                line,
                key: key.to_owned(),
            });
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            None => value.to_owned(),
            Some(rest) => {
                let mut out = String::new();
                let mut chars = rest.chars();
                loop {
                    match chars.next() {
                        None => return Err(EnvFileError::Unterminated { line }),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('\\' | '"' | '`' | '$')) => out.push(c),
                            Some(c) => {
                                out.push('\\');
                                out.push(c);
                            }
                            None => return Err(EnvFileError::Unterminated { line }),
                        },
                        Some(c) => out.push(c),
                    }
                }
                if !chars.as_str().trim().is_empty() {
                    return Err(EnvFileError::TrailingText { line });
                }
                out
            }
        };
        vars.insert(key.to_owned(), value);
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_awkward_values() {
        let values = [
            "plain",
            "",
            "with space",
            r#"q"uo'te"#,
            r"back\slash",
            "$HOME and `cmd`",
            "#not-a-comment",
            "redis://:p%40ss@127.0.0.1:6379",
        ];
        let mut text = String::from("# comment\n\n");
        for (i, v) in values.iter().enumerate() {
            text.push_str(&line(&format!("V{i}"), v).unwrap());
        }
        let parsed = parse(&text).unwrap();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(parsed[&format!("V{i}")], *v);
        }
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(
            quote("a-b_c.d/e:f,g@h%i+j=k").unwrap(),
            "a-b_c.d/e:f,g@h%i+j=k"
        );
        assert_eq!(quote("a b").unwrap(), "\"a b\"");
        assert_eq!(quote("").unwrap(), "\"\"");
        assert_eq!(quote("a$b").unwrap(), r#""a\$b""#);
    }

    #[test]
    fn refuses_newlines() {
        assert_eq!(quote("a\nb"), None);
    }

    #[test]
    fn reports_bad_lines() {
        assert_eq!(parse("novalue\n"), Err(EnvFileError::NoEquals { line: 1 }));
        assert_eq!(
            parse("\nA=\"open\n"),
            Err(EnvFileError::Unterminated { line: 2 })
        );
        assert!(matches!(parse("1A=x"), Err(EnvFileError::BadKey { .. })));
    }
}
