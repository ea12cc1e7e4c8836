//! A real browser for the web-page tests: Debian's headless `chromium`, driven
//! through `chromedriver` by a minimal W3C WebDriver client (HTTP/1.1 with JSON
//! bodies over a plain `TcpStream`). Screenshots go to the scene directory and,
//! when `JUSY_SCREENSHOTS` names a directory, are copied there for review.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::process::Proc;
use crate::scene::Scene;

/// How long chromedriver and page loads may take.
const READY: Duration = Duration::from_secs(30);
/// The W3C key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Whether `chromium` and `chromedriver` are installed.
pub fn available() -> bool {
    ["chromium", "chromedriver"].iter().all(|p| {
        Command::new("which")
            .arg(p)
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// One browser session.
#[derive(Debug)]
pub struct Browser {
    driver: SocketAddr,
    session: String,
    shots: PathBuf,
    /// Keeps chromedriver running; stopped when the browser is dropped.
    _proc: Proc,
}

/// A free TCP port on loopback: bound, read back and released, because
/// chromedriver cannot be told to pick one itself.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn unchunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size_text = std::str::from_utf8(&body[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(body.len() >= size + 2, "short chunk");
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// One HTTP request to chromedriver: status and JSON body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut stream = TcpStream::connect_timeout(&addr, READY)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let payload = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )?;
    // chromedriver keeps the connection open whatever the request says, so
    // the body is read by its length (or its chunks), not to the end.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(n > 0, "connection closed before the end of headers");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = head.contains("transfer-encoding: chunked");
    let mut body = raw[split + 4..].to_vec();
    loop {
        let done = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.windows(5).any(|w| w == b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    if chunked {
        body = unchunk(&body)?;
    }
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&body)))?
    };
    Ok((status, value))
}

impl Browser {
    /// Starts chromedriver on a free port, waits until its `/status` says
    /// ready, and opens a headless chromium with a fresh profile.
    pub fn start(scene: &Scene, name: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut cmd = Command::new("chromedriver");
        cmd.arg(format!("--port={port}"));
        let proc = Proc::start(scene, name, cmd)?;
        let driver = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + READY;
        loop {
            if let Ok((200, v)) = http(driver, "GET", "/status", None)
                && v["value"]["ready"] == true
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "chromedriver never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = scene.subdir(&format!("{name}-profile"))?;
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,900",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let mut options = json!({ "args": args });
        if Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
        }}});
        let (status, v) = http(driver, "POST", "/session", Some(&caps))?;
        anyhow::ensure!(status == 200, "new session failed: {v}");
        let session = v["value"]["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_owned();
        scene.note(&format!(
            "browser session {session} via chromedriver on {port}"
        ));
        Ok(Self {
            driver,
            session,
            shots: scene.dir().to_owned(),
            _proc: proc,
        })
    }

    /// A WebDriver command on this session; its `value`.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let full = format!("/session/{}{path}", self.session);
        let (status, v) = http(self.driver, method, &full, body.as_ref())?;
        if status != 200 {
            bail!(
                "WebDriver {method} {path} answered {status}: {}",
                v["value"]
            );
        }
        Ok(v["value"].clone())
    }

    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))?;
        Ok(())
    }

    pub fn url(&self) -> anyhow::Result<String> {
        Ok(self
            .cmd("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub fn refresh(&self) -> anyhow::Result<()> {
        self.cmd("POST", "/refresh", Some(json!({})))?;
        Ok(())
    }

    /// The HTML of the page shown.
    pub fn source(&self) -> anyhow::Result<String> {
        Ok(self
            .cmd("GET", "/source", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The element matching a CSS selector, if there is one.
    pub fn try_find(&self, css: &str) -> anyhow::Result<Option<String>> {
        let (status, v) = http(
            self.driver,
            "POST",
            &format!("/session/{}/element", self.session),
            Some(&json!({"using": "css selector", "value": css})),
        )?;
        match status {
            200 => Ok(v["value"][ELEMENT].as_str().map(str::to_owned)),
            404 if v["value"]["error"] == "no such element" => Ok(None),
            _ => bail!("finding {css}: {status} {}", v["value"]),
        }
    }

    pub fn find(&self, css: &str) -> anyhow::Result<String> {
        self.try_find(css)?
            .with_context(|| format!("no element {css} on {}", self.url().unwrap_or_default()))
    }

    /// The rendered text of the element matching `css`.
    pub fn text(&self, css: &str) -> anyhow::Result<String> {
        let el = self.find(css)?;
        Ok(self
            .cmd("GET", &format!("/element/{el}/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub fn attr(&self, css: &str, name: &str) -> anyhow::Result<Option<String>> {
        let el = self.find(css)?;
        Ok(self
            .cmd("GET", &format!("/element/{el}/attribute/{name}"), None)?
            .as_str()
            .map(str::to_owned))
    }

    /// Clears a form field and types `text` into it.
    pub fn fill(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let el = self.find(css)?;
        self.cmd("POST", &format!("/element/{el}/clear"), Some(json!({})))?;
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )?;
        Ok(())
    }

    /// Clicks a link or button that loads a page, and waits until that page
    /// replaced this one (the clicked element is gone) and has loaded.
    pub fn click(&self, css: &str) -> anyhow::Result<()> {
        let el = self.find(css)?;
        self.cmd("POST", &format!("/element/{el}/click"), Some(json!({})))?;
        let deadline = Instant::now() + READY;
        loop {
            let (status, v) = http(
                self.driver,
                "GET",
                &format!("/session/{}/element/{el}/name", self.session),
                None,
            )?;
            if status == 404 && v["value"]["error"] == "stale element reference" {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "clicking {css} loaded no page");
            std::thread::sleep(Duration::from_millis(20));
        }
        while self.execute("return document.readyState")? != "complete" {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the page after {css} never loaded"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Logs in on the broker at `base` with a hash or the operator token, as
    /// a user types it into the log-in page.
    pub fn log_in(&self, base: &str, secret: &str) -> anyhow::Result<()> {
        self.goto(&format!("{base}/login"))?;
        self.fill("#secret", secret)?;
        self.click("#login-button")
    }

    /// Runs a script in the page (to forge a request the page would not send).
    pub fn execute(&self, script: &str) -> anyhow::Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// The value of a cookie of the page shown.
    pub fn cookie(&self, name: &str) -> anyhow::Result<Value> {
        self.cmd("GET", &format!("/cookie/{name}"), None)
    }

    /// Resizes the window (e.g. to a phone's width).
    pub fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )?;
        Ok(())
    }

    /// Reloads the page until the element matching `css` has text satisfying
    /// `pred`, and returns that text.
    pub fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.try_find(css)?.is_some() {
                let text = self.text(css)?;
                if pred(&text) {
                    return Ok(text);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{css} never showed what was expected; page:\n{}",
                    self.source()?
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            self.refresh()?;
        }
    }

    /// Saves a PNG of the whole page as `<name>.png` in the scene directory
    /// (and in `JUSY_SCREENSHOTS`, if set). WebDriver shoots only the window,
    /// so the window is stretched to the page's height for the shot.
    pub fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let rect = self.cmd("GET", "/window/rect", None)?;
        let (width, height) = (
            rect["width"].as_u64().unwrap_or(1100),
            rect["height"].as_u64().unwrap_or(900),
        );
        let page = self
            .execute("return document.documentElement.scrollHeight")?
            .as_u64()
            .unwrap_or(height);
        let full = json!({"width": width, "height": (page + 100).clamp(height, 5000)});
        self.cmd("POST", "/window/rect", Some(full))?;
        let data = self.cmd("GET", "/screenshot", None);
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )?;
        let data = data?;
        let png = base64_decode(data.as_str().context("screenshot is not a string")?)?;
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, &png)?;
        if let Some(dir) = std::env::var_os("JUSY_SCREENSHOTS") {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(Path::new(&dir).join(format!("{name}.png")), &png)?;
        }
        Ok(path)
    }
}

/// Standard base64 (as WebDriver sends screenshots), without a crate for it.
fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {c}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            self.driver,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}
