//! `GET /openapi.json`: the OpenAPI 3.1 document of the HTTP API, generated from the
//! handlers' `#[utoipa::path]` annotations and the response types' `ToSchema`.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::Problem;
use crate::routes::batch::{BatchAnswer, ItemAnswer};
use crate::routes::jobs::Accepted;
use jobgate_shared::status::{JobStatus, State as JobState};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "jobgate producer",
        description = "HTTP ingress of jobgate: a job is answered 202 only after the message broker confirmed it. Errors are `application/problem+json` (RFC 9457) with `type` `urn:jobgate:problem:<slug>`. The `bearer` scheme applies only when API keys are configured (`JOBGATE_API_KEYS`, `JOBGATE_API_KEYS_FILE`); the probes and this document stay open."
    ),
    paths(
        crate::routes::jobs::post_to_default_queue,
        crate::routes::jobs::post_to_queue,
        crate::routes::batch::post_batch,
        crate::routes::status::get_status,
        crate::routes::status::cancel_job,
        crate::console::me,
        crate::console::queues,
        crate::console::list_dead,
        crate::console::replay_dead,
        crate::console::purge_dead,
        crate::console::assets::index,
        crate::routes::health::healthz,
        crate::routes::health::readyz,
        crate::metrics::metrics,
        openapi_json,
    ),
    components(schemas(
        Accepted,
        BatchAnswer,
        ItemAnswer,
        JobStatus,
        JobState,
        Problem,
        crate::auth::Role,
        crate::console::Me,
        crate::console::overview::QueuesOverview,
        crate::console::overview::QueueOverview,
        crate::console::DeadLetters,
        crate::console::ReplayRequest,
        crate::console::Replayed,
        crate::console::Purged,
        jobgate_shared::dlq::DeadJobView,
    )),
    modifiers(&BearerScheme),
    tags(
        (name = "jobs", description = "Accept jobs, read their status, cancel them"),
        (name = "console", description = "The web console (`/ui`) and the API it calls: queues, dead letters, who the caller is"),
        (name = "probes", description = "Liveness, readiness and metrics; open even with API keys"),
        (name = "meta", description = "This document"),
    ),
)]
pub struct ApiDoc;

/// Adds the `bearer` security scheme (API keys).
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some(
            "An API key as `Authorization: Bearer <key>`; needed only when keys are configured."
                .to_owned(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

/// The document as JSON.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_owned())
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    summary = "This OpenAPI 3.1 document",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document, generated from the code.", body = serde_json::Value),
    ),
)]
pub async fn openapi_json() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let body = DOC.get_or_init(document).clone();
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    //! Random requests against the router: never a 500 or a panic; documented operations
    //! answer only documented statuses and content types; every error is a problem.

    use std::num::NonZeroU32;
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode};
    use axum::Router;
    use http_body_util::BodyExt;
    use jobgate_shared::broker::memory::MemoryBroker;
    use jobgate_shared::broker::PublishError;
    use proptest::prelude::*;
    use serde_json::Value;
    use tower::ServiceExt;

    use crate::auth::{ApiKeys, Security};
    use crate::rate_limit::RateLimit;
    use crate::startup::app;
    use crate::state::AppState;

    const KEY: &str = "test-key-1";

    fn doc() -> Value {
        serde_json::from_str(&super::document()).unwrap()
    }

    /// The operation of the document for this method and (raw) path, if any. Like the
    /// router, a template with more literal segments wins (`/jobs/{queue}/batch` over
    /// `/jobs/{queue}/{job_id}`), whatever its methods.
    fn operation<'a>(doc: &'a Value, method: &Method, path: &str) -> Option<&'a Value> {
        let segments: Vec<&str> = path.split('/').collect();
        doc["paths"]
            .as_object()?
            .iter()
            .filter_map(|(template, item)| {
                let parts: Vec<&str> = template.split('/').collect();
                let matches = parts.len() == segments.len()
                    && parts.iter().zip(&segments).all(|(t, s)| {
                        if t.starts_with('{') {
                            !s.is_empty()
                        } else {
                            t == s
                        }
                    });
                let literals = parts.iter().filter(|t| !t.starts_with('{')).count();
                matches.then_some((literals, item))
            })
            .max_by_key(|(literals, _)| *literals)
            .and_then(|(_, item)| item.get(method.as_str().to_ascii_lowercase()))
    }

    /// How the router under test is set up.
    #[derive(Debug, Clone, Copy)]
    enum Setup {
        Open,
        Keys,
        KeysAndRateLimit,
        RateLimitOnly,
        Draining,
        BrokerFailing,
        BrokerDown,
    }

    fn router(setup: Setup) -> Router {
        let broker = MemoryBroker::new();
        let mut state = AppState::new(
            Arc::new(broker.clone()),
            vec!["emails".into(), "reports".into()],
            64,
        )
        .with_batch_limits(3, 256)
        .with_callback_allow(Some(
            jobgate_shared::callback::CallbackAllow::parse("hooks.example.com").unwrap(),
        ));
        let keys = || Some(ApiKeys::new([KEY, "other-key"]));
        let rate = || {
            Some(RateLimit::new(
                NonZeroU32::new(1).unwrap(),
                NonZeroU32::new(1).unwrap(),
            ))
        };
        match setup {
            Setup::Open => {}
            Setup::Keys => state = state.with_security(Arc::new(Security::new(keys(), None))),
            Setup::KeysAndRateLimit => {
                state = state.with_security(Arc::new(Security::new(keys(), rate())));
            }
            Setup::RateLimitOnly => {
                state = state.with_security(Arc::new(Security::new(None, rate())));
            }
            Setup::Draining => state.draining.cancel(),
            Setup::BrokerFailing => broker.fail_next_publish(PublishError::Unavailable),
            Setup::BrokerDown => broker.set_ready(false),
        }
        app(state)
    }

    fn setup() -> impl Strategy<Value = Setup> {
        prop_oneof![
            Just(Setup::Open),
            Just(Setup::Keys),
            Just(Setup::KeysAndRateLimit),
            Just(Setup::RateLimitOnly),
            Just(Setup::Draining),
            Just(Setup::BrokerFailing),
            Just(Setup::BrokerDown),
        ]
    }

    fn method() -> impl Strategy<Value = Method> {
        prop_oneof![
            1 => Just(Method::GET),
            4 => Just(Method::POST),
            1 => Just(Method::PUT),
            1 => Just(Method::DELETE),
            1 => Just(Method::PATCH),
        ]
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => Just("emails".to_owned()),
            3 => Just("reports".to_owned()),
            1 => Just("other".to_owned()),
            1 => Just(String::new()),
            1 => Just("%FF".to_owned()),
            1 => Just("%E2%82".to_owned()),
            1 => Just("a%20b".to_owned()),
            1 => Just("%2F".to_owned()),
            1 => Just("..".to_owned()),
            1 => Just("x".repeat(5000)),
            1 => "[a-zA-Z0-9._~%!$&'()*+,;=:@-]{0,24}",
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => Just("/jobs".to_owned()),
            1 => Just("/jobs/".to_owned()),
            1 => Just("/healthz".to_owned()),
            1 => Just("/readyz".to_owned()),
            1 => Just("/openapi.json".to_owned()),
            1 => Just("/metrics".to_owned()),
            1 => Just("/".to_owned()),
            4 => segment().prop_map(|q| format!("/jobs/{q}")),
            4 => segment().prop_map(|q| format!("/jobs/{q}/batch")),
            1 => segment().prop_map(|q| format!("/jobs/{q}/batch/")),
            1 => (segment(), segment()).prop_map(|(q, r)| format!("/jobs/{q}/{r}")),
            1 => (segment(), "[?&=a-z0-9%]{0,16}").prop_map(|(q, query)| format!("/jobs/{q}?{query}")),
            1 => "/[ -~]{0,40}",
            1 => "[ -~]{0,20}",
        ]
    }

    fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
        let content_type = prop_oneof![
            Just(b"application/x-ndjson".to_vec()),
            Just(b"application/json".to_vec()),
            Just(b"Application/JSON; charset=utf-8".to_vec()),
            Just(b"application/x-ndjson;q=1".to_vec()),
            Just(b"text/plain".to_vec()),
            Just(b"application/octet-stream".to_vec()),
            Just(b"multipart/form-data; boundary=x".to_vec()),
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ];
        let junk = || {
            prop_oneof![
                "[ -~]{0,40}".prop_map(String::into_bytes),
                Just("k".repeat(300).into_bytes()),
                proptest::collection::vec(any::<u8>(), 0..40),
            ]
        };
        prop_oneof![
            3 => content_type.prop_map(|v| ("content-type".to_owned(), v)),
            1 => junk().prop_map(|v| ("idempotency-key".to_owned(), v)),
            1 => Just(("idempotency-key".to_owned(), b"fixed-key".to_vec())),
            1 => ("[a-zA-Z0-9-]{0,70}", junk()).prop_map(|(n, v)| (format!("x-job-{n}"), v)),
            1 => Just(("x-job-tenant".to_owned(), b"acme".to_vec())),
            3 => Just(("authorization".to_owned(), format!("Bearer {KEY}").into_bytes())),
            1 => junk().prop_map(|v| ("authorization".to_owned(), v)),
            1 => junk().prop_map(|v| ("traceparent".to_owned(), v)),
            1 => junk().prop_map(|v| ("jobgate-callback".to_owned(), v)),
            1 => Just(("jobgate-callback".to_owned(), b"https://hooks.example.com/cb".to_vec())),
            1 => ("[a-z-]{1,12}", junk()),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        let item = prop_oneof![
            Just("{\"n\":1}".to_owned()),
            Just("[1,2]".to_owned()),
            Just("\"text\"".to_owned()),
            Just("{not json".to_owned()),
            Just(String::new()),
            Just(format!("\"{}\"", "y".repeat(100))),
            "[ -~]{0,16}",
        ];
        prop_oneof![
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 0..128),
            Just(vec![b'z'; 300]),
            proptest::collection::vec(item.clone(), 0..6)
                .prop_map(|lines| lines.join("\n").into_bytes()),
            proptest::collection::vec(item.clone(), 0..6).prop_map(|lines| format!(
                "{}\r\n",
                lines.join("\r\n")
            )
            .into_bytes()),
            proptest::collection::vec(item, 0..6).prop_map(|items| format!(
                "[{}]",
                items.join(",")
            )
            .into_bytes()),
        ]
    }

    fn request(
        method: &Method,
        path: &str,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) -> Option<Request<Body>> {
        let mut builder = Request::builder().method(method.clone()).uri(path);
        // A header `http` cannot carry (a control byte, say) is left out.
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                builder = builder.header(name, value);
            }
        }
        builder.body(Body::from(body.to_vec())).ok()
    }

    /// Checks one answer against the properties; `Err` says what is wrong.
    async fn check(
        doc: &Value,
        method: &Method,
        path: &str,
        response: axum::response::Response,
    ) -> Result<(), String> {
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("<not ASCII>").to_owned());
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        // 501: the status routes without a status store (documented for them only).
        if status.is_server_error()
            && status != StatusCode::SERVICE_UNAVAILABLE
            && status != StatusCode::NOT_IMPLEMENTED
        {
            return Err(format!("status {status}"));
        }
        let essence = content_type
            .as_deref()
            .map(|c| c.split(';').next().unwrap_or_default().trim().to_owned());
        let raw_path = path.split('?').next().unwrap_or_default();
        let documented = operation(doc, method, raw_path)
            .map(|op| &op["responses"][status.as_str()])
            .map(|r| {
                if r.is_null() {
                    Err(format!("status {status} is not documented"))
                } else {
                    Ok(r)
                }
            })
            .transpose()?;
        match documented {
            // The content type must be one the document lists for this status.
            Some(answer) => {
                if let Some(content) = answer["content"].as_object() {
                    let ct = essence.clone().unwrap_or_default();
                    if !content.contains_key(&ct) {
                        return Err(format!(
                            "status {status}: content type {ct:?} is not documented ({:?})",
                            content.keys().collect::<Vec<_>>()
                        ));
                    }
                }
            }
            // Off the document, every error is a problem.
            None if status.as_u16() >= 400
                && essence.as_deref() != Some("application/problem+json") =>
            {
                return Err(format!(
                    "status {status} with content type {content_type:?}"
                ));
            }
            None => {}
        }
        if status.as_u16() >= 400 && essence.as_deref() == Some("application/problem+json") {
            let problem: Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("status {status}: problem is not JSON: {e}"))?;
            if problem["status"] != status.as_u16() {
                return Err(format!("status {status} but problem {problem}"));
            }
            let kind = problem["type"].as_str().unwrap_or_default();
            if !kind.starts_with("urn:jobgate:problem:")
                || !problem["title"].is_string()
                || !problem["detail"].is_string()
            {
                return Err(format!("not a problem: {problem}"));
            }
        } else if essence.as_deref() == Some("application/json") {
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| format!("status {status}: body is not JSON: {e}"))?;
        }
        Ok(())
    }

    #[test]
    fn document_is_openapi_3_1_with_every_route() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, method) in [
            ("/jobs", "post"),
            ("/jobs/{queue}", "post"),
            ("/jobs/{queue}/batch", "post"),
            ("/jobs/{queue}/{job_id}", "get"),
            ("/jobs/{queue}/{job_id}", "delete"),
            ("/healthz", "get"),
            ("/readyz", "get"),
            ("/metrics", "get"),
            ("/openapi.json", "get"),
        ] {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let single = &doc["paths"]["/jobs/{queue}"]["post"];
        assert!(single["requestBody"]["content"]["*/*"].is_object());
        let not_found = &single["responses"]["404"];
        assert!(not_found["content"]["application/problem+json"].is_object());
    }

    #[tokio::test]
    async fn openapi_json_is_served_without_a_key() {
        let response = router(Setup::Keys)
            .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let served: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(served, doc());
    }

    #[tokio::test]
    async fn wrong_method_is_405_problem() {
        let response = router(Setup::Open)
            .oneshot(Request::delete("/jobs/emails").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(response.headers()["allow"], "POST");
    }

    #[tokio::test]
    async fn queue_that_is_not_utf8_is_404_problem() {
        for path in ["/jobs/%FF", "/jobs/%FF/batch"] {
            let response = router(Setup::Open)
                .oneshot(
                    Request::post(path)
                        .header("content-type", "application/json")
                        .body(Body::from("[1]"))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json",
                "{path}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn random_requests_answer_as_documented(
            setup in setup(),
            method in method(),
            path in path(),
            headers in proptest::collection::vec(header(), 0..6),
            body in body(),
            times in 1..=2usize,
        ) {
            let doc = doc();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let app = router(setup);
            for _ in 0..times {
                let Some(request) = request(&method, &path, &headers, &body) else {
                    return Ok(());
                };
                let outcome = runtime.block_on(async {
                    let response = app.clone().oneshot(request).await.unwrap();
                    check(&doc, &method, &path, response).await
                });
                prop_assert!(outcome.is_ok(), "{method} {path:?} ({setup:?}): {}", outcome.unwrap_err());
            }
        }
    }
}
