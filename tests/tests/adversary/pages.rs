//! A stranger against the web pages, and a client that orders without end:
//! tens of thousands of anonymous page views log no one out and cost no
//! memory, a log-in or sign-up form posted without the token signed for the
//! browser's own cookie is refused, the page's "Order now" is charged to the
//! same rate limit as the API's orders, and a client holds at most three
//! orders nobody has logged in to, whether it orders through the API or the
//! page.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use jusy_tests::browser::{self, Browser};
use jusy_tests::http::{Answer, client, exchange, get, post_form};
use jusy_tests::{Broker, Login, Node, Scene, e2e};
use serde_json::Value;

use crate::flood::vm_rss_kb;

/// Anonymous views of the log-in page: each of them used to make a server
/// session, and the table kept 20,000, so this many pushed every logged-in
/// user out.
const VIEWS: usize = 50_000;
/// Threads sending them, each on a kept-alive connection of its own address.
const THREADS: u8 = 8;
/// How much the broker's resident memory may grow under them.
const RSS_BOUND_KB: u64 = 16 << 10;

/// True when the browser is installed; otherwise says why the test skips.
fn have_browser(test: &str) -> bool {
    let ok = browser::available();
    if !ok {
        jusy_tests::skip(test, "needs chromium and chromium-driver installed");
    }
    ok
}

/// The CSRF token of the first form of a page.
fn form_token(page: &str) -> anyhow::Result<String> {
    let (_, rest) = page
        .split_once(r#"name="csrf" value=""#)
        .context("a form with a CSRF token")?;
    Ok(rest.split('"').next().unwrap_or_default().to_owned())
}

/// What the anonymous views got back.
#[derive(Debug, Default)]
struct Views {
    /// Answered with the log-in form (200, with its token).
    forms: usize,
    /// Answers that set a session cookie.
    sessions: usize,
    /// The form nonces set, each a fresh one (no view sent a cookie).
    nonces: HashSet<String>,
}

/// `count` anonymous `GET /login` on [`THREADS`] kept-alive connections from
/// 127.0.5.x. Page views are not rate limited (only log-in and sign-up posts
/// are), so every one reaches the page.
fn view_login_page(broker: &Broker, count: usize) -> anyhow::Result<Views> {
    let request = get("/login", "Accept: text/html\r\n");
    let api = broker.api;
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let request = &request;
                s.spawn(move || -> anyhow::Result<Views> {
                    let mut conn = client(Ipv4Addr::new(127, 0, 5, t + 1), api)?;
                    let mut views = Views::default();
                    for _ in 0..count / usize::from(THREADS) {
                        let answer = exchange(&mut conn, request)?;
                        anyhow::ensure!(answer.status == 200, "{}: {}", answer.status, answer.body);
                        views.forms += usize::from(form_token(&answer.body).is_ok());
                        views.sessions += usize::from(answer.sets_cookie("jusy_session").is_some());
                        if let Some(nonce) = answer.sets_cookie("jusy_form") {
                            views.nonces.insert(nonce.to_owned());
                        }
                    }
                    Ok(views)
                })
            })
            .collect();
        let mut all = Views::default();
        for t in threads {
            let views = t.join().expect("viewing thread")?;
            all.forms += views.forms;
            all.sessions += views.sessions;
            all.nonces.extend(views.nonces);
        }
        Ok(all)
    })
}

#[test]
fn anonymous_page_views_log_no_one_out() {
    if !have_browser("anonymous_page_views_log_no_one_out") {
        return;
    }
    e2e("anonymous_page_views_log_no_one_out", |scene| {
        let data = scene.subdir("broker")?;
        let hash = Broker::add_client(scene, &data)?;
        let broker = Broker::start(scene, "broker", data, 0)?;
        let _node = Node::start(scene, "node", &broker, &["--ready-slots", "1"])?;
        broker.wait_capacity(scene, 1)?;
        let base = format!("http://{}", broker.api);

        // A client logged in in a browser, with an order whose key its
        // session keeps for download.
        let b = Browser::start(scene, "chromedriver")?;
        b.log_in(&base, &hash)?;
        anyhow::ensure!(b.url()?.ends_with("/client"), "{}", b.url()?);
        b.click("#order-now")?;
        let order_id = b.text("#order-id")?;
        let key_path = format!("/client/orders/{order_id}/key");
        let session = b.cookie("jusy_session")?["value"]
            .as_str()
            .context("session cookie")?
            .to_owned();
        let download = || -> anyhow::Result<Answer> {
            let cookie = format!("Cookie: jusy_session={session}\r\n");
            exchange(
                &mut client(Ipv4Addr::LOCALHOST, broker.api)?,
                &get(&key_path, &cookie),
            )
        };
        let key = download()?;
        anyhow::ensure!(
            key.status == 200 && key.body.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
            "{} {}",
            key.status,
            key.body
        );

        // The precondition: every view reached the log-in page and was given a
        // form with a token over a nonce of its own.
        let pid = broker.proc.pid();
        view_login_page(&broker, 800)?;
        let before = vm_rss_kb(pid)?;
        let started = Instant::now();
        let views = view_login_page(&broker, VIEWS)?;
        let after = vm_rss_kb(pid)?;
        scene.note(&format!(
            "{VIEWS} views of /login in {:?}: {} forms, {} distinct nonces, {} session cookies; \
             VmRSS {before} kB before, {after} kB after",
            started.elapsed(),
            views.forms,
            views.nonces.len(),
            views.sessions
        ));
        anyhow::ensure!(views.forms == VIEWS, "only {} forms", views.forms);
        anyhow::ensure!(views.nonces.len() == VIEWS, "{} nonces", views.nonces.len());
        // No view got a session, and the broker kept nothing for them.
        anyhow::ensure!(
            views.sessions == 0,
            "{} views got a session",
            views.sessions
        );
        anyhow::ensure!(
            after < before + RSS_BOUND_KB,
            "VmRSS grew from {before} kB to {after} kB"
        );

        // The client is still logged in, its page and order are there, and
        // the order's key still downloads.
        b.goto(&format!("{base}/client"))?;
        anyhow::ensure!(b.url()?.ends_with("/client"), "logged out: {}", b.url()?);
        anyhow::ensure!(b.try_find("#order-now")?.is_some(), "{}", b.source()?);
        b.goto(&format!("{base}/client/orders/{order_id}"))?;
        anyhow::ensure!(b.text("#order-id")? == order_id);
        let again = download()?;
        anyhow::ensure!(
            again.status == 200 && again.body == key.body,
            "{}",
            again.status
        );
        Ok(())
    });
}

#[test]
fn a_form_before_log_in_counts_only_with_the_token_signed_for_its_cookie() {
    e2e(
        "a_form_before_log_in_counts_only_with_the_token_signed_for_its_cookie",
        |scene| {
            let data = scene.subdir("broker")?;
            let hash = Broker::add_client(scene, &data)?;
            let broker = Broker::start(scene, "broker", data, 0)?;
            // Every request from an address of its own: log-in and sign-up
            // posts are rate limited per address, which is not tested here.
            let sent = std::cell::Cell::new(0u8);
            let send = |request: Vec<u8>| -> anyhow::Result<Answer> {
                sent.set(sent.get().checked_add(1).context("addresses")?);
                let from = Ipv4Addr::new(127, 0, 6, sent.get());
                exchange(&mut client(from, broker.api)?, &request)
            };
            // Two visitors' forms: a nonce cookie each, and the token for it.
            let form = |path: &str| -> anyhow::Result<(String, String)> {
                let page = send(get(path, ""))?;
                anyhow::ensure!(page.status == 200, "{}", page.status);
                anyhow::ensure!(page.sets_cookie("jusy_session").is_none());
                let nonce = page.sets_cookie("jusy_form").context("form cookie")?;
                Ok((nonce.to_owned(), form_token(&page.body)?))
            };
            let (nonce, token) = form("/login")?;
            let (other_nonce, other_token) = form("/login")?;
            anyhow::ensure!(nonce != other_nonce && token != other_token);
            let cookie = |nonce: &str| format!("Cookie: jusy_form={nonce}\r\n");
            let login = |cookie: &str, token: Option<&str>| {
                let csrf = token.map(|t| format!("&csrf={t}")).unwrap_or_default();
                post_form("/login", cookie, &format!("secret={hash}{csrf}"))
            };
            let forged = "0".repeat(64);
            for (what, request) in [
                ("without a token", login(&cookie(&nonce), None)),
                ("without the cookie", login("", Some(&token))),
                ("with a forged token", login(&cookie(&nonce), Some(&forged))),
                (
                    "with another visitor's token",
                    login(&cookie(&nonce), Some(&other_token)),
                ),
                (
                    "with the token under another visitor's cookie",
                    login(&cookie(&other_nonce), Some(&token)),
                ),
            ] {
                let answer = send(request)?;
                anyhow::ensure!(
                    answer.status == 403 && answer.body.contains("did not come from this site"),
                    "a log-in {what} got {}: {}",
                    answer.status,
                    answer.body
                );
                anyhow::ensure!(answer.sets_cookie("jusy_session").is_none(), "{what}");
            }
            // With the token from the form and its cookie the same hash logs
            // in, and the session it makes opens the client's page.
            let answer = send(login(&cookie(&nonce), Some(&token)))?;
            anyhow::ensure!(answer.status == 303, "{}: {}", answer.status, answer.body);
            anyhow::ensure!(answer.all("location").eq(["/client"]));
            let session = answer.sets_cookie("jusy_session").context("session")?;
            let page = send(get(
                "/client",
                &format!("Cookie: jusy_session={session}\r\n"),
            ))?;
            anyhow::ensure!(page.status == 200 && page.body.contains("id=\"account-id\""));

            // Sign-up is guarded the same way: no token, no account.
            let (nonce, token) = form("/signup")?;
            let signup = |token: &str| {
                post_form(
                    "/signup",
                    &cookie(&nonce),
                    &format!("role=client&csrf={token}"),
                )
            };
            let refused = send(signup(&other_token))?;
            anyhow::ensure!(refused.status == 403, "{}", refused.status);
            let made = send(signup(&token))?;
            anyhow::ensure!(
                made.status == 201 && made.body.contains("id=\"hash\""),
                "{}",
                made.status
            );
            Ok(())
        },
    );
}

/// Polls an order's state until `done` holds for it (within 60 s).
fn wait_order(
    scene: &Scene,
    broker: &Broker,
    client: &str,
    order_id: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = broker.get(scene, &format!("/order/{client}/{order_id}"))?;
        if status == 200 && done(&body) {
            return Ok(body);
        }
        anyhow::ensure!(Instant::now() < deadline, "order {order_id}: {body}");
        // Slow enough to leave the hash's rate limit room for orders.
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn orders_nobody_logged_in_to_are_capped_on_the_api_and_the_page() {
    if !have_browser("orders_nobody_logged_in_to_are_capped_on_the_api_and_the_page") {
        return;
    }
    e2e(
        "orders_nobody_logged_in_to_are_capped_on_the_api_and_the_page",
        |scene| {
            let data = scene.subdir("broker")?;
            let hash = Broker::add_client(scene, &data)?;
            // An order nobody logs in to is cancelled after 30 s: time for the
            // steps below, and not long to wait for at the end.
            let broker =
                Broker::start_with(scene, "broker", data, 0, &["--connect-window-secs", "30"])?;
            let _node = Node::start(
                scene,
                "node",
                &broker,
                &["--ready-slots", "4", "--grace-secs", "1"],
            )?;
            broker.wait_capacity(scene, 4)?;
            let base = format!("http://{}", broker.api);
            let balance = || -> anyhow::Result<Value> {
                Ok(broker.get(scene, &format!("/account/{hash}"))?.1["balance_sat"].clone())
            };
            let refused = |what: &str| -> anyhow::Result<()> {
                let (status, body) = broker.order(scene, &hash)?;
                anyhow::ensure!(
                    status == 409
                        && body["status"] == "ERROR"
                        && body["error"]
                            .as_str()
                            .is_some_and(|e| e.contains("3 orders nobody has logged in to yet")),
                    "{what}: {status} {body}"
                );
                Ok(())
            };

            // Three orders, the default cap, nobody logs in to.
            let mut orders = Vec::new();
            for _ in 0..3 {
                let (status, body) = broker.order(scene, &hash)?;
                anyhow::ensure!(status == 200, "{status} {body}");
                orders.push(body);
            }
            // A fourth is refused, although a slot is free and the balance
            // pays for it; nothing is charged.
            let (_, health) = broker.get(scene, "/health")?;
            anyhow::ensure!(health["free_slots"].as_u64() >= Some(1), "{health}");
            let before = balance()?;
            anyhow::ensure!(before.as_u64() > Some(0), "{before}");
            refused("a fourth order")?;
            anyhow::ensure!(balance()? == before, "the refusal charged");

            // The page's "Order now" says the same.
            let b = Browser::start(scene, "chromedriver")?;
            b.log_in(&base, &hash)?;
            b.click("#order-now")?;
            let shown = b.text("#error")?;
            anyhow::ensure!(
                shown.contains("No order was made")
                    && shown.contains("3 orders nobody has logged in to yet"),
                "{shown}"
            );
            b.screenshot("web-order-capped")?;

            // Logging in to one takes it off the count: the page orders.
            let first = Login::from_order(scene, &orders[0])?;
            let out = first.ssh(scene, "true", None)?;
            anyhow::ensure!(out.status == Some(0), "ssh: {}", out.stderr);
            wait_order(scene, &broker, &hash, &first.order_id, |o| {
                o["state"] != "RESERVED"
            })?;
            b.goto(&format!("{base}/client"))?;
            b.click("#order-now")?;
            anyhow::ensure!(b.try_find("#order-id")?.is_some(), "{}", b.source()?);

            // Three wait again: both refuse.
            refused("the cap full again")?;
            b.goto(&format!("{base}/client"))?;
            b.click("#order-now")?;
            anyhow::ensure!(b.text("#error")?.contains("nobody has logged in to yet"));

            // Once one is cancelled for nobody logging in, the API orders
            // again; once the next is, so does the page.
            for (i, via_page) in [(1, false), (2, true)] {
                let id = orders[i]["order_id"].as_str().context("order id")?;
                let ended = wait_order(scene, &broker, &hash, id, |o| o["finished"] == true)?;
                anyhow::ensure!(ended["state"] == "NEVER_CONNECTED", "{ended}");
                broker.wait_capacity(scene, 1)?;
                if via_page {
                    b.goto(&format!("{base}/client"))?;
                    b.click("#order-now")?;
                    anyhow::ensure!(b.try_find("#order-id")?.is_some(), "{}", b.source()?);
                } else {
                    let (status, body) = broker.order(scene, &hash)?;
                    anyhow::ensure!(status == 200, "{status} {body}");
                }
            }
            Ok(())
        },
    );
}

#[test]
fn order_now_is_charged_to_the_hashs_rate_limit_like_the_api() {
    if !have_browser("order_now_is_charged_to_the_hashs_rate_limit_like_the_api") {
        return;
    }
    e2e(
        "order_now_is_charged_to_the_hashs_rate_limit_like_the_api",
        |scene| {
            let data = scene.subdir("broker")?;
            let hash = Broker::add_client(scene, &data)?;
            // No node: an order that passes the limit is refused for want of
            // capacity, which shows it got that far.
            let broker = Broker::start_with(
                scene,
                "broker",
                data,
                0,
                &["--rate-limit-per-sec", "1", "--rate-limit-burst", "5"],
            )?;
            let base = format!("http://{}", broker.api);
            let b = Browser::start(scene, "chromedriver")?;
            b.log_in(&base, &hash)?;
            b.click("#order-now")?;
            let shown = b.text("#error")?;
            anyhow::ensure!(shown.contains("no free capacity"), "{shown}");

            // The hash's requests through the API, from other addresses (20,
            // taking turns, so that none of them runs out), keep its bucket
            // empty (it refills a token a second)...
            let stop = AtomicBool::new(false);
            let emptied = AtomicBool::new(false);
            let shown = std::thread::scope(|s| {
                let flood = s.spawn(|| -> anyhow::Result<()> {
                    let mut conns = (1..=20)
                        .map(|i| client(Ipv4Addr::new(127, 0, 7, i), broker.api))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let account = get(&format!("/account/{hash}"), "");
                    for turn in (0..conns.len()).cycle() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if exchange(&mut conns[turn], &account)?.status == 429 {
                            emptied.store(true, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Ok(())
                });
                // ...and the browser's "Order now", from its own address, is
                // limited with it.
                let shown = (|| {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !emptied.load(Ordering::Relaxed) {
                        anyhow::ensure!(
                            Instant::now() < deadline,
                            "the API never limited the hash"
                        );
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    b.goto(&format!("{base}/client"))?;
                    b.click("#order-now")?;
                    b.text("#error")
                })();
                stop.store(true, Ordering::Relaxed);
                flood.join().expect("flooding thread")?;
                shown
            })?;
            anyhow::ensure!(
                shown.contains("No order was made") && shown.contains("too many requests"),
                "{shown}"
            );
            b.screenshot("web-order-rate-limited")?;
            Ok(())
        },
    );
}
