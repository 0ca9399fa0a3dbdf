//! The console's page and assets, embedded in the binary (no CDN, nothing fetched at
//! run time; the files are `producer/ui/`, plain HTML, CSS and JavaScript without a
//! build step).
//!
//! Every answer carries a Content-Security-Policy that allows only this origin's own
//! script and style files (no inline script or style, no `eval`, no other origin, no
//! framing), so that a job body that slipped through as markup still could not run.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The policy of every console answer.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub(crate) const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// `body` as `content_type`, with the console's security headers.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 6] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        // A new binary brings new assets: never mix an old page with a new API.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (StatusCode::OK, headers, body).into_response()
}

/// `GET /ui` and `GET /ui/`.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "console",
    summary = "The web console",
    description = "The console's page (also at `/ui/`; its script and style at `/ui/app.js` and `/ui/app.css`). Open without a key: the page asks for one and keeps it in the browser's session storage only. Served with a Content-Security-Policy that allows only this origin's own script and style files.",
    responses((status = 200, description = "The page.", content_type = "text/html")),
    security(()),
)]
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/app.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
