//! What isolates one session from the node and from other sessions. For now: a
//! fresh unprivileged Linux user per session, and processes started with a clean
//! environment, their own session id, `no_new_privs` and umask 077.

pub mod process;
pub mod user;
