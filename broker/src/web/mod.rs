//! The web pages, server-rendered from compile-time-checked askama templates
//! (`broker/templates/`), for the public, clients, node owners and the
//! operator. Everything a page needs is served here (`/static/…`); JavaScript
//! only adds copy buttons, and every page works without it.
//!
//! * [`session`] — server-side sessions of logged-in users, their cookies
//!   and CSRF tokens.
//! * [`csrf`] — stateless CSRF tokens of the forms used before log-in.
//! * [`public`] — the home page, sign-up, log-in, log-out.
//! * [`client`] — balance, SSH keys, "Order now", order history.
//! * [`owner`] — the node command, nodes and earnings.
//! * [`operator`] — nodes, orders, the audit, crediting deposits.
//! * [`view`] — what pages show: amounts, times, charts, receipt checks.
//!
//! Every response carries a strict Content-Security-Policy (no inline script
//! or style), and every form a CSRF token: its session's once logged in, a
//! signed double-submit token before.

pub mod client;
pub mod csrf;
pub mod operator;
pub mod owner;
pub mod public;
pub mod session;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use jusy_common::identity::PeerId;

use crate::api::Api;
use crate::limit::RateLimiter;
use csrf::{FormKey, FormToken};
use session::{Session, Sessions, StartError, Who};

/// Largest form accepted (a few SSH keys).
const MAX_FORM: usize = 32 * 1024;
/// Log-in attempts per second per address, and their burst.
const LOGIN_RATE: (u32, u32) = (1, 5);
/// Sign-ups per second per address, and their burst.
const SIGNUP_RATE: (u32, u32) = (1, 5);

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the pages need besides the API's state.
#[derive(Clone, Debug)]
pub struct Web {
    pub api: Api,
    sessions: Arc<Sessions>,
    form_key: FormKey,
    login_limit: Arc<RateLimiter>,
    signup_limit: Arc<RateLimiter>,
    operator_token: Option<Arc<str>>,
    /// `host:port` nodes dial, as the node command shows it.
    relay: String,
    broker_key: String,
    price_sat: u64,
    owner_share_ppm: u32,
    /// The terms of every order this broker sells.
    terms: jusy_common::terms::OrderTerms,
    api_port: u16,
    public_host: String,
}

impl Web {
    pub fn new(
        api: Api,
        cfg: &crate::config::Config,
        api_addr: SocketAddr,
        relay_addr: SocketAddr,
        key: PeerId,
        form_key: FormKey,
    ) -> Self {
        Self {
            api,
            sessions: Arc::default(),
            form_key,
            login_limit: Arc::new(RateLimiter::new(LOGIN_RATE.0, LOGIN_RATE.1)),
            signup_limit: Arc::new(RateLimiter::new(SIGNUP_RATE.0, SIGNUP_RATE.1)),
            operator_token: cfg.operator_token.as_deref().map(Arc::from),
            relay: format!("{}:{}", cfg.public_host, relay_addr.port()),
            broker_key: key.to_string(),
            price_sat: cfg.price_sat,
            owner_share_ppm: cfg.owner_share_ppm,
            terms: cfg.terms(),
            api_port: api_addr.port(),
            public_host: cfg.public_host.clone(),
        }
    }

    /// The base URL clients use, as the browser reached this broker (its
    /// `Host` header, if it looks like a host), else the configured one.
    fn base_url(&self, headers: &HeaderMap) -> String {
        let scheme = if over_tls(headers) { "https" } else { "http" };
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.len() < 256
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .map_or_else(
                || format!("{}:{}", self.public_host, self.api_port),
                str::to_owned,
            );
        format!("{scheme}://{host}")
    }

    /// The CSRF token of a form shown before log-in (no session is made).
    fn form_token(&self, headers: &HeaderMap) -> Result<FormToken, WebError> {
        self.form_key
            .issue(headers, over_tls(headers))
            .ok_or(WebError::Internal)
    }

    /// Refuses a form posted before log-in unless its token is signed over
    /// the nonce in the request's cookie.
    fn pre_login(&self, headers: &HeaderMap, csrf: &str) -> Result<(), WebError> {
        if self.form_key.check(headers, csrf) {
            Ok(())
        } else {
            Err(WebError::Csrf)
        }
    }

    /// A new session for someone who just logged in (or signed up).
    fn log_in(&self, headers: &HeaderMap, who: Who) -> Result<Session, WebError> {
        self.sessions.start(headers, who).map_err(|e| match e {
            StartError::Full => {
                tracing::warn!(error = %e, "log-in refused: the session table is full");
                WebError::Busy
            }
            StartError::Random => internal(e),
        })
    }

    /// The session a form was posted from, if its CSRF token matches.
    fn posted(&self, headers: &HeaderMap, csrf: &str) -> Result<Session, WebError> {
        self.sessions
            .find(headers)
            .filter(|s| s.csrf_ok(csrf))
            .ok_or(WebError::Csrf)
    }
}

/// Whether the browser reached us over TLS, as a TLS-terminating proxy in front
/// of the broker says; the broker itself serves plain HTTP.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

/// The navigation bar: who is logged in and the log-out form's CSRF token.
#[derive(Debug, Clone)]
pub struct Nav {
    pub home: &'static str,
    pub label: &'static str,
    pub csrf: String,
}

impl Nav {
    pub fn of(s: &Session) -> Self {
        let (home, label) = match s.who {
            Who::Client { .. } => ("/client", "My account"),
            Who::Owner { .. } => ("/node-owner", "My nodes"),
            Who::Operator => ("/operator", "Operator"),
        };
        Self {
            home,
            label,
            csrf: s.csrf.clone(),
        }
    }
}

/// Renders a template into a response with `status`.
pub fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a page");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

/// Adds the session cookie to a response.
fn with_cookie(mut resp: Response, session: &Session, headers: &HeaderMap) -> Response {
    if let Some(v) = session::set_cookie(&session.token, over_tls(headers)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// Adds the form nonce's cookie to a response, when the token is over a new
/// one.
fn with_form_cookie(mut resp: Response, form: FormToken) -> Response {
    if let Some(v) = form.set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// A page that failed, shown as an HTML error page.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("This form has expired or did not come from this site. Reload the page and try again.")]
    Csrf,
    #[error("Too many attempts from your address. Wait a few seconds and try again.")]
    TooMany,
    #[error("There is no such page.")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("Something went wrong on our side. Try again later.")]
    Internal,
    #[error("Too many people are logged in right now. Try again in a while.")]
    Busy,
    /// Not logged in as the role the page needs.
    #[error("log in first")]
    Login,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    nav: Option<Nav>,
    status: u16,
    title: &'static str,
    message: String,
}

impl WebError {
    fn status(&self) -> StatusCode {
        match self {
            WebError::Csrf => StatusCode::FORBIDDEN,
            WebError::TooMany => StatusCode::TOO_MANY_REQUESTS,
            WebError::NotFound => StatusCode::NOT_FOUND,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            WebError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            WebError::Login => StatusCode::SEE_OTHER,
        }
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        if let WebError::Login = self {
            return Redirect::to("/login").into_response();
        }
        let status = self.status();
        let page = ErrorPage {
            nav: None,
            status: status.as_u16(),
            title: status.canonical_reason().unwrap_or("Error"),
            message: self.to_string(),
        };
        let mut resp = render(status, &page);
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

/// Logs a storage failure and answers with the generic error page: internals
/// never reach the browser.
fn internal(e: impl std::fmt::Display) -> WebError {
    tracing::error!(error = %e, "web page failed");
    WebError::Internal
}

impl From<crate::store::StoreError> for WebError {
    fn from(e: crate::store::StoreError) -> Self {
        internal(e)
    }
}

impl From<crate::ledger::LedgerError> for WebError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        internal(e)
    }
}

/// The 404 page, also for unknown paths a browser asks for outside the pages.
pub fn not_found() -> Response {
    secure(WebError::NotFound.into_response())
}

/// Whether a request comes from a browser that wants a page, not JSON.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

async fn security_headers(resp: Response) -> Response {
    secure(resp)
}

/// Adds the security headers every page response carries.
fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cross-origin-opener-policy", "same-origin"),
        (
            "permissions-policy",
            "camera=(), microphone=(), geolocation=()",
        ),
        ("cache-control", "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

const STYLE: &str = include_str!("../../static/site.css");
const SCRIPT: &str = include_str!("../../static/copy.js");

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        body,
    )
        .into_response()
}

/// Routes of the pages; merged into the API's router, whose fallback answers
/// browsers with [`not_found`].
pub fn router(web: Web) -> Router {
    Router::new()
        .route("/", get(public::home))
        .route("/signup", get(public::signup_form).post(public::signup))
        .route("/login", get(public::login_form).post(public::login))
        .route("/logout", post(public::logout))
        .route("/client", get(client::dashboard))
        .route("/client/keys", post(client::add_key))
        .route("/client/keys/remove", post(client::remove_key))
        .route("/client/order", post(client::order_now))
        .route("/client/orders/{id}", get(client::made_order))
        .route("/client/orders/{id}/key", get(client::download_key))
        .route("/client/orders/{id}/dispute", post(client::dispute))
        .route("/node-owner", get(owner::dashboard))
        .route("/operator", get(operator::dashboard))
        .route("/operator/deposit", post(operator::deposit))
        .route("/operator/disputes/{id}", post(operator::decide))
        .route(
            "/static/site.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/static/copy.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .layer(axum::middleware::map_response(security_headers))
        .layer(DefaultBodyLimit::max(MAX_FORM))
        .layer(axum::middleware::from_fn_with_state(
            MAX_FORM,
            crate::api::refuse_oversized,
        ))
        .with_state(web)
}

/// Rejects a form whose body could not be read as one.
fn bad_form(e: axum::extract::rejection::FormRejection) -> WebError {
    WebError::BadRequest(format!("This form could not be read: {}", e.body_text()))
}

/// The page a logged-in role starts at.
fn home_of(who: &Who) -> &'static str {
    match who {
        Who::Client { .. } => "/client",
        Who::Owner { .. } => "/node-owner",
        Who::Operator => "/operator",
    }
}
