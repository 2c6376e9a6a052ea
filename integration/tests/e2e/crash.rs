//! kill -9 during applies: what was acknowledged survives, and no apply is
//! ever half there.

use std::sync::mpsc;

use portico_integration::{workload, ControlPlane};
use serde_json::Value;

/// The generations of every Api document, from the API.
fn generations(cp: &ControlPlane) -> Vec<u64> {
    let items = cp.api("GET", "/api/v1/resources/api", None).json()["items"].clone();
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["metadata"]["annotations"]["portico.dev/generation"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
fn kill_9_mid_apply_loses_nothing_acknowledged_and_leaves_no_half_apply() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = 0u64; // highest generation the server acknowledged
    let mut generation = 0u64;
    let mut cp = ControlPlane::start(dir.path());
    // Time one apply of this size, so the kills below can be spread from
    // "before the request is read" to "after the answer was sent".
    let started = std::time::Instant::now();
    let r = cp.api(
        "POST",
        "/api/v1/apply",
        Some(&workload::apply_body(
            &workload::state(100, 10, 20, 0),
            "seed",
        )),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let apply_time = started.elapsed();
    let mut killed_mid_apply = 0;
    const ROUNDS: u32 = 12;
    for round in 0..ROUNDS {
        generation += 1;
        let body = workload::apply_body(
            &workload::state(100, 10, 20, generation),
            &format!("gen {generation}"),
        );
        let addr = cp.addr.clone();
        let token = cp.token.clone();
        let (tx, rx) = mpsc::channel();
        let sender = std::thread::spawn(move || {
            tx.send(()).unwrap();
            portico_integration::http::request(
                &addr,
                "POST",
                "/api/v1/apply",
                Some(&token),
                Some(&body),
            )
        });
        rx.recv().unwrap();
        std::thread::sleep(apply_time * 3 * round / (2 * ROUNDS));
        cp.kill9();
        let answer = sender.join().unwrap();
        match answer {
            Ok(r) if r.status == 200 => acknowledged = generation,
            Ok(r) => panic!(
                "apply failed for a reason other than the kill: {} {}",
                r.status, r.body
            ),
            Err(_) => killed_mid_apply += 1,
        }

        cp = ControlPlane::start(dir.path());
        let gens = generations(&cp);
        assert_eq!(gens.len(), 100, "every Api document is present");
        let first = gens[0];
        assert!(
            gens.iter().all(|g| *g == first),
            "half-applied state after kill -9: {gens:?}"
        );
        assert!(
            first >= acknowledged,
            "acknowledged generation {acknowledged} lost (found {first})"
        );
        // Not necessarily this round's, the last's or the acknowledged
        // one: an apply killed after its commit and before its answer,
        // then applies killed before theirs, leave an unacknowledged one
        // from rounds ago. Never one that was not sent.
        assert!(
            first <= generation,
            "generation {first} was never sent (last {generation})"
        );
        // History is contiguous and every revision is readable.
        let head = cp.revision();
        let list = cp.api("GET", "/api/v1/revisions?limit=1000", None).json();
        let numbers: Vec<u64> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["number"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=head).rev().collect();
        assert_eq!(numbers, expected);
        let detail: Value = cp
            .api("GET", &format!("/api/v1/revisions/{head}"), None)
            .json();
        assert!(detail["changes"].is_array());
    }
    eprintln!("one apply took {apply_time:?}; kills that interrupted an apply: {killed_mid_apply} of {ROUNDS}");
    assert!(
        killed_mid_apply > 0,
        "no kill landed during an apply; the test proved nothing"
    );
    // A final apply still works on the recovered store.
    generation += 1;
    let r = cp.api(
        "POST",
        "/api/v1/apply",
        Some(&workload::apply_body(
            &workload::state(100, 10, 20, generation),
            "after",
        )),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(generations(&cp).iter().all(|g| *g == generation));
}
