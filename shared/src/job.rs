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
//! still a job: missing fields get defaults and nothing panics. Reading is total: every
//! property, header key and value, however huge, negative, overflowing or not UTF-8,
//! becomes a field, a default or a replaced character (a property test holds both
//! decoders to that). Writing is fallible: metadata that AMQP cannot carry (a content
//! type longer than 255 bytes, say) is a [`WireError`], never a panic.
//!
//! A message without a usable id (none, or one that is not [safe](is_safe_id)) gets an
//! id derived from the delivery, the same on every redelivery: on RabbitMQ from a hash
//! of its body and properties, on Kafka from its topic, partition and offset.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};
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
/// How many times the job was replayed from its dead-letter queue (decimal text; absent:
/// never). Its status record counts lives by it (`status::replays_of`).
pub const HEADER_REPLAYS: &str = "x-replays";
/// A scheduled job: when it is due, in ms since the epoch. A consumer that receives it
/// earlier does not run it: it sends it through the delay tiers again (a hop).
pub const HEADER_NOT_BEFORE: &str = "x-not-before";
/// Per-job policy: the attempts this job gets (bounded by the consumer's ceiling).
pub const HEADER_MAX_ATTEMPTS: &str = "x-max-attempts";
/// Per-job policy: the job timeout in ms (bounded by the consumer's ceiling).
pub const HEADER_TIMEOUT_MS: &str = "x-timeout-ms";

/// Longest content type, id or header name that AMQP can carry (a short string). The
/// producer holds jobs on both backends to it, so a job means the same on either.
pub const MAX_SHORT_STRING_BYTES: usize = 255;
/// Longest id taken from the wire as it is; a longer one is replaced by a derived id.
pub const MAX_ID_BYTES: usize = 128;

/// Job metadata that cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{field} is {len} bytes long; at most {MAX_SHORT_STRING_BYTES} fit")]
    TooLong { field: String, len: usize },
}

/// True for an id that may be handed to handlers as it is (an environment variable, a
/// file name, a header, a log field): 1 to [`MAX_ID_BYTES`] ASCII letters, digits and
/// `-_.:`, and not `.` or `..`. UUIDs, our derived ids and most keys of other tools are.
pub fn is_safe_id(id: &str) -> bool {
    (1..=MAX_ID_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        && id != "."
        && id != ".."
}

/// A UUID-shaped id (version 8: "custom") from the first 16 bytes of the SHA-256 of
/// `parts`, each length-prefixed so that no two lists of parts collide by concatenation.
fn hashed_id(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// `UNIX_EPOCH + offset`, or `None` when the platform's clock cannot represent it (a
/// timestamp of `u64::MAX` seconds, say).
fn after_epoch(offset: Duration) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(offset)
}

/// Everything about a job except its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMeta {
    /// The job id: a UUID v7 for jobs that came through the ingress; for a message
    /// published by hand, its `message_id` (RabbitMQ) or `job-id` header or key (Kafka)
    /// when that is [safe](is_safe_id), else an id derived from the delivery that every
    /// redelivery of it gets again.
    pub id: String,
    /// The queue the job was posted to.
    pub queue: String,
    /// MIME type of the body, as the client sent it.
    pub content_type: Option<String>,
    /// When the ingress accepted the job.
    pub enqueued_at: Option<SystemTime>,
    /// 1-based attempt number, as the message carries it (`x-attempt`).
    pub attempt: u32,
    /// Further string headers (sorted by name).
    pub headers: BTreeMap<String, String>,
    /// Earlier deliveries of this very message that ended without an outcome: the
    /// consumer crashed, was killed or lost its broker connection while it held the job
    /// (RabbitMQ: the quorum queue's `x-delivery-count`, else 1 when the delivery is
    /// flagged `redelivered`; Kafka: the replay count the consumer group's committed
    /// offset metadata holds). Set by the job sources, never written to the wire: the
    /// broker (or the group's offsets) keeps it. The worker counts it toward the
    /// attempt limit.
    pub redeliveries: u32,
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
            redeliveries: 0,
        }
    }

    /// The attempt this delivery is: [`JobMeta::attempt`] plus the earlier deliveries
    /// of the message that ended without an outcome (each of them was an attempt that
    /// started and never finished).
    pub fn effective_attempt(&self) -> u32 {
        self.attempt.saturating_add(self.redeliveries)
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

    /// The properties a job is published with: persistent, `message_id` = job id. A
    /// field AMQP cannot carry (a short string over 255 bytes) is an error.
    pub fn properties(meta: &JobMeta) -> Result<BasicProperties, WireError> {
        let mut headers = FieldTable::default();
        headers.insert(
            short("header name", HEADER_ATTEMPT)?,
            AMQPValue::LongLongInt(i64::from(meta.attempt)),
        );
        for (name, value) in &meta.headers {
            headers.insert(
                short("header name", name)?,
                AMQPValue::LongString(LongString::from(value.as_bytes())),
            );
        }
        let mut props = BasicProperties::default()
            .with_message_id(short("the job id", &meta.id)?)
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers);
        if let Some(ct) = &meta.content_type {
            props = props.with_content_type(short("the content type", ct)?);
        }
        if let Some(at) = meta.enqueued_at {
            let secs = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
            props = props.with_timestamp(secs.as_secs());
        }
        Ok(props)
    }

    /// `value` as an AMQP short string, or why it is none.
    pub fn short(field: &str, value: &str) -> Result<ShortString, WireError> {
        ShortString::try_new(value).map_err(|_| WireError::TooLong {
            field: field.to_owned(),
            len: value.len(),
        })
    }

    /// Reads job metadata from a delivery's properties. Never fails: a missing or
    /// malformed field gets its default (attempt 1, no timestamp, an id derived from
    /// `body` and the properties).
    pub fn meta_from(queue: &str, props: &BasicProperties, body: &[u8]) -> JobMeta {
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
                .filter(|id| is_safe_id(id))
                .unwrap_or_else(|| derived_id(props, body)),
            queue: queue.to_owned(),
            content_type: props.content_type().as_ref().map(|c| c.to_string()),
            enqueued_at: props
                .timestamp()
                .and_then(|secs| after_epoch(Duration::from_secs(secs))),
            attempt,
            headers,
            redeliveries: 0,
        }
    }

    /// Header in which a quorum queue counts the earlier deliveries of a message that
    /// came back without an ack (RabbitMQ 3.8 to 4.2: every return, a `basic.nack` with
    /// requeue included; 4.3 and later: failed deliveries only, which a closed channel
    /// or connection is and jobgate's `basic.nack` is not).
    const DELIVERY_COUNT: &str = "x-delivery-count";
    /// Header in which RabbitMQ 4.3 and later count every acquisition of a message.
    const ACQUIRED_COUNT: &str = "x-acquired-count";
    /// Headers the broker changes between deliveries of one message: the derived id
    /// leaves them out.
    const BROKER_COUNTERS: [&str; 2] = [DELIVERY_COUNT, ACQUIRED_COUNT];

    /// How many earlier deliveries of a message ended without an outcome: the quorum
    /// queue's `x-delivery-count` when the message has one (a classic queue has none),
    /// else 1 for a delivery flagged `redelivered`, else 0. A junk count (negative, not
    /// a number) is taken as absent.
    pub fn earlier_deliveries(props: &BasicProperties, redelivered: bool) -> u32 {
        let counted = props
            .headers()
            .as_ref()
            .and_then(|table| table.inner().get(DELIVERY_COUNT))
            .and_then(as_count);
        counted.unwrap_or(u32::from(redelivered))
    }

    /// The id of a message that has no usable one: a hash of its body and properties
    /// (without the delivery count), so every redelivery of it gets the same id. Two
    /// messages alike in body and every property get the same id too: nothing tells
    /// them apart, and handlers are idempotent on the id anyway.
    fn derived_id(props: &BasicProperties, body: &[u8]) -> String {
        let mut stable = props.clone();
        if let Some(table) = props.headers() {
            let kept: BTreeMap<ShortString, AMQPValue> = table
                .inner()
                .iter()
                .filter(|(name, _)| !BROKER_COUNTERS.contains(&name.as_str()))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect();
            stable = stable.with_headers(FieldTable::from(kept));
        }
        let described = format!("{stable:?}");
        hashed_id(&[b"amqp", body, described.as_bytes()])
    }

    /// Any integer type (or a decimal string, as the management UI publishes headers)
    /// counts; zero or negative means "unknown".
    fn as_attempt(value: &AMQPValue) -> Option<u32> {
        as_count(value).filter(|n| *n >= 1)
    }

    /// A non-negative count of any integer type or as a decimal string; `None` for a
    /// negative one, one past `u32::MAX` or anything else.
    fn as_count(value: &AMQPValue) -> Option<u32> {
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
        u32::try_from(n).ok()
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
            let props = properties(&meta).unwrap();
            assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
            let back = meta_from("emails", &props, b"body");
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
            let meta = meta_from("q", &BasicProperties::default(), b"");
            assert_eq!(meta.attempt, 1);
            assert!(Uuid::parse_str(&meta.id).is_ok());
            assert_eq!(meta.content_type, None);
            assert_eq!(meta.queue, "q");
        }

        #[test]
        fn a_message_without_an_id_gets_the_same_id_on_every_delivery() {
            let mut table = FieldTable::default();
            table.insert("x-job-tenant".into(), AMQPValue::LongString("acme".into()));
            let props = BasicProperties::default().with_headers(table.clone());
            let first = meta_from("q", &props, b"body").id;
            // A quorum queue counts redeliveries in a header: the id stays.
            table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
            let again = meta_from("q", &props.clone().with_headers(table.clone()), b"body").id;
            assert_eq!(first, again);
            // RabbitMQ 4.3 adds a second counter.
            table.insert("x-acquired-count".into(), AMQPValue::LongLongInt(5));
            let later = meta_from("q", &props.clone().with_headers(table), b"body").id;
            assert_eq!(first, later);
            assert!(is_safe_id(&first), "{first}");
            assert_ne!(meta_from("q", &props, b"other body").id, first);
        }

        #[test]
        fn earlier_deliveries_are_the_delivery_count_else_the_redelivered_flag() {
            let with = |value: AMQPValue| {
                let mut table = FieldTable::default();
                table.insert("x-delivery-count".into(), value);
                BasicProperties::default().with_headers(table)
            };
            let none = BasicProperties::default();
            assert_eq!(earlier_deliveries(&none, false), 0);
            assert_eq!(earlier_deliveries(&none, true), 1, "a classic queue");
            // A quorum queue's first delivery carries 0 (RabbitMQ 3.10), later ones more.
            assert_eq!(
                earlier_deliveries(&with(AMQPValue::LongLongInt(0)), false),
                0
            );
            assert_eq!(
                earlier_deliveries(&with(AMQPValue::LongLongInt(4)), true),
                4
            );
            assert_eq!(earlier_deliveries(&with(AMQPValue::LongInt(2)), true), 2);
            // Junk counts are no counts.
            assert_eq!(
                earlier_deliveries(&with(AMQPValue::LongLongInt(-3)), true),
                1
            );
            assert_eq!(
                earlier_deliveries(&with(AMQPValue::LongLongInt(i64::MAX)), false),
                0
            );
            assert_eq!(earlier_deliveries(&with(AMQPValue::Boolean(true)), true), 1);
        }

        #[test]
        fn an_unsafe_message_id_is_replaced_by_a_derived_one() {
            for junk in ["../../etc/passwd", "a b", "x\n", "..", &"i".repeat(200)] {
                let props = BasicProperties::default().with_message_id(short("id", junk).unwrap());
                let meta = meta_from("q", &props, b"body");
                assert!(is_safe_id(&meta.id), "{junk:?} -> {:?}", meta.id);
                assert_eq!(meta.id, meta_from("q", &props, b"body").id);
            }
        }

        #[test]
        fn timestamps_past_what_a_clock_can_hold_are_no_timestamp() {
            let props = BasicProperties::default().with_timestamp(u64::MAX);
            assert_eq!(meta_from("q", &props, b"").enqueued_at, None);
            // Year 10000 is representable: it is kept (printing it is the tools' job).
            let props = BasicProperties::default().with_timestamp(253_402_300_800);
            assert!(meta_from("q", &props, b"").enqueued_at.is_some());
        }

        #[test]
        fn metadata_amqp_cannot_carry_is_an_error_not_a_panic() {
            let mut meta = JobMeta::new("q", Some(format!("text/{}", "x".repeat(295))));
            assert!(matches!(
                properties(&meta),
                Err(WireError::TooLong { len: 300, .. })
            ));
            meta.content_type = None;
            meta.id = "i".repeat(256);
            assert!(properties(&meta).is_err());
            meta.id = "ok".into();
            meta.headers.insert("h".repeat(256), "v".into());
            assert!(properties(&meta).is_err());
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
            let meta = meta_from("q", &props, b"");
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
            let meta = meta_from("q", &BasicProperties::default().with_headers(table), b"");
            assert_eq!(meta.attempt, 4);
        }
    }
}

/// Mapping to and from Kafka records.
pub mod kafka {
    use rdkafka::message::{
        BorrowedHeaders, BorrowedMessage, Header, Message, OwnedHeaders, OwnedMessage,
    };

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

    /// One record header as it is on the wire: Kafka header keys are bytes that other
    /// producers need not make UTF-8.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RawHeader<'a> {
        pub key: &'a [u8],
        pub value: Option<&'a [u8]>,
    }

    /// What the wire mapping reads from a Kafka record, borrowed from it.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Record<'a> {
        pub topic: &'a str,
        pub partition: i32,
        pub offset: i64,
        pub key: Option<&'a [u8]>,
        pub headers: Vec<RawHeader<'a>>,
        pub timestamp_millis: Option<i64>,
    }

    impl<'a> Record<'a> {
        /// A record as a consumer received it.
        pub fn of(message: &'a BorrowedMessage<'_>) -> Self {
            Self::read(message, message.headers())
        }

        /// A record detached from its consumer.
        pub fn of_owned(message: &'a OwnedMessage) -> Self {
            Self::read(message, message.headers().map(OwnedHeaders::as_borrowed))
        }

        fn read(message: &'a impl Message, headers: Option<&'a BorrowedHeaders>) -> Self {
            Self {
                topic: message.topic(),
                partition: message.partition(),
                offset: message.offset(),
                key: message.key(),
                headers: headers.map(raw::headers).unwrap_or_default(),
                timestamp_millis: message.timestamp().to_millis(),
            }
        }

        /// The value of the first header named `name`, if it has one.
        pub fn header(&self, name: &str) -> Option<&'a [u8]> {
            self.headers
                .iter()
                .find(|h| h.key == name.as_bytes())
                .and_then(|h| h.value)
        }
    }

    /// Reading header keys without rdkafka's accessor, which turns each key into a
    /// `&str` with an `unwrap`: a record whose key is not UTF-8 would panic the reader.
    #[allow(unsafe_code)]
    mod raw {
        use std::ffi::CStr;
        use std::os::raw::{c_char, c_void};

        use rdkafka::bindings::{rd_kafka_header_cnt, rd_kafka_header_get_all, rd_kafka_headers_t};
        use rdkafka::message::BorrowedHeaders;
        use rdkafka::types::RDKafkaRespErr;

        use super::RawHeader;

        /// Every header of `headers`, in order, keys as the bytes they are.
        pub fn headers(headers: &BorrowedHeaders) -> Vec<RawHeader<'_>> {
            // rdkafka hands out a librdkafka header list as a reference to the
            // zero-sized `BorrowedHeaders`: the reference IS the list's address (its own
            // accessors cast it back the same way).
            let list = std::ptr::from_ref(headers).cast::<rd_kafka_headers_t>();
            // SAFETY: `list` is a live header list for as long as `headers` is borrowed.
            let count = unsafe { rd_kafka_header_cnt(list) };
            let mut out = Vec::with_capacity(count);
            for idx in 0..count {
                let mut name: *const c_char = std::ptr::null();
                let mut value: *const c_void = std::ptr::null();
                let mut size = 0_usize;
                // SAFETY: as above; librdkafka fills the three out-pointers for an index
                // below the count and leaves them alone otherwise.
                let err =
                    unsafe { rd_kafka_header_get_all(list, idx, &mut name, &mut value, &mut size) };
                if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                    continue;
                }
                // SAFETY: librdkafka keeps each name NUL-terminated and each value
                // `size` bytes long (or null: a header without a value) inside the list,
                // which outlives the borrow of `headers` that the slices are tied to.
                let (key, value) = unsafe {
                    (
                        CStr::from_ptr(name).to_bytes(),
                        (!value.is_null())
                            .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
                    )
                };
                out.push(RawHeader { key, value });
            }
            out
        }

        #[cfg(test)]
        mod tests {
            use rdkafka::bindings::rd_kafka_header_add;
            use rdkafka::message::{Headers, OwnedHeaders};

            use super::*;

            #[test]
            fn a_key_that_is_not_utf8_is_read_as_its_bytes() {
                let list = OwnedHeaders::new();
                let raw = std::ptr::from_ref(list.as_borrowed())
                    .cast::<rd_kafka_headers_t>()
                    .cast_mut();
                let key = b"\xff\xfe-key";
                // SAFETY: `raw` is the list `list` owns, unshared; librdkafka copies the
                // key and value (explicit lengths) before returning.
                let err = unsafe {
                    rd_kafka_header_add(
                        raw,
                        key.as_ptr().cast(),
                        key.len() as isize,
                        b"v".as_ptr().cast(),
                        1,
                    )
                };
                assert_eq!(err, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
                assert_eq!(
                    headers(list.as_borrowed()),
                    vec![RawHeader {
                        key: &key[..],
                        value: Some(&b"v"[..])
                    }]
                );
                // rdkafka's own accessor panics on this very list.
                let panicked = std::panic::catch_unwind(|| list.try_get(0).map(|h| h.key.len()));
                assert!(panicked.is_err());
            }
        }
    }

    /// Reads job metadata from a record of `queue` (for a retry tier's record, the job
    /// queue it returns to). Never fails: a record produced by another tool gets
    /// defaults (attempt 1; as id its `job-id` header, else its key, when
    /// [safe](is_safe_id), else `<topic>-<partition>-<offset>`, the same on every
    /// redelivery); header keys and values that are not UTF-8 are read with
    /// replacement characters.
    pub fn meta_from(queue: &str, record: &Record<'_>) -> JobMeta {
        let mut id = None;
        let mut content_type = None;
        let mut attempt = 1;
        let mut extra = BTreeMap::new();
        for header in &record.headers {
            let Some(value) = header.value else { continue };
            let text = String::from_utf8_lossy(value).into_owned();
            match header.key {
                k if k == HEADER_JOB_ID.as_bytes() => {
                    id = Some(text).filter(|t| is_safe_id(t));
                }
                k if k == HEADER_CONTENT_TYPE.as_bytes() => content_type = Some(text),
                k if k == HEADER_ATTEMPT.as_bytes() => {
                    attempt = text
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n >= 1)
                        .unwrap_or(1)
                }
                other => {
                    extra.insert(String::from_utf8_lossy(other).into_owned(), text);
                }
            }
        }
        let id = id
            .or_else(|| {
                record
                    .key
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .filter(|k| is_safe_id(k))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| derived_id(record));
        JobMeta {
            id,
            queue: queue.to_owned(),
            content_type,
            enqueued_at: record
                .timestamp_millis
                .and_then(|ms| u64::try_from(ms).ok())
                .and_then(|ms| after_epoch(Duration::from_millis(ms))),
            attempt,
            headers: extra,
            redeliveries: 0,
        }
    }

    /// The id of a record without a usable one: where it is, which never changes.
    /// Topic names are letters, digits, `.`, `_` and `-`, so the id is safe; a topic
    /// name too long for that gets a hash of it instead.
    fn derived_id(record: &Record<'_>) -> String {
        let id = format!("{}-{}-{}", record.topic, record.partition, record.offset);
        if is_safe_id(&id) {
            id
        } else {
            hashed_id(&[b"kafka", id.as_bytes()])
        }
    }

    #[cfg(test)]
    pub(crate) mod tests {
        use super::*;

        /// The raw headers of `headers`, read the way records are.
        pub(crate) fn raw(headers: &OwnedHeaders) -> Vec<RawHeader<'_>> {
            raw::headers(headers.as_borrowed())
        }

        fn record<'a>(headers: Vec<RawHeader<'a>>, key: Option<&'a [u8]>) -> Record<'a> {
            Record {
                topic: "t",
                partition: 2,
                offset: 41,
                key,
                headers,
                timestamp_millis: None,
            }
        }

        #[test]
        fn metadata_survives_a_round_trip() {
            let mut meta = JobMeta::new("emails", Some("text/csv".into()));
            meta.attempt = 2;
            meta.headers.insert("x-job-tenant".into(), "acme".into());
            let headers = headers(&meta);
            let mut rec = record(raw(&headers), None);
            rec.timestamp_millis = timestamp_millis(&meta);
            let back = meta_from("emails", &rec);
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
            let meta = meta_from("t", &record(vec![], Some(b"order-42")));
            assert_eq!(meta.id, "order-42");
            assert_eq!(meta.attempt, 1);
            let junk = vec![
                RawHeader {
                    key: HEADER_ATTEMPT.as_bytes(),
                    value: Some(b"-3"),
                },
                RawHeader {
                    key: b"bin",
                    value: Some(&[0xff, 0x00]),
                },
                RawHeader {
                    key: b"null",
                    value: None,
                },
                RawHeader {
                    key: &[0xff, 0xfe, b'k'],
                    value: Some(b"v"),
                },
            ];
            let mut rec = record(junk, Some(&[0xff, 0xfe]));
            rec.timestamp_millis = Some(-1);
            let meta = meta_from("t", &rec);
            assert_eq!(meta.attempt, 1);
            assert_eq!(meta.id, "t-2-41", "non-UTF-8 key: the record's position");
            assert_eq!(
                meta.headers.get("bin").map(String::as_str),
                Some("\u{fffd}\0")
            );
            assert_eq!(
                meta.headers.get("\u{fffd}\u{fffd}k").map(String::as_str),
                Some("v")
            );
            assert!(meta.enqueued_at.is_none());
        }

        #[test]
        fn unsafe_ids_and_keys_give_way_to_the_records_position() {
            let headers = vec![RawHeader {
                key: HEADER_JOB_ID.as_bytes(),
                value: Some(b"../../etc/passwd"),
            }];
            let meta = meta_from("t", &record(headers, Some(b"a b")));
            assert_eq!(meta.id, "t-2-41");
        }

        #[test]
        fn the_raw_reader_sees_every_header_of_a_list() {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "a",
                    value: Some(&b"1"[..]),
                })
                .insert(Header::<&[u8]> {
                    key: "b",
                    value: None,
                });
            assert_eq!(
                raw(&headers),
                vec![
                    RawHeader {
                        key: b"a",
                        value: Some(b"1")
                    },
                    RawHeader {
                        key: b"b",
                        value: None
                    },
                ]
            );
        }
    }
}

/// Both wire decoders are total: arbitrary properties, headers and timestamps give a job
/// (with a safe id and an attempt of at least 1), never a panic.
#[cfg(test)]
mod decoders_never_panic {
    use lapin::types::{
        AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    };
    use lapin::BasicProperties;
    use proptest::prelude::*;

    use super::*;

    fn short_string() -> impl Strategy<Value = ShortString> {
        prop_oneof![
            any::<String>(),
            "[\\x00-\\x7f]{0,255}",
            Just("x-attempt".to_owned()),
            Just("x-delivery-count".to_owned()),
            Just("x-acquired-count".to_owned()),
        ]
        .prop_map(|s| {
            let cut = (0..=s.len().min(255))
                .rev()
                .find(|i| s.is_char_boundary(*i))
                .unwrap_or(0);
            ShortString::try_new(&s[..cut]).expect("cut to 255 bytes")
        })
    }

    fn amqp_value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<f64>().prop_map(AMQPValue::Double),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
            short_string().prop_map(AMQPValue::ShortString),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            "[0-9-]{0,30}".prop_map(|s| AMQPValue::LongString(s.into())),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            proptest::collection::vec(any::<u8>(), 0..16)
                .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                proptest::collection::vec((short_string(), inner), 0..4).prop_map(|kv| {
                    let mut table = FieldTable::default();
                    for (k, v) in kv {
                        table.insert(k, v);
                    }
                    AMQPValue::FieldTable(table)
                }),
            ]
        })
    }

    fn properties() -> impl Strategy<Value = BasicProperties> {
        (
            proptest::option::of(short_string()),
            proptest::option::of(short_string()),
            proptest::option::of(prop_oneof![
                any::<u64>(),
                Just(u64::MAX),
                Just(253_402_300_800)
            ]),
            proptest::collection::vec((short_string(), amqp_value()), 0..6),
            any::<u8>(),
        )
            .prop_map(|(id, ct, ts, headers, priority)| {
                let mut props = BasicProperties::default().with_priority(priority);
                if let Some(id) = id {
                    props = props.with_message_id(id);
                }
                if let Some(ct) = ct {
                    props = props.with_content_type(ct);
                }
                if let Some(ts) = ts {
                    props = props.with_timestamp(ts);
                }
                let mut table = FieldTable::default();
                for (k, v) in headers {
                    table.insert(k, v);
                }
                props.with_headers(table)
            })
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn header_key() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            bytes(24),
            Just(kafka::HEADER_JOB_ID.as_bytes().to_vec()),
            Just(kafka::HEADER_CONTENT_TYPE.as_bytes().to_vec()),
            Just(HEADER_ATTEMPT.as_bytes().to_vec()),
        ]
    }

    fn assert_usable(meta: &JobMeta) {
        assert!(is_safe_id(&meta.id), "unsafe id {:?}", meta.id);
        assert!(meta.attempt >= 1);
    }

    proptest! {
        #[test]
        fn amqp_properties_of_any_shape_become_a_job(props in properties(), body in bytes(32)) {
            let meta = amqp::meta_from("q", &props, &body);
            assert_usable(&meta);
            let _ = amqp::earlier_deliveries(&props, true);
            prop_assert_eq!(&meta.id, &amqp::meta_from("q", &props, &body).id);
            // And what was read can be written back (a retry or dead-letter copy).
            prop_assert!(amqp::properties(&meta).is_ok());
        }

        #[test]
        fn kafka_records_of_any_shape_become_a_job(
            headers in proptest::collection::vec((header_key(), proptest::option::of(bytes(32))), 0..8),
            key in proptest::option::of(bytes(24)),
            timestamp in proptest::option::of(prop_oneof![any::<i64>(), Just(i64::MAX), Just(i64::MIN)]),
            partition in any::<i32>(),
            offset in any::<i64>(),
        ) {
            let record = kafka::Record {
                topic: "t",
                partition,
                offset,
                key: key.as_deref(),
                headers: headers
                    .iter()
                    .map(|(k, v)| kafka::RawHeader { key: k, value: v.as_deref() })
                    .collect(),
                timestamp_millis: timestamp,
            };
            let meta = kafka::meta_from("q", &record);
            assert_usable(&meta);
            // The headers a retry copy is produced with.
            let _ = kafka::headers(&meta);
            let _ = kafka::timestamp_millis(&meta);
        }
    }
}
