//! A minimal HTTP/1.1 relay: the floor under any reverse proxy on this
//! machine's loopback.
//!
//! `relay MODE LISTEN UPSTREAM [THREADS]`, MODE `epoll` (tokio, as
//! portico-dp uses the kernel) or `uring` (io_uring: one ring per thread,
//! system calls batched). Each accepted connection gets an upstream
//! connection of its own (what a keep-alive pool amounts to under a steady
//! load); each request's bytes go upstream as they came and the answer's
//! bytes come back as they came. No routing, no header parsing beyond
//! finding where a message ends (its head's blank line plus its
//! `Content-Length`), no logging, no timeouts: what is left is the system
//! calls and the kernel's TCP work that every proxy pays, and so what
//! `bench/dp.sh` measures for it (`PROXIES="... relay relay-uring"`) is the
//! least CPU per request any proxy could reach here. A message framed any
//! other way (chunked, or a head or body over 64 KiB) closes its
//! connection. Any thread's failure ends the process (a relay running on
//! fewer threads than asked would skew the measurement).
//!
//! A benchmark tool only: it trusts its peers (loopback, the benchmark's
//! own load generator and origin).

use std::net::SocketAddr;
use std::process::exit;

/// The longest message head (and body) kept in a buffer.
const LONGEST: usize = 64 * 1024;

/// Where a message in `b` ends, once it is all there: `Ok(None)` while
/// more is to come, `Err` for framing the relay does not do.
fn message_end(b: &[u8]) -> Result<Option<usize>, ()> {
    let Some(head) = b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        return if b.len() > LONGEST { Err(()) } else { Ok(None) };
    };
    let mut body = 0;
    for line in b[..head].split(|&c| c == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(());
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            body = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n <= LONGEST)
                .ok_or(())?;
        }
    }
    Ok((b.len() >= head + body).then_some(head + body))
}

/// A listening socket on `addr` that other threads may bind too
/// (`SO_REUSEPORT`: the kernel spreads connections over them).
fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("usage: relay epoll|uring LISTEN_ADDR UPSTREAM_ADDR [THREADS]");
        exit(2)
    };
    let [mode, listen, upstream, rest @ ..] = args.as_slice() else {
        usage()
    };
    let (Ok(listen), Ok(upstream)) = (listen.parse(), upstream.parse()) else {
        usage()
    };
    let threads = match rest {
        [] => 1,
        [n] => n
            .parse()
            .ok()
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| usage()),
        _ => usage(),
    };
    let run: fn(std::net::TcpListener, SocketAddr) -> std::io::Result<()> = match mode.as_str() {
        "epoll" => epoll::run,
        #[cfg(target_os = "linux")]
        "uring" => uring::run,
        _ => usage(),
    };
    std::panic::set_hook(Box::new(|info| {
        eprintln!("relay: {info}");
        exit(1)
    }));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let l = listener(listen).unwrap_or_else(|e| {
                eprintln!("relay: listening on {listen}: {e}");
                exit(1)
            });
            std::thread::Builder::new()
                .name(format!("relay-{i}"))
                .spawn(move || {
                    // Runs until it fails (a panic ends the process
                    // through the panic hook).
                    let e = match run(l, upstream) {
                        Ok(()) => "stopped".to_string(),
                        Err(e) => e.to_string(),
                    };
                    eprintln!("relay: thread {i}: {e}");
                    exit(1)
                })
                .unwrap_or_else(|e| {
                    eprintln!("relay: starting a thread: {e}");
                    exit(1)
                })
        })
        .collect();
    for h in handles {
        if h.join().is_err() {
            exit(1)
        }
    }
}

/// Readiness with epoll, through tokio: one task per connection.
mod epoll {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub fn run(l: std::net::TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async move {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            loop {
                let (down, _) = l.accept().await?;
                tokio::spawn(async move {
                    let _ = relay(down, upstream).await;
                });
            }
        })
    }

    /// Reads one whole message from `from` into `buf` (cleared first);
    /// `None` at the end of the stream or on framing it does not do.
    async fn message(from: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
        buf.clear();
        loop {
            if from.read_buf(buf).await.ok()? == 0 {
                return None;
            }
            if let Some(n) = super::message_end(buf).ok()? {
                return Some(n);
            }
        }
    }

    async fn relay(mut down: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
        down.set_nodelay(true)?;
        let mut up = TcpStream::connect(upstream).await?;
        up.set_nodelay(true)?;
        let (mut req, mut resp) = (Vec::with_capacity(4096), Vec::with_capacity(4096));
        while let Some(n) = message(&mut down, &mut req).await {
            up.write_all(&req[..n]).await?;
            let Some(n) = message(&mut up, &mut resp).await else {
                break;
            };
            down.write_all(&resp[..n]).await?;
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
/// Completions with io_uring: one ring per thread, every connection pair a
/// small state machine with exactly one operation in flight.
mod uring {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

    use io_uring::{cqueue, opcode, squeue, types, IoUring};

    /// The accept operation's `user_data`; any other is a pair's index.
    const ACCEPT: u64 = u64::MAX;

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Step {
        ReadRequest,
        SendRequest,
        ReadResponse,
        SendResponse,
    }

    /// A downstream connection and its upstream one.
    struct Pair {
        down: RawFd,
        up: RawFd,
        step: Step,
        buf: Vec<u8>,
        /// Bytes read into `buf` so far.
        len: usize,
        /// Bytes of the message to send, and how many went.
        end: usize,
        sent: usize,
    }

    impl Pair {
        /// The pair's next operation. Its buffer stays put until that
        /// operation completes: a pair has one operation in flight, and
        /// nothing touches `buf` in the meantime.
        fn next(&mut self, i: usize) -> squeue::Entry {
            match self.step {
                Step::ReadRequest | Step::ReadResponse => {
                    let fd = if self.step == Step::ReadRequest {
                        self.down
                    } else {
                        self.up
                    };
                    if self.buf.len() - self.len < 2048 {
                        self.buf.resize(self.buf.len() * 2, 0);
                    }
                    let spare = &mut self.buf[self.len..];
                    opcode::Recv::new(types::Fd(fd), spare.as_mut_ptr(), spare.len() as u32)
                        .build()
                        .user_data(i as u64)
                }
                Step::SendRequest | Step::SendResponse => {
                    let fd = if self.step == Step::SendRequest {
                        self.up
                    } else {
                        self.down
                    };
                    let rest = &self.buf[self.sent..self.end];
                    opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(i as u64)
                }
            }
        }

        /// Takes a completed operation's result; false when the pair is
        /// done (closed, failed, or framing the relay does not do).
        fn complete(&mut self, res: i32) -> bool {
            if res <= 0 {
                return false;
            }
            let n = res as usize;
            match self.step {
                Step::ReadRequest | Step::ReadResponse => {
                    self.len += n;
                    match super::message_end(&self.buf[..self.len]) {
                        Err(()) => return false,
                        Ok(None) => {}
                        Ok(Some(end)) => {
                            self.end = end;
                            self.sent = 0;
                            self.step = if self.step == Step::ReadRequest {
                                Step::SendRequest
                            } else {
                                Step::SendResponse
                            };
                        }
                    }
                }
                Step::SendRequest | Step::SendResponse => {
                    self.sent += n;
                    if self.sent == self.end {
                        self.len = 0;
                        self.step = if self.step == Step::SendRequest {
                            Step::ReadResponse
                        } else {
                            Step::ReadRequest
                        };
                    }
                }
            }
            true
        }
    }

    fn push(ring: &mut IoUring, e: &squeue::Entry) -> std::io::Result<()> {
        // SAFETY: every entry pushed points into a pair's buffer, which
        // outlives the operation (see `Pair::next`), or at nothing.
        while unsafe { ring.submission().push(e) }.is_err() {
            ring.submit()?;
        }
        Ok(())
    }

    pub fn run(l: TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
        // Declared before the ring, so dropped after it: the kernel may
        // still write into a pair's buffer until the ring is gone.
        let mut pairs: Vec<Pair> = Vec::new();
        let mut ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_defer_taskrun()
            .build(1024)?;
        let accept = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
            .build()
            .user_data(ACCEPT);
        push(&mut ring, &accept)?;
        let mut free: Vec<usize> = Vec::new();
        let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            match ring.submit_and_wait(1) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            done.extend(
                ring.completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for (id, res, flags) in done.drain(..) {
                if id == ACCEPT {
                    if !cqueue::more(flags) {
                        push(&mut ring, &accept)?;
                    }
                    if res < 0 {
                        continue;
                    }
                    // SAFETY: a successful accept's result is a new socket
                    // that nothing else owns.
                    let down = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(res) };
                    // Blocking, in the ring's thread: connections are set
                    // up once, before the measured load.
                    let Ok(up) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let pair = Pair {
                        down: down.into_raw_fd(),
                        up: up.into_raw_fd(),
                        step: Step::ReadRequest,
                        buf: vec![0; 4096],
                        len: 0,
                        end: 0,
                        sent: 0,
                    };
                    let i = match free.pop() {
                        Some(i) => {
                            pairs[i] = pair;
                            i
                        }
                        None => {
                            pairs.push(pair);
                            pairs.len() - 1
                        }
                    };
                    let e = pairs[i].next(i);
                    push(&mut ring, &e)?;
                    continue;
                }
                let i = id as usize;
                let p = &mut pairs[i];
                if p.complete(res) {
                    let e = p.next(i);
                    push(&mut ring, &e)?;
                } else {
                    // SAFETY: the pair owns both sockets and has no
                    // operation in flight any more.
                    unsafe {
                        libc::close(p.down);
                        libc::close(p.up);
                    }
                    free.push(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::message_end;

    #[test]
    fn messages_end_after_their_head_and_content_length() {
        assert_eq!(message_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(message_end(b"GET / HTTP/1.1\r\n\r\n"), Ok(Some(18)));
        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab";
        assert_eq!(message_end(resp), Ok(None));
        assert_eq!(
            message_end(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"),
            Ok(Some(41))
        );
        assert_eq!(
            message_end(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(())
        );
        assert_eq!(
            message_end(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            Err(())
        );
        assert_eq!(message_end(&vec![b'a'; super::LONGEST + 1]), Err(()));
    }
}
