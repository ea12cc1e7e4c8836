//! Raw HTTP/1.1 to the broker, for floods that `curl` is too slow for and for
//! requests it would tidy up: kept-alive connections from any loopback
//! address, one exchange at a time, with the answer's headers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;
use socket2::{Domain, Socket, Type};

/// A TCP connection to `to` from the loopback address `from` (all of
/// 127.0.0.0/8 is this machine's, so each is another client address).
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from.into(), 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(10))?;
    Ok(s.into())
}

/// A kept-alive connection for [`exchange`].
pub fn client(from: Ipv4Addr, to: SocketAddr) -> anyhow::Result<BufReader<TcpStream>> {
    Ok(BufReader::new(connect_from(from, to)?))
}

/// A GET request of `path` with `extra` header lines (each ending in CRLF).
pub fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: broker\r\n{extra}\r\n").into_bytes()
}

/// A form POST of `body` to `path` with `extra` header lines.
pub fn post_form(path: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: broker\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An answer: its status, header lines (names in lower case) and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// The values of every header named `name` (lower case).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value the answer sets the cookie `name` to, if it sets it.
    pub fn sets_cookie(&self, name: &str) -> Option<&str> {
        self.all("set-cookie").find_map(|v| {
            let (k, rest) = v.split_once('=')?;
            (k.trim() == name).then(|| rest.split(';').next().unwrap_or(""))
        })
    }
}

/// One request on a kept-alive connection, and its answer (whose body must
/// have a length, as every answer of the broker has).
pub fn exchange(conn: &mut BufReader<TcpStream>, request: &[u8]) -> anyhow::Result<Answer> {
    conn.get_mut().write_all(request)?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .with_context(|| format!("status line {line:?}"))?
        .parse()?;
    let mut headers = Vec::new();
    let mut len = 0;
    loop {
        line.clear();
        conn.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
            if k == "content-length" {
                len = v.parse()?;
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body)?;
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8(body)?,
    })
}
