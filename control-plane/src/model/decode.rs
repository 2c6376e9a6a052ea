//! From text to documents to typed [`Resource`]s.
//!
//! Two steps, so that each error can say where it is: [`split`] turns a
//! YAML or JSON file into raw documents (a syntax error carries line and
//! column), then [`decode`] checks one raw document against the schema and
//! reports *every* unknown field and the first type error of each part,
//! each with its JSON path.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Kind, Metadata, Resource, Spec, API_VERSION};
use crate::problem::Problem;

/// One raw document and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceDocument {
    /// Where the document came from, e.g. `apis.yaml#2` (1-based).
    pub origin: String,
    /// The document as JSON.
    pub value: Value,
}

/// A file that is not YAML or JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: not valid {format}: {message}")]
pub struct SyntaxError {
    /// The file's name as given.
    pub file: String,
    /// 1-based line of the error.
    pub line: usize,
    /// 1-based column of the error.
    pub column: usize,
    /// `YAML` or `JSON`.
    pub format: &'static str,
    /// The parser's explanation.
    pub message: String,
}

/// Splits a file into raw documents. `.json` files (or text starting with
/// `{` or `[`) are JSON: one document or an array of them; anything else is
/// YAML, with documents separated by `---`. Empty YAML documents are skipped.
pub fn split(text: &str, file: &str) -> Result<Vec<SourceDocument>, SyntaxError> {
    let trimmed = text.trim_start();
    let values = if file.ends_with(".json") || trimmed.starts_with('{') || trimmed.starts_with('[')
    {
        split_json(text, file)?
    } else {
        split_yaml(text, file)?
    };
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, value)| SourceDocument {
            origin: format!("{file}#{}", i + 1),
            value,
        })
        .collect())
}

fn split_json(text: &str, file: &str) -> Result<Vec<Value>, SyntaxError> {
    let Strict(value) = serde_json::from_str(text).map_err(|e| SyntaxError {
        file: file.to_string(),
        line: e.line(),
        column: e.column(),
        format: "JSON",
        message: strip_location(&e.to_string()),
    })?;
    Ok(match value {
        Value::Array(items) => items,
        other => vec![other],
    })
}

fn split_yaml(text: &str, file: &str) -> Result<Vec<Value>, SyntaxError> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let Strict(value) = Strict::deserialize(doc).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            SyntaxError {
                file: file.to_string(),
                line,
                column,
                format: "YAML",
                message: strip_location(&e.to_string()),
            }
        })?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// A JSON value parsed strictly: a key given twice in one mapping is an
/// error (plain `Value` keeps the last one silently, hiding a mistake).
/// Raised inside the parser, so the error carries line and column.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON-compatible value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("{v} is not a finite number")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parsers append " at line L column C"; the error already says where.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

const TOP_LEVEL_FIELDS: [&str; 4] = ["apiVersion", "kind", "metadata", "spec"];

/// Checks one raw document against the schema. On failure returns every
/// problem found: unknown fields anywhere, a bad `apiVersion` or `kind`, and
/// the first type error in `metadata` and in `spec`.
pub fn decode(doc: &SourceDocument) -> Result<Resource, Vec<Problem>> {
    match decode_lenient(doc) {
        (Some(res), problems) if problems.is_empty() => Ok(res),
        (_, problems) => Err(problems),
    }
}

/// Like [`decode`], but also returns the resource when the only problems
/// are unknown fields (which decoding skips), so value checks can still
/// run on it and report everything in one go.
pub fn decode_lenient(doc: &SourceDocument) -> (Option<Resource>, Vec<Problem>) {
    let Value::Object(top) = &doc.value else {
        return (
            None,
            vec![Problem::document(
                &doc.origin,
                "",
                "a document must be a mapping with apiVersion, kind, metadata and spec",
            )],
        );
    };
    let kind = top.get("kind").and_then(Value::as_str);
    let known_kind = kind.and_then(Kind::parse_exact);
    let name = top
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    // Name problems after the document when we can: `api/pets` is what the
    // operator will search for; the file position is the fallback.
    let label = match (known_kind, name) {
        (Some(k), Some(n)) => format!("{}/{n}", k.slug()),
        _ => doc.origin.clone(),
    };
    let mut problems = Vec::new();

    for key in top.keys() {
        if !TOP_LEVEL_FIELDS.contains(&key.as_str()) {
            problems.push(Problem::document(
                &label,
                key.as_str(),
                "unknown field (a document has apiVersion, kind, metadata and spec)",
            ));
        }
    }
    match top.get("apiVersion") {
        None => problems.push(Problem::document(&label, "apiVersion", "missing field")),
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(other) => problems.push(Problem::document(
            &label,
            "apiVersion",
            format!("unsupported apiVersion {other}; expected \"{API_VERSION}\""),
        )),
    }
    match (top.get("kind"), known_kind) {
        (None, _) => problems.push(Problem::document(&label, "kind", "missing field")),
        (Some(_), Some(_)) => {}
        (Some(other), None) => problems.push(Problem::document(
            &label,
            "kind",
            format!("unknown kind {other}; expected one of Gateway, Service, Api"),
        )),
    }
    let metadata = match top.get("metadata") {
        None => {
            problems.push(Problem::document(&label, "metadata", "missing field"));
            None
        }
        Some(v) => decode_part::<Metadata>(v, "metadata", &label, &mut problems),
    };
    let spec = match (top.get("spec"), known_kind) {
        (None, _) => {
            problems.push(Problem::document(&label, "spec", "missing field"));
            None
        }
        (Some(_), None) => None,
        (Some(v), Some(Kind::Gateway)) => {
            decode_part(v, "spec", &label, &mut problems).map(Spec::Gateway)
        }
        (Some(v), Some(Kind::Service)) => {
            decode_part(v, "spec", &label, &mut problems).map(|s| Spec::Service(Box::new(s)))
        }
        (Some(v), Some(Kind::Api)) => decode_part(v, "spec", &label, &mut problems).map(Spec::Api),
    };
    match (metadata, spec) {
        (Some(metadata), Some(spec)) => (Some(Resource { metadata, spec }), problems),
        _ => (None, problems),
    }
}

/// Decodes one part of a document, recording unknown fields (all of them)
/// and a type error (the first) as problems under `root`.
fn decode_part<T: DeserializeOwned>(
    value: &Value,
    root: &str,
    label: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let result = {
        // Deserializing from `&Value` borrows instead of copying the tree.
        let de = serde_path_to_error::Deserializer::new(value, &mut track);
        serde_ignored::deserialize(de, |path| {
            let mut p = String::from(root);
            push_ignored_path(&mut p, &path);
            unknown.push(p);
        })
    };
    for path in unknown {
        problems.push(Problem::document(label, path, "unknown field"));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let path = track.path();
            let mut full = String::from(root);
            let rendered = path.to_string();
            if rendered != "." && !rendered.is_empty() {
                if !rendered.starts_with('[') {
                    full.push('.');
                }
                full.push_str(&rendered);
            }
            problems.push(Problem::document(label, full, e.to_string()));
            None
        }
    }
}

/// Renders a `serde_ignored` path as `.a[2].b` after the root.
fn push_ignored_path(out: &mut String, path: &serde_ignored::Path<'_>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            push_ignored_path(out, parent);
            out.push_str(&format!("[{index}]"));
        }
        Path::Map { parent, key } => {
            push_ignored_path(out, parent);
            out.push('.');
            out.push_str(key);
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => push_ignored_path(out, parent),
    }
}

/// A batch of documents as one apply sees them.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Every document that could be decoded (unknown fields skipped).
    pub resources: super::DesiredState,
    /// Every decoding problem, including documents named twice.
    pub problems: Vec<Problem>,
    /// Whether every document was decoded. When not, cross-document checks
    /// would report false errors (a reference to a document that is there
    /// but undecodable), so callers keep only per-document problems.
    pub complete: bool,
}

/// Decodes a batch of documents.
pub fn decode_all(docs: &[SourceDocument]) -> Decoded {
    let mut out = Decoded {
        complete: true,
        ..Default::default()
    };
    for doc in docs {
        let (res, mut problems) = decode_lenient(doc);
        out.problems.append(&mut problems);
        let Some(res) = res else {
            out.complete = false;
            continue;
        };
        let key = res.key();
        if out
            .resources
            .insert(key.clone(), std::sync::Arc::new(res))
            .is_some()
        {
            out.problems.push(Problem::document(
                key.to_string(),
                "",
                format!("{key} appears more than once (again in {})", doc.origin),
            ));
        }
    }
    out
}

/// Builds an object document from parts; handy in tests and tools.
pub fn document(kind: Kind, name: &str, spec: Value) -> Value {
    let mut m = Map::new();
    m.insert("apiVersion".into(), Value::from(API_VERSION));
    m.insert("kind".into(), Value::from(kind.as_str()));
    m.insert("metadata".into(), serde_json::json!({ "name": name }));
    m.insert("spec".into(), spec);
    Value::Object(m)
}

/// A desired state from documents that must decode (for tests).
#[cfg(test)]
pub(crate) fn test_state(docs: Vec<Value>) -> super::DesiredState {
    docs.into_iter()
        .map(|value| {
            let res = decode(&SourceDocument {
                origin: "t".into(),
                value,
            })
            .expect("decodes");
            (res.key(), std::sync::Arc::new(res))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Result<Resource, Vec<Problem>> {
        let docs = split(text, "t.yaml").expect("yaml");
        decode(&docs[0])
    }

    #[test]
    fn reports_every_unknown_field_with_its_path() {
        let problems = one(
            "apiVersion: portico.dev/v1\nkind: Service\nmetadata: {name: a, colour: red}\n\
             spec:\n  endpoints:\n    - {address: 10.0.0.1, port: 80, wieght: 2}\n  protocl: http1\n",
        )
        .unwrap_err();
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"metadata.colour"), "{problems:?}");
        assert!(paths.contains(&"spec.endpoints[0].wieght"), "{problems:?}");
        assert!(paths.contains(&"spec.protocl"), "{problems:?}");
        assert!(problems.iter().all(|p| p.document == "service/a"));
    }

    #[test]
    fn type_errors_carry_a_path() {
        let problems = one(
            "apiVersion: portico.dev/v1\nkind: Service\nmetadata: {name: a}\n\
             spec:\n  endpoints:\n    - {address: 10.0.0.1, port: 70000}\n",
        )
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "spec.endpoints[0].port");
    }

    #[test]
    fn unknown_kind_and_version_are_named() {
        let problems =
            one("apiVersion: v9\nkind: Widget\nmetadata: {name: a}\nspec: {}\n").unwrap_err();
        let text: Vec<_> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            text.iter().any(|t| t.contains("unknown kind \"Widget\"")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("unsupported apiVersion")),
            "{text:?}"
        );
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let err = split("a: b\nc: [unclosed\n", "bad.yaml").unwrap_err();
        assert_eq!(err.file, "bad.yaml");
        assert!(err.line >= 2, "{err}");
        let err = split("{\"a\": }", "bad.json").unwrap_err();
        assert_eq!((err.line, err.format), (1, "JSON"));
    }

    #[test]
    fn duplicate_keys_are_syntax_errors() {
        let err = split("a: 1\nb:\n  c: 1\n  c: 2\n", "d.yaml").unwrap_err();
        assert!(err.message.contains("duplicate key \"c\""), "{err}");
        assert_eq!(err.line, 3, "the mapping holding the duplicate: {err}");
        let err = split("{\"a\": 1, \"a\": 2}", "d.json").unwrap_err();
        assert!(err.message.contains("duplicate key"), "{err}");
    }

    #[test]
    fn multi_document_yaml_skips_empty_documents() {
        let docs = split("---\na: 1\n---\n---\nb: 2\n", "m.yaml").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].origin, "m.yaml#2");
    }
}
