//! Apply latency and store size for a desired state of 5,000 routes across
//! 500 Apis, through the real `portico-cp` (SQLite store) and the real
//! `portico` CLI. Run it with `bench/apply.sh`; it prints a Markdown
//! section for BENCHMARKS.md.

use std::path::Path;
use std::time::{Duration, Instant};

use portico_bench::{ms, size, stats};
use portico_integration::{workload, ControlPlane, Run};

const APIS: usize = 500;
const ROUTES_PER_API: usize = 10;
const SERVICES: usize = 50;
const ROUNDS: usize = 10;

fn store_bytes(dir: &Path) -> u64 {
    ["portico.db", "portico.db-wal", "portico.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn api_apply(cp: &ControlPlane, generation: u64) -> Duration {
    let body = workload::apply_body(
        &workload::state(APIS, ROUTES_PER_API, SERVICES, generation),
        "bench",
    );
    let t = Instant::now();
    let r = cp.api("POST", "/api/v1/apply", Some(&body));
    let d = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    d
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path());
    let docs = workload::state(APIS, ROUTES_PER_API, SERVICES, 0);
    let yaml_path = dir.path().join("state.json");
    std::fs::write(&yaml_path, serde_json::to_string_pretty(&docs).unwrap()).unwrap();
    let file_bytes = std::fs::metadata(&yaml_path).unwrap().len();

    // 1. The first apply: everything is created.
    let empty_store = store_bytes(dir.path());
    let first = api_apply(&cp, 0);
    let after_first = store_bytes(dir.path());

    // 2. Re-applying the same state: validated and diffed, nothing written.
    let mut noop: Vec<Duration> = (0..ROUNDS).map(|_| api_apply(&cp, 0)).collect();

    // 3. Every Api changed (new generation annotation): 500 documents rewritten.
    let mut all: Vec<Duration> = (1..=ROUNDS as u64).map(|g| api_apply(&cp, g)).collect();
    let after_all = store_bytes(dir.path());

    // 4. One route of one Api changed, sent as the whole state (what
    //    `portico apply -f dir/` does after a one-line edit).
    let mut one = Vec::new();
    for i in 0..ROUNDS {
        let mut docs = workload::state(APIS, ROUTES_PER_API, SERVICES, ROUNDS as u64);
        docs[1 + SERVICES]["spec"]["routes"][0]["action"]["timeout"] =
            format!("{}s", 10 + i).into();
        let body = workload::apply_body(&docs, "one route");
        let t = Instant::now();
        let r = cp.api("POST", "/api/v1/apply", Some(&body));
        one.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["changes"].as_array().unwrap().len(), 1);
    }

    // 5. The operator's view: `portico apply -f FILE` (read, parse, send,
    //    validate, commit, print), the same state with a new generation.
    let mut cli = Vec::new();
    for g in 0..ROUNDS as u64 {
        let docs = workload::state(APIS, ROUTES_PER_API, SERVICES, 1000 + g);
        std::fs::write(&yaml_path, serde_json::to_string_pretty(&docs).unwrap()).unwrap();
        let t = Instant::now();
        let run = Run::from(
            cp.cli()
                .args(["apply", "-f", yaml_path.to_str().unwrap()])
                .output()
                .unwrap(),
        );
        cli.push(t.elapsed());
        run.ok();
    }
    let revisions = cp.revision();
    let final_size = store_bytes(dir.path());

    let (first_s, noop, all, one, cli) = (
        first,
        stats(&mut noop),
        stats(&mut all),
        stats(&mut one),
        stats(&mut cli),
    );
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "### Apply: {} routes across {APIS} Apis ({SERVICES} Services), SQLite store",
        APIS * ROUTES_PER_API
    );
    println!();
    println!("Machine: {cpus} cores. Request body {} of JSON. {ROUNDS} rounds each; latency in ms, client-observed over loopback.", size(file_bytes));
    println!();
    println!("| apply | min | p50 | p90 | max |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| first apply (creates 551 documents) | {} | {} | {} | {} |",
        ms(first_s),
        ms(first_s),
        ms(first_s),
        ms(first_s)
    );
    for (name, s) in [
        ("unchanged state (validate + diff, no revision)", noop),
        ("one route changed (1 document written)", one),
        ("every Api changed (500 documents written)", all),
        ("`portico apply -f` CLI, every Api changed", cli),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(s.min),
            ms(s.p50),
            ms(s.p90),
            ms(s.max)
        );
    }
    println!();
    println!("| store (portico.db + WAL) | size |");
    println!("|---|---:|");
    println!("| empty | {} |", size(empty_store));
    println!(
        "| after the first apply (revision 1) | {} |",
        size(after_first)
    );
    println!(
        "| after {} full rewrites (revision {}) | {} |",
        ROUNDS,
        1 + ROUNDS,
        size(after_all)
    );
    println!(
        "| at the end (revision {revisions}, every version kept) | {} |",
        size(final_size)
    );
}
