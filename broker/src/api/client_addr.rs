//! The client's address: the TCP peer's, or, when the peer is a trusted
//! reverse proxy, the address that proxy says it forwarded for.

use std::net::IpAddr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::ApiError;

/// Hops of a forwarding header looked at, from the nearest: a longer chain
/// is cut there rather than parsed whole.
const MAX_HOPS: usize = 16;

/// The address a request is charged to, set on every request by the
/// listener ([`super::serve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Self>().copied().ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the client address is unknown".into(),
            )
        })
    }
}

/// Which header the trusted proxies add the client's address to.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, …` (nginx, HAProxy, Caddy, most
    /// load balancers).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for="[2001:db8::1]:4711"` (RFC 7239).
    Forwarded,
}

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an address or address/prefix");
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let net: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { net, prefix })
    }
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                (u32::from(n) ^ u32::from(i)) & mask == 0
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                (u128::from(n) ^ u128::from(i)) & mask == 0
            }
            _ => false,
        }
    }
}

/// The reverse proxies whose forwarding headers are believed.
#[derive(Clone, Debug, Default)]
pub struct Proxies {
    pub trusted: Vec<Cidr>,
    pub header: ForwardedHeader,
}

impl Proxies {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client of a request from `peer`. Anyone may send a forwarding
    /// header, so one is read only from a trusted peer, and only as far back
    /// as trusted proxies wrote it: walking from the nearest hop, the first
    /// address that is not a trusted proxy is the client. A hop that is not
    /// an address (`unknown`, an obfuscated name, garbage) stops the walk at
    /// the last proxy known.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let name = match self.header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        // Later header lines were added nearer to us, like later list items.
        let hops = headers
            .get_all(name)
            .iter()
            .rev()
            .flat_map(|v| v.to_str().unwrap_or("").rsplit(','))
            .take(MAX_HOPS);
        let mut client = peer;
        for hop in hops {
            let ip = match self.header {
                ForwardedHeader::XForwardedFor => parse_addr(hop),
                ForwardedHeader::Forwarded => forwarded_for(hop),
            };
            let Some(ip) = ip else { break };
            client = ip.to_canonical();
            if !self.trusts(client) {
                break;
            }
        }
        client
    }
}

/// The `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    parse_addr(value.trim_matches('"'))
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`,
/// `2001:db8::1`, `[2001:db8::1]:4711`.
fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    s.parse::<std::net::SocketAddrV4>()
        .ok()
        .map(|a| (*a.ip()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(header: ForwardedHeader, nets: &[&str]) -> Proxies {
        Proxies {
            trusted: nets.iter().map(|n| n.parse().unwrap()).collect(),
            header,
        }
    }

    fn headers(name: &'static str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(c.contains(ip("::ffff:10.1.0.1")));
        assert!(!c.contains(ip("10.2.0.1")));
        let one: Cidr = "2001:db8::7".parse().unwrap();
        assert!(one.contains(ip("2001:db8::7")) && !one.contains(ip("2001:db8::8")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")) && !all.contains(ip("::1")));
        for bad in ["10.0.0.0/33", "::/129", "proxy", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn headers_are_ignored_unless_the_peer_is_trusted() {
        let h = headers("x-forwarded-for", &["203.0.113.9"]);
        let none = Proxies::default();
        assert_eq!(none.client_ip(ip("198.51.100.1"), &h), ip("198.51.100.1"));
        let p = proxies(ForwardedHeader::XForwardedFor, &["10.0.0.0/8"]);
        assert_eq!(p.client_ip(ip("198.51.100.1"), &h), ip("198.51.100.1"));
        assert_eq!(p.client_ip(ip("10.0.0.2"), &h), ip("203.0.113.9"));
        // A trusted peer that forwarded nothing is its own client.
        assert_eq!(
            p.client_ip(ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let p = proxies(ForwardedHeader::XForwardedFor, &["10.0.0.0/8"]);
        // The client wrote a false first hop; the proxies appended the rest.
        let h = headers(
            "x-forwarded-for",
            &["1.2.3.4, 203.0.113.9", "10.0.0.5:8080,  10.0.0.6"],
        );
        assert_eq!(p.client_ip(ip("10.0.0.2"), &h), ip("203.0.113.9"));
        // Garbage stops the walk at the last proxy known.
        let h = headers("x-forwarded-for", &["203.0.113.9, unknown, 10.0.0.6"]);
        assert_eq!(p.client_ip(ip("10.0.0.2"), &h), ip("10.0.0.6"));
        // A very long chain is read only near its end.
        let long = format!("203.0.113.9{}", ", 10.0.0.1".repeat(100));
        let h = headers("x-forwarded-for", &[&long]);
        assert_eq!(p.client_ip(ip("10.0.0.2"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_is_read_as_rfc_7239_writes_it() {
        let p = proxies(ForwardedHeader::Forwarded, &["::1"]);
        let h = headers(
            "forwarded",
            &[r#"for=1.2.3.4, for="[2001:db8::9]:4711";proto=https;by=10.0.0.1"#],
        );
        assert_eq!(p.client_ip(ip("::1"), &h), ip("2001:db8::9"));
        let h = headers("forwarded", &["proto=https; For=192.0.2.60"]);
        assert_eq!(p.client_ip(ip("::1"), &h), ip("192.0.2.60"));
        // X-Forwarded-For is not read when Forwarded is the header chosen.
        let h = headers("x-forwarded-for", &["192.0.2.60"]);
        assert_eq!(p.client_ip(ip("::1"), &h), ip("::1"));
        let h = headers("forwarded", &["for=_hidden"]);
        assert_eq!(p.client_ip(ip("::1"), &h), ip("::1"));
    }
}
