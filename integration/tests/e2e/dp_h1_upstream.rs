//! portico-dp's own HTTP/1.1 upstream client against a scripted origin
//! that writes its answers byte by byte as the test says: every framing
//! RFC 9112 allows, answers that arrive before the request body is read,
//! keep-alive connections the origin closes while idle, and garbage.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::dp_common::{api, http1, raw, Env};

/// What the origin saw of one request.
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

/// Reads a request head; `None` at a clean end of the connection.
fn read_head(r: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).ok()?;
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Some(Seen {
        method,
        path,
        headers,
    })
}

impl Seen {
    fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the request body by its framing; returns its bytes.
fn read_body(r: &mut BufReader<TcpStream>, seen: &Seen) -> Vec<u8> {
    if seen
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        let mut out = Vec::new();
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
            if n == 0 {
                // Trailers until an empty line.
                loop {
                    let mut l = String::new();
                    r.read_line(&mut l).expect("trailer");
                    if l.trim_end().is_empty() {
                        return out;
                    }
                }
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).expect("chunk");
            out.extend_from_slice(&chunk[..n]);
        }
    }
    let n: usize = seen
        .header("content-length")
        .map_or(0, |v| v.parse().expect("content-length"));
    let mut body = vec![0; n];
    r.read_exact(&mut body).expect("body");
    body
}

/// The scripted origin: one thread per connection, keep-alive; counts
/// connections. Paths say how to answer.
fn origin() -> (u16, Arc<AtomicU32>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let conns = Arc::new(AtomicU32::new(0));
    let counter = conns.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            counter.fetch_add(1, SeqCst);
            std::thread::spawn(move || serve(s));
        }
    });
    (port, conns)
}

/// Body bytes `/early-ok` read after it had answered.
static EARLY_OK_READ: AtomicUsize = AtomicUsize::new(0);

fn serve(s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    while let Some(seen) = read_head(&mut r) {
        let path = seen.path.trim_start_matches("/a");
        // Answers that do not wait for the body come first.
        if path == "/early" {
            let _ = w.write_all(
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large",
            );
            // Let the proxy see the answer before the socket goes.
            let _ = w.shutdown(std::net::Shutdown::Write);
            let mut sink = [0u8; 64 * 1024];
            while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
            return;
        }
        if path == "/early-ok" {
            // Answers at once and reads the body afterwards (an upload
            // service that flushes its head first): the proxy must still
            // send all of it.
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nearly ok");
            let body = read_body(&mut r, &seen);
            EARLY_OK_READ.store(body.len(), SeqCst);
            continue;
        }
        if path == "/duplex" {
            // Full duplex: the head at once, then each chunk of the
            // request body echoed as it arrives, then the end.
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
            loop {
                let mut size = String::new();
                if r.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).expect("chunk");
                if n == 0 {
                    break; // no trailers in this test
                }
                let _ = w.write_all(format!("{n:x}\r\n").as_bytes());
                let _ = w.write_all(&chunk);
            }
            let _ = w.write_all(b"0\r\n\r\n");
            continue;
        }
        if path == "/continue" {
            let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let body = read_body(&mut r, &seen);
        let write = |w: &mut TcpStream, parts: &[&[u8]]| {
            for p in parts {
                w.write_all(p)?;
                w.flush()?;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok::<(), std::io::Error>(())
        };
        let ok = match path {
            "/chunked" => write(
                &mut w,
                &[
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-trailer\r\n\r\n5\r",
                    b"\nhel",
                    b"lo\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n",
                    b"\r\n",
                ],
            ),
            "/close" => {
                let _ = write(&mut w, &[b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end"]);
                return;
            }
            "/nocontent" => write(&mut w, &[b"HTTP/1.1 204 No Content\r\n\r\n"]),
            "/split" => write(
                &mut w,
                &[
                    b"HTTP/1.1 200 OK\r\ncontent-",
                    b"length: 11\r\nx-a: b\r\n\r\nhello",
                    b" world",
                ],
            ),
            "/idle-close" => {
                let _ = write(&mut w, &[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]);
                // An origin whose keep-alive timeout is short: the
                // connection goes while the proxy holds it idle.
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
            "/switch" => {
                let _ = write(
                    &mut w,
                    &[b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"],
                );
                return;
            }
            "/garbage" => {
                let _ = write(&mut w, &[b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"]);
                return;
            }
            _ => {
                let text = format!(
                    "{} {} body={} te={} cl={}",
                    seen.method,
                    path,
                    body.len(),
                    seen.header("transfer-encoding").unwrap_or("-"),
                    seen.header("content-length").unwrap_or("-"),
                );
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", text.len());
                if seen.method == "HEAD" {
                    write(&mut w, &[head.as_bytes()])
                } else {
                    write(&mut w, &[head.as_bytes(), text.as_bytes()])
                }
            }
        };
        if ok.is_err() {
            return;
        }
    }
}

/// A chunked POST of `chunks` chunks of 64 KiB, on a connection that closes.
fn chunked_post(path: &str, chunks: usize) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..chunks {
        req.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        req.extend_from_slice(&[b'x'; 64 * 1024]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

/// A gateway whose API `a` (base `/a`) routes everything to the scripted
/// origin; with the origin's connection count.
pub(super) fn gateway_to_origin() -> (Env, Arc<AtomicU32>) {
    let (origin_port, conns) = origin();
    let env = Env::new(|_| {
        vec![
            json!({"apiVersion": "portico.dev/v1", "kind": "Service", "metadata": {"name": "s"},
                   "spec": {"endpoints": [{"address": "127.0.0.1", "port": origin_port}]}}),
            api(
                "a",
                "/a",
                &[],
                json!([{"name": "all", "match": {"path": "/"}, "action": {"service": "s"}}]),
            ),
        ]
    });
    (env, conns)
}

#[test]
fn http1_upstream_framing_early_answers_and_idle_closes() {
    let (env, conns) = gateway_to_origin();
    let _dp = env.dp("dp1", &[]);
    let port = env.port;
    let get = |path: &str| http1(port, "GET", path, "gw", &[], "").expect("answer");

    // A chunked answer split mid-size-line, with an extension and trailers.
    let r = get("/a/chunked");
    assert_eq!((r.status, r.body.as_str()), (200, "hello world"), "{r:?}");
    // Its trailers reach a client that asks for them.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(
        b"GET /a/chunked HTTP/1.1\r\nHost: gw\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .expect("request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.contains("\r\nx-trailer: t\r\n"), "{text}");
    // A head split mid-name, the body in two writes.
    let r = get("/a/split");
    assert_eq!((r.status, r.body.as_str()), (200, "hello world"), "{r:?}");
    assert_eq!(r.header("x-a"), Some("b"));
    // Delimited by the end of the connection.
    let r = get("/a/close");
    assert_eq!((r.status, r.body.as_str()), (200, "until the end"), "{r:?}");
    // No body by status or by method, though a length is declared.
    let r = get("/a/nocontent");
    assert_eq!((r.status, r.body.as_str()), (204, ""), "{r:?}");
    // A 204 has no length and still leaves its connection reusable.
    let before = conns.load(SeqCst);
    for _ in 0..5 {
        assert_eq!(get("/a/nocontent").status, 204);
    }
    // Each of the data plane's two workers keeps its own idle
    // connections (nginx's workers do too): at most one new one each.
    assert!(
        conns.load(SeqCst) - before <= 2,
        "204s reuse the connection"
    );
    let r = http1(port, "HEAD", "/a/head", "gw", &[], "").expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    let expected = "HEAD /head body=0 te=- cl=-".len().to_string();
    assert_eq!(r.header("content-length"), Some(expected.as_str()), "{r:?}");
    // 100 Continue is passed over; the final answer comes through.
    let r = http1(port, "POST", "/a/continue", "gw", &[], "abc").expect("answer");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "POST /continue body=3 te=- cl=3"),
        "{r:?}"
    );
    // Bodies: a declared length goes as is; an empty POST says 0.
    let r = http1(port, "PUT", "/a/len", "gw", &[], "hello").expect("answer");
    assert_eq!(r.body, "PUT /len body=5 te=- cl=5", "{r:?}");
    let r = http1(port, "POST", "/a/len", "gw", &[], "").expect("answer");
    assert_eq!(r.body, "POST /len body=0 te=- cl=0", "{r:?}");
    // A chunked request of 1 MiB streams through (not buffered: it is
    // over the retry buffer) and goes upstream chunked.
    let r = raw(port, &chunked_post("/a/big", 16)).expect("answer");
    assert_eq!(r.body, "POST /big body=1048576 te=chunked cl=-", "{r:?}");
    // A success before the body is read: the body still goes in full.
    let r = raw(port, &chunked_post("/a/early-ok", 8)).expect("answer");
    assert_eq!((r.status, r.body.as_str()), (200, "early ok"), "{r:?}");
    assert!(
        portico_integration::wait_for(Duration::from_secs(5), || {
            (EARLY_OK_READ.load(SeqCst) == 8 * 64 * 1024).then_some(())
        })
        .is_some(),
        "the origin read {} body bytes",
        EARLY_OK_READ.load(SeqCst)
    );
    // Full duplex: the origin echoes each piece of the body as it
    // arrives, and the client sends the next only once it has the echo of
    // the last. The answer's head and first echo come through while the
    // request is still open; then the rest, and the answer's end after
    // the request's. The connection is reused afterwards.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(
        b"POST /a/duplex HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
    )
    .expect("head and first piece");
    let mut got = Vec::new();
    let until = |s: &mut TcpStream, got: &mut Vec<u8>, want: &[u8]| {
        let mut buf = [0u8; 4096];
        while !got.windows(want.len()).any(|w| w == want) {
            let n = s.read(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "waiting for {:?}: {e}; got {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(got)
                )
            });
            assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(got));
            got.extend_from_slice(&buf[..n]);
        }
    };
    until(&mut s, &mut got, b"first");
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    s.write_all(b"6\r\nsecond\r\n").expect("second piece");
    until(&mut s, &mut got, b"second");
    s.write_all(b"0\r\n\r\n").expect("end");
    until(&mut s, &mut got, b"\r\n0\r\n\r\n");
    let before = conns.load(SeqCst);
    s.write_all(b"GET /a/next-duplex HTTP/1.1\r\nHost: gw\r\n\r\n")
        .expect("next request");
    until(&mut s, &mut got, b"GET /next-duplex body=0");
    assert_eq!(
        conns.load(SeqCst),
        before,
        "the upstream connection was reused"
    );
    drop(s);

    // An answer before the body is read: the proxy stops sending and
    // passes it on (8 MiB would fill every socket buffer on the way).
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"POST /a/early HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 8388608\r\n\r\n")
        .expect("head");
    let writer = {
        let mut s = s.try_clone().expect("clone");
        std::thread::spawn(move || {
            let chunk = vec![b'y'; 64 * 1024];
            for _ in 0..128 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = super::dp_common::parse(&out).expect("early answer");
    assert_eq!((r.status, r.body.as_str()), (413, "too large"), "{r:?}");
    drop(s);
    let _ = writer.join();

    // An idle pooled connection the origin has closed is not used again:
    // each request below first finds the previous one's connection, which
    // the origin closed meanwhile, and still succeeds.
    for i in 0..5 {
        let r = get("/a/idle-close");
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "ok"),
            "request {i}: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    // Keep-alive otherwise: ten requests, no new connection.
    let before = conns.load(SeqCst);
    for _ in 0..10 {
        assert_eq!(get("/a/len").status, 200);
    }
    assert!(
        conns.load(SeqCst) - before <= 2,
        "connections are reused (one pool per worker)"
    );

    // A protocol switch nobody asked for is a bad gateway, not an answer.
    let r = get("/a/switch");
    assert_eq!(r.status, 502, "{r:?}");
    // Garbage from the origin: 502, Envoy's protocol error, and the next
    // request is fine.
    let r = get("/a/garbage");
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            502,
            "upstream connect error or disconnect/reset before headers. reset reason: protocol error\n"
        ),
        "{r:?}"
    );
    assert_eq!(get("/a/len").status, 200);
}

/// The CPUs in a `/proc/.../status` file's `Cpus_allowed_list` ("0-1,4").
fn cpus_allowed(status: &str) -> Vec<usize> {
    let text = std::fs::read_to_string(status).unwrap_or_else(|e| panic!("{status}: {e}"));
    let list = text
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("{status} has no Cpus_allowed_list"));
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.parse::<usize>().expect("cpu")..=b.parse::<usize>().expect("cpu"));
    }
    cpus
}

/// `--cpu-affinity` pins each worker thread to a CPU of its own (the CPUs
/// the process may use, in turn), leaves its other threads alone, and
/// traffic flows through the pinned workers.
#[test]
fn cpu_affinity_pins_each_worker_to_a_cpu_of_its_own() {
    let (env, _) = gateway_to_origin();
    let dp = env.dp("pinned", &["--cpu-affinity"]);
    for _ in 0..8 {
        let r = http1(env.port, "GET", "/a/len", "gw", &[], "").expect("answer");
        assert_eq!(r.status, 200, "{r:?}");
    }
    // portico-dp inherits this process's CPUs.
    let allowed = cpus_allowed("/proc/self/status");
    let mut workers = std::collections::BTreeMap::new();
    let tasks = format!("/proc/{}/task", dp.pid());
    for task in std::fs::read_dir(&tasks).expect("task dir") {
        let task = task.expect("task").path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = task.join("status").to_string_lossy().into_owned();
        if let Some(i) = comm.trim().strip_prefix("worker-") {
            workers.insert(
                i.parse::<usize>().expect("worker index"),
                cpus_allowed(&status),
            );
        }
    }
    // The harness starts every node with two workers.
    let expected: std::collections::BTreeMap<usize, Vec<usize>> = (0..2)
        .map(|i| (i, vec![allowed[i % allowed.len()]]))
        .collect();
    assert_eq!(workers, expected, "allowed CPUs {allowed:?}");
    assert_eq!(
        cpus_allowed(&format!("/proc/{}/status", dp.pid())),
        allowed,
        "the main thread keeps every CPU"
    );
}
