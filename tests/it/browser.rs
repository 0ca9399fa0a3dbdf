//! A real browser for the console tests: Debian's headless Chromium, driven through its
//! WebDriver server (`chromedriver`, package chromium-driver) with `fantoccini`.
//!
//! Each [`Browser`] starts its own chromedriver on a free loopback port, in a process
//! group of its own, with a fresh profile directory; dropping it kills that group
//! (chromedriver and the Chromium it started), so a failing test leaves no browser
//! behind. `scripts/browser.sh` installs both programs; without them every browser test
//! fails saying so (none is skipped).
//!
//! Chromium is kept off the network: every host but loopback resolves to nothing and
//! goes to a proxy that is not there, and its background services are off.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::redelivery::scratch;

/// How long a wait for the page may last before the test fails.
pub const PAGE_LIMIT: Duration = Duration::from_secs(120);
/// The viewport of every test (and of the README's screenshots).
const WINDOW_SIZE: &str = "--window-size=1280,800";

/// `name` on `PATH`, else in Debian's own places for it.
fn program(name: &str, debian: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .chain(debian.iter().map(PathBuf::from))
        .find(|candidate| candidate.is_file())
}

/// A chromedriver child process (and its process group) killed when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl ChromeDriver {
    /// Starts chromedriver on a free loopback port and waits until it is ready; tries
    /// another port when the one picked was taken meanwhile.
    async fn start(profile: &Path) -> Self {
        let binary = program(
            "chromedriver",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
        )
        .unwrap_or_else(|| {
            panic!(
                "chromedriver is not installed: run `bash scripts/browser.sh` (it installs \
                 Debian's chromium and chromium-driver); scripts/test.sh runs it first"
            )
        });
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = profile.join("chromedriver.log");
            let child = Command::new(&binary)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own group: Chromium joins it, and Drop kills them all.
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
            let mut driver = Self {
                child,
                url: format!("http://127.0.0.1:{port}"),
                log,
            };
            match driver.wait_ready().await {
                Ok(()) => return driver,
                Err(e) => last_error = e,
            }
        }
        panic!("chromedriver did not become ready: {last_error}");
    }

    /// Polls `GET /status` until it says ready (at most 30 s).
    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = crate::helpers::http_client(Duration::from_secs(5));
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "chromedriver exited with {status}: {}",
                    self.log_tail()
                ));
            }
            if let Ok(response) = http.get(format!("{}/status", self.url)).send().await {
                if let Ok(status) = response.json::<Value>().await {
                    if status["value"]["ready"] == true {
                        return Ok(());
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!("not ready within 30 s: {}", self.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process it started.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A headless Chromium session.
pub struct Browser {
    client: Client,
    // Field order is drop order: the session's driver goes before its profile dir.
    _driver: ChromeDriver,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium (1280x800, a fresh profile).
    pub async fn start() -> Self {
        let profile = scratch("chromium-profile");
        let driver = ChromeDriver::start(&profile).await;
        let args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            WINDOW_SIZE.to_owned(),
            format!("--user-data-dir={}", profile.display()),
            // Loopback only: no host resolves, and what would go out meets a dead proxy.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1".to_owned(),
            "--proxy-server=http://127.0.0.1:9".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-default-apps".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-domain-reliability".to_owned(),
            "--disable-client-side-phishing-detection".to_owned(),
            "--metrics-recording-only".to_owned(),
        ];
        let mut options = json!({ "args": args });
        if let Some(chromium) = program("chromium", &["/usr/bin/chromium"]) {
            options["binary"] = json!(chromium);
        }
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": options,
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object")
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no Chromium session from chromedriver ({e}); is Debian's chromium \
                     installed (`bash scripts/browser.sh`)?\n{}",
                    driver.log_tail()
                )
            });
        let browser = Self {
            client,
            _driver: driver,
            profile,
        };
        browser.fit_viewport().await;
        browser
    }

    /// Sizes the window so that the page itself (the viewport) is 1280x800: headless
    /// Chromium counts some window frame into `--window-size`.
    async fn fit_viewport(&self) {
        let (width, height) = (1280_i64, 800_i64);
        let inner = self
            .eval("return [window.innerWidth, window.innerHeight];", vec![])
            .await;
        let (inner_w, inner_h) = (
            inner[0].as_i64().expect("innerWidth"),
            inner[1].as_i64().expect("innerHeight"),
        );
        let (outer_w, outer_h) = self
            .client
            .get_window_size()
            .await
            .expect("the window size");
        let fit = |outer: u64, inner: i64, want: i64| {
            u32::try_from(i64::try_from(outer).expect("a window size") + want - inner)
                .expect("a window size")
        };
        self.client
            .set_window_size(fit(outer_w, inner_w, width), fit(outer_h, inner_h, height))
            .await
            .expect("resize the window");
    }

    /// Ends the session (Chromium quits), then the driver; removes the profile.
    pub async fn close(self) {
        let Self {
            client,
            _driver: driver,
            profile,
        } = self;
        let _ = client.close().await;
        drop(driver);
        let _ = std::fs::remove_dir_all(&profile);
    }

    /// Loads the page again (as the browser's reload button does).
    pub async fn reload(&self) {
        self.client.refresh().await.expect("reload the page");
    }

    pub async fn open(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page.
    pub async fn eval(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("run {script:?} in the page: {e}"))
    }

    /// The `textContent` of the first element matching `css`, `None` when there is none.
    pub async fn text(&self, css: &str) -> Option<String> {
        let value = self
            .eval(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                vec![json!(css)],
            )
            .await;
        value.as_str().map(str::to_owned)
    }

    /// How many elements match `css`.
    pub async fn count(&self, css: &str) -> usize {
        let value = self
            .eval(
                "return document.querySelectorAll(arguments[0]).length;",
                vec![json!(css)],
            )
            .await;
        usize::try_from(value.as_u64().expect("a count")).expect("a small count")
    }

    /// True when an element matches `css` and is rendered (not hidden, not in a hidden
    /// section).
    pub async fn visible(&self, css: &str) -> bool {
        self.eval(
            "const e = document.querySelector(arguments[0]); \
             return Boolean(e && e.checkVisibility());",
            vec![json!(css)],
        )
        .await
            == true
    }

    /// The element matching `css`; panics when there is none.
    pub async fn find(&self, css: &str) -> Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"))
    }

    /// Clicks the element matching `css` as a user does (WebDriver's element click).
    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Replaces the value of the input matching `css` by typing `text`.
    pub async fn fill(&self, css: &str, text: &str) {
        let input = self.find(css).await;
        input
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        if !text.is_empty() {
            input
                .send_keys(text)
                .await
                .unwrap_or_else(|e| panic!("type into {css}: {e}"));
        }
    }

    /// Whether the element matching `css` is enabled (a disabled button is not).
    pub async fn enabled(&self, css: &str) -> bool {
        self.find(css)
            .await
            .is_enabled()
            .await
            .unwrap_or_else(|e| panic!("is {css} enabled: {e}"))
    }

    /// The attribute `name` of the element matching `css`.
    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.find(css)
            .await
            .attr(name)
            .await
            .unwrap_or_else(|e| panic!("attribute {name} of {css}: {e}"))
    }

    pub async fn title(&self) -> String {
        self.client.title().await.expect("the page title")
    }

    /// Asks `check` every 100 ms until it gives a value (at most [`PAGE_LIMIT`]); on
    /// time-out, fails naming `what` and showing what the page said.
    pub async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if start.elapsed() > PAGE_LIMIT {
                let page = self.eval("return document.body.innerText;", vec![]).await;
                panic!(
                    "timed out after {PAGE_LIMIT:?} waiting for {what}; the page shows:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element matching `css` is rendered.
    pub async fn until_visible(&self, css: &str) {
        self.until(&format!("{css} to be visible"), || async {
            self.visible(css).await.then_some(())
        })
        .await;
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    pub async fn until_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        self.until(&format!("{css} to show {what}"), || async {
            self.text(css).await.filter(|t| ok(t.trim()))
        })
        .await
    }

    /// True when `JOBGATE_SCREENSHOTS_DIR` is set (`scripts/screenshots.sh`).
    pub fn screenshots_wanted() -> bool {
        std::env::var_os("JOBGATE_SCREENSHOTS_DIR").is_some()
    }

    /// Saves a PNG of the viewport as `name` in `JOBGATE_SCREENSHOTS_DIR`, when set.
    pub async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("JOBGATE_SCREENSHOTS_DIR") else {
            return;
        };
        let png = self.client.screenshot().await.expect("a screenshot");
        let path = Path::new(&dir).join(name);
        std::fs::create_dir_all(&dir).expect("create the screenshots dir");
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}
