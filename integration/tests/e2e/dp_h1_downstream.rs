//! portico-dp's own HTTP/1.1 server, from raw client sockets: pipelined
//! requests with bodies on one keep-alive connection, `Expect:
//! 100-continue`, HTTP/1.0 clients, response framing by what is known,
//! and bodies the proxy never reads.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::dp_h1_upstream::gateway_to_origin;

/// Reads one response (head, then a `content-length` body) from `s`;
/// returns the head and the body.
fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed before a response: {pending:?}");
        pending.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().expect("length"));
    while pending.len() < end + len {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed in a body");
        pending.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&pending[end..end + len]).into_owned();
    pending.drain(..end + len);
    (head, body)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s
}

/// Everything until the proxy closes the connection.
fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the proxy closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn http1_downstream_keep_alive_bodies_continue_and_http10() {
    let (env, _) = gateway_to_origin();
    let _dp = env.dp("dp1", &[]);
    let port = env.port;

    // Three requests in one write on one connection: a body by length,
    // a chunked body (with a trailer), none; answered in order.
    let mut s = connect(port);
    s.write_all(
        b"POST /a/len HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello\
POST /a/chunk HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n\
GET /a/get HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .expect("write");
    let mut pending = Vec::new();
    let bodies: Vec<String> = (0..3)
        .map(|_| {
            let (head, body) = read_response(&mut s, &mut pending);
            assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
            assert!(head.contains("\r\ndate: "), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            body
        })
        .collect();
    assert_eq!(
        bodies,
        [
            "POST /len body=5 te=- cl=5",
            "POST /chunk body=5 te=chunked cl=-",
            "GET /get body=0 te=- cl=-"
        ]
    );
    // The same connection takes another request after all that.
    s.write_all(b"GET /a/more HTTP/1.1\r\nHost: gw\r\n\r\n")
        .expect("write");
    assert_eq!(
        read_response(&mut s, &mut pending).1,
        "GET /more body=0 te=- cl=-"
    );

    // `Expect: 100-continue`: the proxy says continue when it wants the
    // body, then answers.
    s.write_all(
        b"PUT /a/len HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .expect("write");
    let (head, _) = read_response(&mut s, &mut pending);
    assert!(head.starts_with("http/1.1 100 continue\r\n"), "{head}");
    s.write_all(b"abcd").expect("body");
    let (head, body) = read_response(&mut s, &mut pending);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "PUT /len body=4 te=- cl=4");

    // An upstream answer of unknown length goes chunked to an HTTP/1.1
    // client, and the connection stays.
    s.write_all(b"GET /a/close HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .expect("write");
    let text = read_all(&mut s).to_ascii_lowercase();
    assert!(
        text.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\n0\r\n\r\n"), "{text}");
    assert!(text.contains("connection: close"), "{text}");

    // HTTP/1.0: closed after the answer unless asked to keep it; an
    // answer of unknown length is delimited by the close, not chunked.
    let mut s = connect(port);
    s.write_all(b"GET /a/ten HTTP/1.0\r\nHost: gw\r\n\r\n")
        .expect("write");
    let text = read_all(&mut s);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("GET /ten body=0 te=- cl=-"), "{text}");
    let mut s = connect(port);
    s.write_all(b"GET /a/close HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\n")
        .expect("write");
    let text = read_all(&mut s);
    assert!(
        !text.to_ascii_lowercase().contains("transfer-encoding"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nuntil the end"), "{text}");
    let mut s = connect(port);
    s.write_all(
        b"GET /a/k1 HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\nGET /a/k2 HTTP/1.0\r\nHost: gw\r\n\r\n",
    )
    .expect("write");
    let text = read_all(&mut s);
    assert!(
        text.to_ascii_lowercase().contains("connection: keep-alive"),
        "{text}"
    );
    assert!(
        text.contains("GET /k1 body=0") && text.ends_with("GET /k2 body=0 te=- cl=-"),
        "{text}"
    );

    // A body nobody reads (no route takes it) that has arrived whole is
    // skipped: the request behind it is served on the same connection.
    let mut s = connect(port);
    s.write_all(
        b"POST /nowhere HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhelloGET /a/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .expect("write");
    let text = read_all(&mut s);
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(text.ends_with("GET /x body=0 te=- cl=-"), "{text}");
    // One still on its way cannot be skipped safely: the answer says the
    // connection closes, and it does.
    let mut s = connect(port);
    s.write_all(b"POST /nowhere HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nhello")
        .expect("write");
    let text = read_all(&mut s);
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{text}"
    );
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");

    // A malformed chunked body found while it streams upstream: the
    // client's error (400) at once, not the upstream's fault (no 502, no
    // wait for the upstream to time out waiting for the rest).
    let started = std::time::Instant::now();
    let mut s = connect(port);
    s.write_all(
        b"POST /a/len HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    )
    .expect("write");
    let text = read_all(&mut s);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.ends_with("malformed request body\n"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        started.elapsed()
    );
}
