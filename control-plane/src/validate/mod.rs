//! Validation of the whole desired state.
//!
//! [`validate_state`] checks every document's values and every rule that
//! spans documents (references, conflicts), and returns all problems at
//! once, sorted. The control plane runs it on the state an apply *would*
//! produce; the CLI runs the very same code offline.

mod api;
mod conflicts;
mod gateway;
pub mod rules;
mod service;

use crate::model::{DesiredState, Kind, ResourceKey, Spec};
use crate::problem::{self, Problem};

/// Collects problems for one document.
pub(crate) struct Report<'a> {
    document: String,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Report<'a> {
    pub(crate) fn new(key: &ResourceKey, problems: &'a mut Vec<Problem>) -> Self {
        Report {
            document: key.to_string(),
            problems,
        }
    }

    /// A problem with the document's own values.
    pub(crate) fn value(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems
            .push(Problem::document(&self.document, path, message));
    }

    /// A problem with how the document fits the rest of the state.
    pub(crate) fn reference(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems
            .push(Problem::reference(&self.document, path, message));
    }

    /// Records `result`'s error, if any, at `path`.
    pub(crate) fn check<T>(
        &mut self,
        path: impl Into<String>,
        result: Result<T, String>,
    ) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.value(path, message);
                None
            }
        }
    }
}

/// Validates a whole desired state; an empty result means it may be applied.
pub fn validate_state(state: &DesiredState) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (key, resource) in state {
        let mut report = Report::new(key, &mut problems);
        report.check("metadata.name", rules::check_name(&key.name));
        match &resource.spec {
            Spec::Gateway(spec) => gateway::check(spec, &mut report),
            Spec::Service(spec) => service::check(spec, &mut report),
            Spec::Api(spec) => api::check(spec, state, &mut report),
        }
    }
    gateway::check_shared_ports(state, &mut problems);
    conflicts::check(state, &mut problems);
    problem::sort(&mut problems);
    problems.dedup();
    problems
}

/// Whether a document of `kind` named `name` exists in `state`.
pub(crate) fn exists(state: &DesiredState, kind: Kind, name: &str) -> bool {
    state.contains_key(&ResourceKey::new(kind, name))
}

#[cfg(test)]
mod tests;
