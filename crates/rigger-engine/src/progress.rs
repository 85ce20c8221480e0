//! How an operation tells the operator what it is doing: every command's flow, on every
//! provider, reports through one [`Progress`], which the CLI implements once (plain lines on
//! stderr, nothing with `-q`). Whatever shows progress differently (a live terminal display,
//! a dashboard) implements it again; no flow knows where its lines go.

/// Where an operation's progress lines go. `Sync`: a flow may report from concurrent steps.
pub trait Progress: Sync {
    /// One line: a step begun or done, a wait, a warning.
    fn report(&self, line: &str);
}

/// A plain function of a line is a [`Progress`] (tests collect lines with one).
impl<F: Fn(&str) + Sync> Progress for F {
    fn report(&self, line: &str) {
        self(line)
    }
}

/// Progress nobody watches.
pub struct Silent;

impl Progress for Silent {
    fn report(&self, _line: &str) {}
}

/// Progress shown indented under a heading: each line prefixed with two spaces.
pub struct Indented<'a>(pub &'a dyn Progress);

impl Progress for Indented<'_> {
    fn report(&self, line: &str) {
        self.0.report(&format!("  {line}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn indented_progress_prefixes_every_line() {
        let lines = Mutex::new(Vec::new());
        let collect = |line: &str| lines.lock().unwrap().push(line.to_owned());
        let indented = Indented(&collect);
        indented.report("launching web-3");
        Silent.report("nobody sees this");
        assert_eq!(*lines.lock().unwrap(), ["  launching web-3"]);
    }
}
