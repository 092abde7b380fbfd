//! The wire protocol: text headers, binary payloads, one request and one answer at a time.
//!
//! ```text
//! PUB <topic> <len>\n<payload>   ->  OK <id>\n
//! GET <topic>\n                  ->  MSG <id> <len>\n<payload>   |  EMPTY\n
//! ACK <id>\n                     ->  OK <id>\n                   |  ERR <reason>\n
//! ```

use std::io::{self, BufRead, Read, Write};

/// Largest payload a PUB may carry.
pub const MAX_PAYLOAD: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Publish { topic: String, payload: Vec<u8> },
    Get { topic: String },
    Ack { id: u64 },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Ok(u64),
    Message { id: u64, payload: Vec<u8> },
    Empty,
    Error(String),
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_payload(r: &mut impl Read, len: &str) -> io::Result<Vec<u8>> {
    let len: usize = len.parse().map_err(|_| bad(format!("bad length {len:?}")))?;
    if len > MAX_PAYLOAD {
        return Err(bad(format!("payload of {len} bytes is over the {MAX_PAYLOAD} limit")));
    }
    let mut payload = vec![0; len];
    r.read_exact(&mut payload)?;
    Ok(payload)
}

/// Reads one request; `Ok(None)` at a clean end of the connection.
pub fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["PUB", topic, len] => Ok(Some(Request::Publish { topic: topic.to_string(), payload: read_payload(r, len)? })),
        ["GET", topic] => Ok(Some(Request::Get { topic: topic.to_string() })),
        ["ACK", id] => Ok(Some(Request::Ack { id: id.parse().map_err(|_| bad(format!("bad id {id:?}")))? })),
        _ => Err(bad(format!("unknown request {:?}", line.trim_end()))),
    }
}

pub fn write_request(w: &mut impl Write, request: &Request) -> io::Result<()> {
    match request {
        Request::Publish { topic, payload } => {
            writeln!(w, "PUB {topic} {}", payload.len())?;
            w.write_all(payload)?;
        }
        Request::Get { topic } => writeln!(w, "GET {topic}")?,
        Request::Ack { id } => writeln!(w, "ACK {id}")?,
    }
    w.flush()
}

pub fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the broker closed the connection"));
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["OK", id] => Ok(Reply::Ok(id.parse().map_err(|_| bad("bad id"))?)),
        ["MSG", id, len] => {
            Ok(Reply::Message { id: id.parse().map_err(|_| bad("bad id"))?, payload: read_payload(r, len)? })
        }
        ["EMPTY"] => Ok(Reply::Empty),
        ["ERR", ..] => Ok(Reply::Error(line.trim_end()[4..].to_owned())),
        _ => Err(bad(format!("unknown reply {:?}", line.trim_end()))),
    }
}

pub fn write_reply(w: &mut impl Write, reply: &Reply) -> io::Result<()> {
    match reply {
        Reply::Ok(id) => writeln!(w, "OK {id}")?,
        Reply::Message { id, payload } => {
            writeln!(w, "MSG {id} {}", payload.len())?;
            w.write_all(payload)?;
        }
        Reply::Empty => w.write_all(b"EMPTY\n")?,
        Reply::Error(reason) => writeln!(w, "ERR {reason}")?,
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let requests = [
            Request::Publish { topic: "t".into(), payload: b"a\nb".to_vec() },
            Request::Get { topic: "t".into() },
            Request::Ack { id: 7 },
        ];
        let mut buf = Vec::new();
        for r in &requests {
            write_request(&mut buf, r).unwrap();
        }
        let mut reader = &buf[..];
        for r in requests {
            assert_eq!(read_request(&mut reader).unwrap(), Some(r));
        }
        assert_eq!(read_request(&mut reader).unwrap(), None);

        let replies = [
            Reply::Ok(1),
            Reply::Message { id: 2, payload: vec![0, 10, 13] },
            Reply::Empty,
            Reply::Error("no such id".into()),
        ];
        let mut buf = Vec::new();
        for r in &replies {
            write_reply(&mut buf, r).unwrap();
        }
        let mut reader = &buf[..];
        for r in replies {
            assert_eq!(read_reply(&mut reader).unwrap(), r);
        }
    }

    #[test]
    fn oversized_and_unknown_requests_are_refused() {
        let mut big = format!("PUB t {}\n", MAX_PAYLOAD + 1).into_bytes();
        assert!(read_request(&mut &big[..]).is_err());
        big.clear();
        assert!(read_request(&mut &b"DROP TABLE\n"[..]).is_err());
    }
}
