//! Located error messages and their rustc-style rendering.
//!
//! A [`Diagnostic`] is one problem at a byte range of the source; [`Diagnostics`] holds all
//! problems of one file together with its text, so it can render each one with the offending
//! line, an underline and a `help:` line. Start at [`Diagnostics::render`].

use std::fmt;
use std::ops::Range;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// What is wrong, in one line, e.g. "unknown key `desird` in `environments.local.web`".
    pub message: String,
    /// Byte offsets into the source of the text the problem is about.
    pub span: Range<usize>,
    /// Short note printed next to the underline, e.g. "unknown key".
    pub label: String,
    /// What to do about it.
    pub help: Option<String>,
}

/// Every problem found in one config file, with the file's text to show them in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics {
    /// File name printed in `--> FILE:LINE:COLUMN`.
    pub file_name: String,
    /// The whole text of the file; every span indexes into it.
    pub source: String,
    /// The problems, in the order they appear in the file.
    pub items: Vec<Diagnostic>,
}

impl Diagnostic {
    pub(crate) fn new(
        message: impl Into<String>,
        span: Range<usize>,
        label: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            message: message.into(),
            span,
            label: label.into(),
            help: None,
        }
    }

    pub(crate) fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
}

impl Diagnostics {
    /// Sorts `items` by position so the output reads top to bottom.
    pub(crate) fn new(file_name: &str, source: &str, mut items: Vec<Diagnostic>) -> Diagnostics {
        items.sort_by_key(|d| (d.span.start, d.span.end));
        Diagnostics {
            file_name: file_name.to_owned(),
            source: source.to_owned(),
            items,
        }
    }

    /// 1-based line and column (in characters) of byte offset `offset` of the source.
    pub fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(&self.source, offset);
        let before = &self.source[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = self.source[line_start..offset].chars().count() + 1;
        (line, column)
    }

    /// Renders every problem like rustc does, separated by blank lines; with `color`, ANSI
    /// escapes make the headline and underline red and bold.
    pub fn render(&self, color: bool) -> String {
        let style = if color { Style::ANSI } else { Style::PLAIN };
        let mut out = String::new();
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            self.render_one(item, &style, &mut out);
        }
        out
    }

    fn render_one(&self, item: &Diagnostic, s: &Style, out: &mut String) {
        use std::fmt::Write as _;

        let (line, column) = self.line_column(item.span.start);
        let line_start = self.source[..floor_char_boundary(&self.source, item.span.start)]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line_end = self.source[line_start..]
            .find('\n')
            .map_or(self.source.len(), |i| line_start + i);
        let text = self.source[line_start..line_end].trim_end_matches('\r');
        // The underline covers the span's part of its first line, and at least one character.
        let end = floor_char_boundary(&self.source, item.span.end.clamp(item.span.start, line_end));
        let start = floor_char_boundary(&self.source, item.span.start);
        let width = self.source[start..end].chars().count().max(1);

        let pad = " ".repeat(line.to_string().len());
        let (e, b, g, r) = (s.error, s.bold, s.gutter, s.reset);
        let _ = writeln!(
            out,
            "{e}error{r}{b}: {}{r}",
            printable(&item.message, false)
        );
        let _ = writeln!(out, "{pad}{g}-->{r} {}:{line}:{column}", self.file_name);
        let _ = writeln!(out, "{pad} {g}|{r}");
        // Tabs would shift the underline; one space each keeps columns counted in characters.
        let _ = writeln!(out, "{g}{line} |{r} {}", text.replace('\t', " "));
        let label = if item.label.is_empty() {
            String::new()
        } else {
            format!(" {}", printable(&item.label, false))
        };
        let _ = writeln!(
            out,
            "{pad} {g}|{r} {}{e}{}{label}{r}",
            " ".repeat(column - 1),
            "^".repeat(width),
        );
        if let Some(help) = &item.help {
            let _ = writeln!(out, "{pad} {g}|{r}");
            let indent = format!("\n{pad}         ");
            let _ = writeln!(
                out,
                "{pad} {g}={r} {b}help{r}: {}",
                printable(help, true).replace('\n', &indent)
            );
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostics {}

struct Style {
    error: &'static str,
    bold: &'static str,
    gutter: &'static str,
    reset: &'static str,
}

impl Style {
    const PLAIN: Style = Style {
        error: "",
        bold: "",
        gutter: "",
        reset: "",
    };
    const ANSI: Style = Style {
        error: "\x1b[1;31m",
        bold: "\x1b[1m",
        gutter: "\x1b[1;34m",
        reset: "\x1b[0m",
    };
}

/// `text` with every control character escaped (`\u{1b}`, `\n`), but for line breaks when
/// `lines`: messages quote values from the file, and a value's escape sequence must not reach
/// the terminal nor its line break split a message.
fn printable(text: &str, lines: bool) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && !(lines && c == '\n') {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn floor_char_boundary(s: &str, mut offset: usize) -> usize {
    offset = offset.min(s.len());
    while !s.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, span: Range<usize>, help: Option<&str>) -> String {
        let mut d = Diagnostic::new("something is wrong", span, "here");
        d.help = help.map(str::to_owned);
        Diagnostics::new("rigger.toml", source, vec![d]).to_string()
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let out = render("a = \"é\"\nbé = 1\n", 13..14, None);
        assert_eq!(
            out,
            "error: something is wrong\n --> rigger.toml:2:4\n  |\n2 | bé = 1\n  |    ^ here\n"
        );
    }

    #[test]
    fn gutter_widens_with_the_line_number() {
        let source = "\n".repeat(11) + "desird = 3\n";
        let out = render(
            &source,
            11..17,
            Some("did you mean `desired`?\nsecond line"),
        );
        assert_eq!(
            out,
            "error: something is wrong
  --> rigger.toml:12:1
   |
12 | desird = 3
   | ^^^^^^ here
   |
   = help: did you mean `desired`?
           second line
"
        );
    }

    #[test]
    fn empty_span_at_end_of_line_gets_one_caret() {
        let out = render("[project\n", 8..8, None);
        assert!(out.contains("1 | [project\n  |         ^ here"), "{out}");
    }

    #[test]
    fn control_characters_in_messages_are_escaped() {
        let mut d = Diagnostic::new("bad `a\nb\u{1b}[2J`", 0..1, "\u{1b}]0;x\u{7}");
        d.help = Some("line one\nline two \r\u{1b}[31m".into());
        let out = Diagnostics::new("f", "x\n", vec![d]).to_string();
        assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out:?}");
        assert!(out.starts_with("error: bad `a\\nb\\u{1b}[2J`\n"), "{out:?}");
        assert!(out.contains("^ \\u{1b}]0;x\\u{7}\n"), "{out:?}");
        assert!(
            out.contains("help: line one\n          line two \\r\\u{1b}[31m\n"),
            "{out:?}"
        );
    }

    #[test]
    fn color_wraps_headline_and_underline() {
        let d = Diagnostic::new("bad", 0..1, "here");
        let out = Diagnostics::new("f", "x\n", vec![d]).render(true);
        assert!(
            out.starts_with("\x1b[1;31merror\x1b[0m\x1b[1m: bad\x1b[0m\n"),
            "{out:?}"
        );
        assert!(out.contains("\x1b[1;31m^ here\x1b[0m"), "{out:?}");
    }
}
