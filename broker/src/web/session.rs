//! Server-side sessions of the web pages: who is logged in, the per-session
//! CSRF token, and the credentials of orders made in this session (their
//! private keys live only here, for download, never in a page URL).
//!
//! The browser holds only a random session token in an HttpOnly,
//! SameSite=Strict cookie; the secret hash stays on the server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::{COOKIE, HeaderValue};
use jusy_common::ledger::AccountId;

/// Name of the session cookie.
const COOKIE_NAME: &str = "jusy_session";
/// A session unused this long is forgotten.
const IDLE: Duration = Duration::from_secs(2 * 3600);
/// Sessions kept at most; past this the least recently used goes, so a flood of
/// visitors cannot grow memory without bound.
const MAX_SESSIONS: usize = 20_000;
/// Orders whose private keys a session keeps for download.
const KEPT_ORDERS: usize = 8;

/// Who a session belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// Not logged in: the session exists only to carry a CSRF token.
    Visitor,
    Client {
        hash: String,
        id: AccountId,
    },
    Owner {
        hash: String,
        id: AccountId,
    },
    Operator,
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

/// All sessions, in memory: a broker restart logs everyone out, which is
/// harmless (they log in again with their hash).
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn random_token() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(hex::encode(b))
}

/// The session token in a request's cookies, if any.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v)
}

/// Compares secrets without stopping at the first differing byte.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The `Set-Cookie` value for a session; `Secure` when the page was served
/// over TLS (by a TLS-terminating proxy in front of the broker).
pub fn set_cookie(token: &str, tls: bool) -> Option<HeaderValue> {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        IDLE.as_secs()
    ))
    .ok()
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("jusy_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live session a request carries, refreshed.
    pub fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let token = cookie_token(headers)?;
        let mut map = self.lock();
        let now = Instant::now();
        let s = map.get_mut(token)?;
        if now.saturating_duration_since(s.last_used) > IDLE {
            map.remove(token);
            return None;
        }
        s.last_used = now;
        Some(s.clone())
    }

    /// Starts a fresh session (a new token, a new CSRF token) for `who`,
    /// ending the one the request carried: logging in never reuses a token
    /// that existed before (no session fixation).
    pub fn start(&self, headers: &HeaderMap, who: Who) -> Option<Session> {
        let session = Session {
            token: random_token()?,
            who,
            csrf: random_token()?,
            orders: Vec::new(),
            last_used: Instant::now(),
        };
        let mut map = self.lock();
        if let Some(old) = cookie_token(headers) {
            map.remove(old);
        }
        if map.len() >= MAX_SESSIONS {
            let now = Instant::now();
            map.retain(|_, s| now.saturating_duration_since(s.last_used) <= IDLE);
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(session.token.clone(), session.clone());
        Some(session)
    }

    pub fn end(&self, token: &str) {
        self.lock().remove(token);
    }

    /// Keeps an order's credentials in the session, newest first.
    pub fn add_order(&self, token: &str, order: MadeOrder) {
        if let Some(s) = self.lock().get_mut(token) {
            s.orders.insert(0, order);
            s.orders.truncate(KEPT_ORDERS);
        }
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

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn sessions_are_found_by_cookie_and_rotate_on_start() {
        let sessions = Sessions::default();
        let first = sessions
            .start(&HeaderMap::new(), Who::Visitor)
            .expect("start");
        let headers = with_cookie(&format!("a=b; {COOKIE_NAME}={}; c=d", first.token));
        assert_eq!(sessions.find(&headers).map(|s| s.csrf), Some(first.csrf));
        let second = sessions.start(&headers, Who::Operator).expect("start");
        assert_ne!(second.token, first.token);
        assert!(sessions.find(&headers).is_none(), "the old token is gone");
        assert!(second.csrf_ok(&second.csrf.clone()));
        assert!(!second.csrf_ok(""));
        assert!(sessions.find(&with_cookie("jusy_session=nope")).is_none());
    }
}
