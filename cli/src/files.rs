//! Reading `-f FILE|DIR|-` into documents.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use portico_cp::model::decode::{split, SourceDocument};

/// Reads every document named by `paths`. A directory contributes its
/// `.yaml`, `.yml` and `.json` files, sorted by name, recursively; `-` is
/// standard input. A syntax error stops with file, line and column.
pub fn read_documents(paths: &[PathBuf]) -> anyhow::Result<Vec<SourceDocument>> {
    let mut docs = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read standard input")?;
            docs.extend(split(&text, "<stdin>")?);
            continue;
        }
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        let files = if meta.is_dir() {
            let mut files = Vec::new();
            collect_dir(path, &mut files)?;
            if files.is_empty() {
                bail!("{} holds no .yaml, .yml or .json files", path.display());
            }
            files
        } else {
            vec![path.clone()]
        };
        for file in files {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            docs.extend(split(&text, &file.display().to_string())?);
        }
    }
    if docs.is_empty() {
        bail!(
            "no documents found in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(docs)
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_dir(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}
