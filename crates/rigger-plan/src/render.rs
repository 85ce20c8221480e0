//! The human rendering of a plan, in the familiar `+ ~ -/+ -` style with a summary line.
//! Makes sense without colour; colour is an addition, never the only signal.

use std::fmt::Write as _;

use rigger_topology::Value;

use crate::{Action, Change, Plan, Step};

/// How to render.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    pub color: bool,
    /// Also list resources that do not change.
    pub show_unchanged: bool,
}

/// The plan as text for a terminal.
pub fn human(plan: &Plan, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Plan for {}/{} at release {}:",
        plan.project, plan.environment, plan.release
    );
    if plan.is_empty() {
        let _ = writeln!(
            out,
            "\nNo changes: the environment matches the configuration."
        );
    } else {
        out.push('\n');
    }
    for step in &plan.steps {
        if step.action == Action::NoOp && !style.show_unchanged {
            continue;
        }
        step_lines(&mut out, step, style);
    }
    let summary = plan.summary();
    let _ = writeln!(
        out,
        "\nPlan: {} to create, {} to update, {} to replace, {} to delete, {} unchanged.",
        summary.create, summary.update, summary.replace, summary.delete, summary.no_op
    );
    out
}

fn step_lines(out: &mut String, step: &Step, style: Style) {
    let symbol = paint(style, color_of(step.action), step.action.symbol());
    let mut header = format!("{symbol:>3} {}", step.id);
    if let (true, Some(wave)) = (style.show_unchanged, step.wave) {
        let _ = write!(header, "  (wave {wave})");
    }
    let _ = writeln!(out, "{header}");
    if step.action == Action::NoOp {
        return;
    }
    let width = step
        .changes
        .iter()
        .map(|c| c.attribute.len())
        .max()
        .unwrap_or(0);
    for change in &step.changes {
        change_lines(out, change, width, step.action, style);
    }
}

fn change_lines(out: &mut String, change: &Change, width: usize, action: Action, style: Style) {
    let name = &change.attribute;
    let note = if change.forces_replacement {
        paint(style, Color::Magenta, "  (forces replacement)")
    } else {
        String::new()
    };
    match (action, &change.old, &change.new) {
        (Action::Create, _, Some(new)) => {
            let _ = writeln!(out, "        {name:<width$} = {new}");
        }
        (Action::Delete, Some(old), _) => {
            let _ = writeln!(out, "        {name:<width$} = {old}");
        }
        (_, Some(Value::Set(old)), Some(Value::Set(new))) => {
            let _ = writeln!(out, "        {name:<width$}{note}");
            for added in new.difference(old) {
                let _ = writeln!(
                    out,
                    "          {} {added:?}",
                    paint(style, Color::Green, "+")
                );
            }
            for removed in old.difference(new) {
                let _ = writeln!(
                    out,
                    "          {} {removed:?}",
                    paint(style, Color::Red, "-")
                );
            }
        }
        (_, old, new) => {
            let old = old.as_ref().map_or("(none)".to_owned(), Value::to_string);
            let new = new.as_ref().map_or("(none)".to_owned(), Value::to_string);
            let _ = writeln!(out, "        {name:<width$}   {old} -> {new}{note}");
        }
    }
}

#[derive(Clone, Copy)]
enum Color {
    Green,
    Yellow,
    Magenta,
    Red,
}

fn color_of(action: Action) -> Color {
    match action {
        Action::Create => Color::Green,
        Action::Update | Action::NoOp => Color::Yellow,
        Action::Replace => Color::Magenta,
        Action::Delete => Color::Red,
    }
}

fn paint(style: Style, color: Color, text: &str) -> String {
    if !style.color {
        return text.to_owned();
    }
    let code = match color {
        Color::Green => 32,
        Color::Yellow => 33,
        Color::Magenta => 35,
        Color::Red => 31,
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}
