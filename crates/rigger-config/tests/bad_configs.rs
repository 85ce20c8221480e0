//! Every file under `tests/bad/` is an invalid `rigger.toml`; its rendered diagnostics are
//! snapshots under `tests/snapshots/`. Review a changed snapshot by reading it: each error must
//! point at the offending text and its help must say what to do.

#[test]
fn bad_configs() {
    insta::glob!("bad/*.toml", |path| {
        let source = std::fs::read_to_string(path).unwrap();
        let diagnostics = rigger_config::parse(&source, "rigger.toml")
            .expect_err("every file under tests/bad is invalid");
        for item in &diagnostics.items {
            assert!(
                item.help.is_some(),
                "no help for `{}` in {}",
                item.message,
                path.display()
            );
        }
        insta::assert_snapshot!(diagnostics.to_string());
    });
}

#[test]
fn color_rendering_marks_error_and_underline() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/bad/unknown-key-typo.toml"
    ))
    .unwrap();
    let diagnostics = rigger_config::parse(&source, "rigger.toml").unwrap_err();
    let colored = diagnostics.render(true);
    assert!(colored.contains("\x1b[1;31merror\x1b[0m"), "{colored:?}");
    assert!(
        colored.contains("\x1b[1;31m^^^^^^ unknown key\x1b[0m"),
        "{colored:?}"
    );
    let stripped = strip_ansi(&colored);
    assert_eq!(stripped, diagnostics.render(false));
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('m').map_or(rest.len(), |m| i + m + 1);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}
