//! I/O-free core of jusy, shared by the node and the broker.
//!
//! # Layout
//! * [`capacity`] — capacity statements nodes sign and brokers publish in
//!   their DHT, and the keys they are published under.
//! * [`identity`] — ed25519 identities of nodes and brokers and their text form.
//! * [`wire`] — the control-stream messages between a node and its relay, and the
//!   header that opens every tunnelled client stream.
//! * [`frame`] — length-prefixed framing of control messages ("need more bytes" is a
//!   normal outcome, not an error).
//! * [`order`] — an order's life on the broker (reserved → connected → finished
//!   or cancelled) and how its price is paid out.
//! * [`ledger`] — double-entry bookkeeping: accounts, entries, balances and the
//!   invariant that money is neither made nor lost.
//! * [`hold`] — an owner's earnings held after settlement, the client's
//!   dispute of them and the operator's decision.
//! * [`terms`] — an order's terms (CPU budget, wall limit, memory,
//!   processes, disk, connect window, grace) and the node's signed
//!   acceptance of them.
//! * [`plausible`] — the most CPU time a receipt can prove: the node's cores
//!   times the wall time the broker saw since the first login.
//! * [`verdict`] — a claimed end reason held against the broker's evidence:
//!   whether it stands, whose fault it was, how the price is paid out.
//! * [`rating`] — node ratings from how their sessions ended.
//! * [`receipt`] — signed usage receipts: canonical bytes, signing, the hash
//!   chain and its verifier.
//! * [`release`] — signatures of node releases with the operator's release
//!   key, and their check.
//! * [`speed`] — the deterministic single-core workload of the node speed test,
//!   and how an answer is judged.
//! * [`session`] — the lifecycle of one order's session on a node as a state machine
//!   driven by `handle_*(now, input)` calls.
//! * [`tls`] — rustls configurations that authenticate both QUIC peers by their
//!   ed25519 keys (no certificate authorities), and whether this CPU runs
//!   AES-GCM in hardware (which cipher QUIC and SSH prefer).
//!
//! Nothing here opens a socket, spawns a task or reads a clock.

pub mod capacity;
pub mod frame;
pub mod hold;
pub mod identity;
pub mod ledger;
pub mod order;
pub mod plausible;
pub mod rating;
pub mod receipt;
pub mod release;
pub mod session;
pub mod speed;
pub mod terms;
pub mod tls;
pub mod verdict;
pub mod wire;
