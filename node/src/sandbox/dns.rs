//! The name service sessions get: the node answers DNS questions (UDP and TCP
//! port 53) at the gateway address of each session's network, asking its own
//! system resolver (hickory with the node's `/etc/resolv.conf` and `/etc/hosts`).
//!
//! Sessions cannot send UDP anywhere else, so this is how names resolve inside
//! them. Only plain questions are answered: one question of class IN, opcode
//! QUERY, not a zone transfer; anything else gets REFUSED or NOTIMP, and bytes
//! that do not parse as a DNS message get no answer at all.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{DNSClass, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Questions one session may have in flight at once; more are dropped (a client
/// retries), so a session cannot make the node hammer its upstream resolver.
const IN_FLIGHT: usize = 16;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Largest UDP answer to a question without EDNS (RFC 1035).
const UDP_PLAIN: usize = 512;

/// Setting up the name service failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("reading the node's resolver configuration: {0}")]
    Config(NetError),
    #[error("listening for DNS at {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The node's resolver, shared by every session.
#[derive(Clone)]
pub struct Resolver(Arc<TokioResolver>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// A resolver with the node's system configuration.
    pub fn system() -> Result<Self, DnsError> {
        let resolver = TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(DnsError::Config)?;
        Ok(Self(Arc::new(resolver)))
    }

    /// Answers DNS at `addr` port 53 (UDP and TCP) until `tasks` is dropped or
    /// aborted.
    pub async fn serve(&self, addr: IpAddr, tasks: &mut JoinSet<()>) -> Result<(), DnsError> {
        let at = SocketAddr::new(addr, 53);
        let bind = |source| DnsError::Bind { addr: at, source };
        let udp = UdpSocket::bind(at).await.map_err(bind)?;
        let tcp = TcpListener::bind(at).await.map_err(bind)?;
        let limit = Arc::new(Semaphore::new(IN_FLIGHT));
        tasks.spawn(serve_udp(self.clone(), Arc::new(udp), limit.clone()));
        tasks.spawn(serve_tcp(self.clone(), tcp, limit));
        Ok(())
    }

    /// The answer to one DNS message, None when it is not one.
    async fn answer(&self, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let req = Message::from_vec(bytes).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let resp = match question(&req) {
            Ok(q) => {
                let looked = self.0.lookup(q.name().clone(), q.query_type()).await;
                respond(&req, Outcome::from(looked))
            }
            Err(code) => respond(&req, Outcome::Error(code)),
        };
        let bytes = resp.to_vec().ok()?;
        let room = req
            .edns
            .as_ref()
            .map_or(UDP_PLAIN, |e| usize::from(e.max_payload()).max(UDP_PLAIN));
        if udp && bytes.len() > room {
            return resp.truncate().to_vec().ok();
        }
        Some(bytes)
    }
}

/// What the resolver said about a question.
#[derive(Debug)]
enum Outcome {
    Records(Vec<hickory_resolver::proto::rr::Record>),
    Error(ResponseCode),
}

impl From<Result<hickory_resolver::lookup::Lookup, NetError>> for Outcome {
    fn from(r: Result<hickory_resolver::lookup::Lookup, NetError>) -> Self {
        match r {
            Ok(lookup) => Self::Records(lookup.answers().to_vec()),
            Err(e) if e.is_nx_domain() => Self::Error(ResponseCode::NXDomain),
            // The name exists without records of that type: an empty answer.
            Err(e) if e.is_no_records_found() => Self::Records(Vec::new()),
            Err(e) => {
                tracing::debug!(error = %e, "a session's DNS question failed upstream");
                Self::Error(ResponseCode::ServFail)
            }
        }
    }
}

/// The one question of a request this service answers, or the code refusing it.
fn question(req: &Message) -> Result<&Query, ResponseCode> {
    if req.metadata.op_code != OpCode::Query {
        return Err(ResponseCode::NotImp);
    }
    let [q] = req.queries.as_slice() else {
        return Err(ResponseCode::FormErr);
    };
    if q.query_class() != DNSClass::IN {
        return Err(ResponseCode::Refused);
    }
    match q.query_type() {
        RecordType::AXFR | RecordType::IXFR | RecordType::ANY => Err(ResponseCode::Refused),
        _ => Ok(q),
    }
}

fn respond(req: &Message, outcome: Outcome) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_queries(req.queries.iter().cloned());
    match outcome {
        Outcome::Records(records) => {
            resp.add_answers(records);
        }
        Outcome::Error(code) => resp.metadata.response_code = code,
    }
    resp
}

async fn serve_udp(resolver: Resolver, socket: Arc<UdpSocket>, limit: Arc<Semaphore>) {
    let mut buf = vec![0u8; 4096];
    let mut questions = JoinSet::new();
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "session DNS socket failed");
                return;
            }
        };
        while questions.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let bytes = buf.get(..n).unwrap_or_default().to_vec();
        let (resolver, socket) = (resolver.clone(), socket.clone());
        questions.spawn(async move {
            if let Some(answer) = resolver.answer(&bytes, true).await {
                let _ = socket.send_to(&answer, from).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(resolver: Resolver, listener: TcpListener, limit: Arc<Semaphore>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let resolver = resolver.clone();
        conns.spawn(async move {
            let _ = tokio::time::timeout(TCP_IDLE * 6, serve_conn(&resolver, stream)).await;
            drop(permit);
        });
    }
}

/// Questions on one TCP connection, each framed by a two-byte length.
async fn serve_conn(resolver: &Resolver, mut stream: TcpStream) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut msg).await?;
        let Some(answer) = resolver.answer(&msg, false).await else {
            return Ok(());
        };
        let Ok(n) = u16::try_from(answer.len()) else {
            return Ok(());
        };
        stream.write_all(&n.to_be_bytes()).await?;
        stream.write_all(&answer).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::Name;

    fn request(op: OpCode, class: DNSClass, rtype: RecordType, n: usize) -> Message {
        let mut m = Message::new(0x4242, MessageType::Query, op);
        m.metadata.recursion_desired = true;
        for _ in 0..n {
            let mut q = Query::query(Name::from_ascii("example.com.").unwrap(), rtype);
            q.set_query_class(class);
            m.add_query(q);
        }
        m
    }

    #[test]
    fn only_plain_questions_are_answered() {
        let ok = request(OpCode::Query, DNSClass::IN, RecordType::A, 1);
        assert!(question(&ok).is_ok());
        let refused = [
            (
                request(OpCode::Update, DNSClass::IN, RecordType::A, 1),
                ResponseCode::NotImp,
            ),
            (
                request(OpCode::Query, DNSClass::CH, RecordType::TXT, 1),
                ResponseCode::Refused,
            ),
            (
                request(OpCode::Query, DNSClass::IN, RecordType::AXFR, 1),
                ResponseCode::Refused,
            ),
            (
                request(OpCode::Query, DNSClass::IN, RecordType::ANY, 1),
                ResponseCode::Refused,
            ),
            (
                request(OpCode::Query, DNSClass::IN, RecordType::A, 2),
                ResponseCode::FormErr,
            ),
            (
                request(OpCode::Query, DNSClass::IN, RecordType::A, 0),
                ResponseCode::FormErr,
            ),
        ];
        for (req, code) in refused {
            assert_eq!(question(&req).err(), Some(code), "{req:?}");
        }
    }

    #[test]
    fn answers_echo_the_question_and_its_id() {
        let req = request(OpCode::Query, DNSClass::IN, RecordType::A, 1);
        let resp = respond(&req, Outcome::Error(ResponseCode::NXDomain));
        let bytes = resp.to_vec().unwrap();
        let back = Message::from_vec(&bytes).unwrap();
        assert_eq!(back.metadata.id, 0x4242);
        assert_eq!(back.metadata.message_type, MessageType::Response);
        assert_eq!(back.metadata.response_code, ResponseCode::NXDomain);
        assert!(back.metadata.recursion_desired && back.metadata.recursion_available);
        assert_eq!(back.queries, req.queries);
    }
}
