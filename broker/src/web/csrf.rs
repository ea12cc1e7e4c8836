//! CSRF protection of the forms shown before anyone is logged in (log-in,
//! sign-up), without server state: a signed double-submit token.
//!
//! The browser gets a random nonce in an HttpOnly, SameSite=Strict cookie
//! (`jusy_form`); the form carries HMAC-SHA256(form key, nonce). A post is
//! taken only when its form token is the MAC of the nonce its cookie
//! carries, checked in constant time. Another site can neither read the
//! cookie nor make a matching token without the form key, which is derived
//! from the broker's identity key (so forms stay valid across a restart).
//! Nothing is stored per visitor: a page view costs one MAC.
//!
//! Forms of logged-in pages use their session's own token
//! ([`super::session::Session::csrf_ok`]).

use axum::http::HeaderMap;
use axum::http::header::HeaderValue;
use ring::hmac;

use super::session::{IDLE, cookie, cookie_value};

/// Name of the cookie holding the nonce.
const COOKIE_NAME: &str = "jusy_form";

/// The key form tokens are signed with.
#[derive(Clone)]
pub struct FormKey(hmac::Key);

impl std::fmt::Debug for FormKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FormKey(***)")
    }
}

/// A form's token, and the cookie to set when the request carried no nonce.
#[derive(Debug)]
pub struct FormToken {
    pub token: String,
    pub set_cookie: Option<HeaderValue>,
}

/// The nonce a request's cookie carries, if well-formed.
fn nonce(headers: &HeaderMap) -> Option<[u8; 32]> {
    let mut nonce = [0u8; 32];
    hex::decode_to_slice(cookie(headers, COOKIE_NAME)?, &mut nonce).ok()?;
    Some(nonce)
}

impl FormKey {
    /// The form key of the broker whose identity key is `identity`: an
    /// HMAC of a label under it, so it reveals nothing of the identity.
    pub fn derive(identity: &ed25519_dalek::SigningKey) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, &identity.to_bytes());
        let derived = hmac::sign(&root, b"jusy web form key\0");
        Self(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }

    /// The token for a form shown in answer to a request: signed over the
    /// request's nonce, or over a new one that the answer sets as a cookie.
    pub fn issue(&self, headers: &HeaderMap, tls: bool) -> Option<FormToken> {
        let (nonce, set_cookie) = match nonce(headers) {
            Some(n) => (n, None),
            None => {
                let mut n = [0u8; 32];
                getrandom::fill(&mut n).ok()?;
                let cookie = cookie_value(COOKIE_NAME, &hex::encode(n), IDLE, tls)?;
                (n, Some(cookie))
            }
        };
        Some(FormToken {
            token: hex::encode(hmac::sign(&self.0, &nonce)),
            set_cookie,
        })
    }

    /// Whether a posted form's token is the one for the nonce its request's
    /// cookie carries (compared in constant time by `ring`).
    pub fn check(&self, headers: &HeaderMap, given: &str) -> bool {
        let mut given_mac = [0u8; 32];
        let (Some(nonce), Ok(())) = (nonce(headers), hex::decode_to_slice(given, &mut given_mac))
        else {
            return false;
        };
        hmac::verify(&self.0, &nonce, &given_mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::COOKIE;

    fn key(seed: u8) -> FormKey {
        FormKey::derive(&ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
    }

    /// The request a browser sends after `set` came with a page.
    fn returning(set: &HeaderValue) -> HeaderMap {
        let pair = set
            .to_str()
            .expect("ascii")
            .split(';')
            .next()
            .expect("name=value");
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(pair).expect("header"));
        h
    }

    #[test]
    fn a_token_is_good_only_with_its_own_cookie_and_key() {
        let k = key(1);
        let first = k.issue(&HeaderMap::new(), false).expect("issue");
        let set = first.set_cookie.expect("a new nonce is set");
        let s = set.to_str().expect("ascii");
        assert!(
            s.starts_with("jusy_form=") && s.contains("HttpOnly") && s.contains("SameSite=Strict")
        );
        let browser = returning(&set);
        assert!(k.check(&browser, &first.token));

        // The same browser gets the same token again and no new cookie.
        let again = k.issue(&browser, false).expect("issue");
        assert!(again.set_cookie.is_none());
        assert_eq!(again.token, first.token);

        // No cookie, another browser's cookie, a forged or empty token, another
        // broker's key: all refused.
        assert!(!k.check(&HeaderMap::new(), &first.token));
        let other = k.issue(&HeaderMap::new(), false).expect("issue");
        let other_browser = returning(&other.set_cookie.expect("cookie"));
        assert!(!k.check(&other_browser, &first.token));
        assert!(!k.check(&browser, &"0".repeat(64)));
        assert!(!k.check(&browser, ""));
        assert!(!k.check(&browser, &"zz".repeat(32)));
        assert!(!key(2).check(&browser, &first.token));
    }

    #[test]
    fn the_key_prints_nothing() {
        assert_eq!(format!("{:?}", key(7)), "FormKey(***)");
    }
}
