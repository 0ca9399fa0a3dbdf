//! Job metadata from request headers: `X-Job-*` headers and the W3C trace context
//! (`traceparent`, `tracestate`) travel with the job as message headers
//! (`JobMeta::headers`, names lower-cased, e.g. `x-job-tenant`). The ONE extraction,
//! used by single jobs and batches alike.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use jobgate_shared::job::MAX_SHORT_STRING_BYTES;

use crate::error::ApiError;

/// Most `X-Job-*` headers in one request.
pub const MAX_JOB_HEADERS: usize = 16;
/// Longest `X-Job-*` header name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest `X-Job-*` header value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024;

const PREFIX: &str = "x-job-";
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Metadata headers that cannot travel with the job: 400 `bad-metadata` (through
/// [`ApiError::BadMetadata`], written by `problem_response`). The text names the
/// offending header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadMetadata(pub String);

impl IntoResponse for BadMetadata {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

fn visible_ascii(value: &[u8]) -> bool {
    value.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
}

/// Loose W3C check: `00-<32 hex>-<16 hex>-<2 hex>` (55 characters).
pub fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    value.len() == 55
        && parts.len() == 4
        && parts[0] == "00"
        && [(parts[1], 32), (parts[2], 16), (parts[3], 2)]
            .iter()
            .all(|(p, n)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The job's content type: the request's `Content-Type`, at most
/// [`MAX_SHORT_STRING_BYTES`] bytes (what an AMQP property holds; Kafka jobs are held to
/// it too, so a job means the same on both backends). A value that is not visible
/// ASCII is left out, as the job's content type is optional.
pub fn content_type(headers: &HeaderMap) -> Result<Option<String>, BadMetadata> {
    let Some(value) = headers.get(axum::http::header::CONTENT_TYPE) else {
        return Ok(None);
    };
    if value.len() > MAX_SHORT_STRING_BYTES {
        return Err(BadMetadata(format!(
            "Content-Type is {} bytes long; at most {MAX_SHORT_STRING_BYTES} are allowed.",
            value.len()
        )));
    }
    Ok(value.to_str().ok().map(str::to_owned))
}

/// The message headers a request's metadata becomes. An invalid `traceparent` is
/// dropped (with `tracestate`, which means nothing without it), not an error.
pub fn extract(headers: &HeaderMap) -> Result<BTreeMap<String, String>, BadMetadata> {
    let mut out = BTreeMap::new();
    let mut count = 0;
    for (name, value) in headers {
        // `HeaderName`s are lower-case already.
        let name = name.as_str();
        if !name.starts_with(PREFIX) {
            continue;
        }
        count += 1;
        if count > MAX_JOB_HEADERS {
            return Err(BadMetadata(format!(
                "At most {MAX_JOB_HEADERS} X-Job-* headers are allowed; {name} is one too many."
            )));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(BadMetadata(format!(
                "Header {name} has a name longer than {MAX_NAME_BYTES} bytes."
            )));
        }
        let bytes = value.as_bytes();
        if bytes.len() > MAX_VALUE_BYTES {
            return Err(BadMetadata(format!(
                "Header {name} has a value longer than {MAX_VALUE_BYTES} bytes."
            )));
        }
        if !visible_ascii(bytes) {
            return Err(BadMetadata(format!(
                "Header {name} has characters other than visible ASCII."
            )));
        }
        if out.contains_key(name) {
            return Err(BadMetadata(format!("Header {name} is repeated.")));
        }
        out.insert(name.to_owned(), String::from_utf8_lossy(bytes).into_owned());
    }
    let traceparent = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match traceparent {
        Some(tp) if valid_traceparent(tp) => {
            out.insert(TRACEPARENT.to_owned(), tp.to_ascii_lowercase());
            let state = headers
                .get(TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= MAX_VALUE_BYTES);
            if let Some(state) = state {
                out.insert(TRACESTATE.to_owned(), state.to_owned());
            }
        }
        Some(tp) => tracing::debug!(traceparent = tp, "invalid traceparent ignored"),
        None if headers.contains_key(TRACEPARENT) => {
            tracing::debug!("traceparent that is not text ignored");
        }
        None => {}
    }
    // The request id (set by `request_id::assign`) lets a job's logs be found from the
    // client's answer.
    if let Some(id) = headers
        .get(&crate::request_id::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        out.insert(
            crate::request_id::X_REQUEST_ID.as_str().to_owned(),
            id.to_owned(),
        );
    }
    // With trace export on, the job continues the request's span, not the client's.
    jobgate_shared::telemetry::inject_current(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn job_headers_and_trace_context_are_taken_lower_cased() {
        let h = map(&[
            ("X-Job-Tenant", "acme"),
            ("x-job-region", "eu west"),
            ("content-type", "text/plain"),
            ("traceparent", TP),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let got = extract(&h).unwrap();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got["x-job-tenant"], "acme");
        assert_eq!(got["x-job-region"], "eu west");
        assert_eq!(got["traceparent"], TP);
        assert_eq!(got["tracestate"], "congo=t61rcWkgMzE");
    }

    #[test]
    fn an_invalid_traceparent_is_ignored() {
        for bad in [
            "01-abc",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "",
        ] {
            let h = map(&[("traceparent", bad), ("tracestate", "a=b")]);
            assert!(extract(&h).unwrap().is_empty(), "{bad}");
        }
        assert!(valid_traceparent(TP));
    }

    #[test]
    fn too_many_too_long_or_odd_headers_are_refused_naming_the_header() {
        let names: Vec<String> = (0..17).map(|i| format!("x-job-h{i:02}")).collect();
        let mut h = HeaderMap::new();
        for name in &names[..16] {
            h.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert_eq!(extract(&h).unwrap().len(), 16);
        h.insert(
            axum::http::HeaderName::from_bytes(names[16].as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
        assert!(extract(&h).unwrap_err().0.contains("too many"));

        let long_name = format!("x-job-{}", "n".repeat(59));
        let err = extract(&map(&[(&long_name, "v")])).unwrap_err().0;
        assert!(err.contains(&long_name), "{err}");
        assert!(extract(&map(&[(&long_name[..64], "v")])).is_ok());

        let long_value = "v".repeat(1025);
        let err = extract(&map(&[("x-job-big", &long_value)])).unwrap_err().0;
        assert!(err.contains("x-job-big"), "{err}");
        assert!(extract(&map(&[("x-job-big", &long_value[..1024])])).is_ok());

        let mut h = HeaderMap::new();
        h.insert(
            "x-job-bin",
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert!(extract(&h).unwrap_err().0.contains("x-job-bin"));
        assert!(extract(&map(&[("x-job-tab", "a\tb")])).is_err());
        let err = extract(&map(&[("x-job-a", "1"), ("x-job-a", "2")]))
            .unwrap_err()
            .0;
        assert!(err.contains("repeated"), "{err}");
    }

    #[tokio::test]
    async fn single_and_batch_jobs_carry_the_metadata_and_bad_metadata_is_400() {
        use std::sync::Arc;

        use axum::body::Body;
        use axum::http::Request;
        use http_body_util::BodyExt;
        use jobgate_shared::broker::memory::MemoryBroker;
        use tower::ServiceExt;

        use crate::startup::app;
        use crate::state::AppState;

        let broker = MemoryBroker::new();
        let router = app(AppState::new(
            Arc::new(broker.clone()),
            vec!["q".into()],
            1024,
        ));
        let single = Request::post("/jobs/q")
            .header("X-Job-Tenant", "acme")
            .header("traceparent", TP)
            .body(Body::from("x"))
            .unwrap();
        let batch = Request::post("/jobs/q/batch")
            .header("content-type", "application/x-ndjson")
            .header("x-job-tenant", "acme")
            .header("traceparent", TP)
            .body(Body::from("1\n2\n"))
            .unwrap();
        for request in [single, batch] {
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), axum::http::StatusCode::ACCEPTED);
        }
        let published = broker.published();
        assert_eq!(published.len(), 3);
        for job in &published {
            assert_eq!(job.meta.headers["x-job-tenant"], "acme");
            assert_eq!(job.meta.headers["traceparent"], TP);
        }
        for path in ["/jobs/q", "/jobs/q/batch"] {
            let mut request = Request::post(path).header("content-type", "application/x-ndjson");
            for i in 0..17 {
                request = request.header(format!("x-job-h{i}"), "v");
            }
            let response = router
                .clone()
                .oneshot(request.body(Body::from("1")).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(json["type"], "urn:jobgate:problem:bad-metadata");
            assert_eq!(json["title"], "Bad job metadata");
            assert!(
                json["detail"].as_str().unwrap().contains("x-job-h"),
                "{json}"
            );
        }
        assert_eq!(broker.published().len(), 3);
    }

    #[test]
    fn a_content_type_longer_than_an_amqp_short_string_is_bad_metadata() {
        let mut headers = HeaderMap::new();
        let long = format!("text/{}", "x".repeat(MAX_SHORT_STRING_BYTES - 4));
        headers.insert("content-type", long.parse().unwrap());
        let error = content_type(&headers).unwrap_err();
        assert!(error.0.contains("Content-Type"), "{error}");
        let fits = format!("text/{}", "x".repeat(MAX_SHORT_STRING_BYTES - 5));
        headers.insert("content-type", fits.parse().unwrap());
        assert_eq!(content_type(&headers).unwrap(), Some(fits));
    }
}
