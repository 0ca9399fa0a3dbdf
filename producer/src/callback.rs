//! `Jobgate-Callback`: the URL a job's final status is POSTed to (issue 16). The
//! request header is checked against `JOBGATE_CALLBACK_ALLOW` here, at submit, and
//! travels with the job as the message header `x-callback-url`; the consumer checks it
//! again before anything is sent (see `jobgate_shared::callback`).

use std::collections::BTreeMap;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jobgate_shared::callback::{self, CallbackAllow, CallbackError, HEADER_CALLBACK_URL};

use crate::error::problem_response;

/// A `Jobgate-Callback` header the producer refuses: 400, nothing is queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackRefused {
    /// Repeated, or not visible ASCII.
    #[error("the Jobgate-Callback header is repeated or not visible ASCII")]
    Unreadable,
    #[error(transparent)]
    Refused(#[from] CallbackError),
}

impl CallbackRefused {
    fn slug(&self) -> &'static str {
        match self {
            Self::Refused(CallbackError::Off | CallbackError::NotAllowed(_)) => {
                "callback-not-allowed"
            }
            _ => "bad-callback",
        }
    }
}

impl IntoResponse for CallbackRefused {
    fn into_response(self) -> Response {
        let (title, detail) = match &self {
            Self::Refused(CallbackError::Off) => (
                "Callbacks are off",
                "This producer sends no completion callbacks: JOBGATE_CALLBACK_ALLOW is not \
                 set. Nothing was queued."
                    .to_owned(),
            ),
            Self::Refused(CallbackError::NotAllowed(host)) => (
                "Callback host not allowed",
                format!(
                    "Callbacks may go only to the hosts in JOBGATE_CALLBACK_ALLOW; {host} is \
                     not one of them. Nothing was queued."
                ),
            ),
            other => (
                "Bad callback URL",
                format!("Jobgate-Callback: {other}. Nothing was queued."),
            ),
        };
        problem_response(StatusCode::BAD_REQUEST, self.slug(), title, detail, None)
    }
}

/// Adds the request's `Jobgate-Callback` (checked against `allow`, normalised) to
/// `job_headers`; without the header nothing changes.
pub fn apply(
    allow: Option<&CallbackAllow>,
    headers: &HeaderMap,
    job_headers: &mut BTreeMap<String, String>,
) -> Result<(), CallbackRefused> {
    let mut values = headers.get_all(callback::REQUEST_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(());
    };
    if values.next().is_some() {
        return Err(CallbackRefused::Unreadable);
    }
    let raw = value.to_str().map_err(|_| CallbackRefused::Unreadable)?;
    let url = callback::check(allow, raw.trim())?;
    job_headers.insert(HEADER_CALLBACK_URL.to_owned(), url.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append("jobgate-callback", HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn an_allowed_callback_travels_normalised_and_others_are_refused() {
        let allow = CallbackAllow::parse("*.example.com").unwrap();
        let mut out = BTreeMap::new();
        apply(
            Some(&allow),
            &headers(&["https://A.example.com/cb"]),
            &mut out,
        )
        .unwrap();
        assert_eq!(out[HEADER_CALLBACK_URL], "https://a.example.com/cb");

        let refused = |allow: Option<&CallbackAllow>, values: &[&str]| {
            apply(allow, &headers(values), &mut BTreeMap::new()).unwrap_err()
        };
        let other = refused(Some(&allow), &["https://evil.net/"]);
        assert_eq!(other.slug(), "callback-not-allowed");
        assert_eq!(
            refused(None, &["https://a.example.com/"]).slug(),
            "callback-not-allowed"
        );
        let twice = refused(
            Some(&allow),
            &["https://a.example.com/", "https://b.example.com/"],
        );
        assert_eq!(twice, CallbackRefused::Unreadable);
        assert_eq!(
            refused(Some(&allow), &["https://u:p@a.example.com/"]).slug(),
            "bad-callback"
        );

        let mut none = BTreeMap::new();
        apply(None, &HeaderMap::new(), &mut none).unwrap();
        assert!(
            none.is_empty(),
            "no header, no callback, also with callbacks off"
        );
    }
}
