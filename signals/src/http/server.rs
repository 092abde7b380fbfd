//! The listener's one thread: `poll(2)` over the listening socket, a wake socket and every
//! connection, each a small state machine (reading its request, waiting for the control
//! thread's answer, writing it). Nothing here blocks: a slow or silent client costs one slot
//! and is closed at its deadline, and the captures it asks for run on the control thread.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::control::{Command, Pull, PullWhat, Pulled};

use super::routes::{Action, Response, route};
use super::{HEADER_TIMEOUT, Listen, MAX_CONNECTIONS, MAX_REQUEST_BYTES, MAX_SYMBOL_BODY_BYTES, WRITE_TIMEOUT};

/// The running listener. [`Server::shutdown`] stops and joins its thread.
pub(crate) struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    wake: Arc<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Where the control thread is reached: its command queue and its wake socket.
pub(crate) struct Control {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) wake: UnixStream,
}

impl Control {
    fn send(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        // Non-blocking: a full socket already holds a wake-up.
        let _ = (&self.wake).write(&[1]);
        sent
    }
}

impl Server {
    /// Binds `listen.addr` and starts the thread. `max` caps `?seconds=`.
    pub(crate) fn start(listen: Listen, max: Duration, control: Control) -> io::Result<Server> {
        let listener = TcpListener::bind(listen.addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (wake_reader, wake_writer) = UnixStream::pair()?;
        wake_reader.set_nonblocking(true)?;
        wake_writer.set_nonblocking(true)?;
        control.wake.set_nonblocking(true)?;
        let wake = Arc::new(wake_writer);
        let stop = Arc::new(AtomicBool::new(false));
        let (replies, answers) = mpsc::channel();
        let mut event_loop = Loop {
            listener,
            wake_reader,
            wake: wake.clone(),
            stop: stop.clone(),
            replies,
            answers,
            conns: Vec::new(),
            next_id: 1,
            token: listen.token,
            max,
            control,
            accept_error_logged: false,
        };
        let thread = std::thread::Builder::new().name("onsite-http".into()).spawn(move || {
            // Parsing, routing and writing answers are onsite's work, not the service's.
            let _own = onsite_core::own_work::OwnThread::register();
            event_loop.run();
        })?;
        Ok(Server { addr, stop, wake, thread: Some(thread) })
    }

    /// The address it listens on (with the port chosen when 0 was asked for).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the thread (open connections are closed) and joins it.
    pub(crate) fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = (&*self.wake).write(&[1]);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("onsite: the HTTP thread panicked");
        }
    }

    /// In a forked child, which has no such thread: nothing to join.
    pub(crate) fn forget(mut self) {
        std::mem::forget(self.thread.take());
    }
}

enum State {
    /// Reading the request header, until `deadline`.
    Reading { buf: Vec<u8>, deadline: Instant },
    /// Reading and dropping `left` more bytes of a request body (the symbol lookup's), then
    /// answering `then`, until `deadline`. Read whole so closing cannot reset the answer.
    Draining { left: usize, then: Option<Response>, deadline: Instant },
    /// The control thread records `what`; its answer comes through `Loop::answers`.
    Waiting { what: PullWhat },
    /// Writing the answer, until `deadline`.
    Writing { out: Vec<u8>, pos: usize, deadline: Instant },
}

struct Conn {
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    state: State,
}

impl Conn {
    fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Reading { deadline, .. } | State::Draining { deadline, .. } | State::Writing { deadline, .. } => {
                Some(*deadline)
            }
            State::Waiting { .. } => None,
        }
    }

    fn respond(&mut self, response: Response) {
        self.state = State::Writing { out: response.to_bytes(), pos: 0, deadline: Instant::now() + WRITE_TIMEOUT };
    }
}

/// What happened to a connection in one turn.
enum Next {
    Keep,
    Close,
}

struct Loop {
    listener: TcpListener,
    wake_reader: UnixStream,
    wake: Arc<UnixStream>,
    stop: Arc<AtomicBool>,
    replies: mpsc::Sender<(u64, Pulled)>,
    answers: mpsc::Receiver<(u64, Pulled)>,
    conns: Vec<Conn>,
    next_id: u64,
    token: Option<String>,
    max: Duration,
    control: Control,
    accept_error_logged: bool,
}

impl Loop {
    fn run(&mut self) {
        tracing::debug!("onsite: HTTP thread running");
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(MAX_CONNECTIONS + 2);
        while !self.stop.load(Ordering::Acquire) {
            fds.clear();
            fds.push(pollfd(self.listener.as_raw_fd(), libc::POLLIN));
            fds.push(pollfd(self.wake_reader.as_raw_fd(), libc::POLLIN));
            for conn in &self.conns {
                let events = match conn.state {
                    State::Reading { .. } | State::Draining { .. } => libc::POLLIN,
                    State::Waiting { .. } => libc::POLLRDHUP,
                    State::Writing { .. } => libc::POLLOUT,
                };
                fds.push(pollfd(conn.stream.as_raw_fd(), events));
            }
            let now = Instant::now();
            let timeout = self.conns.iter().filter_map(Conn::deadline).min().map_or(-1, |at| {
                // Rounded up, so a deadline is past when poll returns.
                at.saturating_duration_since(now).as_millis().min(i32::MAX as u128) as i32 + 1
            });
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    tracing::error!(error = %e, "onsite: HTTP poll failed; the listener stops");
                    return;
                }
                continue;
            }
            if fds[1].revents != 0 {
                let mut buf = [0u8; 64];
                while matches!((&self.wake_reader).read(&mut buf), Ok(n) if n > 0) {}
            }
            self.take_answers();
            // Connections first (their indices match `fds` until one is removed), then accept.
            let now = Instant::now();
            let mut i = self.conns.len();
            while i > 0 {
                i -= 1;
                let revents = fds.get(i + 2).map_or(0, |p| p.revents);
                if let Next::Close = self.turn(i, revents, now) {
                    self.conns.swap_remove(i);
                }
            }
            if fds[0].revents != 0 {
                self.accept();
            }
        }
        tracing::debug!(open = self.conns.len(), "onsite: HTTP thread stopping");
    }

    /// Answers that arrived from the control thread become responses to write.
    fn take_answers(&mut self) {
        while let Ok((id, answer)) = self.answers.try_recv() {
            // None: the client went away and its connection is gone.
            if let Some(conn) = self.conns.iter_mut().find(|c| c.id == id)
                && let State::Waiting { what } = conn.state
            {
                conn.respond(Response::pulled(what, answer));
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    self.accept_error_logged = false;
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    if self.conns.len() >= MAX_CONNECTIONS && !self.evict_one() {
                        // Every slot waits for a capture or writes an answer: refuse this one.
                        let bytes = Response::text(503, "onsite: too many HTTP connections").to_bytes();
                        let _ = (&stream).write(&bytes);
                        continue;
                    }
                    let now = Instant::now();
                    let id = self.next_id;
                    self.next_id += 1;
                    self.conns.push(Conn {
                        id,
                        stream,
                        peer,
                        accepted: now,
                        state: State::Reading { buf: Vec::new(), deadline: now + HEADER_TIMEOUT },
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors, say: the listener stays readable, so wait a
                    // little rather than spin; say it once per run of errors.
                    if !self.accept_error_logged {
                        tracing::warn!(error = %e, "onsite: HTTP accept failed");
                        self.accept_error_logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    return;
                }
            }
        }
    }

    /// Closes the connection that has waited longest without finishing its request; `false`
    /// if none is still reading.
    fn evict_one(&mut self) -> bool {
        let oldest = (self.conns.iter().enumerate())
            .filter(|(_, c)| matches!(c.state, State::Reading { .. }))
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i);
        match oldest {
            Some(i) => {
                let conn = self.conns.swap_remove(i);
                tracing::debug!(peer = %conn.peer, "onsite: HTTP connection limit reached; closed the oldest unfinished request");
                true
            }
            None => false,
        }
    }

    /// One connection's turn after poll: read, write, or notice a deadline or a hang-up.
    fn turn(&mut self, i: usize, revents: libc::c_short, now: Instant) -> Next {
        let conn = &mut self.conns[i];
        match &mut conn.state {
            State::Reading { buf, deadline } => {
                let deadline = *deadline;
                if revents != 0 {
                    match read_some(&conn.stream, buf) {
                        Ok(true) => {}
                        Ok(false) | Err(_) => return Next::Close,
                    }
                    if let Some(parsed) = parse(buf) {
                        return self.handle(i, parsed);
                    }
                }
                if now >= deadline {
                    tracing::debug!(peer = %conn.peer, "onsite: HTTP request header not complete in time; closed");
                    return Next::Close;
                }
                Next::Keep
            }
            State::Draining { left, then, deadline } => {
                if revents != 0 {
                    let mut chunk = [0u8; 4096];
                    while *left > 0 {
                        match (&conn.stream).read(&mut chunk[..(*left).min(4096)]) {
                            Ok(0) => return Next::Close,
                            Ok(n) => *left -= n,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => return Next::Close,
                        }
                    }
                }
                if *left == 0 {
                    let response = then.take().unwrap_or_else(|| Response::text(500, "onsite: lost answer"));
                    conn.respond(response);
                    return Next::Keep;
                }
                if now >= *deadline {
                    return Next::Close;
                }
                Next::Keep
            }
            State::Waiting { .. } => {
                if revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                    tracing::info!(peer = %conn.peer, "onsite: HTTP client went away; stopping its capture");
                    let id = conn.id;
                    self.control.send(Command::AbandonPull { id });
                    return Next::Close;
                }
                Next::Keep
            }
            State::Writing { out, pos, deadline } => {
                if revents & (libc::POLLHUP | libc::POLLERR) != 0 && revents & libc::POLLOUT == 0 {
                    return Next::Close;
                }
                loop {
                    match (&conn.stream).write(&out[*pos..]) {
                        Ok(0) => return Next::Close,
                        Ok(n) => {
                            *pos += n;
                            if *pos == out.len() {
                                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                                return Next::Close;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => return Next::Close,
                    }
                }
                if now >= *deadline {
                    tracing::debug!(peer = %conn.peer, "onsite: HTTP client did not read its answer in time; closed");
                    return Next::Close;
                }
                Next::Keep
            }
        }
    }

    /// A complete request (or a refusal of it) on connection `i`.
    fn handle(&mut self, i: usize, parsed: Parsed) -> Next {
        let peer = self.conns[i].peer;
        let request = match parsed {
            Parsed::Bad(response) => {
                tracing::debug!(%peer, status = response.status, "onsite: HTTP request refused");
                self.conns[i].respond(response);
                return Next::Keep;
            }
            Parsed::Request(request) => request,
        };
        if let Some(token) = &self.token
            && !request.bearer.as_deref().is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes()))
        {
            tracing::warn!(%peer, "onsite: HTTP request without the right bearer token; refused");
            self.conns[i].respond(Response::unauthorized());
            return Next::Keep;
        }
        if request.method_is_post {
            // Only the symbol lookup takes a body; its addresses were named in the profile
            // already where onsite could, so its answer names none (see `routes`).
            let response = match request.target.split('?').next() {
                Some("/debug/pprof/symbol") => route(&request.target, self.max, crate::backends::records_always),
                _ => {
                    Action::Respond(Response::text(405, "onsite: only GET is served here").with("Allow", "GET".into()))
                }
            };
            let Action::Respond(response) = response else { return Next::Close };
            let left = request.body_len.saturating_sub(request.body_read);
            let deadline = Instant::now() + HEADER_TIMEOUT;
            self.conns[i].state = State::Draining { left, then: Some(response), deadline };
            return self.turn(i, 0, Instant::now());
        }
        match route(&request.target, self.max, crate::backends::records_always) {
            Action::Respond(response) => self.conns[i].respond(response),
            Action::Pull(what) => {
                let id = self.conns[i].id;
                let replies = self.replies.clone();
                let wake = self.wake.clone();
                let reply = Box::new(move |answer: Pulled| {
                    let _ = replies.send((id, answer));
                    let _ = (&*wake).write(&[1]);
                });
                let shown: String = request.target.chars().take(200).collect();
                let pull = Pull { id, what, requested_by: format!("GET {shown} from {peer}"), reply };
                if self.control.send(Command::Pull(pull)) {
                    self.conns[i].state = State::Waiting { what };
                } else {
                    self.conns[i].respond(Response::text(503, "onsite is shutting down"));
                }
            }
        }
        Next::Keep
    }
}

fn pollfd(fd: libc::c_int, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// Reads what is there into `buf`, up to [`MAX_REQUEST_BYTES`]; `false` if the client closed.
fn read_some(mut stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 2048];
    while buf.len() < MAX_REQUEST_BYTES {
        let room = (MAX_REQUEST_BYTES - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Ok(false),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A request line and the headers that matter here.
struct Request {
    target: String,
    bearer: Option<String>,
    method_is_post: bool,
    /// The body's length (POST only), and how much of it came with the header.
    body_len: usize,
    body_read: usize,
}

enum Parsed {
    Request(Request),
    Bad(Response),
}

/// The request in `buf`, once its header is complete (or refused); `None` while partial.
fn parse(buf: &[u8]) -> Option<Parsed> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let bad = |status, text: &str| Some(Parsed::Bad(Response::text(status, format!("onsite: {text}"))));
    match request.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_BYTES => {
            bad(431, &format!("the request header is longer than {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => bad(431, "too many request headers"),
        Err(e) => bad(400, &format!("malformed request: {e}")),
        Ok(httparse::Status::Complete(header_len)) => {
            let method_is_post = match request.method {
                Some("GET") => false,
                Some("POST") => true,
                _ => {
                    return Some(Parsed::Bad(
                        Response::text(405, "onsite: only GET is served").with("Allow", "GET".into()),
                    ));
                }
            };
            let mut bearer = None;
            let mut body_len = 0;
            for header in request.headers.iter() {
                let name = header.name;
                if name.eq_ignore_ascii_case("transfer-encoding") {
                    return bad(411, "a request body needs a Content-Length");
                }
                if name.eq_ignore_ascii_case("content-length") {
                    let len = std::str::from_utf8(header.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
                    match len {
                        Some(n) if n > 0 && !method_is_post => return bad(413, "a GET here carries no body"),
                        Some(n) if n > MAX_SYMBOL_BODY_BYTES => {
                            return bad(413, &format!("a request body may have at most {MAX_SYMBOL_BODY_BYTES} bytes"));
                        }
                        Some(n) => body_len = n,
                        None => return bad(400, "Content-Length is not a number"),
                    }
                }
                if name.eq_ignore_ascii_case("authorization") {
                    let value = String::from_utf8_lossy(header.value).into_owned();
                    let (scheme, token) = value.trim().split_once(' ').unwrap_or(("", ""));
                    if scheme.eq_ignore_ascii_case("bearer") {
                        bearer = Some(token.trim().to_owned());
                    }
                }
            }
            let target = request.path.unwrap_or("/").to_owned();
            let body_read = buf.len() - header_len;
            Some(Parsed::Request(Request { target, bearer, method_is_post, body_len, body_read }))
        }
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Option<Result<(String, Option<String>), u16>> {
        parse(text.as_bytes()).map(|p| match p {
            Parsed::Request(r) => Ok((r.target, r.bearer)),
            Parsed::Bad(r) => Err(r.status),
        })
    }

    #[test]
    fn requests_are_parsed_only_when_whole_and_within_bounds() {
        assert_eq!(parsed("GET /debug/pprof/ HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            parsed("GET /debug/pprof/heap?seconds=3 HTTP/1.1\r\nAuthorization: Bearer abc \r\n\r\n"),
            Some(Ok(("/debug/pprof/heap?seconds=3".into(), Some("abc".into()))))
        );
        assert_eq!(parsed("PUT /debug/pprof/ HTTP/1.1\r\n\r\n"), Some(Err(405)));
        assert_eq!(parsed("POST /debug/pprof/symbol HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n"), Some(Err(413)));
        assert_eq!(parsed("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"), Some(Err(413)));
        assert_eq!(parsed("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(Err(411)));
        assert_eq!(parsed("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), Some(Ok(("/".into(), None))));
        assert_eq!(parsed("GARBAGE\0\r\n\r\n"), Some(Err(400)));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(parsed(&long[..MAX_REQUEST_BYTES]), Some(Err(431)));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcde", b"0123456789abcdef"));
    }
}
