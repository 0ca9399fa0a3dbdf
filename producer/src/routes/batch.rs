//! `POST /jobs/{queue}/batch`: many jobs in one request.
//!
//! The body is either NDJSON (`application/x-ndjson`: one JSON job body per line) or a
//! JSON array (`application/json`: one job body per element). Every item becomes one
//! job with content type `application/json`; its body is the item's text byte for byte
//! (the line without its `\n` or `\r\n`; the element as written, without the
//! whitespace around it). The whole batch is checked before anything is published:
//! a malformed, empty or oversized batch publishes nothing. Then all items are
//! published concurrently and the answer lists, in order, each item's job id or error.

use std::time::Duration;

use std::ops::Range;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::{Extension, Json};
use bytes::BytesMut;
use futures::StreamExt;
use http_body_util::BodyExt;
use jobgate_shared::broker::PublishError;
use jobgate_shared::job::JobMeta;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::auth::ApiKeyId;
use crate::error::{problem_response, ApiError, Problem};
use crate::rate_limit::Bucket;
use crate::state::AppState;

/// Content type of NDJSON batches.
pub const NDJSON: &str = "application/x-ndjson";
/// Content type of JSON-array batches, and of every job a batch makes.
pub const JSON: &str = "application/json";

/// The route. Its body is read by [`read_batch`], under `JOBGATE_MAX_BATCH_BYTES`
/// rather than the app-wide `JOBGATE_MAX_BODY_BYTES`.
pub fn route() -> MethodRouter<AppState> {
    post(post_batch)
}

/// The answer to a batch (202, 207 or 503).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchAnswer {
    pub queue: String,
    pub accepted: usize,
    pub failed: usize,
    pub items: Vec<ItemAnswer>,
}

/// One item of the answer: `job_id` when the broker took it, `error` when not.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ItemAnswer {
    pub index: usize,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub job_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
}

/// A batch refused before anything was published.
#[derive(Debug)]
enum BatchError {
    TooManyItems {
        limit: usize,
    },
    TooLarge {
        limit: usize,
    },
    ItemTooLarge {
        item: String,
        limit: usize,
    },
    Malformed(String),
    Empty,
    UnsupportedMediaType,
    /// The metadata headers times the items pass `JOBGATE_MAX_BATCH_HEADER_BYTES`.
    HeadersTooLarge {
        limit: usize,
    },
    /// More items than the rate limit's burst: no wait would let it through.
    OverTheBurst {
        burst: u32,
    },
}

impl IntoResponse for BatchError {
    fn into_response(self) -> Response {
        let (status, slug, title, detail) = match self {
            Self::TooManyItems { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch-too-large",
                "Batch too large",
                format!("The batch has more than {limit} items; split it. Nothing was queued."),
            ),
            Self::TooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch-too-large",
                "Batch too large",
                format!("The batch is larger than {limit} bytes; split it. Nothing was queued."),
            ),
            Self::ItemTooLarge { item, limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Job body too large",
                format!("{item} is larger than {limit} bytes. Nothing was queued."),
            ),
            Self::HeadersTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch-too-large",
                "Batch too large",
                format!(
                    "The X-Job-* and trace headers, copied onto every item, come to more than \
                     {limit} bytes for this batch; send fewer items or smaller headers. Nothing \
                     was queued."
                ),
            ),
            Self::OverTheBurst { burst } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch-too-large",
                "Batch too large",
                format!(
                    "Each item of a batch counts as a request for the rate limit, and this batch \
                     has more items than the {burst} a client may send at once; split it. \
                     Nothing was queued."
                ),
            ),
            Self::Malformed(why) => (
                StatusCode::BAD_REQUEST,
                "malformed-batch",
                "Malformed batch",
                format!("{why}. Nothing was queued."),
            ),
            Self::Empty => (
                StatusCode::BAD_REQUEST,
                "empty-batch",
                "Empty batch",
                "The batch has no items. Nothing was queued.".to_owned(),
            ),
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported batch format",
                format!(
                    "A batch is sent as {NDJSON} (one JSON job per line) or as {JSON} \
                     (a JSON array of jobs)."
                ),
            ),
        };
        problem_response(status, slug, title, detail, None)
    }
}

/// The two batch formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Ndjson,
    JsonArray,
}

/// The format named by the `Content-Type` header (its parameters are ignored).
fn format_of(headers: &HeaderMap) -> Option<Format> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case(NDJSON) {
        Some(Format::Ndjson)
    } else if essence.eq_ignore_ascii_case(JSON) {
        Some(Format::JsonArray)
    } else {
        None
    }
}

/// Splits an NDJSON body into its lines (job bodies) as it arrives, checking each line
/// once the byte after its `\n` is in (only the body's end tells whether a final `\n`
/// closes the last line or starts an empty one). Stops at the line past `max_items`.
struct NdjsonLines {
    max_items: usize,
    max_item_bytes: usize,
    items: Vec<Range<usize>>,
    /// Where the next line starts.
    line_start: usize,
    /// Where to look for the next `\n`.
    scanned: usize,
}

impl NdjsonLines {
    fn new(max_items: usize, max_item_bytes: usize) -> Self {
        Self {
            max_items,
            max_item_bytes,
            items: Vec::new(),
            line_start: 0,
            scanned: 0,
        }
    }

    /// Takes the lines of `body` (all that arrived so far) that are known complete.
    fn feed(&mut self, body: &[u8]) -> Result<(), BatchError> {
        while let Some(at) = body[self.scanned..].iter().position(|b| *b == b'\n') {
            let newline = self.scanned + at;
            if newline + 1 == body.len() {
                // Maybe the final line end: wait for more or for the end.
                self.scanned = newline;
                return Ok(());
            }
            self.line(body, self.line_start..newline)?;
            self.line_start = newline + 1;
            self.scanned = newline + 1;
        }
        self.scanned = body.len();
        Ok(())
    }

    /// The whole body is in: the last line, then the items.
    fn finish(mut self, body: &[u8]) -> Result<Vec<Range<usize>>, BatchError> {
        // One newline at the end closes the last line; it does not start an empty one.
        let end = body.len() - usize::from(body.ends_with(b"\n"));
        if end == 0 {
            return Err(BatchError::Empty);
        }
        // Every `\n` before `end` was followed by a byte, so its line was taken.
        self.line(body, self.line_start..end)?;
        Ok(self.items)
    }

    fn line(&mut self, body: &[u8], range: Range<usize>) -> Result<(), BatchError> {
        let number = self.items.len() + 1;
        if self.items.len() == self.max_items {
            return Err(BatchError::TooManyItems {
                limit: self.max_items,
            });
        }
        let line = &body[range.clone()];
        let (line, range) = match line.strip_suffix(b"\r") {
            Some(line) => (line, range.start..range.end - 1),
            None => (line, range),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return Err(BatchError::Malformed(format!("Line {number} is empty")));
        }
        if line.len() > self.max_item_bytes {
            return Err(BatchError::ItemTooLarge {
                item: format!("Line {number}"),
                limit: self.max_item_bytes,
            });
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(line) {
            return Err(BatchError::Malformed(format!(
                "Line {number} is not valid JSON (column {}: {})",
                e.column(),
                category(&e)
            )));
        }
        self.items.push(range);
        Ok(())
    }
}

/// Counts the top-level elements of a JSON array as it arrives, without parsing it
/// (strings, escapes and nesting only), so a body with too many items is refused
/// before the rest of it is read. The parse proper comes once the body is complete.
#[derive(Debug, Default)]
struct ArrayCounter {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Commas directly inside the outermost array: elements less one.
    separators: usize,
}

impl ArrayCounter {
    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                b',' if self.depth == 1 => self.separators += 1,
                _ => {}
            }
        }
    }

    /// At least this many elements have begun.
    fn elements(&self) -> usize {
        self.separators.saturating_add(1)
    }
}

/// The elements of a JSON array, parsed one by one: past `max_items` the parse stops
/// (`too_many` is set), so an array of millions of `0`s never becomes a vector.
struct Elements<'a> {
    max_items: usize,
    too_many: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Elements<'_> {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Elements<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of jobs")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(element) = seq.next_element::<&'de RawValue>()? {
            if items.len() == self.max_items {
                self.too_many.set(true);
                return Err(serde::de::Error::custom("too many items"));
            }
            items.push(element);
        }
        Ok(items)
    }
}

/// Splits a JSON-array body into its elements' text, checking each.
fn array_items(
    body: &[u8],
    max_items: usize,
    max_item_bytes: usize,
) -> Result<Vec<&[u8]>, BatchError> {
    use serde::de::DeserializeSeed;
    let too_many = std::cell::Cell::new(false);
    let mut parser = serde_json::Deserializer::from_slice(body);
    let parsed = Elements {
        max_items,
        too_many: &too_many,
    }
    .deserialize(&mut parser)
    .and_then(|elements| parser.end().map(|()| elements));
    let elements = parsed.map_err(|e| {
        if too_many.get() {
            return BatchError::TooManyItems { limit: max_items };
        }
        BatchError::Malformed(format!(
            "The body is not a JSON array of jobs ({} at line {}, column {})",
            category(&e),
            e.line(),
            e.column()
        ))
    })?;
    if elements.is_empty() {
        return Err(BatchError::Empty);
    }
    if let Some(index) = elements.iter().position(|e| e.get().len() > max_item_bytes) {
        return Err(BatchError::ItemTooLarge {
            item: format!("Item {index} (0-based) of the array"),
            limit: max_item_bytes,
        });
    }
    Ok(elements.iter().map(|e| e.get().as_bytes()).collect())
}

/// Reads a batch body as it arrives, refusing it as soon as it is known too large or
/// to hold too many items (the rest is never read; hyper closes the connection), then
/// splits it into its items.
async fn read_batch(
    state: &AppState,
    headers: &HeaderMap,
    format: Format,
    mut body: Body,
) -> Result<(Bytes, Vec<Range<usize>>), Response> {
    let too_large = || {
        BatchError::TooLarge {
            limit: state.max_batch_bytes,
        }
        .into_response()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(state.max_batch_bytes).unwrap_or(u64::MAX)) {
        return Err(too_large());
    }
    let max_items = state.max_batch_items;
    let mut lines = NdjsonLines::new(max_items, state.max_body_bytes);
    let mut counter = ArrayCounter::default();
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            if crate::body_deadline::is_deadline(&*error.into_inner()) {
                ApiError::BodyTimeout(state.body_read_timeout).into_response()
            } else {
                ApiError::BadBody.into_response()
            }
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        if buffer.len() + chunk.len() > state.max_batch_bytes {
            return Err(too_large());
        }
        buffer.extend_from_slice(&chunk);
        match format {
            Format::Ndjson => lines.feed(&buffer).map_err(IntoResponse::into_response)?,
            Format::JsonArray => {
                counter.feed(&chunk);
                if counter.elements() > max_items {
                    return Err(BatchError::TooManyItems { limit: max_items }.into_response());
                }
            }
        }
    }
    let body = buffer.freeze();
    let items = match format {
        Format::Ndjson => lines.finish(&body),
        Format::JsonArray => array_items(&body, max_items, state.max_body_bytes).map(|items| {
            // Each element is a sub-slice of the body: its range.
            let base = body.as_ptr() as usize;
            items
                .iter()
                .map(|item| {
                    let start = item.as_ptr() as usize - base;
                    start..start + item.len()
                })
                .collect()
        }),
    }
    .map_err(IntoResponse::into_response)?;
    Ok((body, items))
}

/// serde_json's message without its position (we say where ourselves).
fn category(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// What an item's failure is called in the answer; internals stay in the log.
fn short_problem(error: &PublishError) -> &'static str {
    match error {
        PublishError::Unavailable => "the message broker is not reachable; retry later",
        PublishError::Timeout(_) => "the message broker did not confirm in time: it may have been queued",
        PublishError::Unconfirmed(_) => {
            "the connection to the message broker was lost before it confirmed: it may have been queued"
        }
        PublishError::Nacked => "the message broker refused it; retry later",
        PublishError::Unroutable => "the message broker has no queue for it; retry later",
        PublishError::Broker(_) => "the message broker failed; retry later",
        PublishError::Overloaded => "too many jobs are waiting for the message broker; retry later",
        PublishError::Malformed(_) => "its metadata cannot be sent to the message broker",
    }
}

/// `POST /jobs/{queue}/batch`.
#[utoipa::path(
    post,
    path = "/jobs/{queue}/batch",
    tag = "jobs",
    summary = "Accept many jobs for a queue",
    description = "NDJSON (one JSON job body per line) or a JSON array (one job body per element). The whole batch is checked before anything is published; then every item is published and the answer lists each item's job id or error. `Idempotency-Key` is not used for batches.",
    request_body(
        description = "The jobs. Each item becomes one job with content type `application/json`, its text byte for byte.",
        content(
            (String = "application/x-ndjson"),
            (Vec<serde_json::Value> = "application/json"),
        ),
    ),
    params(
        ("queue" = String, Path, description = "A queue of `JOBGATE_QUEUES`."),
        ("X-Job-*" = Option<String>, Header, description = "Any number (at most 16) of `X-Job-<name>` headers travel with every job of the batch as message headers, names lower-cased: names up to 64 bytes, values up to 1024 bytes of visible ASCII and spaces."),
        ("Jobgate-Callback" = Option<String>, Header, description = "An absolute http(s) URL (at most 2048 bytes, no user name or password) whose host is in `JOBGATE_CALLBACK_ALLOW`: every job of the batch POSTs its final status (done, dead, cancelled) there, signed (`Jobgate-Signature`). Else 400."),
        ("traceparent" = Option<String>, Header, description = "W3C trace context; travels with every job when valid."),
        ("tracestate" = Option<String>, Header, description = "W3C trace context; travels with a valid `traceparent`."),
        ("Jobgate-Delay" = Option<String>, Header, description = "For every job of the batch: Run the job no sooner than this many seconds from now (`90`, `1.5`); `0` runs it now. At most `JOBGATE_SCHEDULE_MAX` (default 30 days). Not with `Jobgate-Not-Before`. Its status is `scheduled` until it starts. The job reaches a consumer up to `JOBGATE_RETRY_BASE_MS` (default 1 s) after its time on RabbitMQ, about on time on Kafka, plus the consumers' own backlog; never before."),
        ("Jobgate-Not-Before" = Option<String>, Header, description = "For every job of the batch: Run the job no sooner than this RFC 3339 time (`2026-01-05T10:00:00Z`, `2026-01-05T11:00:00+01:00`); a time in the past runs it now. At most `JOBGATE_SCHEDULE_MAX` ahead. Not with `Jobgate-Delay`."),
        ("Jobgate-Max-Attempts" = Option<u32>, Header, description = "For every job of the batch: Attempts this job gets in all (1 to 1000) instead of the consumer's `JOBGATE_MAX_ATTEMPTS`; a consumer holds it to its `JOBGATE_MAX_ATTEMPTS_CEILING`."),
        ("Jobgate-Timeout" = Option<String>, Header, description = "For every job of the batch: This job's timeout, in seconds (`30`, `0.5`) or as a duration (`1m 30s`, `250ms`), 1 ms to 7 days, instead of the consumer's `JOBGATE_JOB_TIMEOUT_MS`; a consumer holds it to its `JOBGATE_JOB_TIMEOUT_CEILING`."),
    ),
    responses(
        (status = 202, description = "The broker took every item.", body = BatchAnswer),
        (status = 207, description = "The broker took some items; the others have `error` (retry those).", body = BatchAnswer,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying the failed items."))),
        (status = 400, description = "`malformed-batch`, `empty-batch`, `bad-body`, `bad-metadata`, `bad-schedule`, `bad-job-policy`, `callback-not-allowed` (the `Jobgate-Callback` host is not in `JOBGATE_CALLBACK_ALLOW`, or that setting is unset) or `bad-callback` (nothing is published).", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: API keys are configured and the request has none or a wrong one.", body = Problem, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"jobgate\"`"))),
        (status = 404, description = "`unknown-queue` (nothing is published) or `not-found`.", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "`body-timeout`: the body did not arrive within `JOBGATE_BODY_READ_TIMEOUT_MS`; the connection is closed.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`batch-too-large` (too many items or bytes) or `body-too-large` (one item too large); nothing is published.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported-media-type`: neither `application/x-ndjson` nor `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate-limited`: over the per-client rate limit.", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
        (status = 503, description = "Either the broker took no item (a `BatchAnswer`, `application/json`), or `shutting-down` (a `Problem`, `application/problem+json`).",
            content(
                (BatchAnswer = "application/json"),
                (Problem = "application/problem+json"),
            ),
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
    security((), ("bearer" = [])),
)]
pub async fn post_batch(
    State(state): State<AppState>,
    queue: Result<Path<String>, PathRejection>,
    bucket: Option<Extension<Bucket>>,
    scope: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let queue = super::jobs::queue_name(queue).map_err(IntoResponse::into_response)?;
    if !state.accepts(&queue) {
        return Err(ApiError::UnknownQueue(queue).into_response());
    }
    if state.draining.is_cancelled() {
        return Err(ApiError::ShuttingDown.into_response());
    }
    let Some(format) = format_of(&headers) else {
        return Err(BatchError::UnsupportedMediaType.into_response());
    };
    let (body, items) = read_batch(&state, &headers, format, body).await?;
    let items: Vec<Bytes> = items.into_iter().map(|range| body.slice(range)).collect();
    // The request's metadata headers travel with every job of the batch.
    let mut job_headers =
        crate::metadata::extract(&headers).map_err(IntoResponse::into_response)?;
    let options = crate::job_options::JobOptions::from_headers(
        &headers,
        std::time::SystemTime::now(),
        state.schedule_max,
    )
    .map_err(IntoResponse::into_response)?;
    options.apply(&mut job_headers);
    crate::callback::apply(state.callback_allow.as_ref(), &headers, &mut job_headers)
        .map_err(IntoResponse::into_response)?;
    let header_bytes: usize = job_headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if header_bytes.saturating_mul(items.len()) > state.max_batch_header_bytes {
        return Err(BatchError::HeadersTooLarge {
            limit: state.max_batch_header_bytes,
        }
        .into_response());
    }
    // The request paid one token at the door; every further item pays one more.
    if let (Some(limit), Some(Extension(bucket))) = (&state.security.rate_limit, &bucket) {
        let over_the_burst = u32::try_from(items.len()).map_or(true, |n| n > limit.burst());
        let paid = if over_the_burst {
            Err(None)
        } else {
            limit.check_n(bucket, items.len() - 1)
        };
        match paid {
            Ok(()) => {}
            Err(Some(wait)) => return Err(crate::rate_limit::too_many_requests(wait)),
            Err(None) => {
                return Err(BatchError::OverTheBurst {
                    burst: limit.burst(),
                }
                .into_response())
            }
        }
    }

    let publisher = Arc::clone(&state.publisher);
    // Collected first: a lazy `map` inside the stream trips the handler's `Send` bound.
    let publishes: Vec<_> = items
        .iter()
        .map(|item| {
            let mut meta = JobMeta::new(queue.clone(), Some(JSON.to_owned()));
            meta.headers.clone_from(&job_headers);
            let publisher = Arc::clone(&publisher);
            let item = item.clone();
            async move {
                let result = publisher.publish(&meta, &item).await;
                (meta.id, result)
            }
        })
        .collect();
    // At most the batch's share of the in-flight permits at once: the other items wait
    // their turn here (in order), and other requests keep the rest.
    let outcomes: Vec<_> = futures::stream::iter(publishes)
        .buffered(state.batch_in_flight_cap())
        .collect()
        .await;

    let mut retry_after: Option<Duration> = None;
    let mut first_error: Option<PublishError> = None;
    let answers: Vec<ItemAnswer> = outcomes
        .into_iter()
        .enumerate()
        .map(|(index, (job_id, result))| match result {
            Ok(()) => ItemAnswer {
                index,
                status: StatusCode::ACCEPTED.as_u16(),
                job_id: Some(job_id),
                error: None,
            },
            Err(error) => {
                let after = error.retry_after();
                retry_after = Some(retry_after.map_or(after, |a| a.max(after)));
                let problem = short_problem(&error);
                first_error.get_or_insert(error);
                ItemAnswer {
                    index,
                    status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
                    job_id: None,
                    error: Some(problem.to_owned()),
                }
            }
        })
        .collect();
    // Every accepted item's status in one write, in a task of its own: a client that
    // hangs up now does not cut it off.
    let accepted_ids: Vec<String> = answers.iter().filter_map(|a| a.job_id.clone()).collect();
    if state.status.is_some() && !accepted_ids.is_empty() {
        let (task_state, task_queue) = (state.clone(), queue.clone());
        let scope = scope.map(|Extension(ApiKeyId(digest))| digest);
        let recorded = tokio::spawn(async move {
            super::status::record_queued(
                &task_state,
                &task_queue,
                &accepted_ids,
                scope.as_ref(),
                options.due,
            )
            .await;
        });
        if let Err(error) = recorded.await {
            tracing::error!(%error, "the task recording the batch's status failed");
        }
    }
    let failed = answers.iter().filter(|a| a.job_id.is_none()).count();
    let accepted = answers.len() - failed;
    match &first_error {
        None => tracing::info!(%queue, items = answers.len(), accepted, failed, "batch accepted"),
        Some(error) => tracing::warn!(
            %queue, items = answers.len(), accepted, failed, %error,
            "batch partly or wholly refused by the broker"
        ),
    }
    let status = if failed == 0 {
        StatusCode::ACCEPTED
    } else if accepted == 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::MULTI_STATUS
    };
    let mut response = (
        status,
        Json(BatchAnswer {
            queue,
            accepted,
            failed,
            items: answers,
        }),
    )
        .into_response();
    if let Some(after) = retry_after {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(after.as_secs().max(1)),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request;
    use axum::Router;
    use jobgate_shared::broker::memory::MemoryBroker;
    use serde_json::Value;

    use super::*;
    use crate::startup::app;
    use crate::state::DEFAULT_MAX_BATCH_HEADER_BYTES;

    /// Queues `emails`, `reports`; jobs up to 16 bytes, batches of 5 items, 200 bytes.
    fn test_app(broker: &MemoryBroker) -> Router {
        let state = AppState::new(
            Arc::new(broker.clone()),
            vec!["emails".into(), "reports".into()],
            16,
        )
        .with_batch_limits(5, 200);
        app(state)
    }

    use crate::test_support::send;

    fn batch(queue: &str, content_type: &str, body: impl AsRef<[u8]>) -> Request<Body> {
        Request::post(format!("/jobs/{queue}/batch"))
            .header("content-type", content_type)
            .body(Body::from(body.as_ref().to_vec()))
            .unwrap()
    }

    fn assert_problem(
        status: StatusCode,
        headers: &HeaderMap,
        json: &Value,
        want: u16,
        slug: &str,
    ) {
        assert_eq!(status.as_u16(), want, "{json}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(json["status"], want);
        assert_eq!(json["type"], format!("urn:jobgate:problem:{slug}"));
    }

    #[tokio::test]
    async fn ndjson_all_taken_is_202_in_order_byte_for_byte() {
        let broker = MemoryBroker::new();
        let body = b"{\"n\":1}\n[ 2 ,3]\r\n\"three\"\n";
        let (status, headers, json) = send(test_app(&broker), batch("reports", NDJSON, body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        assert!(!headers.contains_key("retry-after"));
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(json["queue"], "reports");
        assert_eq!(json["accepted"], 3);
        assert_eq!(json["failed"], 0);
        let items = json["items"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        let published = broker.published();
        let mut ids = std::collections::BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            assert_eq!(item["index"], i);
            assert_eq!(item["status"], 202);
            assert!(item.get("error").is_none());
            let id = item["job_id"].as_str().unwrap();
            ids.insert(id.to_owned());
            let job = published.iter().find(|j| j.meta.id == id).unwrap();
            assert_eq!(job.meta.queue, "reports");
            assert_eq!(job.meta.content_type.as_deref(), Some("application/json"));
        }
        assert_eq!(ids.len(), 3, "distinct ids");
        let body_of = |i: usize| {
            let id = items[i]["job_id"].as_str().unwrap();
            published
                .iter()
                .find(|j| j.meta.id == id)
                .unwrap()
                .body
                .clone()
        };
        assert_eq!(&body_of(0)[..], b"{\"n\":1}");
        assert_eq!(&body_of(1)[..], b"[ 2 ,3]");
        assert_eq!(&body_of(2)[..], b"\"three\"");
    }

    #[tokio::test]
    async fn json_array_elements_are_published_as_written() {
        let broker = MemoryBroker::new();
        let body = b" [ {\"a\": 1, \"b\":[]} ,\n 2.50, \"x\\u0041\" ] ";
        let (status, _, json) = send(
            test_app(&broker),
            batch("emails", "application/json; charset=utf-8", body),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        assert_eq!(json["accepted"], 3);
        let published = broker.published();
        let bodies: Vec<&[u8]> = json["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                let id = item["job_id"].as_str().unwrap();
                &published.iter().find(|j| j.meta.id == id).unwrap().body[..]
            })
            .collect();
        assert_eq!(
            bodies,
            vec![&b"{\"a\": 1, \"b\":[]}"[..], b"2.50", b"\"x\\u0041\""]
        );
    }

    #[tokio::test]
    async fn some_failing_is_207_with_per_item_statuses() {
        let broker = MemoryBroker::new();
        broker.fail_publishes(2, PublishError::Broker("10.1.2.3 said no".into()));
        let (status, headers, json) =
            send(test_app(&broker), batch("emails", NDJSON, b"1\n2\n3\n4")).await;
        assert_eq!(status, StatusCode::MULTI_STATUS, "{json}");
        assert!(headers.contains_key("retry-after"));
        assert_eq!(json["accepted"], 2);
        assert_eq!(json["failed"], 2);
        let items = json["items"].as_array().unwrap();
        let statuses: Vec<u64> = items
            .iter()
            .map(|i| i["status"].as_u64().unwrap())
            .collect();
        // The memory broker fails the first publishes it sees, and join_all starts them
        // in order.
        assert_eq!(statuses, vec![503, 503, 202, 202]);
        for item in &items[..2] {
            assert!(item.get("job_id").is_none());
            let error = item["error"].as_str().unwrap();
            assert!(!error.contains("10.1.2.3"), "{error}");
        }
        assert_eq!(broker.published().len(), 2);
        let published: Vec<Vec<u8>> = broker.published().iter().map(|j| j.body.to_vec()).collect();
        assert_eq!(published, vec![b"3".to_vec(), b"4".to_vec()]);
    }

    #[tokio::test]
    async fn all_failing_is_503_with_retry_after() {
        let broker = MemoryBroker::new();
        broker.fail_publishes(2, PublishError::Unavailable);
        let (status, headers, json) = send(
            test_app(&broker),
            batch("emails", "application/json", b"[1,2]"),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "5");
        assert_eq!(json["accepted"], 0);
        assert_eq!(json["failed"], 2);
        assert_eq!(json["items"][1]["index"], 1);
        assert_eq!(json["items"][1]["status"], 503);
        assert!(broker.published().is_empty());
    }

    #[tokio::test]
    async fn other_content_types_are_415() {
        let broker = MemoryBroker::new();
        let (status, headers, json) =
            send(test_app(&broker), batch("emails", "text/plain", b"1\n2")).await;
        assert_problem(status, &headers, &json, 415, "unsupported-media-type");
        let detail = json["detail"].as_str().unwrap();
        assert!(detail.contains(NDJSON) && detail.contains(JSON), "{detail}");
        let request = Request::post("/jobs/emails/batch")
            .body(Body::from("1"))
            .unwrap();
        let (status, _, _) = send(test_app(&broker), request).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(broker.published().is_empty());
    }

    #[tokio::test]
    async fn a_bad_ndjson_line_is_400_naming_it_and_nothing_is_published() {
        for (body, line) in [
            (&b"1\n{\"a\":\n3\n"[..], "Line 2 "),
            (b"1\n2\n\n4", "Line 3 is empty"),
            (b"\n1", "Line 1 is empty"),
            (b"1\n2\nnope", "Line 3 "),
        ] {
            let broker = MemoryBroker::new();
            let request = Request::post("/jobs/emails/batch")
                .header("content-type", NDJSON)
                .body(Body::from(body))
                .unwrap();
            let (status, headers, json) = send(test_app(&broker), request).await;
            assert_problem(status, &headers, &json, 400, "malformed-batch");
            let detail = json["detail"].as_str().unwrap();
            assert!(detail.contains(line), "{detail}");
            assert!(broker.published().is_empty());
        }
    }

    #[tokio::test]
    async fn a_malformed_array_is_400_with_its_position() {
        for body in [&b"[1,\n 2,,3]"[..], b"{\"not\":\"an array\"}", b"[1] 2"] {
            let broker = MemoryBroker::new();
            let request = Request::post("/jobs/emails/batch")
                .header("content-type", JSON)
                .body(Body::from(body))
                .unwrap();
            let (status, headers, json) = send(test_app(&broker), request).await;
            assert_problem(status, &headers, &json, 400, "malformed-batch");
            let detail = json["detail"].as_str().unwrap();
            assert!(
                detail.contains("line ") && detail.contains("column "),
                "{detail}"
            );
            assert!(broker.published().is_empty());
        }
    }

    #[tokio::test]
    async fn an_empty_batch_is_400() {
        for (content_type, body) in [(NDJSON, &b""[..]), (NDJSON, b"\n"), (JSON, b"[]")] {
            let broker = MemoryBroker::new();
            let request = Request::post("/jobs/emails/batch")
                .header("content-type", content_type)
                .body(Body::from(body))
                .unwrap();
            let (status, headers, json) = send(test_app(&broker), request).await;
            assert_problem(status, &headers, &json, 400, "empty-batch");
        }
    }

    #[tokio::test]
    async fn too_many_items_or_bytes_is_413_and_nothing_is_published() {
        let broker = MemoryBroker::new();
        let (status, headers, json) = send(
            test_app(&broker),
            batch("emails", NDJSON, b"1\n2\n3\n4\n5\n6\n"),
        )
        .await;
        assert_problem(status, &headers, &json, 413, "batch-too-large");
        let (status, headers, json) =
            send(test_app(&broker), batch("emails", JSON, b"[1,2,3,4,5,6]")).await;
        assert_problem(status, &headers, &json, 413, "batch-too-large");
        // Five items are fine.
        let (status, _, _) = send(
            test_app(&broker),
            batch("emails", NDJSON, b"1\n2\n3\n4\n5\n"),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(broker.published().len(), 5);
        // More than 200 bytes in all, each item within its limit.
        let broker = MemoryBroker::new();
        let big = format!("[{}]", vec!["\"0123456789\""; 17].join(","));
        let (status, headers, json) = send(test_app(&broker), batch("emails", JSON, big)).await;
        assert_problem(status, &headers, &json, 413, "batch-too-large");
        assert!(broker.published().is_empty());
    }

    #[tokio::test]
    async fn an_oversized_item_is_413_naming_it() {
        let broker = MemoryBroker::new();
        // 16 bytes is the job limit: line 2 has 17.
        let (status, headers, json) = send(
            test_app(&broker),
            batch(
                "emails",
                NDJSON,
                b"\"fourteen bytes\"\n\"fifteen bytes!!\"\n",
            ),
        )
        .await;
        assert_problem(status, &headers, &json, 413, "body-too-large");
        assert!(
            json["detail"].as_str().unwrap().contains("Line 2"),
            "{json}"
        );
        let (status, headers, json) = send(
            test_app(&broker),
            batch("emails", JSON, b"[1, \"fifteen bytes!!\"]"),
        )
        .await;
        assert_problem(status, &headers, &json, 413, "body-too-large");
        assert!(
            json["detail"].as_str().unwrap().contains("Item 1"),
            "{json}"
        );
        assert!(broker.published().is_empty());
    }

    /// A batch body of `[0,0,0,...` (or `0\n0\n...`) in 4 KiB chunks, `total` bytes,
    /// that counts the bytes the producer pulled from it.
    fn huge_batch(
        format: Format,
        total: usize,
        pulled: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Body {
        use std::sync::atomic::Ordering;
        let chunk = match format {
            Format::JsonArray => "0,".repeat(2048),
            Format::Ndjson => "0\n".repeat(2048),
        };
        // A valid batch: `[0,...,0,` `0,...,0,` ... `0,...,0]`.
        let (first, last) = match format {
            Format::JsonArray => (
                format!("[{chunk}"),
                format!("{}]", &chunk[..chunk.len() - 1]),
            ),
            Format::Ndjson => (chunk.clone(), chunk.clone()),
        };
        let chunks = std::iter::once(first)
            .chain(std::iter::repeat_n(chunk, total / 4096 - 2))
            .chain(std::iter::once(last))
            .map(move |c| {
                pulled.fetch_add(c.len(), Ordering::SeqCst);
                Ok::<_, std::io::Error>(Bytes::from(c))
            });
        Body::from_stream(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn a_batch_with_too_many_items_is_refused_before_the_rest_of_its_body_is_read() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for (format, content_type) in [(Format::JsonArray, JSON), (Format::Ndjson, NDJSON)] {
            let broker = MemoryBroker::new();
            let state = AppState::new(Arc::new(broker.clone()), vec!["q".into()], 1024)
                .with_batch_limits(1000, 10 * 1024 * 1024);
            let pulled = Arc::new(AtomicUsize::new(0));
            let request = Request::post("/jobs/q/batch")
                .header("content-type", content_type)
                .body(huge_batch(format, 10 * 1024 * 1024, Arc::clone(&pulled)))
                .unwrap();
            let (status, headers, json) = send(app(state), request).await;
            assert_problem(status, &headers, &json, 413, "batch-too-large");
            // 1001 items fit in the first 4 KiB chunk: nothing near 10 MiB was read.
            let read = pulled.load(Ordering::SeqCst);
            assert!(read <= 64 * 1024, "{format:?}: {read} bytes read");
            assert!(broker.published().is_empty());
        }
    }

    /// The NDJSON lines of `body` fed whole, or in chunks of `step` bytes.
    fn ndjson(body: &[u8], step: usize) -> Result<Vec<Range<usize>>, String> {
        let mut lines = NdjsonLines::new(3, 8);
        let mut end = 0;
        while end < body.len() {
            end = (end + step).min(body.len());
            lines.feed(&body[..end]).map_err(|e| format!("{e:?}"))?;
        }
        lines.finish(body).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn ndjson_lines_are_the_same_however_the_body_arrives() {
        for body in [
            &b""[..],
            b"\n",
            b"1",
            b"1\n",
            b"1\r\n2\r\n",
            b"1\n\n",
            b"\n1",
            b"1\n2\n3",
            b"1\n2\n3\n",
            b"1\n2\n3\n4",
            b"1\n2\n3\n\n",
            b"1\nnope\n3",
            b"\"123456789\"\n1",
        ] {
            let whole = ndjson(body, body.len().max(1));
            for step in 1..4 {
                assert_eq!(
                    ndjson(body, step),
                    whole,
                    "{:?} in steps of {step}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        assert_eq!(ndjson(b"1\r\n22\n", 1).unwrap(), vec![0..1, 3..5]);
        assert!(ndjson(b"1\n2\n3\n4", 1)
            .unwrap_err()
            .contains("TooManyItems"));
        assert!(ndjson(b"\n", 1).unwrap_err().contains("Empty"));
    }

    #[test]
    fn the_array_parser_stops_at_the_item_past_the_limit() {
        // Malformed after the limit: the parser never got there, it is too many items.
        let body = b"[1,2,3,4,5,6,oops";
        assert!(matches!(
            array_items(body, 5, 100),
            Err(BatchError::TooManyItems { limit: 5 })
        ));
        assert_eq!(array_items(b"[1,2,3]", 5, 100).unwrap().len(), 3);
    }

    /// Publishes after 50 ms; counts how many wait at once.
    #[derive(Default)]
    struct Gauged {
        now: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl jobgate_shared::broker::Publisher for Gauged {
        async fn publish_to(&self, _: &str, _: &JobMeta, _: &[u8]) -> Result<(), PublishError> {
            use std::sync::atomic::Ordering;
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        fn is_ready(&self) -> bool {
            true
        }
        async fn close(&self) {}
    }

    #[tokio::test]
    async fn a_batch_holds_at_most_its_share_of_the_in_flight_permits() {
        let gauged = Arc::new(Gauged::default());
        let state = AppState::new(gauged.clone(), vec!["q".into()], 1024)
            .with_max_in_flight(4)
            .with_batch_fairness(50, DEFAULT_MAX_BATCH_HEADER_BYTES);
        let batch = send(app(state.clone()), batch("q", NDJSON, "1\n2\n3\n4\n5\n"));
        let single = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let job = Request::post("/jobs/q").body(Body::from("x")).unwrap();
            send(app(state.clone()), job).await
        };
        let ((status, _, json), (single, _, _)) = tokio::join!(batch, single);
        // Every item waited for its turn within the batch's share; none was refused.
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        assert_eq!(json["accepted"], 5);
        // The other half stayed free for other requests.
        assert_eq!(single, StatusCode::ACCEPTED);
        let most = gauged.most.load(std::sync::atomic::Ordering::SeqCst);
        assert!(most <= 3, "{most} publishes at once (batch 2 + single 1)");
    }

    #[tokio::test]
    async fn a_batch_costs_a_rate_limit_token_per_item() {
        use std::num::NonZeroU32;
        let broker = MemoryBroker::new();
        let rate = crate::rate_limit::RateLimit::new(
            NonZeroU32::new(1).unwrap(),
            NonZeroU32::new(5).unwrap(),
        );
        let security = crate::auth::Security::new(None, Some(rate));
        let state = AppState::new(Arc::new(broker.clone()), vec!["q".into()], 1024)
            .with_security(Arc::new(security));
        // 3 of the 5 tokens.
        let (status, _, json) = send(app(state.clone()), batch("q", NDJSON, "1\n2\n3\n")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        // 3 more do not fit in the 2 left.
        let (status, headers, json) =
            send(app(state.clone()), batch("q", NDJSON, "1\n2\n3\n")).await;
        assert_problem(status, &headers, &json, 429, "rate-limited");
        assert!(headers.contains_key("retry-after"));
        assert_eq!(broker.published().len(), 3);
        // More items than the burst can never pass: 413, split it.
        let (status, headers, json) =
            send(app(state.clone()), batch("q", NDJSON, "1\n2\n3\n4\n5\n6\n")).await;
        assert_problem(status, &headers, &json, 413, "batch-too-large");
        assert!(json["detail"].as_str().unwrap().contains("rate"), "{json}");
        assert_eq!(broker.published().len(), 3);
    }

    #[tokio::test]
    async fn the_headers_a_batch_copies_onto_its_jobs_are_bounded() {
        let broker = MemoryBroker::new();
        let state = AppState::new(Arc::new(broker.clone()), vec!["q".into()], 1024)
            .with_batch_fairness(50, 200);
        let with_header = |body: &'static str| {
            Request::post("/jobs/q/batch")
                .header("content-type", NDJSON)
                // 7 + 40 bytes a job, and 12 + 36 of `x-request-id`: 95.
                .header("x-job-a", "x".repeat(40))
                .body(Body::from(body))
                .unwrap()
        };
        let (status, _, json) = send(app(state.clone()), with_header("1\n2\n")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        let (status, headers, json) = send(app(state.clone()), with_header("1\n2\n3\n")).await;
        assert_problem(status, &headers, &json, 413, "batch-too-large");
        assert!(
            json["detail"].as_str().unwrap().contains("X-Job-"),
            "{json}"
        );
        assert_eq!(broker.published().len(), 2);
    }

    #[tokio::test]
    async fn unknown_queue_is_404_and_shutting_down_is_503() {
        let broker = MemoryBroker::new();
        let (status, headers, json) = send(test_app(&broker), batch("other", NDJSON, b"1")).await;
        assert_problem(status, &headers, &json, 404, "unknown-queue");
        let state = AppState::new(Arc::new(broker.clone()), vec!["q".into()], 16);
        state.draining.cancel();
        let (status, headers, json) = send(app(state), batch("q", NDJSON, b"1")).await;
        assert_problem(status, &headers, &json, 503, "shutting-down");
        assert!(headers.contains_key("retry-after"));
        assert!(broker.published().is_empty());
    }
}
