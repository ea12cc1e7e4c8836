//! Pages anyone may see: what the service is and how to use it, sign-up (the
//! new hash is shown once), log-in with a hash or the operator token, log-out.
//! Showing them makes no session; only a log-in or a sign-up does.

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::StatusCode;
use axum::http::header::{HeaderMap, SET_COOKIE};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::session::{Who, clear_cookie, same_secret};
use super::view::sat;
use super::{Nav, Web, WebError, bad_form, home_of, render, with_cookie, with_form_cookie};
use crate::api::client_addr::ClientIp;
use crate::limit::Key;
use crate::store::{Role, valid_hash};

#[derive(Template)]
#[template(path = "home.html")]
struct Home {
    nav: Option<Nav>,
    base: String,
    price: String,
    owner_share: u32,
    terms: jusy_common::terms::OrderTerms,
    /// How long owners' earnings are held, in words.
    hold: String,
    free_slots: usize,
    nodes: usize,
}

pub async fn home(State(web): State<Web>, headers: HeaderMap) -> Response {
    let (nodes, free_slots) = web.api.relay.capacity();
    let page = Home {
        nav: web.sessions.find(&headers).as_ref().map(Nav::of),
        base: web.base_url(&headers),
        price: sat(web.price_sat),
        owner_share: web.owner_share_ppm / 10_000,
        terms: web.terms,
        hold: super::view::duration_words(web.api.orders.ledger.hold_ms),
        free_slots,
        nodes,
    };
    render(StatusCode::OK, &page)
}

#[derive(Template)]
#[template(path = "signup.html")]
struct Signup {
    nav: Option<Nav>,
    csrf: String,
}

pub async fn signup_form(State(web): State<Web>, headers: HeaderMap) -> Result<Response, WebError> {
    let form = web.form_token(&headers)?;
    let page = Signup {
        nav: web.sessions.find(&headers).as_ref().map(Nav::of),
        csrf: form.token.clone(),
    };
    Ok(with_form_cookie(render(StatusCode::OK, &page), form))
}

#[derive(Debug, Deserialize)]
pub struct SignupForm {
    #[serde(default)]
    csrf: String,
    role: Role,
}

#[derive(Template)]
#[template(path = "hash.html")]
struct NewHash {
    nav: Option<Nav>,
    role: &'static str,
    hash: String,
    next: &'static str,
}

pub async fn signup(
    State(web): State<Web>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    form: Result<Form<SignupForm>, FormRejection>,
) -> Result<Response, WebError> {
    if !web.signup_limit.allow(Key::addr(peer)) {
        crate::metrics::METRICS.limited("signup");
        return Err(WebError::TooMany);
    }
    let Form(form) = form.map_err(bad_form)?;
    web.pre_login(&headers, &form.csrf)?;
    let (hash, id) = web.api.store.add_account(form.role)?;
    let (who, role) = match form.role {
        Role::Client => (
            Who::Client {
                hash: hash.clone(),
                id,
            },
            "client",
        ),
        Role::Owner => (
            Who::Owner {
                hash: hash.clone(),
                id,
            },
            "node owner",
        ),
    };
    tracing::info!(account = %id, role, "signed up on the web");
    // The account exists now: its hash is shown even when no session can be
    // started for it (the table is full), and the user logs in later.
    let session = match web.log_in(&headers, who) {
        Ok(s) => Some(s),
        Err(WebError::Busy) => None,
        Err(e) => return Err(e),
    };
    let page = NewHash {
        nav: session.as_ref().map(Nav::of),
        role,
        next: session.as_ref().map_or("/login", |s| home_of(&s.who)),
        hash,
    };
    let resp = render(StatusCode::CREATED, &page);
    Ok(match &session {
        Some(s) => with_cookie(resp, s, &headers),
        None => resp,
    })
}

#[derive(Template)]
#[template(path = "login.html")]
struct Login {
    nav: Option<Nav>,
    csrf: String,
    error: Option<&'static str>,
}

pub async fn login_form(State(web): State<Web>, headers: HeaderMap) -> Result<Response, WebError> {
    let form = web.form_token(&headers)?;
    let page = Login {
        nav: web.sessions.find(&headers).as_ref().map(Nav::of),
        csrf: form.token.clone(),
        error: None,
    };
    Ok(with_form_cookie(render(StatusCode::OK, &page), form))
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    secret: String,
}

pub async fn login(
    State(web): State<Web>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, WebError> {
    // Counted before anything else, so guessing hashes costs the same whether
    // or not the guess is well-formed.
    if !web.login_limit.allow(Key::addr(peer)) {
        crate::metrics::METRICS.limited("login");
        return Err(WebError::TooMany);
    }
    let Form(form) = form.map_err(bad_form)?;
    web.pre_login(&headers, &form.csrf)?;
    let secret = form.secret.trim();
    let store = &web.api.store;
    let who = if !valid_hash(secret) {
        web.operator_token
            .as_deref()
            .filter(|t| same_secret(t, secret))
            .map(|_| Who::Operator)
    } else if let Some((id, _)) = store.account(Role::Client, secret)? {
        Some(Who::Client {
            hash: secret.to_ascii_lowercase(),
            id,
        })
    } else {
        store
            .account(Role::Owner, secret)?
            .map(|(id, _)| Who::Owner {
                hash: secret.to_ascii_lowercase(),
                id,
            })
    };
    let Some(who) = who else {
        let page = Login {
            nav: None,
            csrf: form.csrf,
            error: Some(if valid_hash(secret) {
                "No account has this hash. Check that you pasted all 64 characters."
            } else {
                "That is not a hash: a hash is 64 characters 0-9 and a-f."
            }),
        };
        return Ok(render(StatusCode::UNAUTHORIZED, &page));
    };
    let session = web.log_in(&headers, who)?;
    Ok(with_cookie(
        Redirect::to(home_of(&session.who)).into_response(),
        &session,
        &headers,
    ))
}

#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

pub async fn logout(
    State(web): State<Web>,
    headers: HeaderMap,
    form: Result<Form<LogoutForm>, FormRejection>,
) -> Result<Response, WebError> {
    let Form(form) = form.map_err(bad_form)?;
    let session = web.posted(&headers, &form.csrf)?;
    web.sessions.end(&session.token);
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut().append(SET_COOKIE, clear_cookie());
    Ok(resp)
}
