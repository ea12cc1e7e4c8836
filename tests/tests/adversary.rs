//! The adversarial suite: each test plays a hostile client, node owner or
//! stranger against the real binaries, first shows that its attack's
//! precondition holds (the victim's secret exists, the object was made), and
//! then that the attack fails.
//!
//! * [`isolation`] — one session against another: files, disk images, IPC,
//!   processes, leftovers, uid reuse, process and channel limits.
//! * [`state`] — the node's and broker's own files and secrets.
//! * [`syscalls`] — calls a session must not make (user namespaces, bpf, …).
//! * [`network`] — where a session may connect: TCP 22 outside, nothing of the
//!   node's own or its LAN, no special-use range.
//! * [`traffic`] — a stranger's connections to an order port: idle ones lock
//!   no client out and are closed after the login grace time; only a login
//!   counts, so an order nobody logged in to is refunded in full.
//! * [`liar`] — a node owner who lies (`jusy-liar`): early `DONE`, impossible
//!   receipts, limits without evidence, sessions never ended, other terms
//!   signed, another node's order ended; each is caught by the broker's
//!   evidence and costs the node its rating, not the client its money.
//! * [`flood`] — a stranger against the HTTP API: slow headers by the
//!   thousand, stalled bodies, 60 KB hashes, forged forwarding headers, no
//!   file descriptors left.
//! * [`pages`] — a stranger against the web pages (anonymous views by the ten
//!   thousand, forms posted without their signed token) and a client that
//!   orders without logging in, through the API and the page.
//! * [`ports`] — a stranger against the relay's and the mesh's UDP ports:
//!   handshakes that never say hello, half-open ones, made-up nodes asking
//!   for speed tests.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

// A test target's root resolves `mod x;` beside itself (tests/tests/x.rs):
// the rooms live in tests/tests/adversary/.
#[path = "adversary/flood.rs"]
mod flood;
#[path = "adversary/isolation.rs"]
mod isolation;
#[path = "adversary/liar.rs"]
mod liar;
#[path = "adversary/network.rs"]
mod network;
#[path = "adversary/pages.rs"]
mod pages;
#[path = "adversary/ports.rs"]
mod ports;
#[path = "adversary/state.rs"]
mod state;
#[path = "adversary/syscalls.rs"]
mod syscalls;
#[path = "adversary/traffic.rs"]
mod traffic;
