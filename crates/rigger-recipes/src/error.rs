//! [`RenderError`]: why a recipe could not be rendered.

use crate::Role;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A template failed: a bug in rigger (an undefined variable, a filter error), since
    /// templates are embedded and their inputs validated first.
    #[error("rendering template `{template}`")]
    Template {
        template: String,
        #[source]
        source: minijinja::Error,
    },

    /// A value would break the syntax of a file it goes into, or is otherwise unusable.
    /// `value` is `(secret)` for secrets: error messages never carry them.
    #[error("{field} = `{value}` is not valid here: expected {expected}")]
    InvalidValue {
        field: String,
        value: String,
        expected: &'static str,
    },

    #[error("role {role} is not one of server {server}'s roles")]
    RoleNotOnServer { role: Role, server: String },

    /// Two roles of one server render different things under the same name.
    #[error("two roles of the server render different versions of `{key}`")]
    Conflict { key: String },
}
