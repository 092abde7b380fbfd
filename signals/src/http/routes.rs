//! What each `/debug/pprof/` path answers, and the answers' bytes. No I/O here.

use std::time::Duration;

use onsite_core::ProfileKind;

use crate::control::{PullWhat, Pulled};

use super::DEFAULT_PROFILE_SECONDS;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Action {
    /// An answer known at once (the index, an error).
    Respond(Response),
    /// A capture (or the thread dump) made by the control thread.
    Pull(PullWhat),
}

/// An HTTP answer, sent whole, then the connection is closed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Response {
    pub(super) status: u16,
    content_type: &'static str,
    extra: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    pub(super) fn text(status: u16, body: impl Into<String>) -> Response {
        let mut body = body.into();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Response { status, content_type: "text/plain; charset=utf-8", extra: Vec::new(), body: body.into_bytes() }
    }

    pub(super) fn with(mut self, name: &'static str, value: String) -> Response {
        self.extra.push((name, value));
        self
    }

    /// 401, asking for the bearer token.
    pub(super) fn unauthorized() -> Response {
        Response::text(
            401,
            "onsite: this endpoint needs `Authorization: Bearer TOKEN` (the service's ONSITE_HTTP_TOKEN)",
        )
        .with("WWW-Authenticate", "Bearer realm=\"onsite\"".to_owned())
    }

    /// The answer to a pull, as the control thread gave it.
    pub(super) fn pulled(what: PullWhat, answer: Pulled) -> Response {
        match answer {
            Pulled::Body { bytes, file_name } => {
                let content_type = match what {
                    PullWhat::ThreadDump => "text/plain; charset=utf-8",
                    PullWhat::Window { kind: ProfileKind::Trace, .. } => "application/json",
                    PullWhat::Window { .. } => "application/octet-stream",
                };
                Response { status: 200, content_type, extra: Vec::new(), body: bytes }
                    .with("Content-Disposition", format!("attachment; filename=\"{file_name}\""))
                    .with("X-Onsite-File", file_name)
            }
            Pulled::Held { holder, ends_in } => {
                let mut text = match what {
                    PullWhat::Window { kind, .. } => format!("onsite: {kind} is being recorded already, by {holder}"),
                    PullWhat::ThreadDump => format!("onsite: busy: {holder}"),
                };
                let mut response = Response::text(409, String::new());
                if let Some(left) = ends_in {
                    let secs = left.as_secs() + 1;
                    text.push_str(&format!("; it ends in at most {secs}s, ask again then"));
                    response = response.with("Retry-After", secs.to_string());
                }
                response.body = format!("{text}\n").into_bytes();
                response
            }
            Pulled::Unavailable(why) => Response::text(404, format!("onsite: {why}")),
            Pulled::Failed(why) => Response::text(500, format!("onsite: {why}")),
        }
    }

    /// The bytes on the wire: status line, headers, body.
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The endpoints, as the index lists them: path, what it answers.
const ENDPOINTS: &[(&str, &str)] = &[
    ("profile?seconds=N", "CPU profile of the next N seconds (default 30), gzip'd pprof"),
    ("heap?seconds=N", "memory: allocations during the next N seconds and those still live at their end, gzip'd pprof"),
    ("allocs?seconds=N", "the same memory profile (choose alloc_space / inuse_space in the reader)"),
    ("mutex?seconds=N", "lock contention, charged to the unlocking stack, gzip'd pprof"),
    ("block?seconds=N", "time spent waiting on locks and condvars, gzip'd pprof"),
    ("threadcreate?seconds=N", "threads created in the window and alive at its end, gzip'd pprof"),
    (
        "trace?seconds=N",
        "the tracing spans of the window as Chrome Trace Event JSON (Perfetto, chrome://tracing); NOT Go's execution trace format",
    ),
    ("goroutine?debug=2", "every thread's name, state and stack, as text (what the dump signal writes)"),
    ("threads", "the same thread dump"),
    ("cmdline", "the command line, NUL-separated"),
];

/// The HTML index page at `/debug/pprof/`.
fn index(max: Duration) -> Response {
    let mut html = String::from(
        "<!DOCTYPE html>\n<html><head><title>onsite /debug/pprof/</title></head><body>\n<h1>onsite /debug/pprof/</h1>\n\
         <p>Go's net/http/pprof paths, answered by onsite. Profiles other than <code>profile</code> record only \
         during a window: add <code>?seconds=N</code> (with ONSITE_MEMORY_ALWAYS=on, <code>heap</code> without it \
         answers at once with every live sampled block, as Go's does).</p>\n<table>\n",
    );
    for (path, what) in ENDPOINTS {
        html.push_str(&format!("<tr><td><a href=\"{path}\">{path}</a></td><td>{what}</td></tr>\n"));
    }
    html.push_str(&format!(
        "</table>\n<p><code>seconds</code> is capped at {}s (ONSITE_MAX_DURATION). One capture records a kind at a \
         time: a request for a kind being recorded gets 409, naming what records it.</p>\n\
         <p><code>go tool pprof http://HOST:PORT/debug/pprof/profile?seconds=30</code></p>\n</body></html>\n",
        max.as_secs()
    ));
    Response { status: 200, content_type: "text/html; charset=utf-8", extra: Vec::new(), body: html.into_bytes() }
}

/// The kind a window path records.
fn window_kind(name: &str) -> Option<ProfileKind> {
    Some(match name {
        "profile" => ProfileKind::Cpu,
        "heap" | "allocs" => ProfileKind::Memory,
        "mutex" => ProfileKind::Mutex,
        "block" => ProfileKind::Block,
        "threadcreate" => ProfileKind::ThreadCreate,
        "trace" => ProfileKind::Trace,
        _ => return None,
    })
}

/// The value of `name` in a query string (`a=1&b=2`); no percent-decoding is needed for the
/// numbers these paths take.
fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// What `target` (the request's path and query) asks for. `max` caps `seconds`.
/// `records_always` says which kinds are recorded all the time: those answer without
/// `seconds` at once, as Go's do (a window of none), instead of asking for a window.
pub(super) fn route(target: &str, max: Duration, records_always: impl Fn(ProfileKind) -> bool) -> Action {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(name) = path.strip_prefix("/debug/pprof").map(|rest| rest.trim_start_matches('/')) else {
        return Action::Respond(Response::text(404, "onsite: only /debug/pprof/ is served"));
    };
    match name {
        "" => return Action::Respond(index(max)),
        "cmdline" => {
            // As Go answers: each argument followed by a NUL. `args_os`, because `args` panics on
            // an argument that is not UTF-8; such bytes are shown as U+FFFD.
            let mut line = String::new();
            for arg in std::env::args_os() {
                line.push_str(&arg.to_string_lossy());
                line.push('\0');
            }
            return Action::Respond(Response::text(200, line));
        }
        "threads" => return Action::Pull(PullWhat::ThreadDump),
        // pprof asks here for names of addresses in mappings without function names. Every
        // address onsite could name is named in the profile already (the same symbols, in this
        // process), so the answer names none; `num_symbols: 1` is Go's "lookups are served".
        "symbol" => return Action::Respond(Response::text(200, "num_symbols: 1")),
        "goroutine" => {
            return match param(query, "debug") {
                Some("1" | "2") => Action::Pull(PullWhat::ThreadDump),
                _ => Action::Respond(Response::text(
                    404,
                    "onsite: there is no goroutine profile in pprof form (a Rust service has threads, not goroutines); \
                     /debug/pprof/goroutine?debug=2 answers every thread's stack as text. Turn the goroutine profile \
                     off in the scraper.",
                )),
            };
        }
        _ => {}
    }
    let Some(kind) = window_kind(name) else {
        let known: Vec<&str> = ENDPOINTS.iter().map(|(p, _)| p.split('?').next().unwrap_or(p)).collect();
        return Action::Respond(Response::text(
            404,
            format!("onsite: unknown profile {name:?}; known: {}", known.join(", ")),
        ));
    };
    let seconds = match param(query, "seconds") {
        Some(text) => match text.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Action::Respond(Response::text(
                    400,
                    format!("onsite: seconds={text:?} is not a whole number of seconds, 1 or more"),
                ));
            }
        },
        None if kind == ProfileKind::Cpu => DEFAULT_PROFILE_SECONDS,
        None if records_always(kind) => return Action::Pull(PullWhat::Window { kind, length: Duration::ZERO }),
        None => {
            return Action::Respond(Response::text(
                400,
                format!(
                    "onsite: {name} is recorded only during a window: add ?seconds=N (for example /debug/pprof/{name}?seconds=30)"
                ),
            ));
        }
    };
    let length = Duration::from_secs(seconds).min(max);
    Action::Pull(PullWhat::Window { kind, length })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(600);

    fn window(kind: ProfileKind, secs: u64) -> Action {
        Action::Pull(PullWhat::Window { kind, length: Duration::from_secs(secs) })
    }

    /// No kind is recorded all the time (the default).
    fn none(_: ProfileKind) -> bool {
        false
    }

    #[test]
    fn a_kind_recorded_all_the_time_answers_without_seconds() {
        let heap_always = |kind| kind == ProfileKind::Memory;
        assert_eq!(route("/debug/pprof/heap", MAX, heap_always), window(ProfileKind::Memory, 0));
        assert_eq!(route("/debug/pprof/allocs", MAX, heap_always), window(ProfileKind::Memory, 0));
        assert_eq!(route("/debug/pprof/heap?seconds=4", MAX, heap_always), window(ProfileKind::Memory, 4));
        assert_eq!(status(route("/debug/pprof/mutex", MAX, heap_always)), 400);
    }

    fn status(action: Action) -> u16 {
        match action {
            Action::Respond(r) => r.status,
            Action::Pull(_) => 0,
        }
    }

    fn body(action: Action) -> String {
        match action {
            Action::Respond(r) => String::from_utf8(r.body).unwrap(),
            Action::Pull(what) => format!("{what:?}"),
        }
    }

    #[test]
    fn go_paths_and_their_windows() {
        assert_eq!(route("/debug/pprof/profile", MAX, none), window(ProfileKind::Cpu, 30));
        assert_eq!(route("/debug/pprof/profile?seconds=3", MAX, none), window(ProfileKind::Cpu, 3));
        assert_eq!(route("/debug/pprof/heap?gc=1&seconds=4", MAX, none), window(ProfileKind::Memory, 4));
        assert_eq!(route("/debug/pprof/allocs?seconds=4", MAX, none), window(ProfileKind::Memory, 4));
        assert_eq!(route("/debug/pprof/mutex?seconds=5", MAX, none), window(ProfileKind::Mutex, 5));
        assert_eq!(route("/debug/pprof/block?seconds=5", MAX, none), window(ProfileKind::Block, 5));
        assert_eq!(route("/debug/pprof/threadcreate?seconds=5", MAX, none), window(ProfileKind::ThreadCreate, 5));
        assert_eq!(route("/debug/pprof/trace?seconds=1", MAX, none), window(ProfileKind::Trace, 1));
        assert_eq!(route("/debug/pprof/profile?seconds=9999", MAX, none), window(ProfileKind::Cpu, 600));
        assert_eq!(route("/debug/pprof/goroutine?debug=2", MAX, none), Action::Pull(PullWhat::ThreadDump));
        assert_eq!(route("/debug/pprof/threads", MAX, none), Action::Pull(PullWhat::ThreadDump));
    }

    #[test]
    fn a_window_kind_without_seconds_says_to_add_them() {
        for name in ["heap", "allocs", "mutex", "block", "threadcreate", "trace"] {
            let answer = route(&format!("/debug/pprof/{name}"), MAX, none);
            let Action::Respond(r) = answer else { panic!("{name}: not refused") };
            assert_eq!(r.status, 400);
            assert!(String::from_utf8(r.body).unwrap().contains("add ?seconds=N"), "{name}");
        }
        assert_eq!(status(route("/debug/pprof/mutex?seconds=0", MAX, none)), 400);
        assert_eq!(status(route("/debug/pprof/mutex?seconds=1.5", MAX, none)), 400);
    }

    #[test]
    fn only_debug_pprof_is_served() {
        assert_eq!(status(route("/", MAX, none)), 404);
        assert_eq!(status(route("/etc/passwd", MAX, none)), 404);
        assert_eq!(status(route("/debug/pprofx", MAX, none)), 404);
        assert_eq!(status(route("/debug/pprof/nothing", MAX, none)), 404);
        assert_eq!(status(route("/debug/pprof/goroutine", MAX, none)), 404);
        let index = body(route("/debug/pprof/", MAX, none));
        assert!(index.contains("profile?seconds=N") && index.contains("NOT Go's execution trace"), "{index}");
    }

    #[test]
    fn a_conflict_names_its_holder_and_when_to_retry() {
        let what = PullWhat::Window { kind: ProfileKind::Cpu, length: Duration::from_secs(3) };
        let answer = Pulled::Held {
            holder: "the capture started by SIGUSR2 4s ago".into(),
            ends_in: Some(Duration::from_secs(20)),
        };
        let text = String::from_utf8(Response::pulled(what, answer).to_bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        assert!(
            text.contains("Retry-After: 21\r\n")
                && text.contains("cpu is being recorded already, by the capture started by SIGUSR2"),
            "{text}"
        );
    }
}
