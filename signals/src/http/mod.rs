//! The `/debug/pprof/` HTTP listener (cargo feature `http`): Go's `net/http/pprof` paths, so
//! `go tool pprof URL`, Parca and Grafana Alloy's `pyroscope.scrape` can pull captures.
//!
//! - `ONSITE_HTTP=ADDR` (or [`crate::Builder::http`]): where to listen. `127.0.0.1:6060`,
//!   `[::1]:6060`, `0.0.0.0:6060`; a bare port (`6060`, `:6060`) is loopback; port 0 picks a free
//!   one (the log says which); `off` turns off an address the builder set.
//! - `ONSITE_HTTP_TOKEN=TOKEN` (or [`crate::Builder::http_token`]): every request must carry
//!   `Authorization: Bearer TOKEN`. Required for an address that is not loopback: without it
//!   the listener does not start (logged; strict mode: `install` fails) and the service runs on.
//!
//! One thread (`onsite-http`, registered as onsite's own) serves every connection with
//! `poll(2)`: no async runtime, no thread per connection. A request is parsed with `httparse`
//! once its header is complete; a capture it asks for is started by the control thread (the
//! only place captures start and stop), which answers with the bytes of the file it wrote, so
//! the connection waits without holding a thread. Bounds: [`MAX_CONNECTIONS`] at once (past it
//! the oldest connection that has not finished its request is closed), [`MAX_REQUEST_BYTES`] of
//! request header, [`HEADER_TIMEOUT`] to send it, [`WRITE_TIMEOUT`] to read the answer.

mod routes;
pub(crate) mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use onsite_core::ConfigError;

use crate::env;

pub(crate) use server::Server;

/// The address variable.
pub(crate) const ADDR_VAR: &str = crate::vars::HTTP;
/// The bearer token variable.
pub(crate) const TOKEN_VAR: &str = crate::vars::HTTP_TOKEN;

/// Connections served at once; a new one past this closes the oldest one still sending its
/// request, so idle connections cannot lock out a real client.
pub const MAX_CONNECTIONS: usize = 64;
/// The most bytes a request (line and headers; no body is accepted) may have.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// The most bytes of a symbol lookup's body (a list of addresses, read and dropped).
pub const MAX_SYMBOL_BODY_BYTES: usize = 1024 * 1024;
/// How long a client has, from connecting, to send its whole request header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to read the answer once it is ready.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The length of `/debug/pprof/profile` without `?seconds=`, as in Go.
pub const DEFAULT_PROFILE_SECONDS: u64 = 30;
/// The shortest token accepted: a guessable token on a network port is no protection.
const MIN_TOKEN_LEN: usize = 16;

/// The listener's settings, after the builder and the environment.
#[derive(Clone, Default)]
pub(crate) struct Settings {
    addr: Option<SocketAddr>,
    token: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself: this may be logged.
        f.debug_struct("Settings").field("addr", &self.addr).field("token", &self.token.as_ref().map(|_| "…")).finish()
    }
}

/// What [`Settings::checked`] found: where to listen and with which token, if anywhere.
pub(crate) struct Listen {
    pub(crate) addr: SocketAddr,
    pub(crate) token: Option<String>,
}

impl Settings {
    pub(crate) fn apply_env(&mut self, env: &mut env::Reader) {
        env.set_shown(ADDR_VAR, &mut self.addr, parse_addr, |a| {
            a.map_or("no HTTP listener".to_owned(), |a| a.to_string())
        });
        match env::var(TOKEN_VAR) {
            Ok(None) => {}
            Ok(Some(token)) => self.token = Some(token),
            Err(e) => {
                env.reject(e, "no HTTP listener");
                self.addr = None;
            }
        }
    }

    /// The address and token to serve with, or `None` (logged, or strict's error) when there is
    /// no address, the token is unusable, or a non-loopback address has no token.
    pub(crate) fn checked(&self, env: &mut env::Reader) -> Option<Listen> {
        let addr = self.addr?;
        let token = match self.token.as_deref().map(str::trim) {
            None => None,
            Some(token) => match check_token(token) {
                Ok(()) => Some(token.to_owned()),
                Err(reason) => {
                    env.reject(ConfigError::new(TOKEN_VAR, "(hidden)", reason), "no HTTP listener");
                    return None;
                }
            },
        };
        if token.is_none() && !is_loopback(addr.ip()) {
            let reason = format!(
                "is not a loopback address, so every request must carry a bearer token: set {TOKEN_VAR} (at least {MIN_TOKEN_LEN} characters), or listen on 127.0.0.1"
            );
            env.reject(ConfigError::new(ADDR_VAR, addr.to_string(), reason), "no HTTP listener");
            return None;
        }
        Some(Listen { addr, token })
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// `127.0.0.1:6060`, `[::1]:6060`, `0.0.0.0:6060`, `localhost:6060`, a bare port (`6060` or
/// `:6060`: loopback), or `off`.
fn parse_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let loopback = |port: &str| {
        port.parse::<u16>().map(|p| Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))).map_err(|_| {
            format!("{port:?} is not a port number (0-65535); expected 127.0.0.1:6060, [::1]:6060, 0.0.0.0:6060, 6060 or off")
        })
    };
    if let Some(port) = text.strip_prefix(':').or_else(|| text.strip_prefix("localhost:")) {
        return loopback(port);
    }
    if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() {
        return loopback(text);
    }
    text.parse::<SocketAddr>().map(Some).map_err(|_| {
        "expected an IP address and port such as 127.0.0.1:6060, [::1]:6060 or 0.0.0.0:6060, a port (6060: loopback), or off".to_owned()
    })
}

fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!("is {} characters long; use at least {MIN_TOKEN_LEN}", token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("may hold only visible ASCII characters (no spaces)".to_owned());
    }
    Ok(())
}

impl crate::Builder {
    /// Serves Go's `/debug/pprof/` endpoints on `addr` (feature `http`; `ONSITE_HTTP` still
    /// wins). An address that is not loopback needs [`Builder::http_token`](crate::Builder::http_token)
    /// or `ONSITE_HTTP_TOKEN`, or the listener does not start.
    pub fn http(mut self, addr: SocketAddr) -> Self {
        self.http.addr = Some(addr);
        self
    }

    /// The bearer token every HTTP request must carry (`Authorization: Bearer TOKEN`), at
    /// least 16 visible ASCII characters; `ONSITE_HTTP_TOKEN` still wins.
    pub fn http_token(mut self, token: impl Into<String>) -> Self {
        self.http.token = Some(token.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_people_write_them() {
        let local = |p| Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p));
        assert_eq!(parse_addr("6060"), Ok(local(6060)));
        assert_eq!(parse_addr(":6060"), Ok(local(6060)));
        assert_eq!(parse_addr("localhost:0"), Ok(local(0)));
        assert_eq!(parse_addr("off"), Ok(None));
        assert_eq!(parse_addr("0.0.0.0:6060").unwrap().unwrap().to_string(), "0.0.0.0:6060");
        assert_eq!(parse_addr("[::1]:6060").unwrap().unwrap().to_string(), "[::1]:6060");
        assert!(parse_addr("6060x").unwrap_err().contains("127.0.0.1:6060"));
        assert!(parse_addr(":99999").unwrap_err().contains("port"));
    }

    #[test]
    fn a_non_loopback_address_needs_a_usable_token() {
        let mut env = env::Reader::new(true);
        let open = Settings { addr: parse_addr("0.0.0.0:6060").unwrap(), token: None };
        assert!(open.checked(&mut env).is_none());
        let err = env.finish().unwrap_err();
        assert_eq!(err.setting, ADDR_VAR);
        assert!(err.to_string().contains(TOKEN_VAR), "{err}");

        let mut env = env::Reader::new(true);
        let short = Settings { addr: parse_addr("0.0.0.0:6060").unwrap(), token: Some("abc".into()) };
        assert!(short.checked(&mut env).is_none());
        assert!(env.finish().unwrap_err().to_string().contains("at least 16"));

        let mut env = env::Reader::new(true);
        let good = Settings { addr: parse_addr("0.0.0.0:6060").unwrap(), token: Some("0123456789abcdef".into()) };
        assert!(good.checked(&mut env).is_some());
        let local = Settings { addr: parse_addr("6060").unwrap(), token: None };
        assert!(local.checked(&mut env).is_some());
        assert!(env.finish().is_ok());
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
    }
}
