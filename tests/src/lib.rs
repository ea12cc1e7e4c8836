//! End-to-end test support for jusy: starts the real `jusy-broker` and `jusy-node`
//! binaries, waits for their readiness events, drives them with the real OpenSSH
//! and curl clients, and prints every process's log when a test fails.
//!
//! # Layout
//! * [`scene`] — one test's directory, log files and failure report.
//! * [`process`] — a started binary: event lines on stdout, stop on drop.
//! * [`jusy`] — a broker and nodes started as a user would, orders through `curl`.
//! * [`browser`] — headless chromium through chromedriver (WebDriver), for the
//!   web pages.
//! * [`http`] — raw HTTP/1.1 on kept-alive connections from any loopback
//!   address, for floods and hand-made requests.
//! * [`client`] — OpenSSH `ssh`, `scp`, `sftp` and `rsync` against an order.
//! * [`site`] — where a program runs: loopback or a lab host's namespace.
//! * [`lab`] — a network of namespaced hosts: the internet, brokers, home
//!   routers that NAT, carrier-grade NAT, and clients.
//! * [`leftovers`] — what a node's sessions left on the machine, if anything.
//! * [`liar`] — `jusy-liar`, a node that lies, and a client's plain TCP login
//!   to the order ports it serves.
//! * [`mux`] — an OpenSSH master connection and channels opened over it.
//! * [`terminal`] — a program on a pty of its own, resized like a window.
//! * [`stranger`] — a stranger's QUIC against the relay and mesh ports:
//!   half-open handshakes, connections without a hello, made-up nodes.
//!
//! The binaries are taken from the Cargo target directory the tests were built
//! in; build them first (`cargo build --workspace --bins`, as README's test
//! command does).

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

pub mod browser;
pub mod client;
pub mod http;
pub mod jusy;
pub mod lab;
pub mod leftovers;
pub mod liar;
pub mod mux;
pub mod process;
pub mod scene;
pub mod site;
pub mod stranger;
pub mod terminal;

pub use client::Login;
pub use jusy::{Broker, Node};
pub use lab::Lab;
pub use scene::{Scene, e2e};
pub use site::Site;

/// True when the test may create Linux users (root). Otherwise says why it skips;
/// under CI (`CI` set) skipping is not allowed and the test fails instead.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(test, "needs root to create per-session Linux users");
    false
}

/// Says why `test` skips. Under CI (`CI` set) skipping is not allowed: the test
/// fails instead, so a machine that cannot run it is noticed.
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {why}, and CI must run it"
    );
    eprintln!("SKIPPED {test}: {why}");
}
