//! The dashboard on the web port: its assets are served with the right types and headers and
//! load nothing from elsewhere; and, when Debian's chromium is installed, a real headless
//! browser loads the page, which connects through the bridge and lists the devices that
//! publish telemetry.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The dashboard's files and their content types.
const ASSETS: [(&str, &str); 5] = [
    ("/", "text/html; charset=utf-8"),
    ("/index.html", "text/html; charset=utf-8"),
    ("/assets/style.css", "text/css; charset=utf-8"),
    ("/assets/app.js", "text/javascript; charset=utf-8"),
    ("/assets/vigil-bridge.js", "text/javascript; charset=utf-8"),
];

/// Splits a response into (status line, lower-cased headers, body).
fn split(resp: &str) -> (String, Vec<(String, String)>, String) {
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Lines of `text` that mention an absolute http(s) URL outside comments (`//`, `/* */`,
/// `<!-- -->`, and the ` * ` lines of doc comments).
fn external_urls(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_block = false;
    let mut in_html_comment = false;
    for line in text.lines() {
        let t = line.trim_start();
        let starts_block = t.starts_with("/*");
        let starts_html = t.starts_with("<!--");
        let comment = in_block
            || in_html_comment
            || starts_block
            || starts_html
            || t.starts_with("//")
            || t.starts_with("* ");
        if (starts_block || in_block) && !line.contains("*/") {
            in_block = true;
        } else if line.contains("*/") {
            in_block = false;
        }
        if (starts_html || in_html_comment) && !line.contains("-->") {
            in_html_comment = true;
        } else if line.contains("-->") {
            in_html_comment = false;
        }
        let lower = line.to_ascii_lowercase();
        if !comment && (lower.contains("http://") || lower.contains("https://")) {
            found.push(line.to_string());
        }
    }
    found
}

#[test]
fn url_scan_ignores_comments_only() {
    let text = "// see https://example.com\n/* multi\n http://a.b\n*/\n<!--\n https://c.d\n-->\n * doc https://e.f\nconst x = \"https://cdn.example/x.js\";\n<script src=\"http://cdn\"></script>\n";
    assert_eq!(
        external_urls(text),
        vec![
            "const x = \"https://cdn.example/x.js\";".to_string(),
            "<script src=\"http://cdn\"></script>".to_string()
        ]
    );
}

#[test]
fn serves_the_dashboard_assets() {
    let v = Vigil::start();
    for (path, content_type) in ASSETS {
        let resp = http_get(v.http, path);
        let (status, headers, body) = split(&resp);
        assert!(status.contains(" 200 "), "GET {path}: {status}");
        assert_eq!(
            header(&headers, "content-type"),
            Some(content_type),
            "{path}"
        );
        assert_eq!(
            header(&headers, "content-security-policy"),
            Some(CSP),
            "{path}"
        );
        assert_eq!(
            header(&headers, "cache-control"),
            Some("no-store"),
            "{path}"
        );
        assert_eq!(
            header(&headers, "content-length"),
            Some(body.len().to_string().as_str()),
            "{path}"
        );
        assert!(!body.is_empty(), "{path}: empty body");
        let urls = external_urls(&body);
        assert!(urls.is_empty(), "{path} refers to external URLs: {urls:?}");
        let lower = body.to_ascii_lowercase();
        for bad in ["src=\"//", "href=\"//", "@import"] {
            assert!(!lower.contains(bad), "{path} contains {bad}");
        }
        if path.ends_with(".css") {
            assert!(!lower.contains("url("), "{path} loads a url()");
        }
    }
    // The page loads its own assets, and the module the page imports is the bridge client.
    let (_, _, html) = split(&http_get(v.http, "/"));
    assert!(html.contains("src=\"assets/app.js\""), "{html}");
    assert!(html.contains("href=\"assets/style.css\""), "{html}");
    let (_, _, app) = split(&http_get(v.http, "/assets/app.js"));
    assert!(app.contains("from \"./vigil-bridge.js\""));
    let (_, _, module) = split(&http_get(v.http, "/assets/vigil-bridge.js"));
    assert_eq!(
        module,
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser/vigil-bridge.js")
        )
        .unwrap(),
        "the served module is examples/browser/vigil-bridge.js"
    );
    // Anything else under /assets is not found; the other endpoints are unchanged and carry
    // no dashboard policy.
    for path in [
        "/assets/",
        "/assets/nope.js",
        "/assets/../Cargo.toml",
        "/dashboard",
    ] {
        let (status, headers, _) = split(&http_get(v.http, path));
        assert!(status.contains(" 404 "), "GET {path}: {status}");
        assert_eq!(header(&headers, "content-security-policy"), None);
    }
    let (status, headers, body) = split(&http_get(v.http, "/healthz"));
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, "{\"status\":\"ok\"}\n");
    assert_eq!(header(&headers, "content-security-policy"), None);
    // A query string does not change the page.
    let (status, _, body) = split(&http_get(v.http, "/?url=ws://127.0.0.1:1/ws"));
    assert!(status.contains(" 200 ") && body == html, "{status}");
}

/// Publishes telemetry for press-1 and press-2 every 200 ms until `stop`.
fn telemetry_publisher(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            for (dev, temp) in [("press-1", 60.0 + (n % 10) as f64), ("press-2", 41.5)] {
                let topic = format!("device/{dev}/telemetry");
                let msg =
                    format!("{{\"device_id\":\"{dev}\",\"temperature\":{temp},\"pressure\":{n}}}");
                publish(port, &["-t", &topic, "-m", &msg, "-q", "1"]);
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        n
    })
}

/// A headless chromium with a DevTools port, killed (by its pid) on drop.
struct Chromium {
    child: std::process::Child,
    devtools: SocketAddr,
}

impl Chromium {
    /// Starts chromium headless on `url`, with its DevTools endpoint on a free port.
    fn start(url: &str, profile: &Path) -> Chromium {
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromium");
        // Chromium writes its DevTools port to DevToolsActivePort in the profile.
        let file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u16>().ok()))
            {
                break port;
            }
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not open its DevTools port");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        Chromium {
            child,
            devtools: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The DevTools WebSocket URL of the page showing `url`.
    fn page_ws(&self, url: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(self.devtools).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        use std::io::Write;
        // Chromium builds webSocketDebuggerUrl from the Host header: give it the port.
        let req = format!(
            "GET /json/list HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.devtools
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let (_, body) = resp.split_once("\r\n\r\n")?;
        let targets: serde_json::Value = serde_json::from_str(body).ok()?;
        targets.as_array()?.iter().find_map(|t| {
            (t["type"] == "page" && t["url"].as_str() == Some(url))
                .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
                .flatten()
        })
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Evaluates `expression` in the page every 250 ms (over the DevTools protocol) until
/// `done(value)` or `limit`; returns the last value.
async fn poll_page(
    ws_url: &str,
    expression: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("DevTools WebSocket");
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = serde_json::Value::Null;
    for id in 1.. {
        let cmd = serde_json::json!({"id": id, "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true}});
        ws.send(Message::text(cmd.to_string())).await.expect("send");
        // Skip events; wait for the answer to this id.
        let answer = tokio::time::timeout_at(deadline, async {
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(text) = msg {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    if v["id"] == id {
                        return Some(v);
                    }
                }
            }
            None
        })
        .await;
        match answer {
            Ok(Some(v)) => last = v["result"]["result"]["value"].clone(),
            _ => return last,
        }
        if done(&last) || tokio::time::Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    last
}

#[test]
fn a_real_browser_lists_publishing_devices() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!(
            "SKIPPED the real-browser check: {CHROMIUM} is not installed (apt-get install chromium); only the HTTP checks ran"
        );
        return;
    }
    let v = Vigil::start();
    let url = format!("http://{}/", v.http);
    let profile = TempDir::new();
    let browser = Chromium::start(&url, &profile.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let ws_url = loop {
        if let Some(u) = browser.page_ws(&url) {
            break u;
        }
        assert!(
            Instant::now() < deadline,
            "no DevTools page target for {url}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = telemetry_publisher(v.port(), stop.clone());
    let expression = "JSON.stringify({state: document.body.dataset.state || '', \
        devices: [...document.querySelectorAll('#fleet-body tr')].map(r => r.dataset.device), \
        text: document.body.innerText})";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let value = rt.block_on(poll_page(
        &ws_url,
        expression,
        Duration::from_secs(20),
        |v| {
            let text = v.as_str().unwrap_or_default();
            text.contains("\"connected\"") && text.contains("press-1") && text.contains("press-2")
        },
    ));
    stop.store(true, Ordering::Relaxed);
    let rounds = publisher.join().expect("publisher");
    drop(browser);
    let page: serde_json::Value =
        serde_json::from_str(value.as_str().unwrap_or("{}")).unwrap_or_default();
    let text = page["text"].as_str().unwrap_or_default();
    assert_eq!(
        page["state"],
        "connected",
        "the page did not connect to the bridge; page: {page}\nvigil log:\n{}",
        v.log()
    );
    let mut devices: Vec<&str> = page["devices"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d.as_str()).collect())
        .unwrap_or_default();
    devices.sort();
    assert_eq!(devices, ["press-1", "press-2"], "page text:\n{text}");
    assert!(
        text.contains("2 devices"),
        "device count; page text:\n{text}"
    );
    assert!(
        text.contains("temperature"),
        "latest values; page text:\n{text}"
    );
    eprintln!(
        "real-browser check ran: {CHROMIUM} listed press-1 and press-2 after {rounds} rounds of telemetry"
    );
}
