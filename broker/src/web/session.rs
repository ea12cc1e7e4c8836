//! Server-side sessions of the web pages: who is logged in, the per-session
//! CSRF token of their forms, and the credentials of orders made in the
//! session (their private keys live only here, for download, never in a page
//! URL).
//!
//! Only a log-in (or a sign-up, which logs in to the new account) makes a
//! session: looking at pages makes none, so anonymous traffic adds nothing
//! here and can never push a logged-in session out. The table is bounded
//! per account ([`PER_ACCOUNT`]: a new log-in ends that account's least
//! recently used session) and in all ([`MAX_SESSIONS`]: when it is full of
//! sessions used within [`IDLE`], a new log-in is refused rather than ending
//! anyone else's).
//!
//! The browser holds only a random session token in an HttpOnly,
//! SameSite=Strict cookie; the secret hash stays on the server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::HeaderValue;
use jusy_common::ledger::AccountId;
use subtle::ConstantTimeEq;

/// Name of the session cookie.
const COOKIE_NAME: &str = "jusy_session";
/// A session unused this long is forgotten.
pub const IDLE: Duration = Duration::from_secs(2 * 3600);
/// Sessions one account (or the operator) holds at once: browsers and
/// devices logged in together.
pub const PER_ACCOUNT: usize = 8;
/// Sessions held at most, a few hundred bytes each (and up to
/// [`KEPT_ORDERS`] orders' credentials, which were paid for). Only logged-in
/// accounts fill it; a sign-up logs in, and sign-ups are rate limited per
/// address, so filling it takes that many sign-ups or log-ins within
/// [`IDLE`].
pub const MAX_SESSIONS: usize = 100_000;
/// Orders whose private keys a session keeps for download.
const KEPT_ORDERS: usize = 8;

/// Who a session belongs to: always someone logged in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    Client { hash: String, id: AccountId },
    Owner { hash: String, id: AccountId },
    Operator,
}

/// The account a session counts against, for [`PER_ACCOUNT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Principal {
    Client(AccountId),
    Owner(AccountId),
    Operator,
}

impl Who {
    fn principal(&self) -> Principal {
        match self {
            Who::Client { id, .. } => Principal::Client(*id),
            Who::Owner { id, .. } => Principal::Owner(*id),
            Who::Operator => Principal::Operator,
        }
    }
}

/// Credentials of an order made from the web page.
#[derive(Clone, Debug)]
pub struct MadeOrder {
    pub order_id: String,
    pub username: String,
    pub host: String,
    pub port: u16,
    pub privkey: String,
    pub known_hosts: String,
    /// The cipher preference for `ssh -c`, if the node has one.
    pub ssh_ciphers: Option<&'static str>,
    pub terms: jusy_common::terms::OrderTerms,
}

/// One browser's session.
#[derive(Clone, Debug)]
pub struct Session {
    pub token: String,
    pub who: Who,
    pub csrf: String,
    pub orders: Vec<MadeOrder>,
    last_used: Instant,
}

/// Why no session was started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{MAX_SESSIONS} sessions are in use")]
    Full,
    #[error("no randomness for a session token")]
    Random,
}

#[derive(Debug, Default)]
struct Table {
    by_token: HashMap<String, Session>,
    /// Each account's session tokens, oldest log-in first.
    by_account: HashMap<Principal, Vec<String>>,
}

impl Table {
    fn remove(&mut self, token: &str) {
        let Some(s) = self.by_token.remove(token) else {
            return;
        };
        let principal = s.who.principal();
        if let Some(tokens) = self.by_account.get_mut(&principal) {
            tokens.retain(|t| t != token);
            if tokens.is_empty() {
                self.by_account.remove(&principal);
            }
        }
    }

    fn forget_idle(&mut self, now: Instant) {
        let idle: Vec<String> = self
            .by_token
            .values()
            .filter(|s| now.saturating_duration_since(s.last_used) > IDLE)
            .map(|s| s.token.clone())
            .collect();
        for token in idle {
            self.remove(&token);
        }
    }

    /// Makes room for one more session of `principal`: its own least
    /// recently used one goes when it has [`PER_ACCOUNT`]; nobody else's
    /// ever does.
    fn make_room(&mut self, principal: Principal, now: Instant) -> Result<(), StartError> {
        let own = self
            .by_account
            .get(&principal)
            .map_or(&[][..], Vec::as_slice);
        if own.len() >= PER_ACCOUNT {
            let oldest = own
                .iter()
                .filter_map(|t| self.by_token.get(t))
                .min_by_key(|s| s.last_used)
                .map(|s| s.token.clone());
            if let Some(oldest) = oldest {
                self.remove(&oldest);
            }
        }
        if self.by_token.len() >= MAX_SESSIONS {
            self.forget_idle(now);
        }
        if self.by_token.len() >= MAX_SESSIONS {
            return Err(StartError::Full);
        }
        Ok(())
    }
}

/// All sessions, in memory: a broker restart logs everyone out, which is
/// harmless (they log in again with their hash).
#[derive(Debug, Default)]
pub struct Sessions {
    table: Mutex<Table>,
}

pub fn random_token() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(hex::encode(b))
}

/// The value of the cookie `name` in a request, if any.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Compares secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// A `Set-Cookie` value for `name=value` that scripts cannot read and other
/// sites never send, kept `max_age`; `Secure` when the page was served over
/// TLS (by a TLS-terminating proxy in front of the broker).
pub fn cookie_value(name: &str, value: &str, max_age: Duration, tls: bool) -> Option<HeaderValue> {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.as_secs()
    ))
    .ok()
}

/// The `Set-Cookie` value for a session.
pub fn set_cookie(token: &str, tls: bool) -> Option<HeaderValue> {
    cookie_value(COOKIE_NAME, token, IDLE, tls)
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("jusy_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live session a request carries, refreshed.
    pub fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let token = cookie(headers, COOKIE_NAME)?;
        let mut table = self.lock();
        let now = Instant::now();
        let s = table.by_token.get_mut(token)?;
        if now.saturating_duration_since(s.last_used) > IDLE {
            table.remove(token);
            return None;
        }
        s.last_used = now;
        Some(s.clone())
    }

    /// Starts a fresh session (a new token, a new CSRF token) for `who`
    /// after a successful log-in, ending the one the request carried:
    /// logging in never reuses a token that existed before (no session
    /// fixation).
    pub fn start(&self, headers: &HeaderMap, who: Who) -> Result<Session, StartError> {
        let now = Instant::now();
        let session = Session {
            token: random_token().ok_or(StartError::Random)?,
            who,
            csrf: random_token().ok_or(StartError::Random)?,
            orders: Vec::new(),
            last_used: now,
        };
        let principal = session.who.principal();
        let mut table = self.lock();
        if let Some(old) = cookie(headers, COOKIE_NAME) {
            table.remove(old);
        }
        table.make_room(principal, now)?;
        table
            .by_account
            .entry(principal)
            .or_default()
            .push(session.token.clone());
        table
            .by_token
            .insert(session.token.clone(), session.clone());
        Ok(session)
    }

    pub fn end(&self, token: &str) {
        self.lock().remove(token);
    }

    /// Keeps an order's credentials in the session, newest first.
    pub fn add_order(&self, token: &str, order: MadeOrder) {
        if let Some(s) = self.lock().by_token.get_mut(token) {
            s.orders.insert(0, order);
            s.orders.truncate(KEPT_ORDERS);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_token.len()
    }
}

impl Session {
    /// Whether a form's CSRF token is this session's.
    pub fn csrf_ok(&self, given: &str) -> bool {
        same_secret(&self.csrf, given)
    }

    pub fn order(&self, order_id: &str) -> Option<&MadeOrder> {
        self.orders.iter().find(|o| o.order_id == order_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::COOKIE;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(v).expect("header"));
        h
    }

    fn client(n: u8) -> Who {
        Who::Client {
            hash: hex::encode([n; 32]),
            id: AccountId([n; 32]),
        }
    }

    #[test]
    fn sessions_are_found_by_cookie_and_rotate_on_start() {
        let sessions = Sessions::default();
        let first = sessions.start(&HeaderMap::new(), client(1)).expect("start");
        let headers = with_cookie(&format!("a=b; {COOKIE_NAME}={}; c=d", first.token));
        assert_eq!(sessions.find(&headers).map(|s| s.csrf), Some(first.csrf));
        let second = sessions.start(&headers, Who::Operator).expect("start");
        assert_ne!(second.token, first.token);
        assert!(sessions.find(&headers).is_none(), "the old token is gone");
        assert!(second.csrf_ok(&second.csrf.clone()));
        assert!(!second.csrf_ok(""));
        assert!(sessions.find(&with_cookie("jusy_session=nope")).is_none());
        assert_eq!(sessions.len(), 1);
    }

    #[test]
    fn an_account_holds_a_bounded_number_and_pushes_out_only_its_own() {
        let sessions = Sessions::default();
        let other = sessions.start(&HeaderMap::new(), client(2)).expect("start");
        let mine: Vec<Session> = (0..PER_ACCOUNT + 3)
            .map(|_| sessions.start(&HeaderMap::new(), client(1)).expect("start"))
            .collect();
        assert_eq!(sessions.len(), PER_ACCOUNT + 1);
        let found = |s: &Session| {
            sessions
                .find(&with_cookie(&format!("{COOKIE_NAME}={}", s.token)))
                .is_some()
        };
        // The account's oldest went; its newest and the other account's stay.
        assert!(!found(&mine[0]));
        assert!(mine[3..].iter().all(found));
        assert!(found(&other));
        // Logging out removes it from its account's list too.
        sessions.end(&mine[3].token);
        assert_eq!(
            sessions.lock().by_account[&Principal::Client(AccountId([1; 32]))].len(),
            PER_ACCOUNT - 1
        );
    }

    #[test]
    fn a_full_table_refuses_new_log_ins_rather_than_ending_anyone() {
        let mut table = Table::default();
        let now = Instant::now();
        for i in 0..MAX_SESSIONS {
            let token = format!("{i:064x}");
            let who = Who::Owner {
                hash: token.clone(),
                id: AccountId([0; 32]),
            };
            table.by_token.insert(
                token.clone(),
                Session {
                    token,
                    who,
                    csrf: String::new(),
                    orders: Vec::new(),
                    last_used: now,
                },
            );
        }
        let newcomer = Principal::Client(AccountId([9; 32]));
        assert!(matches!(
            table.make_room(newcomer, now),
            Err(StartError::Full)
        ));
        assert_eq!(table.by_token.len(), MAX_SESSIONS);
        // Once they are idle, they are forgotten and the log-in goes ahead.
        let later = now + IDLE + Duration::from_secs(1);
        assert!(table.make_room(newcomer, later).is_ok());
        assert!(table.by_token.is_empty());
    }
}
