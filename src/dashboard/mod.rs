//! The live dashboard served on the web port: `GET /` and `GET /assets/...`.
//!
//! Every asset is embedded in the binary (no files to deploy, no external requests): the page,
//! its stylesheet and script, and the bridge client module, which is
//! `examples/browser/vigil-bridge.js` itself (the source of truth), served as
//! `/assets/vigil-bridge.js`. The page talks to vigil only through the JSON bridge at `/ws`.

const INDEX_HTML: &str = include_str!("assets/index.html");
const STYLE_CSS: &str = include_str!("assets/style.css");
const APP_JS: &str = include_str!("assets/app.js");
const BRIDGE_JS: &str = include_str!("../../examples/browser/vigil-bridge.js");

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// The Content-Security-Policy sent with the dashboard: its own assets only, plus WebSockets.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' ws: wss:";

/// The dashboard asset at `path` (the request path without its query): its content type and
/// body, or `None` when `path` is not one of the dashboard's.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some((HTML, INDEX_HTML)),
        "/assets/style.css" => Some((CSS, STYLE_CSS)),
        "/assets/app.js" => Some((JS, APP_JS)),
        "/assets/vigil-bridge.js" => Some((JS, BRIDGE_JS)),
        _ => None,
    }
}

/// Every path [`asset`] serves (for tests).
pub const PATHS: [&str; 5] = [
    "/",
    "/index.html",
    "/assets/style.css",
    "/assets/app.js",
    "/assets/vigil-bridge.js",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_every_path_with_its_type() {
        for p in PATHS {
            let (ct, body) = asset(p).unwrap_or_else(|| panic!("{p} not served"));
            assert!(!body.is_empty(), "{p} is empty");
            let want = if p.ends_with(".js") {
                JS
            } else if p.ends_with(".css") {
                CSS
            } else {
                HTML
            };
            assert_eq!(ct, want, "{p}");
        }
        assert!(asset("/assets/").is_none());
        assert!(asset("/assets/../Cargo.toml").is_none());
        assert!(asset("/nope").is_none());
    }

    #[test]
    fn page_references_only_embedded_assets() {
        for src in ["assets/style.css", "assets/app.js"] {
            assert!(INDEX_HTML.contains(src), "index.html does not load {src}");
        }
        assert!(APP_JS.contains("./vigil-bridge.js"));
    }
}
