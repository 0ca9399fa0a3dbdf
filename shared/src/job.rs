//! The job envelope and its mapping to and from the wire.
//!
//! The body of a job is the HTTP request body byte for byte; it is never re-encoded, so
//! workers in any language and the RabbitMQ management UI see the real payload.
//! Metadata travels beside it. This module is the ONE place that knows how metadata
//! maps onto broker messages; every backend and tool goes through it.
//!
//! | field        | RabbitMQ                 | Kafka                                  |
//! |--------------|--------------------------|----------------------------------------|
//! | job id       | `message_id` property    | header `job-id` (and the record key)   |
//! | content type | `content_type` property  | header `content-type`                  |
//! | enqueued at  | `timestamp` property (s) | record timestamp (ms)                  |
//! | queue        | routing key              | topic                                  |
//! | attempt      | header `x-attempt`       | header `x-attempt` (decimal text)      |
//! | other        | string headers           | headers (UTF-8 text)                   |
//!
//! A message that lacks our fields (published by hand in the management UI, say) is
//! still a job: missing fields get defaults and nothing panics.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

/// Header that carries the 1-based attempt number.
pub const HEADER_ATTEMPT: &str = "x-attempt";
/// Header of a retry: when it is due again, in ms since the epoch (Kafka retry topics
/// are forwarded by it; on RabbitMQ the tier's TTL decides and it is informational).
pub const HEADER_DUE_AT: &str = "x-due-at";
/// Dead-letter headers: why the job died, after how many attempts, when, from where.
pub const HEADER_ERROR: &str = "x-error";
pub const HEADER_ATTEMPTS: &str = "x-attempts";
pub const HEADER_FAILED_AT: &str = "x-failed-at";
pub const HEADER_ORIGINAL_QUEUE: &str = "x-original-queue";
/// On a retry, the reason the previous attempt failed.
pub const HEADER_LAST_ERROR: &str = "x-last-error";

/// Everything about a job except its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMeta {
    /// The job id: a UUID v7 for jobs that came through the ingress; for a message
    /// published by hand, its `message_id`, or a fresh UUID v7 when it has none.
    pub id: String,
    /// The queue the job was posted to.
    pub queue: String,
    /// MIME type of the body, as the client sent it.
    pub content_type: Option<String>,
    /// When the ingress accepted the job.
    pub enqueued_at: Option<SystemTime>,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Further string headers (sorted by name).
    pub headers: BTreeMap<String, String>,
}

impl JobMeta {
    /// Metadata for a new job accepted now: fresh UUID v7, attempt 1.
    pub fn new(queue: impl Into<String>, content_type: Option<String>) -> Self {
        Self {
            id: Uuid::now_v7().to_string(),
            queue: queue.into(),
            content_type,
            enqueued_at: Some(SystemTime::now()),
            attempt: 1,
            headers: BTreeMap::new(),
        }
    }
}

/// A job as a worker receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub meta: JobMeta,
    pub body: Bytes,
}

/// Mapping to and from AMQP 0-9-1 message properties (RabbitMQ).
pub mod amqp {
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    use lapin::BasicProperties;

    use super::*;

    /// `delivery_mode` 2: the broker writes the message to disk.
    const PERSISTENT: u8 = 2;

    /// The properties a job is published with: persistent, `message_id` = job id.
    pub fn properties(meta: &JobMeta) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(HEADER_ATTEMPT),
            AMQPValue::LongLongInt(i64::from(meta.attempt)),
        );
        for (name, value) in &meta.headers {
            headers.insert(
                ShortString::from(name.as_str()),
                AMQPValue::LongString(LongString::from(value.as_bytes())),
            );
        }
        let mut props = BasicProperties::default()
            .with_message_id(ShortString::from(meta.id.as_str()))
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers);
        if let Some(ct) = &meta.content_type {
            props = props.with_content_type(ShortString::from(ct.as_str()));
        }
        if let Some(at) = meta.enqueued_at {
            let secs = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
            props = props.with_timestamp(secs.as_secs());
        }
        props
    }

    /// Reads job metadata from a delivery's properties. Never fails: a missing or
    /// malformed field gets its default (attempt 1, a fresh id).
    pub fn meta_from(queue: &str, props: &BasicProperties) -> JobMeta {
        let mut attempt = 1;
        let mut headers = BTreeMap::new();
        if let Some(table) = props.headers() {
            for (name, value) in table {
                if name.as_str() == HEADER_ATTEMPT {
                    attempt = as_attempt(value).unwrap_or(1);
                } else if let Some(text) = as_text(value) {
                    headers.insert(name.to_string(), text);
                }
            }
        }
        JobMeta {
            id: props
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| Uuid::now_v7().to_string()),
            queue: queue.to_owned(),
            content_type: props.content_type().as_ref().map(|c| c.to_string()),
            enqueued_at: props
                .timestamp()
                .map(|secs| UNIX_EPOCH + Duration::from_secs(secs)),
            attempt,
            headers,
        }
    }

    /// Any integer type (or a decimal string, as the management UI publishes headers)
    /// counts; zero or negative means "unknown".
    fn as_attempt(value: &AMQPValue) -> Option<u32> {
        let n: i64 = match value {
            AMQPValue::ShortShortInt(v) => (*v).into(),
            AMQPValue::ShortShortUInt(v) => (*v).into(),
            AMQPValue::ShortInt(v) => (*v).into(),
            AMQPValue::ShortUInt(v) => (*v).into(),
            AMQPValue::LongInt(v) => (*v).into(),
            AMQPValue::LongUInt(v) => (*v).into(),
            AMQPValue::LongLongInt(v) => *v,
            other => as_text(other)?.trim().parse().ok()?,
        };
        u32::try_from(n).ok().filter(|n| *n >= 1)
    }

    /// String-like header values; bytes that are not UTF-8 are replaced, not rejected.
    fn as_text(value: &AMQPValue) -> Option<String> {
        match value {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn metadata_survives_a_round_trip() {
            let mut meta = JobMeta::new("emails", Some("application/json".into()));
            meta.attempt = 3;
            meta.headers.insert("x-job-tenant".into(), "acme".into());
            let props = properties(&meta);
            assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
            let back = meta_from("emails", &props);
            assert_eq!(back.id, meta.id);
            assert_eq!(back.content_type.as_deref(), Some("application/json"));
            assert_eq!(back.attempt, 3);
            assert_eq!(
                back.headers.get("x-job-tenant").map(String::as_str),
                Some("acme")
            );
            // The AMQP timestamp has whole seconds.
            let sent = meta
                .enqueued_at
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap();
            let got = back
                .enqueued_at
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap();
            assert_eq!(got.as_secs(), sent.as_secs());
        }

        #[test]
        fn a_hand_published_message_without_our_fields_gets_defaults() {
            let meta = meta_from("q", &BasicProperties::default());
            assert_eq!(meta.attempt, 1);
            assert!(Uuid::parse_str(&meta.id).is_ok());
            assert_eq!(meta.content_type, None);
            assert_eq!(meta.queue, "q");
        }

        #[test]
        fn junk_headers_do_not_break_parsing() {
            let mut table = FieldTable::default();
            table.insert(
                "x-attempt".into(),
                AMQPValue::LongString("not a number".into()),
            );
            table.insert(
                "bad-utf8".into(),
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, b'a'])),
            );
            table.insert("flag".into(), AMQPValue::Boolean(true));
            let props = BasicProperties::default()
                .with_headers(table)
                .with_message_id("hand-made".into());
            let meta = meta_from("q", &props);
            assert_eq!(meta.attempt, 1);
            assert_eq!(meta.id, "hand-made");
            assert_eq!(
                meta.headers.get("bad-utf8").map(String::as_str),
                Some("\u{fffd}\u{fffd}a")
            );
            assert!(!meta.headers.contains_key("flag"));
        }

        #[test]
        fn attempt_written_as_a_string_by_the_management_ui_is_read() {
            let mut table = FieldTable::default();
            table.insert("x-attempt".into(), AMQPValue::LongString("4".into()));
            let meta = meta_from("q", &BasicProperties::default().with_headers(table));
            assert_eq!(meta.attempt, 4);
        }
    }
}

/// Mapping to and from Kafka records.
pub mod kafka {
    use rdkafka::message::{Header, Headers, OwnedHeaders};

    use super::*;

    /// Header that carries the job id (also the record key).
    pub const HEADER_JOB_ID: &str = "job-id";
    /// Header that carries the body's MIME type.
    pub const HEADER_CONTENT_TYPE: &str = "content-type";

    /// The headers a job's record is produced with.
    pub fn headers(meta: &JobMeta) -> OwnedHeaders {
        let attempt = meta.attempt.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(3 + meta.headers.len())
            .insert(Header {
                key: HEADER_JOB_ID,
                value: Some(meta.id.as_bytes()),
            })
            .insert(Header {
                key: HEADER_ATTEMPT,
                value: Some(attempt.as_bytes()),
            });
        if let Some(ct) = &meta.content_type {
            headers = headers.insert(Header {
                key: HEADER_CONTENT_TYPE,
                value: Some(ct.as_bytes()),
            });
        }
        for (name, value) in &meta.headers {
            headers = headers.insert(Header {
                key: name.as_str(),
                value: Some(value.as_bytes()),
            });
        }
        headers
    }

    /// The record timestamp: when the job was accepted, in ms since the epoch.
    pub fn timestamp_millis(meta: &JobMeta) -> Option<i64> {
        let at = meta.enqueued_at?.duration_since(UNIX_EPOCH).ok()?;
        i64::try_from(at.as_millis()).ok()
    }

    /// Reads job metadata from a record. Never fails: a record produced by another
    /// tool gets defaults (the key, or a fresh UUID v7, as id; attempt 1).
    pub fn meta_from<H: Headers + ?Sized>(
        topic: &str,
        key: Option<&[u8]>,
        headers: Option<&H>,
        timestamp_millis: Option<i64>,
    ) -> JobMeta {
        let mut id = None;
        let mut content_type = None;
        let mut attempt = 1;
        let mut extra = BTreeMap::new();
        let all = headers.map_or(0, |h| h.count());
        for header in (0..all).filter_map(|i| headers.and_then(|h| h.try_get(i))) {
            let Some(value) = header.value else { continue };
            let text = String::from_utf8_lossy(value).into_owned();
            match header.key {
                HEADER_JOB_ID => id = Some(text).filter(|t| !t.is_empty()),
                HEADER_CONTENT_TYPE => content_type = Some(text),
                HEADER_ATTEMPT => {
                    attempt = text
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n >= 1)
                        .unwrap_or(1)
                }
                other => {
                    extra.insert(other.to_owned(), text);
                }
            }
        }
        let id = id
            .or_else(|| {
                key.and_then(|k| std::str::from_utf8(k).ok())
                    .map(str::to_owned)
            })
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        JobMeta {
            id,
            queue: topic.to_owned(),
            content_type,
            enqueued_at: timestamp_millis
                .and_then(|ms| u64::try_from(ms).ok())
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
            attempt,
            headers: extra,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn metadata_survives_a_round_trip() {
            let mut meta = JobMeta::new("emails", Some("text/csv".into()));
            meta.attempt = 2;
            meta.headers.insert("x-job-tenant".into(), "acme".into());
            let headers = headers(&meta);
            let back = meta_from("emails", None, Some(&headers), timestamp_millis(&meta));
            assert_eq!(back.id, meta.id);
            assert_eq!(back.content_type.as_deref(), Some("text/csv"));
            assert_eq!(back.attempt, 2);
            assert_eq!(
                back.headers.get("x-job-tenant").map(String::as_str),
                Some("acme")
            );
            let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
            assert_eq!(ms(back.enqueued_at.unwrap()), ms(meta.enqueued_at.unwrap()));
        }

        #[test]
        fn a_foreign_record_gets_defaults_and_junk_headers_are_tolerated() {
            let meta = meta_from::<OwnedHeaders>("t", Some(b"order-42"), None, None);
            assert_eq!(meta.id, "order-42");
            assert_eq!(meta.attempt, 1);
            let junk = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_ATTEMPT,
                    value: Some(&b"-3"[..]),
                })
                .insert(Header {
                    key: "bin",
                    value: Some(&[0xff_u8, 0x00][..]),
                })
                .insert(Header::<&[u8]> {
                    key: "null",
                    value: None,
                });
            let meta = meta_from("t", Some(&[0xff, 0xfe][..]), Some(&junk), Some(-1));
            assert_eq!(meta.attempt, 1);
            assert!(Uuid::parse_str(&meta.id).is_ok(), "non-UTF-8 key: fresh id");
            assert_eq!(
                meta.headers.get("bin").map(String::as_str),
                Some("\u{fffd}\0")
            );
            assert!(meta.enqueued_at.is_none());
        }
    }
}
