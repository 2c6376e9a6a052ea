//! `portico`: the command-line tool for a Portico control plane.

mod client;
mod config;
mod files;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portico_cp::admin::types::*;
use portico_cp::model::Kind;
use portico_cp::store::Revision;
use serde_json::Value;

use client::{Client, ClientError};
use output::{Format, Table};

/// Operate a Portico API gateway: apply desired state, inspect it, roll it back.
#[derive(Debug, Parser)]
#[command(name = "portico", version, about)]
struct Cli {
    /// Admin API of the control plane [default: http://127.0.0.1:7700].
    #[arg(long, global = true, env = "PORTICO_SERVER")]
    server: Option<String>,
    /// Bearer token for the admin API.
    #[arg(long, global = true, env = "PORTICO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (e.g. <data-dir>/admin.token).
    #[arg(long, global = true, env = "PORTICO_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or replace documents, atomically, as a new revision.
    Apply {
        /// YAML/JSON file, directory, or - for standard input (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Message recorded with the revision.
        #[arg(short, long, default_value = "")]
        message: String,
        /// Fail unless the current revision is N.
        #[arg(long, value_name = "N")]
        expect_revision: Option<u64>,
        /// Validate and show what would change; apply nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what applying files would change, or what a revision changed.
    Diff {
        /// Files to compare with the current state.
        #[arg(
            short = 'f',
            long = "filename",
            conflicts_with = "revision",
            required_unless_present = "revision"
        )]
        files: Vec<PathBuf>,
        /// Show the changes made by revision N.
        #[arg(long, value_name = "N")]
        revision: Option<u64>,
    },
    /// Check files against every rule, offline (the files are the whole state).
    Validate {
        /// Files to check.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Check against the server's current state instead of offline.
        #[arg(long)]
        remote: bool,
    },
    /// List documents of a kind, or show one.
    Get {
        /// gateway, service, api (plural and short forms work), or all.
        kind: String,
        /// A document name.
        name: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Delete a document, as a new revision.
    Delete {
        /// gateway, service or api.
        kind: String,
        /// The document's name.
        name: String,
        /// Fail unless the current revision is N.
        #[arg(long, value_name = "N")]
        expect_revision: Option<u64>,
        /// Message recorded with the revision.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// List revisions, newest first.
    History {
        /// How many.
        #[arg(long, default_value = "20")]
        limit: u32,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Restore the state of revision N, as a new revision.
    Rollback {
        /// The revision to restore.
        revision: u64,
        /// Fail unless the current revision is N.
        #[arg(long, value_name = "N")]
        expect_revision: Option<u64>,
        /// Message recorded with the revision.
        #[arg(short, long, default_value = "")]
        message: String,
    },
    /// Show the control plane's state.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

fn report(e: &anyhow::Error) {
    if let Some(ClientError::Api { body, .. }) = e.downcast_ref::<ClientError>() {
        if !body.error.details.is_empty() {
            output::print_problems(&body.error.message, &body.error.details);
            return;
        }
    }
    eprintln!("error: {e:#}");
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Validate {
        files,
        remote: false,
    } = &cli.command
    {
        return validate_offline(files);
    }
    let target = config::resolve(cli.server, cli.token, cli.token_file)?;
    let client = Client::new(target.server, target.token)?;
    match cli.command {
        Command::Apply {
            files,
            message,
            expect_revision,
            dry_run,
        } => {
            let (documents, origins) = read(&files)?;
            let req = ApplyRequest {
                documents,
                origins,
                message,
                expect_revision: expect_revision.map(Revision),
                dry_run,
            };
            let resp: WriteResponse = client.post("/api/v1/apply", &req).await?;
            print!("{}", output::change_lines(&resp.changes));
            if dry_run {
                println!(
                    "dry run: {} change(s) would be applied on top of revision {}",
                    resp.changes.len(),
                    resp.revision
                );
            } else if resp.committed {
                println!("applied as revision {}", resp.revision);
            } else {
                println!("no changes; revision {} is current", resp.revision);
            }
        }
        Command::Diff {
            files,
            revision: Some(n),
        } => {
            debug_assert!(files.is_empty());
            let detail: RevisionDetail = client.get(&format!("/api/v1/revisions/{n}")).await?;
            let r = &detail.revision;
            println!(
                "revision {} by {} at {}: {}",
                r.number,
                r.author,
                r.created_at,
                if r.message.is_empty() {
                    "(no message)"
                } else {
                    &r.message
                }
            );
            print!(
                "{}",
                output::render_changes(
                    &detail.changes,
                    &format!("revision {}", n.saturating_sub(1)),
                    &format!("revision {n}")
                )
            );
        }
        Command::Diff {
            files,
            revision: None,
        } => {
            let (documents, origins) = read(&files)?;
            let req = ApplyRequest {
                documents,
                origins,
                dry_run: true,
                ..Default::default()
            };
            let resp: WriteResponse = client.post("/api/v1/apply", &req).await?;
            if resp.changes.is_empty() {
                println!("no differences from revision {}", resp.revision);
            } else {
                print!(
                    "{}",
                    output::render_changes(
                        &resp.changes,
                        &format!("revision {}", resp.revision),
                        "files"
                    )
                );
            }
        }
        Command::Validate { files, remote: _ } => {
            let (documents, origins) = read(&files)?;
            let resp: ValidateResponse = client
                .post("/api/v1/validate", &ValidateRequest { documents, origins })
                .await?;
            if !resp.valid {
                output::print_problems(
                    &format!(
                        "{} problem(s) against the current state",
                        resp.problems.len()
                    ),
                    &resp.problems,
                );
                return Ok(ExitCode::FAILURE);
            }
            println!("valid against the current state");
        }
        Command::Get {
            kind,
            name,
            output: format,
        } => get(&client, &kind, name, format).await?,
        Command::Delete {
            kind,
            name,
            expect_revision,
            message,
        } => {
            let kind = parse_kind(&kind)?;
            let mut path = format!("/api/v1/resources/{}/{}?", kind.slug(), encode(&name));
            if let Some(n) = expect_revision {
                path.push_str(&format!("expectRevision={n}&"));
            }
            if let Some(m) = message {
                path.push_str(&format!("message={}", encode(&m)));
            }
            let resp: WriteResponse = client.delete(path.trim_end_matches(['?', '&'])).await?;
            print!("{}", output::change_lines(&resp.changes));
            println!("deleted as revision {}", resp.revision);
        }
        Command::History {
            limit,
            output: format,
        } => {
            let list: RevisionList = client
                .get(&format!("/api/v1/revisions?limit={limit}"))
                .await?;
            match format {
                Format::Json => println!("{}", output::json(&list)),
                Format::Yaml => print!("{}", output::yaml(&serde_json::to_value(&list)?)),
                Format::Table => {
                    let mut t = Table::new(vec!["REV", "TIME", "AUTHOR", "CHANGES", "MESSAGE"]);
                    for r in &list.items {
                        let mut message = r.message.clone();
                        if let Some(of) = r.rollback_of {
                            if message.is_empty() {
                                message = format!("rollback to {of}");
                            }
                        }
                        t.row(vec![
                            r.number.to_string(),
                            r.created_at
                                .chars()
                                .take(19)
                                .collect::<String>()
                                .replace('T', " "),
                            r.author.clone(),
                            format!("+{} ~{} -{}", r.created, r.updated, r.deleted),
                            message,
                        ]);
                    }
                    if list.items.is_empty() {
                        println!("no revisions yet");
                    } else {
                        print!("{}", t.render(80));
                    }
                }
            }
        }
        Command::Rollback {
            revision,
            expect_revision,
            message,
        } => {
            let req = RollbackRequest {
                revision: Revision(revision),
                message,
                expect_revision: expect_revision.map(Revision),
            };
            let resp: WriteResponse = client.post("/api/v1/rollback", &req).await?;
            print!("{}", output::change_lines(&resp.changes));
            if resp.committed {
                println!(
                    "rolled back to the state of revision {revision} as revision {}",
                    resp.revision
                );
            } else {
                println!(
                    "revision {} already has the state of revision {revision}; nothing to do",
                    resp.revision
                );
            }
        }
        Command::Status { output: format } => {
            let s: StatusResponse = client.get("/api/v1/status").await?;
            match format {
                Format::Json => println!("{}", output::json(&s)),
                Format::Yaml => print!("{}", output::yaml(&serde_json::to_value(&s)?)),
                Format::Table => {
                    println!("control plane  portico-cp {}", s.version);
                    println!("revision       {}", s.revision);
                    println!("store          {}", s.store);
                    println!(
                        "uptime         {}",
                        humantime::format_duration(std::time::Duration::from_secs(
                            s.uptime_seconds
                        ))
                    );
                    let counts: Vec<String> = s
                        .resources
                        .iter()
                        .map(|(k, n)| format!("{n} {k}"))
                        .collect();
                    println!("documents      {}", counts.join(", "));
                    println!("nodes          {} connected", s.nodes.len());
                    if !s.nodes.is_empty() {
                        println!();
                        print!("{}", nodes_table(&s.nodes));
                        for n in &s.nodes {
                            for (t, st) in &n.types {
                                if let Some(nack) = &st.nack {
                                    println!("NACK  {} {t}: {nack}", n.id);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One row per node: who, where, and per type the ACKed version (`!` marks
/// a type whose last response was NACKed).
fn nodes_table(nodes: &[portico_cp::xds::registry::NodeStatus]) -> String {
    let mut t = Table::new(vec![
        "NODE", "GROUP", "CLIENT", "ADDRESS", "STREAM", "CDS", "EDS", "LDS", "RDS",
    ]);
    for n in nodes {
        let v = |ty: &str| match n.types.get(ty) {
            None => "-".to_string(),
            Some(st) => {
                let acked = st
                    .acked_version
                    .as_deref()
                    .map(|v| v.chars().take(6).collect::<String>())
                    .unwrap_or_else(|| "sent".into());
                if st.nack.is_some() {
                    format!("{acked}!")
                } else {
                    acked
                }
            }
        };
        t.row(vec![
            n.id.clone(),
            n.group.clone(),
            format!("{:?}", n.client).to_lowercase(),
            n.address.clone(),
            n.stream.clone(),
            v("cds"),
            v("eds"),
            v("lds"),
            v("rds"),
        ]);
    }
    t.render(80)
}

fn validate_offline(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let docs = files::read_documents(files)?;
    let problems = portico_cp::validate::validate_documents(&docs);
    if problems.is_empty() {
        println!("{} document(s) valid", docs.len());
        return Ok(ExitCode::SUCCESS);
    }
    output::print_problems(
        &format!("{} problem(s); nothing would be applied", problems.len()),
        &problems,
    );
    Ok(ExitCode::FAILURE)
}

fn read(files: &[PathBuf]) -> anyhow::Result<(Vec<Value>, Vec<String>)> {
    Ok(files::read_documents(files)?
        .into_iter()
        .map(|d| (d.value, d.origin))
        .unzip())
}

fn parse_kind(kind: &str) -> anyhow::Result<Kind> {
    Kind::parse_loose(kind)
        .ok_or_else(|| anyhow::anyhow!("unknown kind {kind:?}; use gateway, service or api"))
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn get(
    client: &Client,
    kind: &str,
    name: Option<String>,
    format: Format,
) -> anyhow::Result<()> {
    let kind = if kind == "all" {
        None
    } else {
        Some(parse_kind(kind)?)
    };
    if let Some(name) = name {
        let Some(kind) = kind else {
            anyhow::bail!("name a kind to get one document")
        };
        let one: ResourceResponse = client
            .get(&format!(
                "/api/v1/resources/{}/{}",
                kind.slug(),
                encode(&name)
            ))
            .await?;
        match format {
            Format::Json => println!("{}", output::json(&one.item)),
            Format::Yaml => print!("{}", output::yaml(&one.item)),
            Format::Table => print!("{}", table_for(kind, std::slice::from_ref(&one.item))),
        }
        return Ok(());
    }
    let path = match kind {
        Some(k) => format!("/api/v1/resources/{}", k.slug()),
        None => "/api/v1/resources".to_string(),
    };
    let list: ResourceList = client.get(&path).await?;
    match format {
        Format::Json => println!("{}", output::json(&list)),
        Format::Yaml => {
            for (i, item) in list.items.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", output::yaml(item));
            }
        }
        Format::Table if list.items.is_empty() => println!("no documents"),
        Format::Table => match kind {
            Some(k) => print!("{}", table_for(k, &list.items)),
            None => {
                for k in Kind::ALL {
                    let items: Vec<Value> = list
                        .items
                        .iter()
                        .filter(|d| output::key_of(d).is_some_and(|key| key.kind == k))
                        .cloned()
                        .collect();
                    if !items.is_empty() {
                        println!("{}", table_for(k, &items));
                    }
                }
            }
        },
    }
    Ok(())
}

fn s(v: &Value, ptr: &str) -> String {
    match v.pointer(ptr) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn list(v: &Value, ptr: &str, f: impl Fn(&Value) -> String) -> String {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(f).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

fn table_for(kind: Kind, items: &[Value]) -> String {
    let mut t = match kind {
        Kind::Gateway => Table::new(vec!["GATEWAY", "NODE GROUP", "LISTENERS"]),
        Kind::Service => Table::new(vec!["SERVICE", "PROTOCOL", "LB", "ENDPOINTS"]),
        Kind::Api => Table::new(vec![
            "API",
            "VERSION",
            "STATE",
            "ROUTES",
            "BASE PATH",
            "HOSTNAMES",
        ]),
    };
    for d in items {
        t.row(match kind {
            Kind::Gateway => vec![
                s(d, "/metadata/name"),
                s(d, "/spec/nodeGroup"),
                list(d, "/spec/listeners", |l| {
                    format!("{}:{}/{}", s(l, "/name"), s(l, "/port"), s(l, "/protocol"))
                }),
            ],
            Kind::Service => vec![
                s(d, "/metadata/name"),
                s(d, "/spec/protocol"),
                s(d, "/spec/loadBalancing"),
                list(d, "/spec/endpoints", |e| {
                    format!("{}:{}", s(e, "/address"), s(e, "/port"))
                }),
            ],
            Kind::Api => vec![
                s(d, "/metadata/name"),
                s(d, "/spec/version"),
                s(d, "/spec/lifecycle/state"),
                d.pointer("/spec/routes")
                    .and_then(Value::as_array)
                    .map(|r| r.len())
                    .unwrap_or(0)
                    .to_string(),
                d.pointer("/spec/basePath")
                    .and_then(Value::as_str)
                    .unwrap_or("/")
                    .to_string(),
                list(d, "/spec/hostnames", |h| {
                    h.as_str().unwrap_or_default().to_string()
                }),
            ],
        });
    }
    t.render(80)
}
