//! Turning a TOML parse error into a [`Diagnostic`].
//!
//! The parser stops at the first error, so a file with broken syntax yields exactly one
//! diagnostic. A table defined twice is a syntax error to the parser; it is recognised here and
//! reported in terms of the config ("environment `X` is defined twice").

use std::ops::Range;

use toml_edit::TomlError;

use crate::diagnostic::Diagnostic;

pub(crate) fn diagnose(err: &TomlError, source: &str) -> Diagnostic {
    let span = err.span().unwrap_or(0..0);
    if err.message() == "duplicate key" {
        return duplicate(span, source);
    }
    // The parser's messages read "what went wrong, expected X"; the second half is a label.
    let (what, expected) = match err.message().split_once(", expected ") {
        Some((what, expected)) => (what, Some(expected)),
        None => (err.message(), None),
    };
    let text = source[span.clone()].trim();
    let mut label = match expected {
        Some("nothing") | None => "here".to_owned(),
        Some(expected) => format!("expected {expected}"),
    };
    let help = if what.starts_with("string values must be quoted") {
        if text.is_empty() {
            label = "missing value".to_owned();
            "write a value after `=`, e.g. `key = \"text\"`, `key = 3` or `key = true`".to_owned()
        } else {
            label = "not quoted".to_owned();
            let line_start = source[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let before = source[line_start..span.start].trim_start();
            format!("put text in double quotes: `{before}\"{text}\"`")
        }
    } else if what.starts_with("unclosed table") {
        "close the table header with `]`, e.g. `[project]`".to_owned()
    } else if what.starts_with("unclosed array") {
        "close the list with `]`, e.g. `domains = [\"example.com\"]`".to_owned()
    } else if what.contains("string") {
        "close the string with the quote it starts with".to_owned()
    } else {
        "rigger.toml is TOML; see https://toml.io/en/v1.0.0 for its syntax".to_owned()
    };
    Diagnostic::new(format!("invalid TOML: {what}"), span, label).help(help)
}

/// A "duplicate key" error points at the last key of the repeated header or key/value line.
fn duplicate(key_span: Range<usize>, source: &str) -> Diagnostic {
    let line_start = source[..key_span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = source[key_span.end..]
        .find('\n')
        .map_or(source.len(), |i| key_span.end + i);
    let line = &source[line_start..line_end];
    let Some(header) = Header::parse(line) else {
        let key = &source[key_span.clone()];
        let mut d = Diagnostic::new(
            format!("key `{key}` is defined twice"),
            key_span.clone(),
            "defined again here",
        );
        d.help = Some(match first_key_line(source, line_start, key) {
            Some(n) => format!("remove one of the two; the first is on line {n}"),
            None => "remove one of the two".to_owned(),
        });
        return d;
    };
    let span = line_start + header.span.start..line_start + header.span.end;
    let first = first_header_line(source, line_start, &header.path);
    let (message, help) = match header.path.as_slice() {
        [environments, name] if environments == "environments" => (
            format!("environment `{name}` is defined twice"),
            format!(
                "rename this environment or merge its keys into the first \
                 `[environments.{name}]`{}",
                on_line(first)
            ),
        ),
        path => (
            format!("table `[{}]` is defined twice", path.join(".")),
            format!(
                "merge its keys into the first `[{}]`{}",
                path.join("."),
                on_line(first)
            ),
        ),
    };
    Diagnostic::new(message, span, "defined again here").help(help)
}

fn on_line(line: Option<usize>) -> String {
    line.map(|n| format!(" (line {n})")).unwrap_or_default()
}

/// A `[a.b.c]` line: its keys and where the brackets are within the line.
struct Header {
    path: Vec<String>,
    span: Range<usize>,
}

impl Header {
    fn parse(line: &str) -> Option<Header> {
        let start = line.find(|c: char| !c.is_whitespace())?;
        let rest = &line[start..];
        if !rest.starts_with('[') || rest.starts_with("[[") {
            return None;
        }
        let close = rest.find(']')?;
        let path = rest[1..close]
            .split('.')
            .map(|k| k.trim().trim_matches(['"', '\'']).to_owned())
            .collect();
        Some(Header {
            path,
            span: start..start + close + 1,
        })
    }
}

/// 1-based line of the first header naming `path`, before byte `before`.
fn first_header_line(source: &str, before: usize, path: &[String]) -> Option<usize> {
    source[..before]
        .lines()
        .position(|l| Header::parse(l).is_some_and(|h| h.path == path))
        .map(|i| i + 1)
}

/// 1-based line of the last `key = ...` line of the same table, before byte `before`.
fn first_key_line(source: &str, before: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = source[..before].lines().collect();
    lines
        .iter()
        .enumerate()
        .rev()
        .take_while(|(_, l)| Header::parse(l).is_none())
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|(i, _)| i + 1)
}
