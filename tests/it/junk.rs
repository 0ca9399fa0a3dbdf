//! Junk never stops the fleet (issues 12 and 13): messages put on a queue by hand with
//! extreme, malformed or oversized metadata become jobs (missing or unreadable fields
//! get defaults) or dead letters with a reason, and the consumer keeps going; the DLQ
//! tools print such jobs escaped; a request whose metadata cannot travel is a 400.
//!
//! The hand-made messages are published here, with clients of the test's own, the way
//! another tool would: jobgate's own publisher would refuse most of them.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::helpers::{
    assert_problem, brokers_shared, unique, wait_until, Backend, Consumer, Producer, AMQP_URL,
    KAFKA_BROKERS,
};

/// Long enough for a consumer to take a few dozen jobs, short of a hang.
const LIMIT: Duration = Duration::from_secs(60);

/// One hand-made message: body and what the broker carries beside it.
mod hand_made {
    use super::*;

    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
    use lapin::BasicProperties;

    /// The AMQP properties of the junk messages `rabbitmq` publishes, one per message.
    /// Every one of them is accepted by RabbitMQ.
    pub fn amqp_junk() -> Vec<BasicProperties> {
        let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
        let headers = |pairs: Vec<(&str, AMQPValue)>| {
            let mut table = FieldTable::default();
            for (name, value) in pairs {
                table.insert(ShortString::try_new(name).expect("short name"), value);
            }
            table
        };
        let mut nested = FieldTable::default();
        nested.insert("deep".into(), AMQPValue::Timestamp(u64::MAX));
        vec![
            // The end of time, and the first second of year 10000.
            BasicProperties::default().with_timestamp(u64::MAX),
            BasicProperties::default().with_timestamp(253_402_300_800),
            // An id that is not safe to hand to a command or a file name.
            BasicProperties::default().with_message_id("../../etc/passwd \n\u{7}x".into()),
            // The longest content type and id AMQP can carry, with control characters.
            BasicProperties::default()
                .with_content_type(ShortString::try_new("\u{1b}[31m".repeat(51)).unwrap())
                .with_message_id(ShortString::try_new("i".repeat(255)).unwrap()),
            BasicProperties::default().with_headers(headers(vec![
                ("x-attempt", AMQPValue::LongLongInt(i64::MIN)),
                ("x-due-at", AMQPValue::LongLongInt(i64::MAX)),
                ("x-error", long("\u{1b}]0;pwned\u{7}\r\n")),
            ])),
            BasicProperties::default().with_headers(headers(vec![
                ("x-attempt", AMQPValue::LongUInt(u32::MAX)),
                ("traceparent", long("00-zz-zz-zz")),
                ("tracestate", long(&"=".repeat(10_000))),
            ])),
            BasicProperties::default().with_headers(headers(vec![
                ("x-attempt", AMQPValue::Double(1e300)),
                // Properties travel in one frame (128 KiB by default): big, but not more.
                (&"h".repeat(255), long(&"v".repeat(100_000))),
                ("when", AMQPValue::Timestamp(u64::MAX)),
                ("nested", AMQPValue::FieldTable(nested)),
                (
                    "array",
                    AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
                ),
                ("bytes", AMQPValue::ByteArray(vec![0xff, 0x00].into())),
            ])),
            BasicProperties::default()
                .with_priority(255)
                .with_headers(headers(vec![(
                    "x-attempt",
                    long("99999999999999999999999"),
                )])),
        ]
    }

    /// Publishes `messages` (body, properties) to `queue` on RabbitMQ, confirmed.
    pub async fn rabbitmq(queue: &str, messages: Vec<(Vec<u8>, BasicProperties)>) {
        let conn = tokio::time::timeout(
            Duration::from_secs(30),
            lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()),
        )
        .await
        .expect("connect in time")
        .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for (body, props) in messages {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    ShortString::try_new(queue).unwrap(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack(), "RabbitMQ took the junk message");
        }
        let _ = conn.close(200, "bye".into()).await;
    }

    /// A Kafka record as another tool may produce it. Header keys are bytes: Kafka does
    /// not require them to be UTF-8 (the protocol says so, clients do not check).
    #[derive(Debug, Clone, Default)]
    pub struct KafkaJunk {
        pub key: Option<Vec<u8>>,
        pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        pub timestamp_ms: Option<i64>,
    }

    /// The junk records `kafka` produces, one per record.
    pub fn kafka_junk() -> Vec<KafkaJunk> {
        let h = |k: &[u8], v: Option<&[u8]>| (k.to_vec(), v.map(<[u8]>::to_vec));
        vec![
            KafkaJunk {
                headers: vec![h(b"\xff\xfe-key", Some(b"v")), h(b"ok", Some(b"v"))],
                ..KafkaJunk::default()
            },
            KafkaJunk {
                key: Some(b"../../etc/passwd \n\x07".to_vec()),
                headers: vec![
                    h(b"job-id", Some(b"\x1b[31m id with\r\ncontrol")),
                    h(b"x-attempt", Some(b"-99999999999999999999")),
                    h(b"content-type", Some(&[b'c'; 100_000])),
                ],
                ..KafkaJunk::default()
            },
            KafkaJunk {
                key: Some(vec![0xff, 0x00]),
                headers: vec![
                    h(b"", None),
                    h(b"x-attempt", Some(b"4294967295")),
                    h(b"x-error", Some(b"\x1b]0;pwned\x07")),
                    h(b"traceparent", Some(b"00-zz-zz-zz")),
                    h(b"big", Some(&vec![b'v'; 512 * 1024])),
                ],
                ..KafkaJunk::default()
            },
            // The first millisecond after the epoch (Kafka refuses timestamps far in the
            // future: the decoder's property test covers those).
            KafkaJunk {
                timestamp_ms: Some(1),
                ..KafkaJunk::default()
            },
        ]
    }

    /// Produces `records` (body, junk) to topic `queue`, each acknowledged.
    pub async fn kafka(queue: &str, records: Vec<(Vec<u8>, KafkaJunk)>) {
        use rdkafka::message::OwnedHeaders;
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", KAFKA_BROKERS)
            .create()
            .unwrap();
        for (body, junk) in records {
            let mut headers = OwnedHeaders::new_with_capacity(junk.headers.len());
            for (key, value) in &junk.headers {
                headers = add_raw_header(headers, key, value.as_deref());
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(queue).payload(&body[..]).headers(headers);
            if let Some(key) = &junk.key {
                record = record.key(&key[..]);
            }
            if let Some(ms) = junk.timestamp_ms {
                record = record.timestamp(ms);
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap_or_else(|(e, _)| panic!("Kafka took the junk record {junk:?}: {e}"));
        }
    }

    /// Adds a header whose key may be any bytes. rdkafka's safe `insert` takes the key
    /// as `&str`, so a key that is not UTF-8 goes through librdkafka's own call.
    #[allow(unsafe_code)]
    fn add_raw_header(
        headers: rdkafka::message::OwnedHeaders,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> rdkafka::message::OwnedHeaders {
        use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_headers_t};
        // `OwnedHeaders` owns an `rd_kafka_headers_t`; `as_borrowed` is that pointer
        // under another type (rdkafka's own accessors cast it back the same way).
        let raw = headers.as_borrowed() as *const _ as *mut rd_kafka_headers_t;
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr().cast(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `raw` is the live list `headers` owns and nothing else reads it
        // meanwhile; librdkafka copies the key and value (with their explicit lengths)
        // before returning.
        let err = unsafe {
            rd_kafka_header_add(
                raw,
                key.as_ptr().cast(),
                key.len() as isize,
                value_ptr,
                value_len,
            )
        };
        assert_eq!(err as i32, 0, "rd_kafka_header_add failed");
        headers
    }
}

/// True for an id that is safe in a file name, an environment variable and a log line:
/// 1 to 128 ASCII letters, digits, `-`, `_`, `.`, `:`, and not `.` or `..`.
fn is_safe_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        && id != "."
        && id != ".."
}

/// Asserts that `consumer` is still alive and subscribed: it never logged its source
/// dying or itself stopping.
fn assert_still_running(consumer: &Consumer) {
    for fatal in [
        "job source task failed",
        "job source ended",
        "consumer stopped",
    ] {
        assert!(
            consumer.process.lines(fatal).is_empty(),
            "the consumer logged {fatal:?}:\n{}",
            consumer.process.dump()
        );
    }
}

/// Puts the backend's junk on `queue` by hand; returns how many messages that was.
async fn publish_all_junk(backend: Backend, queue: &str) -> usize {
    match backend {
        Backend::Rabbitmq => {
            let junk = hand_made::amqp_junk();
            let n = junk.len();
            let messages = junk
                .into_iter()
                .enumerate()
                .map(|(i, props)| (format!("junk {i}").into_bytes(), props))
                .collect();
            hand_made::rabbitmq(queue, messages).await;
            n
        }
        Backend::Kafka => {
            let junk = hand_made::kafka_junk();
            let n = junk.len();
            let records = junk
                .into_iter()
                .enumerate()
                .map(|(i, j)| (format!("junk {i}").into_bytes(), j))
                .collect();
            hand_made::kafka(queue, records).await;
            n
        }
    }
}

pub async fn junk_and_extreme_messages_among_normal_jobs_never_stop_a_consumer(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("junkmix");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let consumer = Consumer::start(backend, &queue, &[]).await;
    let mut normal = producer.post_many(&queue, 3).await;
    let junk = publish_all_junk(backend, &queue).await;
    normal.extend(producer.post_many(&queue, 3).await);

    wait_until(LIMIT, "every normal job to be processed", || {
        let seen: BTreeSet<String> = consumer.processed().into_iter().collect();
        std::future::ready(
            normal.iter().all(|id| seen.contains(id)) || {
                !consumer.process.lines("consumer stopped").is_empty()
            },
        )
    })
    .await;
    assert_still_running(&consumer);
    let normal_ids: BTreeSet<&String> = normal.iter().collect();
    let dead = crate::helpers::dlq::list(backend, &queue).await;
    wait_until(LIMIT, "every junk message to be processed", || {
        let junk_done = consumer
            .processed()
            .iter()
            .filter(|id| !normal_ids.contains(id))
            .count();
        std::future::ready(junk_done + dead.len() >= junk)
    })
    .await;
    // A junk message is a job (with defaults) or a dead letter with a reason.
    for line in &dead {
        assert!(
            line["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{line}"
        );
    }
    for line in consumer.process.lines("job processed") {
        let id = line["job_id"].as_str().unwrap_or_default();
        assert!(
            is_safe_id(id),
            "unsafe job id handed to the handler: {id:?}"
        );
        assert!(line["attempt"].as_u64().is_some_and(|a| a >= 1), "{line}");
    }
    assert_still_running(&consumer);
}

pub async fn a_content_type_longer_than_an_amqp_short_string_is_a_400_problem(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("longct");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let response = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("content-type", format!("text/{}", "x".repeat(295)))
        .body("body")
        .send()
        .await
        .expect("the producer answers instead of dropping the connection");
    assert_problem(response, 400, "bad-metadata").await;
    // The longest content type that fits still goes through, and the producer lives.
    let response = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("content-type", format!("text/{}", "x".repeat(250)))
        .body("body")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

pub async fn dlq_tools_print_extreme_dead_jobs_escaped(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("junkdlq");
    let _cleanup = backend.cleanup(&[&queue]);
    // The producer declares `Q` and `Q.dlq` (RabbitMQ) or creates the topics (Kafka).
    let _producer = Producer::start(backend, &[&queue], &[]).await;
    let dlq = format!("{queue}.dlq");
    let junk = publish_all_junk(backend, &dlq).await;
    let listed = crate::helpers::dlq::list(backend, &queue).await;
    assert_eq!(listed.len(), junk, "{listed:?}");
    let table = crate::helpers::dlq::run(backend, &["list", "--queue", &queue]).await;
    assert!(
        !table.chars().any(|c| c.is_control() && c != '\n'),
        "control characters reach the terminal: {table:?}"
    );
    for line in &listed {
        if let Some(at) = line["enqueued_at"].as_str() {
            assert!(at.ends_with('Z'), "{line}");
        }
    }
}

pub async fn junk_that_fails_is_dead_lettered_with_a_reason_and_the_consumer_goes_on(
    backend: Backend,
) {
    let _brokers = brokers_shared().await;
    let queue = unique("junkdead");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    // Every job fails: its retry copy (junk metadata and all) goes through a tier, then
    // its dead-letter copy to `Q.dlq`.
    let env = [
        ("JOBGATE_HANDLER", "exec".to_owned()),
        ("JOBGATE_EXEC_COMMAND", "false".to_owned()),
        ("JOBGATE_MAX_ATTEMPTS", "2".to_owned()),
    ];
    let consumer = Consumer::start(backend, &queue, &env).await;
    let normal = producer.post_many(&queue, 2).await;
    let junk = publish_all_junk(backend, &queue).await;
    let expected = normal.len() + junk;
    let start = std::time::Instant::now();
    let dead = loop {
        let dead = crate::helpers::dlq::list(backend, &queue).await;
        if dead.len() >= expected {
            break dead;
        }
        assert!(
            start.elapsed() < LIMIT * 2,
            "{} of {expected} jobs dead-lettered in time: {dead:?}\n{}",
            dead.len(),
            consumer.process.dump()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(dead.len(), expected, "{dead:?}");
    let ids: BTreeSet<&str> = dead.iter().filter_map(|d| d["job_id"].as_str()).collect();
    assert_eq!(
        ids.len(),
        expected,
        "one dead letter per job, each its own id: {dead:?}"
    );
    for id in &normal {
        assert!(ids.contains(id.as_str()), "{id} missing from {dead:?}");
    }
    for line in &dead {
        let id = line["job_id"].as_str().unwrap_or_default();
        assert!(is_safe_id(id), "unsafe job id {id:?}");
        assert!(
            line["reason"].as_str().is_some_and(|r| r.contains("exit")),
            "{line}"
        );
    }
    assert_still_running(&consumer);
}

on_both_backends!(
    junk_and_extreme_messages_among_normal_jobs_never_stop_a_consumer,
    junk_that_fails_is_dead_lettered_with_a_reason_and_the_consumer_goes_on,
    a_content_type_longer_than_an_amqp_short_string_is_a_400_problem,
    dlq_tools_print_extreme_dead_jobs_escaped,
);

#[tokio::test]
async fn a_rabbitmq_timestamp_of_u64_max_does_not_stop_the_consumer() {
    let backend = Backend::Rabbitmq;
    let _brokers = brokers_shared().await;
    let queue = unique("tsmax");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let consumer = Consumer::start(backend, &queue, &[]).await;
    let props = lapin::BasicProperties::default().with_timestamp(u64::MAX);
    hand_made::rabbitmq(&queue, vec![(b"the end of time".to_vec(), props)]).await;
    assert_junk_and_the_job_behind_it_processed(&producer, &consumer, &queue, b"the end of time")
        .await;
}

#[tokio::test]
async fn a_kafka_header_key_that_is_not_utf8_does_not_stop_the_consumer() {
    let backend = Backend::Kafka;
    let _brokers = brokers_shared().await;
    let queue = unique("badkey");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let consumer = Consumer::start(backend, &queue, &[]).await;
    let junk = hand_made::KafkaJunk {
        headers: vec![
            (b"\xff\xfe".to_vec(), Some(b"v".to_vec())),
            (b"x-job-tenant".to_vec(), Some(b"acme".to_vec())),
        ],
        ..Default::default()
    };
    hand_made::kafka(&queue, vec![(b"bad header key".to_vec(), junk)]).await;
    assert_junk_and_the_job_behind_it_processed(&producer, &consumer, &queue, b"bad header key")
        .await;
}

/// Posts a normal job behind the junk already on `queue` and waits until the consumer
/// processed it (or stopped); then the consumer must still run and have processed the
/// junk too (found by its body's length).
async fn assert_junk_and_the_job_behind_it_processed(
    producer: &Producer,
    consumer: &Consumer,
    queue: &str,
    junk_body: &[u8],
) {
    let id = producer.post_ok(queue, "a normal job behind it").await;
    wait_until(LIMIT, "the normal job behind it to be processed", || {
        std::future::ready(
            consumer.processed().contains(&id)
                || !consumer.process.lines("consumer stopped").is_empty(),
        )
    })
    .await;
    assert_still_running(consumer);
    let junk_line = consumer
        .process
        .lines("job processed")
        .into_iter()
        .find(|l| l["bytes"] == junk_body.len());
    assert!(junk_line.is_some(), "{}", consumer.process.dump());
}

/// Runs the `consumer` binary with `env` (and the backend's) until it exits, at most
/// `limit`; returns its exit code and stderr.
async fn consumer_exit(backend: Backend, env: &[(&str, &str)], limit: Duration) -> (i32, String) {
    // target/<profile>/deps/it-<hash> -> target/<profile>/consumer
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("consumer");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("JOBGATE_RETRY_MAX_MS", "2000")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in backend.env() {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .expect("the consumer exits by itself")
        .expect("run the consumer");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[tokio::test]
async fn a_consumer_whose_job_source_dies_exits_non_zero() {
    let backend = Backend::Kafka;
    let _brokers = brokers_shared().await;
    let queue = unique("srcdies");
    let _cleanup = backend.cleanup(&[&queue]);
    // With an empty consumer group librdkafka refuses the subscription: the Kafka source
    // gives up and ends, the way any source that dies outside a shutdown does.
    let (code, stderr) = consumer_exit(
        backend,
        &[("JOBGATE_QUEUE", &queue), ("JOBGATE_KAFKA_GROUP", "")],
        LIMIT,
    )
    .await;
    assert_ne!(
        code, 0,
        "a consumer that stopped consuming passed for a clean exit:\n{stderr}"
    );
    assert!(stderr.contains("job source"), "{stderr}");
}
