//! Rendering for people (tables, diffs) and for scripts (JSON, YAML).

use portico_cp::model::ResourceKey;
use portico_cp::problem::Problem;
use portico_cp::store::{Change, ChangeAction};
use serde_json::Value;

/// Output formats of `get` and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Columns that fit an 80-column terminal.
    Table,
    /// YAML documents, ready to edit and apply.
    Yaml,
    /// The API's JSON, stable for scripts.
    Json,
}

/// Columns of text, squeezed to `width` by shortening the widest column.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers.
    pub fn new(headers: Vec<&'static str>) -> Self {
        Table {
            headers,
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one cell per header.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with columns separated by two spaces, at most `width` wide.
    pub fn render(&self, width: usize) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(n) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let gaps = 2 * n.saturating_sub(1);
        while widths.iter().sum::<usize>() + gaps > width {
            // Shrink the widest column by one; stop at a readable minimum.
            let (i, w) = widths
                .iter()
                .enumerate()
                .max_by_key(|(_, w)| **w)
                .map(|(i, w)| (i, *w))
                .unwrap_or((0, 0));
            if w <= 8 {
                break;
            }
            widths[i] -= 1;
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let line: Vec<String> = (0..n)
                .map(|i| {
                    let cell = row.get(i).map(String::as_str).unwrap_or("");
                    fit(cell, widths[i])
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

fn fit(cell: &str, width: usize) -> String {
    let len = cell.chars().count();
    if len <= width {
        format!("{cell:<width$}")
    } else {
        let mut s: String = cell.chars().take(width.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// A document as YAML.
pub fn yaml(value: &Value) -> String {
    serde_yaml_ng::to_string(value).unwrap_or_else(|e| format!("# cannot render as YAML: {e}\n"))
}

/// Pretty JSON.
pub fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// Prints problems one per line, indented, under a heading.
pub fn print_problems(heading: &str, problems: &[Problem]) {
    eprintln!("error: {heading}");
    for p in problems {
        eprintln!("  {p}");
    }
}

/// A unified diff of each change's YAML; `from`/`to` label the two sides.
pub fn render_changes(changes: &[Change], from: &str, to: &str) -> String {
    let mut out = String::new();
    for c in changes {
        let before = c.before.as_ref().map(yaml).unwrap_or_default();
        let after = c.after.as_ref().map(yaml).unwrap_or_default();
        let diff = similar::TextDiff::from_lines(&before, &after);
        let label = |side: &str, present: bool| {
            if present {
                format!("{} ({side})", c.key)
            } else {
                "/dev/null".to_string()
            }
        };
        out.push_str(
            &diff
                .unified_diff()
                .context_radius(3)
                .header(
                    &label(from, c.before.is_some()),
                    &label(to, c.after.is_some()),
                )
                .to_string(),
        );
    }
    out
}

/// One line per change: `api/pets created`.
pub fn change_lines(changes: &[Change]) -> String {
    changes
        .iter()
        .map(|c| format!("{} {}\n", c.key, action_word(c.action)))
        .collect()
}

/// `created`, `updated`, `deleted`.
pub fn action_word(a: ChangeAction) -> &'static str {
    match a {
        ChangeAction::Created => "created",
        ChangeAction::Updated => "updated",
        ChangeAction::Deleted => "deleted",
    }
}

/// The key of a document in the API's JSON.
pub fn key_of(doc: &Value) -> Option<ResourceKey> {
    let kind = portico_cp::model::Kind::parse_exact(doc.get("kind")?.as_str()?)?;
    let name = doc.get("metadata")?.get("name")?.as_str()?;
    Some(ResourceKey::new(kind, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_80_columns() {
        let mut t = Table::new(vec!["NAME", "HOSTNAMES", "ROUTES"]);
        t.row(vec!["pets".into(), "a.example.com,".repeat(20), "3".into()]);
        let out = t.render(80);
        assert!(out.lines().all(|l| l.chars().count() <= 80), "{out}");
        assert!(out.contains('…'));
    }
}
