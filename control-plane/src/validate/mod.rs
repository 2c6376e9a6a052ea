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

/// Validates documents as a complete desired state on their own: what
/// `portico validate` does offline.
pub fn validate_documents(docs: &[crate::model::decode::SourceDocument]) -> Vec<Problem> {
    let decoded = crate::model::decode::decode_all(docs);
    validate_with(&decoded.resources, decoded.problems, decoded.complete)
}

/// Validates `state` and merges the problems found while decoding it.
/// When some document could not be decoded at all (`complete` is false),
/// cross-document problems are dropped: they would blame the missing
/// document's users for the decoding problem already reported.
pub fn validate_with(
    state: &DesiredState,
    mut carried: Vec<Problem>,
    complete: bool,
) -> Vec<Problem> {
    let found = validate_state(state);
    carried.extend(
        found
            .into_iter()
            .filter(|p| complete || p.class == crate::problem::ProblemClass::Document),
    );
    problem::sort(&mut carried);
    carried.dedup();
    carried
}

/// Every place in `state` that refers to `target`, as (document, path).
pub fn referrers(state: &DesiredState, target: &ResourceKey) -> Vec<(ResourceKey, String)> {
    let mut out = Vec::new();
    for (key, res) in state {
        let Spec::Api(api) = &res.spec else { continue };
        if target.kind == Kind::Gateway {
            for (i, g) in api.gateways.iter().enumerate() {
                if *g == target.name {
                    out.push((key.clone(), format!("spec.gateways[{i}]")));
                }
            }
        }
        if target.kind == Kind::Service {
            for (i, route) in api.routes.iter().enumerate() {
                let a = &route.action;
                if a.service.as_deref() == Some(target.name.as_str()) {
                    out.push((key.clone(), format!("spec.routes[{i}].action.service")));
                }
                for (j, w) in a.services.iter().enumerate() {
                    if w.name == target.name {
                        out.push((
                            key.clone(),
                            format!("spec.routes[{i}].action.services[{j}].name"),
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Whether a document of `kind` named `name` exists in `state`.
pub(crate) fn exists(state: &DesiredState, kind: Kind, name: &str) -> bool {
    state.contains_key(&ResourceKey::new(kind, name))
}

#[cfg(test)]
mod tests;
