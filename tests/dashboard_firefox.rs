//! The dashboard in Firefox: when Debian's firefox-esr is installed, a real headless Firefox,
//! driven directly over WebDriver BiDi (its own WebSocket endpoint, no geckodriver), loads the
//! page from a running vigil. The page connects through the bridge and lists the devices that
//! publish telemetry; a real mouse click on a device row draws its chart; a command typed into
//! the form with real key presses reaches mosquitto_sub; and the page reports no JavaScript
//! error (`log.entryAdded` events, and `error`/`unhandledrejection` caught in the page). The test
//! leaves screenshots in `<target dir>/dashboard-screenshots/firefox_*.png`.
//!
//! Firefox runs with a fresh profile whose `user.js` turns off first-run pages, telemetry,
//! updates and every background service that would reach for the network, in its own process
//! group, killed as a whole on drop.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const FIREFOX: &str = "/usr/bin/firefox-esr";
const VIEWPORT: (u32, u32) = (1280, 900);

/// Preferences of the test profile: no first-run or welcome pages, no telemetry, no updates,
/// and no background service that reaches for the network (the test machine has none, and a
/// DNS lookup that times out must not slow anything down). Firefox's remote agent applies
/// similar "recommended preferences" itself, but only once it has started; these hold from the
/// first moment. `services.settings.server` is honoured only with MOZ_REMOTE_SETTINGS_DEVTOOLS=1
/// in the environment (release builds ignore it otherwise).
const USER_JS: &str = r#"
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("browser.startup.page", 0);
user_pref("browser.startup.homepage", "about:blank");
user_pref("startup.homepage_welcome_url", "about:blank");
user_pref("startup.homepage_welcome_url.additional", "");
user_pref("browser.aboutwelcome.enabled", false);
user_pref("trailhead.firstrun.didSeeAboutWelcome", true);
user_pref("termsofuse.bypassNotification", true);
user_pref("browser.newtabpage.enabled", false);
user_pref("browser.newtab.preload", false);
user_pref("browser.sessionstore.resume_from_crash", false);
user_pref("browser.tabs.warnOnClose", false);
user_pref("browser.warnOnQuit", false);
user_pref("toolkit.startup.max_resumed_crashes", -1);
user_pref("browser.uitour.enabled", false);
user_pref("browser.pagethumbnails.capturing_disabled", true);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("datareporting.policy.dataSubmissionPolicyBypassNotification", true);
user_pref("datareporting.healthreport.uploadEnabled", false);
user_pref("datareporting.usage.uploadEnabled", false);
user_pref("toolkit.telemetry.enabled", false);
user_pref("toolkit.telemetry.unified", false);
user_pref("toolkit.telemetry.archive.enabled", false);
user_pref("toolkit.telemetry.server", "data:,");
user_pref("toolkit.telemetry.shutdownPingSender.enabled", false);
user_pref("toolkit.telemetry.firstShutdownPing.enabled", false);
user_pref("toolkit.telemetry.newProfilePing.enabled", false);
user_pref("toolkit.telemetry.updatePing.enabled", false);
user_pref("toolkit.telemetry.bhrPing.enabled", false);
user_pref("browser.ping-centre.telemetry", false);
user_pref("browser.newtabpage.activity-stream.feeds.telemetry", false);
user_pref("browser.newtabpage.activity-stream.telemetry", false);
user_pref("app.shield.optoutstudies.enabled", false);
user_pref("app.normandy.enabled", false);
user_pref("app.normandy.api_url", "");
user_pref("messaging-system.rsexperimentloader.enabled", false);
user_pref("browser.crashReports.unsubmittedCheck.autoSubmit2", false);
user_pref("browser.tabs.crashReporting.sendReport", false);
user_pref("app.update.disabledForTesting", true);
user_pref("app.update.auto", false);
user_pref("app.update.checkInstallTime", false);
user_pref("extensions.update.enabled", false);
user_pref("extensions.update.autoUpdateDefault", false);
user_pref("extensions.getAddons.cache.enabled", false);
user_pref("extensions.getAddons.discovery.api_url", "data:,");
user_pref("extensions.systemAddon.update.enabled", false);
user_pref("extensions.blocklist.enabled", false);
user_pref("extensions.pocket.enabled", false);
user_pref("media.gmp-manager.updateEnabled", false);
user_pref("media.gmp-manager.url", "data:,");
user_pref("browser.search.update", false);
user_pref("browser.search.geoip.url", "");
user_pref("browser.region.network.url", "");
user_pref("browser.region.update.enabled", false);
user_pref("services.settings.server", "data:,#remote-settings-dummy/v1");
user_pref("services.settings.loglevel", "off");
user_pref("security.remote_settings.crlite_filters.enabled", false);
user_pref("security.remote_settings.intermediates.enabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("network.trr.mode", 5);
user_pref("network.proxy.type", 0);
user_pref("network.dns.disablePrefetch", true);
user_pref("network.prefetch-next", false);
user_pref("network.http.speculative-parallel-limit", 0);
user_pref("network.predictor.enabled", false);
user_pref("network.sntp.pools", "");
user_pref("dom.push.connection.enabled", false);
user_pref("browser.safebrowsing.malware.enabled", false);
user_pref("browser.safebrowsing.phishing.enabled", false);
user_pref("browser.safebrowsing.downloads.enabled", false);
user_pref("browser.safebrowsing.downloads.remote.enabled", false);
user_pref("browser.safebrowsing.blockedURIs.enabled", false);
user_pref("browser.safebrowsing.update.enabled", false);
user_pref("browser.safebrowsing.provider.mozilla.updateURL", "");
user_pref("browser.safebrowsing.provider.mozilla.gethashURL", "");
user_pref("browser.safebrowsing.provider.google4.updateURL", "");
user_pref("browser.safebrowsing.provider.google4.gethashURL", "");
user_pref("browser.safebrowsing.provider.google.updateURL", "");
user_pref("browser.safebrowsing.provider.google.gethashURL", "");
user_pref("privacy.trackingprotection.enabled", false);
user_pref("browser.topsites.contile.enabled", false);
user_pref("browser.discovery.enabled", false);
user_pref("browser.urlbar.quicksuggest.enabled", false);
user_pref("browser.urlbar.merino.endpointURL", "");
user_pref("identity.fxaccounts.enabled", false);
user_pref("geo.provider.network.url", "");
user_pref("security.OCSP.enabled", 0);
user_pref("security.certerrors.mitm.priming.enabled", false);
user_pref("signon.rememberSignons", false);
user_pref("extensions.formautofill.addresses.enabled", false);
user_pref("browser.translations.enable", false);
user_pref("browser.ml.enable", false);
user_pref("browser.backup.enabled", false);
user_pref("browser.backup.scheduled.enabled", false);
user_pref("dom.ipc.reportProcessHangs", false);
"#;

/// Collects what the page's own scripts throw or leave unhandled, from before they run (a
/// BiDi preload script, run in the page's realm).
const ERROR_TRAP: &str = r#"() => {
    const errors = [];
    Object.defineProperty(window, "__vigilTestErrors", { value: errors });
    window.addEventListener("error", (e) =>
        errors.push(`error: ${e.message} at ${e.filename}:${e.lineno}:${e.colno}`));
    window.addEventListener("unhandledrejection", (e) =>
        errors.push(`unhandled rejection: ${e.reason?.stack ?? e.reason}`));
}"#;

/// Where the screenshots go: `dashboard-screenshots/` in cargo's target directory, as in
/// tests/dashboard.rs.
fn screenshot_path(name: &str) -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .unwrap_or(tmp)
        .join("dashboard-screenshots")
        .join(format!("{name}.png"))
}

/// Publishes telemetry for press-1 and press-2 every 200 ms until dropped.
struct Telemetry {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Telemetry {
    fn start(port: u16) -> Telemetry {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u32;
            while !flag.load(Ordering::Relaxed) {
                for (dev, temp) in [("press-1", 60.0 + f64::from(n % 10)), ("press-2", 41.5)] {
                    let topic = format!("device/{dev}/telemetry");
                    let msg = format!("{{\"temperature\":{temp},\"pressure\":{n}}}");
                    // Whatever fails here shows as a missing device in the page.
                    let _ = try_publish(port, &["-t", &topic, "-m", &msg, "-q", "1"]);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Telemetry {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs Firefox (`"$0" "$@"`) in the background and kills the whole process group when it
/// exits, or when its standard input, a pipe from the test, reaches end of file: the test
/// process is gone, even killed or interrupted (Ctrl-C goes to the terminal's process group,
/// which Firefox is not in) before its destructors could run.
const WATCHDOG: &str = r#"exec 3<&0 </dev/null
"$0" "$@" 3<&- &
firefox=$!
(read -r line <&3; kill -KILL 0) &
wait "$firefox"
kill -KILL 0"#;

/// A headless Firefox in its own process group, killed (the whole group) on drop.
struct Firefox {
    child: Child,
    /// What Firefox wrote to stderr, shown when the test fails.
    stderr: Arc<Mutex<String>>,
    /// The WebDriver BiDi endpoint, `ws://127.0.0.1:PORT/session`.
    bidi_url: String,
}

impl Firefox {
    /// Starts Firefox on about:blank with a fresh profile in `dir` and its WebDriver BiDi
    /// endpoint on a free port.
    fn start(dir: &Path) -> Firefox {
        let profile = dir.join("profile");
        let home = dir.join("home");
        std::fs::create_dir_all(&profile).expect("profile directory");
        std::fs::create_dir_all(&home).expect("home directory");
        std::fs::write(profile.join("user.js"), USER_JS).expect("user.js");
        let mut child = Command::new("sh")
            .args(["-c", WATCHDOG, FIREFOX])
            .args([
                "--headless",
                "--no-remote",
                "--remote-debugging-port=0",
                "--profile",
            ])
            .arg(&profile)
            .arg("about:blank")
            // Firefox also writes under $HOME (~/.mozilla, ~/.cache, ~/Downloads): keep it in
            // the test's directory.
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("XDG_DATA_HOME")
            .env_remove("XDG_STATE_HOME")
            .env("MOZ_HEADLESS", "1")
            .env("MOZ_CRASHREPORTER_DISABLE", "1")
            .env("MOZ_REMOTE_SETTINGS_DEVTOOLS", "1")
            // The watchdog's pipe: it reaches end of file when this process is gone.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // A process group of its own (the watchdog, Firefox and its content processes),
            // killed as a whole.
            .process_group(0)
            .spawn()
            .expect("spawn firefox-esr (through sh)");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut log) = log.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
                let _ = tx.send(line);
            }
        });
        let mut firefox = Firefox {
            child,
            stderr,
            bidi_url: String::new(),
        };
        // The remote agent says where it listens on stderr ("WebDriver BiDi listening on
        // ws://127.0.0.1:PORT") and in WebDriverBiDiServer.json in the profile.
        let deadline = Instant::now() + Duration::from_secs(45);
        let server_json = profile.join("WebDriverBiDiServer.json");
        let base = loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                if let Some(url) = line.split("WebDriver BiDi listening on ").nth(1) {
                    break url.trim().trim_end_matches('/').to_string();
                }
            }
            let from_file = std::fs::read_to_string(&server_json)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| Some((v["ws_host"].as_str()?.to_string(), v["ws_port"].as_u64()?)));
            if let Some((host, port)) = from_file {
                break format!("ws://{host}:{port}");
            }
            let exited = matches!(firefox.child.try_wait(), Ok(Some(_)));
            assert!(
                !exited && Instant::now() < deadline,
                "firefox-esr did not open its WebDriver BiDi port (exited: {exited}); stderr:\n{}",
                firefox.stderr()
            );
        };
        firefox.bidi_url = format!("{base}/session");
        firefox
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Firefox {
    fn drop(&mut self) {
        // The whole group: the watchdog, Firefox and its content processes.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- firefox-esr stderr ---\n{}--- end ---", self.stderr());
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A blocking WebDriver BiDi client (its own runtime drives the WebSocket) of one browsing
/// context. Events that arrive while it waits for an answer are kept in `events`.
struct Bidi {
    rt: tokio::runtime::Runtime,
    ws: Socket,
    next_id: u64,
    context: String,
    events: Vec<Value>,
}

impl Bidi {
    /// Connects to `url`, starts a session, subscribes to `log.entryAdded`, and takes the
    /// top-level browsing context (the one tab).
    fn connect(url: &str) -> Bidi {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (ws, _) = rt
            .block_on(tokio_tungstenite::connect_async(url))
            .unwrap_or_else(|e| panic!("WebDriver BiDi WebSocket {url}: {e}"));
        let mut bidi = Bidi {
            rt,
            ws,
            next_id: 0,
            context: String::new(),
            events: Vec::new(),
        };
        let session = bidi.must("session.new", json!({"capabilities": {}}));
        eprintln!(
            "WebDriver BiDi session with {} {}",
            session["capabilities"]["browserName"]
                .as_str()
                .unwrap_or("?"),
            session["capabilities"]["browserVersion"]
                .as_str()
                .unwrap_or("?")
        );
        bidi.must("session.subscribe", json!({"events": ["log.entryAdded"]}));
        let tree = bidi.must("browsingContext.getTree", json!({"maxDepth": 0}));
        bidi.context = tree["contexts"][0]["context"]
            .as_str()
            .unwrap_or_else(|| panic!("no browsing context: {tree}"))
            .to_string();
        bidi
    }

    /// Sends `method` and waits (at most `limit`) for its answer, keeping the events that
    /// arrive meanwhile: the `result`, or the error as text.
    fn call(&mut self, method: &str, params: Value, limit: Duration) -> Result<Value, String> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        self.next_id += 1;
        let id = self.next_id;
        let Bidi { rt, ws, events, .. } = self;
        rt.block_on(async {
            let cmd = json!({"id": id, "method": method, "params": params});
            ws.send(Message::text(cmd.to_string()))
                .await
                .map_err(|e| format!("{method}: send: {e}"))?;
            let answer = tokio::time::timeout(limit, async {
                while let Some(Ok(msg)) = ws.next().await {
                    let Message::Text(text) = msg else { continue };
                    let v: Value = serde_json::from_str(&text).unwrap_or_default();
                    if v["type"] == "event" {
                        events.push(v);
                    } else if v["id"] == id {
                        return Some(v);
                    }
                }
                None
            })
            .await
            .map_err(|_| format!("{method}: no answer within {limit:?}"))?
            .ok_or_else(|| format!("{method}: the BiDi connection closed"))?;
            if answer["type"] != "success" {
                return Err(format!(
                    "{method}: {} {}",
                    answer["error"], answer["message"]
                ));
            }
            Ok(answer["result"].clone())
        })
    }

    fn must(&mut self, method: &str, params: Value) -> Value {
        self.call(method, params, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Evaluates `expression` in the page, awaiting a promise; its value as JSON (primitives,
    /// arrays and plain objects), or the exception's text as the error.
    fn try_eval(&mut self, expression: &str) -> Result<Value, String> {
        let params = json!({"expression": expression, "target": {"context": self.context},
            "awaitPromise": true, "resultOwnership": "none"});
        let result = self.call("script.evaluate", params, Duration::from_secs(20))?;
        if result["type"] == "exception" {
            return Err(result["exceptionDetails"]["text"]
                .as_str()
                .unwrap_or("exception")
                .to_string());
        }
        Ok(remote_value(&result["result"]))
    }

    fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .unwrap_or_else(|e| panic!("page evaluation failed: {e}\nexpression: {expression}"))
    }

    /// Evaluates `expression` every 250 ms until `done(value)` or `limit`; the last value.
    fn poll(&mut self, expression: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        common::poll(
            limit,
            || self.try_eval(expression).unwrap_or_default(),
            done,
        )
    }

    /// The BiDi shared id of the element `selector` matches, scrolled into view.
    fn element(&mut self, selector: &str) -> String {
        let expression = format!(
            "(() => {{ const el = document.querySelector({selector:?}); \
                el?.scrollIntoView({{block: 'center'}}); return el; }})()"
        );
        let params = json!({"expression": expression, "target": {"context": self.context},
            "awaitPromise": false, "resultOwnership": "none"});
        let result = self
            .call("script.evaluate", params, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{selector}: {e}"));
        result["result"]["sharedId"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {selector}: {result}"))
            .to_string()
    }

    /// Clicks the middle of the element `selector` with the (virtual) mouse.
    fn click(&mut self, selector: &str) {
        let id = self.element(selector);
        let actions = json!([{"type": "pointer", "id": "mouse",
            "parameters": {"pointerType": "mouse"},
            "actions": [
                {"type": "pointerMove", "x": 0, "y": 0,
                    "origin": {"type": "element", "element": {"sharedId": id}}},
                {"type": "pointerDown", "button": 0},
                {"type": "pointerUp", "button": 0}]}]);
        self.must(
            "input.performActions",
            json!({"context": self.context, "actions": actions}),
        );
    }

    /// Clicks into the field `selector`, selects all its text (Ctrl+A) and types `text`
    /// over it, one key press per character.
    fn type_into(&mut self, selector: &str, text: &str) {
        const CONTROL: &str = "\u{E009}";
        // The page re-lays itself out as data arrives: click again if the first click did not
        // give the field the focus.
        let focused = format!("document.activeElement === document.querySelector({selector:?})");
        for _ in 0..3 {
            self.click(selector);
            if self.try_eval(&focused) == Ok(Value::Bool(true)) {
                break;
            }
        }
        let mut keys = vec![
            json!({"type": "keyDown", "value": CONTROL}),
            json!({"type": "keyDown", "value": "a"}),
            json!({"type": "keyUp", "value": "a"}),
            json!({"type": "keyUp", "value": CONTROL}),
        ];
        for c in text.chars() {
            keys.push(json!({"type": "keyDown", "value": c.to_string()}));
            keys.push(json!({"type": "keyUp", "value": c.to_string()}));
        }
        let actions = json!([{"type": "key", "id": "keyboard", "actions": keys}]);
        self.must(
            "input.performActions",
            json!({"context": self.context, "actions": actions}),
        );
    }

    /// Saves a PNG of the viewport as `dashboard-screenshots/<name>.png`; returns its path.
    fn screenshot(&mut self, name: &str) -> PathBuf {
        use base64::Engine;
        let shot = self.must(
            "browsingContext.captureScreenshot",
            json!({"context": self.context, "format": {"type": "image/png"}}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .expect("base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = screenshot_path(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(&path, &png).expect("write screenshot");
        eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());
        path
    }

    /// The `log.entryAdded` entries received so far (after a round trip, so that everything
    /// the page logged before now has arrived).
    fn log_entries(&mut self) -> Vec<Value> {
        self.must("session.status", json!({}));
        self.events
            .iter()
            .filter(|e| e["method"] == "log.entryAdded")
            .map(|e| e["params"].clone())
            .collect()
    }
}

/// A BiDi remote value as plain JSON: primitives, arrays and objects with string keys;
/// anything else (nodes, functions, ...) as the remote value itself.
fn remote_value(v: &Value) -> Value {
    match v["type"].as_str() {
        Some("undefined" | "null") => Value::Null,
        Some("string" | "boolean" | "number") => v["value"].clone(),
        Some("array") => Value::Array(
            v["value"]
                .as_array()
                .map(|a| a.iter().map(remote_value).collect())
                .unwrap_or_default(),
        ),
        Some("object") => Value::Object(
            v["value"]
                .as_array()
                .map(|pairs| {
                    pairs
                        .iter()
                        .filter_map(|p| Some((p[0].as_str()?.to_string(), remote_value(&p[1]))))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        _ => v.clone(),
    }
}

/// One log entry as a line of text.
fn describe(entry: &Value) -> String {
    let mut s = format!(
        "[{} {}] {}",
        entry["type"].as_str().unwrap_or("?"),
        entry["level"].as_str().unwrap_or("?"),
        entry["text"].as_str().unwrap_or_default()
    );
    if let Some(frame) = entry["stackTrace"]["callFrames"].get(0) {
        s.push_str(&format!(
            " at {}:{}:{}",
            frame["url"].as_str().unwrap_or_default(),
            frame["lineNumber"],
            frame["columnNumber"]
        ));
    }
    s
}

/// The state of the fleet table, as JSON.
const FLEET: &str = "({state: document.body.dataset.state || '', \
    devices: [...document.querySelectorAll('#fleet-body tr[data-device]')].map(r => r.dataset.device), \
    count: document.getElementById('fleet-count').textContent, \
    text: document.getElementById('fleet').innerText})";

/// The selected device's charts: how many points each shows, and how much it has drawn (all
/// pixels, and those of the data line's blue, #2563eb).
const CHARTS: &str = "({device: document.getElementById('device-id').textContent, \
    hidden: document.getElementById('device').hidden, \
    charts: [...document.querySelectorAll('#charts canvas')].map((c) => { \
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
        let ink = 0, blue = 0; \
        for (let i = 0; i < d.length; i += 4) { \
            if (d[i + 3] > 0) ink++; \
            if (d[i + 3] > 160 && d[i] < 110 && d[i + 1] < 150 && d[i + 2] > 180) blue++; \
        } \
        return {metric: c.parentElement.querySelector('h3')?.textContent ?? '', \
            points: Number(c.dataset.points ?? 0), width: c.width, height: c.height, \
            cssWidth: c.clientWidth, ink, blue}; })})";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[test]
fn the_dashboard_works_in_firefox() {
    if !Path::new(FIREFOX).exists() {
        eprintln!(
            "SKIPPED the Firefox dashboard check: firefox-esr is not installed \
             (apt-get install firefox-esr)"
        );
        return;
    }
    let started = Instant::now();
    let v = Vigil::start();
    let url = format!("http://{}/", v.http);
    let mut sub = Sub::start(v.port(), &["-t", "device/press-2/commands", "-q", "1"]);
    let dir = TempDir::new();
    // Dropped in reverse order: the BiDi client, Firefox (killed), the telemetry, the profile.
    let _telemetry = Telemetry::start(v.port());
    let firefox = Firefox::start(&dir.0);
    let mut page = Bidi::connect(&firefox.bidi_url);
    page.must(
        "browsingContext.setViewport",
        json!({"context": page.context,
            "viewport": {"width": VIEWPORT.0, "height": VIEWPORT.1}, "devicePixelRatio": 1}),
    );
    page.must(
        "script.addPreloadScript",
        json!({"functionDeclaration": ERROR_TRAP, "contexts": [page.context]}),
    );
    page.must(
        "browsingContext.navigate",
        json!({"context": page.context, "url": url, "wait": "complete"}),
    );

    // 1. The page connects through the bridge and lists both publishing devices.
    let fleet = page.poll(FLEET, Duration::from_secs(20), |f| {
        f["state"] == "connected"
            && f["count"] == "2 devices"
            && f["text"]
                .as_str()
                .is_some_and(|t| t.contains("temperature"))
    });
    assert_eq!(
        fleet["state"],
        "connected",
        "the page did not connect to the bridge: {fleet}\nvigil log:\n{}",
        v.log()
    );
    let mut devices: Vec<&str> = fleet["devices"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    devices.sort();
    assert_eq!(devices, ["press-1", "press-2"], "fleet rows: {fleet}");
    assert_eq!(fleet["count"], "2 devices", "{fleet}");
    let text = fleet["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("temperature") && text.contains("pressure"),
        "latest values: {text}"
    );

    // 2. A mouse click on press-1's row opens its charts, which draw its readings.
    page.click("#fleet-body tr[data-device=\"press-1\"]");
    let charts = page.poll(CHARTS, Duration::from_secs(15), |c| {
        c["charts"].as_array().is_some_and(|a| {
            a.iter().any(|c| {
                c["metric"] == "temperature"
                    && c["points"].as_u64().unwrap_or(0) >= 2
                    && c["blue"].as_u64().unwrap_or(0) > 0
            })
        })
    });
    page.screenshot("firefox_fleet_and_chart");
    assert_eq!(charts["device"], "press-1", "{charts}");
    assert_eq!(charts["hidden"], false, "{charts}");
    let list = charts["charts"].as_array().cloned().unwrap_or_default();
    // One chart per metric; their order depends on whether the stored history (keys sorted)
    // or the live readings came first.
    let mut metrics: Vec<&str> = list.iter().filter_map(|c| c["metric"].as_str()).collect();
    metrics.sort();
    assert_eq!(metrics, ["pressure", "temperature"], "{charts}");
    for c in &list {
        assert!(
            c["points"].as_u64().unwrap_or(0) >= 2
                && c["blue"].as_u64().unwrap_or(0) > 0
                && c["width"].as_u64().unwrap_or(0) >= 300
                && c["width"] == c["cssWidth"],
            "a chart that shows its readings, drawn at its size: {c}"
        );
    }

    // 3. A command typed into the form (press-1 was filled in by the row click) reaches
    // mosquitto_sub.
    let before = now_ms();
    page.type_into("#command-device", "press-2");
    page.type_into("#command-payload", r#"{"cmd":"stop"}"#);
    let typed = page.eval(
        "({device: document.getElementById('command-device').value, \
            payload: document.getElementById('command-payload').value})",
    );
    page.click("#command-form button[type=\"submit\"]");
    let result = page.poll(
        "({cls: document.getElementById('command-result').className, \
            text: document.getElementById('command-result').textContent})",
        Duration::from_secs(10),
        |r| r["cls"] == "ok" || r["cls"] == "error",
    );
    let got = sub.expect_messages(1, Duration::from_secs(10));
    let after = now_ms();
    page.screenshot("firefox_command");
    assert_eq!(
        typed,
        json!({"device": "press-2", "payload": "{\"cmd\":\"stop\"}"}),
        "what the key presses typed"
    );
    let text = result["text"].as_str().unwrap_or_default();
    assert!(
        result["cls"] == "ok"
            && text.starts_with("puback for device/press-2/commands in ")
            && text.ends_with(" ms"),
        "the page shows no puback: {result}"
    );
    assert_eq!(got.len(), 1, "mosquitto_sub received {got:?}");
    let payload = got[0]
        .strip_prefix("device/press-2/commands|1|0|")
        .unwrap_or_else(|| panic!("not a QoS 1, non-retained command: {}", got[0]));
    let sent: Value = serde_json::from_str(payload).expect("a JSON payload");
    let stamp = sent["timestamp"].as_u64().unwrap_or_default();
    assert!(
        (before..=after).contains(&stamp),
        "timestamp {stamp} not within the test ({before}..={after}): {payload}"
    );
    assert_eq!(
        payload,
        format!("{{\"cmd\":\"stop\",\"timestamp\":{stamp}}}"),
        "the payload's bytes"
    );

    // 4. No JavaScript error: neither logged (log.entryAdded) nor thrown in the page.
    let trapped = page.eval("window.__vigilTestErrors ?? ['the error trap did not run']");
    let entries = page.log_entries();
    for e in &entries {
        eprintln!("page log: {}", describe(e));
    }
    let errors: Vec<String> = entries
        .iter()
        .filter(|e| e["level"] == "error")
        .map(describe)
        .collect();
    assert!(errors.is_empty(), "JavaScript errors logged: {errors:#?}");
    assert_eq!(trapped, json!([]), "errors thrown in the page");
    // Both collectors work: an error thrown on purpose now is seen by each.
    page.eval("setTimeout(() => { throw new Error('vigil-test-probe'); }), true");
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut logged, mut caught) = (false, false);
    while !(logged && caught) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        logged = page.log_entries().iter().any(|e| {
            e["level"] == "error"
                && e["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("vigil-test-probe"))
        });
        caught = page
            .eval("JSON.stringify(window.__vigilTestErrors ?? [])")
            .as_str()
            .is_some_and(|t| t.contains("vigil-test-probe"));
    }
    assert!(
        logged && caught,
        "an error thrown on purpose was not seen (log.entryAdded: {logged}, page trap: {caught})"
    );
    eprintln!(
        "Firefox check ran in {:.1} s: {text}; mosquitto_sub got {payload}",
        started.elapsed().as_secs_f64()
    );
    drop(page);
    drop(firefox);
}
