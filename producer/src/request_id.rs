//! `X-Request-Id`: every request has one. A client's own id (1 to 128 visible ASCII
//! characters) is kept; otherwise a UUID v7 is made. It is set on the request (so the
//! request span and the job's headers see it) and returned on the answer.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

/// The header, in both directions.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id kept, in bytes.
pub const MAX_LEN: usize = 128;

fn acceptable(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(u8::is_ascii_graphic)
}

/// Middleware: see the module documentation.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = match request.headers().get(&X_REQUEST_ID) {
        Some(value) if acceptable(value) => value.clone(),
        _ => HeaderValue::try_from(uuid::Uuid::now_v7().to_string())
            .expect("a UUID is a valid header value"),
    };
    request
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), id.clone());
    let mut response = next.run(request).await;
    response.headers_mut().insert(X_REQUEST_ID.clone(), id);
    response
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    /// Echoes the id the handler saw, to check the request carries it too.
    fn router() -> Router {
        Router::new()
            .route(
                "/",
                get(|request: Request| async move {
                    request.headers()[&X_REQUEST_ID]
                        .to_str()
                        .unwrap()
                        .to_owned()
                }),
            )
            .layer(axum::middleware::from_fn(assign))
    }

    async fn call(id: Option<&str>) -> (String, String) {
        let mut request = Request::get("/");
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        let response = router()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let answered = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        (answered, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_clients_id_is_kept_and_returned() {
        let (answered, seen) = call(Some("abc-123")).await;
        assert_eq!(answered, "abc-123");
        assert_eq!(seen, "abc-123");
    }

    #[tokio::test]
    async fn a_missing_or_unacceptable_id_is_replaced_by_a_uuid() {
        let long = "x".repeat(MAX_LEN + 1);
        for id in [None, Some(""), Some("has space"), Some(long.as_str())] {
            let (answered, seen) = call(id).await;
            assert_eq!(answered, seen);
            let parsed = uuid::Uuid::parse_str(&answered).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 7, "{id:?}");
        }
    }
}
