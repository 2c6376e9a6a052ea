//! A problem found in the desired state: which document, where in it, and why.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Which class of rule a problem breaks. The admin API answers 400 when any
/// problem is a `Document` problem and 422 when all are `Reference` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ProblemClass {
    /// The document itself is wrong: syntax, schema, or a value out of range.
    Document,
    /// The document is well-formed but does not fit the rest of the state:
    /// a missing reference, a conflict with another document, a deletion of
    /// something still in use.
    Reference,
}

/// One problem in one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// The document: `api/pets`, or `FILE#N` when it has no usable name.
    pub document: String,
    /// JSON path inside the document, e.g. `spec.routes[2].match.path`.
    pub path: String,
    /// What is wrong, for a person.
    pub message: String,
    /// The class of rule broken.
    pub class: ProblemClass,
}

impl Problem {
    /// A problem with the document itself.
    pub fn document(
        document: impl Into<String>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            document: document.into(),
            path: path.into(),
            message: message.into(),
            class: ProblemClass::Document,
        }
    }

    /// A problem with how the document fits the rest of the state.
    pub fn reference(
        document: impl Into<String>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            class: ProblemClass::Reference,
            ..Problem::document(document, path, message)
        }
    }
}

impl fmt::Display for Problem {
    /// `api/pets: spec.routes[2].match.path: must start with '/'`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.document, self.message)
        } else {
            write!(f, "{}: {}: {}", self.document, self.path, self.message)
        }
    }
}

/// Orders problems for display: by document, then path, then message.
pub fn sort(problems: &mut [Problem]) {
    problems.sort_by(|a, b| {
        (&a.document, &a.path, &a.message).cmp(&(&b.document, &b.path, &b.message))
    });
}
