//! The web pages in a real browser (headless chromium through chromedriver):
//! a client signs up, adds a key, is credited by the operator and logs in to a
//! shell with the command the page shows; a node owner runs the command their
//! page shows and sees the node online; bad input gets a visible answer.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use jusy_tests::browser::{self, Browser};
use jusy_tests::process::{self, Proc, bin};
use jusy_tests::{Broker, Node, Scene, e2e};

const TOKEN: &str = "operator-token-for-tests-0123456789";

/// True when the browser is installed; otherwise says why the test skips.
fn have_browser(test: &str) -> bool {
    let ok = browser::available();
    if !ok {
        jusy_tests::skip(test, "needs chromium and chromium-driver installed");
    }
    ok
}

fn logout(b: &Browser) -> anyhow::Result<()> {
    b.click("header form button")?;
    Ok(())
}

/// Runs the `ssh` command a page showed, in the directory holding the files
/// it names, with options that make it fail rather than ask (no user config,
/// no agent, strict host-key checking), followed by `remote`.
fn run_shown_ssh(
    scene: &Scene,
    dir: &std::path::Path,
    shown: &str,
    remote: &str,
) -> anyhow::Result<String> {
    let rest = shown
        .strip_prefix("ssh ")
        .with_context(|| format!("not an ssh command: {shown}"))?;
    let line = format!(
        "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes \
         -o IdentityAgent=none {rest} {remote}"
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &line]).current_dir(dir);
    let out = process::run(scene, cmd, None, Duration::from_secs(60))?;
    anyhow::ensure!(out.status == Some(0), "{line} failed: {}", out.stderr);
    Ok(out.text())
}

#[test]
fn client_signs_up_is_credited_and_orders_a_shell_from_the_page() {
    if !have_browser("client_signs_up_is_credited_and_orders_a_shell_from_the_page") {
        return;
    }
    e2e("web_client", |scene| {
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let broker = Broker::start_with(scene, "broker", data, 0, &["--operator-token", TOKEN])?;
        let mut node = Node::start_owned(
            scene,
            "node",
            &broker,
            &owner,
            &["--ready-slots", "1", "--grace-secs", "1"],
        )?;
        broker.wait_capacity(scene, 1)?;
        let base = format!("http://{}", broker.api);
        let b = Browser::start(scene, "chromedriver")?;

        // The public page explains the flow with this broker's address.
        b.goto(&base)?;
        assert!(b.text("#flow")?.contains(&format!("curl -s {base}/order/")));
        b.screenshot("web-home")?;
        b.resize(390, 844)?;
        b.screenshot("web-home-phone")?;
        b.resize(1100, 900)?;

        // Sign up: the hash is shown once.
        b.click("a[href='/signup']")?;
        b.screenshot("web-signup")?;
        b.click("#signup-client-button")?;
        let hash = b.text("#hash")?;
        assert!(
            hash.len() == 64 && hash.bytes().all(|c| c.is_ascii_hexdigit()),
            "{hash}"
        );
        b.screenshot("web-client-hash")?;

        // Log in again with the hash; it never appears in a URL.
        logout(&b)?;
        b.log_in(&base, &hash)?;
        assert!(b.url()?.ends_with("/client"), "{}", b.url()?);
        assert!(b.text("#balance-amount")?.starts_with("0 sat"));
        // A new account's rating.
        assert_eq!(b.text("#rating-percent")?, "90 %");

        // A bad key is refused with a message; a good one is listed.
        b.fill("#key", "ssh-ed25519 not-a-key me@laptop")?;
        b.click("#add-key-button")?;
        assert!(
            b.text("#error")?.contains("not added"),
            "{}",
            b.text("#error")?
        );
        b.screenshot("web-client-bad-key")?;
        let keydir = scene.subdir("mykey")?;
        let mykey = keydir.join("id_ed25519");
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "web-test", "-f"])
            .arg(&mykey)
            .status()?
            .success();
        anyhow::ensure!(ok, "ssh-keygen failed");
        let public = std::fs::read_to_string(mykey.with_extension("pub"))?;
        b.fill("#key", public.trim())?;
        b.click("#add-key-button")?;
        assert!(b.text("ul.keys")?.contains("web-test"));
        let account_id = b.text("#account-id")?;

        // The operator credits the client.
        logout(&b)?;
        b.log_in(&base, TOKEN)?;
        assert!(b.url()?.ends_with("/operator"), "{}", b.url()?);
        b.fill("#account_id", &account_id)?;
        b.fill("#amount_sat", "100000")?;
        b.click("#deposit-button")?;
        assert!(b.text("#notice")?.contains("Credited"), "{}", b.source()?);
        assert_eq!(b.text("#audit")?, "balanced");
        let relays = b.text("#relays")?;
        assert!(
            relays.contains(&format!(":{}", broker.relay.port()))
                && relays.contains(&broker.key[..12]),
            "the operator page lists this relay: {relays}"
        );
        b.screenshot("web-operator")?;

        // Order now: the page's command, key download and known_hosts line
        // give a shell.
        logout(&b)?;
        b.log_in(&base, &hash)?;
        assert!(b.text("#balance-amount")?.starts_with("100"));
        b.screenshot("web-client")?;
        b.click("#order-now")?;
        let command = b.text("#ssh-command")?;
        let order_id = b.text("#order-id")?;
        b.screenshot("web-order")?;
        let words: Vec<&str> = command.split_whitespace().collect();
        let key_file = words[words.iter().position(|w| *w == "-i").context("-i")? + 1];
        let known_hosts_file = words
            .iter()
            .find_map(|w| w.strip_prefix("UserKnownHostsFile="))
            .context("known_hosts option")?;
        let dir = scene.subdir("download")?;
        let href = b.attr("#download-key", "href")?.context("download link")?;
        let href = if href.starts_with('/') {
            format!("{base}{href}")
        } else {
            href
        };
        let cookie = b.cookie("jusy_session")?;
        // The session cookie is out of scripts' reach and never sent cross-site.
        assert_eq!(cookie["httpOnly"], true, "{cookie}");
        assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
        let mut curl = Command::new("curl");
        curl.args(["-sSf", "-b"])
            .arg(format!(
                "jusy_session={}",
                cookie["value"].as_str().unwrap_or("")
            ))
            .arg("-o")
            .arg(dir.join(key_file))
            .arg(&href);
        let out = process::run(scene, curl, None, Duration::from_secs(30))?;
        anyhow::ensure!(out.status == Some(0), "key download failed: {}", out.stderr);
        std::fs::set_permissions(dir.join(key_file), std::fs::Permissions::from_mode(0o600))?;
        std::fs::write(
            dir.join(known_hosts_file),
            format!("{}\n", b.text("#known-hosts")?),
        )?;
        let said = run_shown_ssh(scene, &dir, &command, "echo shell-from-the-web-page")?;
        assert_eq!(said, "shell-from-the-web-page\n");
        // The client's own key logs in too.
        let own = command.replace(
            &format!("-i {key_file}"),
            &format!("-i {}", mykey.display()),
        );
        assert_eq!(
            run_shown_ssh(scene, &dir, &own, "echo own-key")?,
            "own-key\n"
        );

        // Once the session ends, the history shows it, settled.
        node.wait_session_end(&order_id, Duration::from_secs(60))?;
        b.goto(&format!("{base}/client"))?;
        let row = format!("tr[data-order='{order_id}']");
        let text = b.wait_text(&row, Duration::from_secs(30), |t| {
            t.contains("cancelled") || t.contains("finished")
        })?;
        // At least the final receipt, checked by the page as a client would.
        assert!(text.contains("· verified"), "receipts must verify: {text}");
        assert!(
            !text.contains("none yet"),
            "the final receipt must be shown: {text}"
        );
        assert!(b.try_find("svg.chart rect.bar")?.is_some(), "CPU chart");
        b.screenshot("web-client-history")?;
        Ok(())
    });
}

#[test]
fn node_owner_runs_the_shown_command_and_sees_the_node_online() {
    if !have_browser("node_owner_runs_the_shown_command_and_sees_the_node_online") {
        return;
    }
    e2e("web_owner", |scene| {
        let data = scene.subdir("broker")?;
        let client = Broker::add_client(scene, &data)?;
        // A test-sized CPU hour (the node below sells no more).
        let broker = Broker::start_with(scene, "broker", data, 0, &["--cpu-budget-secs", "1"])?;
        let base = format!("http://{}", broker.api);
        let b = Browser::start(scene, "chromedriver")?;
        b.goto(&format!("{base}/signup"))?;
        b.click("#signup-owner-button")?;
        let hash = b.text("#hash")?;
        b.click("#continue")?;
        assert!(b.try_find("#no-nodes")?.is_some());
        b.screenshot("web-owner-new")?;

        // `JUSY_OWNER=<hash> jusy-node …`: the hash in the environment, never
        // among the arguments, which every process on the node can read.
        let command = b.text("#node-command")?;
        let mut words = command.split_whitespace();
        assert_eq!(
            words.next(),
            Some(format!("JUSY_OWNER={hash}").as_str()),
            "{command}"
        );
        assert_eq!(words.next(), Some("jusy-node"), "{command}");
        let args: Vec<&str> = words.collect();
        assert!(
            !args.iter().any(|a| a.contains(hash.as_str())),
            "the arguments do not carry the owner hash: {command}"
        );
        let mut cmd = Command::new(bin("jusy-node")?);
        cmd.env("JUSY_OWNER", &hash)
            .args(&args)
            .arg("--data-dir")
            .arg(scene.subdir("node")?)
            .args(["--ready-slots", "1"])
            // A test-sized CPU hour: the session below uses it up (DONE),
            // which pays the owner, where a short session would be refunded.
            .args(["--cpu-budget-secs", "1", "--receipt-secs", "1"])
            .env("RUST_LOG", "info,jusy_node=debug,quinn=warn");
        let mut node = Proc::start(scene, "node", cmd)?;
        node.wait_event("registered", Duration::from_secs(30))?;

        let state = b.wait_text("tr.node", Duration::from_secs(30), |t| t.contains("online"))?;
        assert!(state.contains("online"), "{state}");
        let before = b.text("#earnings-held")?;
        b.screenshot("web-owner")?;

        // A client's session on the node: its earnings appear on the page.
        broker.wait_capacity(scene, 1)?;
        let (status, order) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{order}");
        let login = jusy_tests::Login::from_order(scene, &order)?;
        let burn = "perl -e 'my ($u, $s) = times; ($u, $s) = times while $u + $s < 30'";
        let _ = login.ssh(scene, burn, None)?;
        let ended = node.wait_event_where("session_ended", Duration::from_secs(60), |v| {
            v["order_id"] == login.order_id.as_str()
        })?;
        assert_eq!(ended["reason"], "DONE", "{ended}");
        b.goto(&format!("{base}/node-owner"))?;
        // Held for the hold period first.
        let earned = b.wait_text("#earnings-held", Duration::from_secs(30), |t| t != before)?;
        assert!(earned != before, "earnings stayed at {before}");
        assert_eq!(b.text("#earnings-amount")?, "0 sat");
        assert!(b.text("#earnings")?.contains("1 session(s) served"));
        // One session kept to its end: the node's rating (90 % for a new
        // node, pulled up by every kept session) shows in its row.
        assert_eq!(b.text("tr.node td.rating")?, "90 %");
        b.screenshot("web-owner-earnings")?;
        Ok(())
    });
}

#[test]
fn forms_reject_bad_input_and_log_in_is_rate_limited() {
    if !have_browser("forms_reject_bad_input_and_log_in_is_rate_limited") {
        return;
    }
    e2e("web_bad_input", |scene| {
        let broker = Broker::start(scene, "broker", scene.subdir("broker")?, 0)?;
        let base = format!("http://{}", broker.api);
        let b = Browser::start(scene, "chromedriver")?;

        // Every page is sent with a strict policy: no inline script or
        // style, no framing.
        let mut head = Command::new("curl");
        head.args(["-sS", "-D", "-", "-o", "/dev/null"])
            .arg(format!("{base}/login"));
        let headers = process::run(scene, head, None, Duration::from_secs(30))?
            .text()
            .to_ascii_lowercase();
        let csp = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-security-policy: "))
            .with_context(|| format!("no CSP: {headers}"))?;
        assert!(
            csp.contains("default-src 'none'") || csp.contains("default-src 'self'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(headers.contains("x-frame-options: deny"), "{headers}");

        // Unknown paths get the 404 page.
        b.goto(&format!("{base}/no/such/page"))?;
        assert!(b.text("h1")?.contains("404"));
        b.screenshot("web-404")?;

        // A form without its CSRF token is refused with 403.
        b.goto(&format!("{base}/login"))?;
        b.execute("document.querySelector('#login input[name=csrf]').remove()")?;
        b.fill("#secret", &"0".repeat(64))?;
        b.click("#login-button")?;
        assert!(b.text("h1")?.contains("403"), "{}", b.source()?);
        b.screenshot("web-403")?;

        // A wrong hash and a non-hash are told apart.
        b.log_in(&base, &"0".repeat(64))?;
        assert!(b.text("#error")?.contains("No account has this hash"));
        b.screenshot("web-login-wrong-hash")?;
        b.log_in(&base, "hello")?;
        assert!(b.text("#error")?.contains("not a hash"));

        // Guessing is rate limited: soon every attempt gets the 429 page.
        let mut limited = false;
        for _ in 0..20 {
            b.log_in(&base, &"1".repeat(64))?;
            if b.text("h1")?.contains("429") {
                limited = true;
                break;
            }
        }
        assert!(limited, "log-in was never rate limited");
        b.screenshot("web-429")?;
        Ok(())
    });
}

#[test]
fn a_client_disputes_on_its_page_and_the_operator_refunds_on_theirs() {
    if !have_browser("a_client_disputes_on_its_page_and_the_operator_refunds_on_theirs") {
        return;
    }
    e2e("web_dispute", |scene| {
        // One satoshi per CPU-microsecond: two seconds of CPU earn plenty.
        const HOUR_PRICE: u64 = 3_600_000_000;
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let client = Broker::add_account(scene, &data, "client", HOUR_PRICE)?;
        let price = HOUR_PRICE.to_string();
        let broker = Broker::start_with(
            scene,
            "broker",
            data,
            0,
            &["--price-sat", &price, "--operator-token", TOKEN],
        )?;
        let mut node = Node::start_owned(
            scene,
            "node",
            &broker,
            &owner,
            &[
                "--ready-slots",
                "1",
                "--grace-secs",
                "1",
                "--receipt-secs",
                "1",
            ],
        )?;
        broker.wait_capacity(scene, 1)?;

        // A session with two seconds of CPU, closed at once: its owner's
        // part is held.
        let (status, order) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{order}");
        let login = jusy_tests::Login::from_order(scene, &order)?;
        let busy = "perl -e 'my ($u, $s) = times; ($u, $s) = times while $u + $s < 2'";
        let out = login.ssh(scene, busy, None)?;
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        node.wait_session_end(&login.order_id, Duration::from_secs(30))?;
        let id = login.order_id.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let held = loop {
            let (_, body) = broker.get(scene, &format!("/order/{client}/{id}"))?;
            if let Some(amount) = body["hold"]["amount_sat"].as_u64() {
                break amount;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "never held: {body}");
            std::thread::sleep(Duration::from_millis(300));
        };
        assert!(held > 0);
        let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
        let before = account["balance_sat"].as_u64().unwrap_or(0);

        // The client disputes it on its page, with a reason.
        let base = format!("http://{}", broker.api);
        let b = Browser::start(scene, "chromedriver")?;
        b.log_in(&base, &client)?;
        let row = format!("tr.order[data-order='{id}']");
        assert!(
            b.text(&format!("{row} td.hold"))?
                .contains("held for the owner")
        );
        b.fill(&format!("#reason-{id}"), "the shell froze at once")?;
        b.screenshot("web-client-dispute")?;
        b.click(&format!("{row} form.dispute button"))?;
        let cell = b.wait_text(&format!("{row} td.hold"), Duration::from_secs(10), |t| {
            t.contains("disputed")
        })?;
        assert!(cell.contains("the shell froze at once"), "{cell}");
        assert!(b.try_find(&format!("{row} form.dispute"))?.is_none());

        // The operator sees it and refunds it all.
        logout(&b)?;
        b.log_in(&base, TOKEN)?;
        let dispute = format!("tr.dispute[data-order='{id}']");
        assert!(b.text(&format!("{dispute} td.reason"))? == "the shell froze at once");
        assert_eq!(
            b.attr(&format!("#refund-{id}"), "value")?.as_deref(),
            Some(held.to_string().as_str())
        );
        b.screenshot("web-operator-dispute")?;
        b.click(&format!("{dispute} button.refund"))?;
        assert!(b.text("#notice")?.contains("decided"), "{}", b.source()?);
        assert!(b.try_find(&dispute)?.is_none());
        assert_eq!(b.text("#audit")?, "balanced");

        // The client has it back, and its page says so.
        let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
        assert_eq!(account["balance_sat"], before + held, "{account}");
        logout(&b)?;
        b.log_in(&base, &client)?;
        assert!(
            b.text(&format!("{row} td.hold"))?
                .contains("refunded after the dispute")
        );
        Ok(())
    });
}
