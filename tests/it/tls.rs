//! jobgate through the brokers' TLS listeners, as managed brokers require them.
//!
//! `scripts/brokers.sh` opens them on loopback with the test CA of `scripts/lib/tls.sh`
//! (in `<state dir>/tls`): RabbitMQ's AMQPS on 5671 (PLAIN logins, or EXTERNAL with the
//! client certificate, CN `jobgate-client`), Kafka's SASL_SSL on 9094 (PLAIN,
//! SCRAM-SHA-256, SCRAM-SHA-512; user `jobgate`) and Kafka's SSL on 9095, which requires
//! a client certificate. Both binaries carry jobs end to end through each; a wrong
//! password, an untrusted broker certificate or a missing client certificate leave the
//! producer unready with the reason in its log and a 503 problem for clients; settings
//! that do not fit together stop the binaries at start, naming the setting.

use std::path::PathBuf;
use std::time::Duration;

use crate::helpers::{
    assert_processed_exactly_once, brokers_shared, dlq, rabbit, refused_with, state_dir, unique,
    unready_producer, wait_until, Backend, Consumer, Process, Producer,
};

/// The listeners and login of `scripts/brokers.sh` (same values there).
const AMQPS_URL: &str = "amqps://guest:guest@127.0.0.1:5671/%2f";
const AMQPS_EXTERNAL_URL: &str = "amqps://127.0.0.1:5671/%2f?auth_mechanism=external";
const KAFKA_SASL_SSL: &str = "127.0.0.1:9094";
const KAFKA_SSL: &str = "127.0.0.1:9095";
const KAFKA_USER: &str = "jobgate";
const KAFKA_PASSWORD: &str = "jobgate-test-secret";

const PROCESS_LIMIT: Duration = Duration::from_secs(60);

/// A file of the test PKI: `ca.pem`, `client.pem`, `client.key`.
fn pki(name: &str) -> String {
    let path: PathBuf = state_dir().join("tls").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/brokers.sh up",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

fn settings(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// RabbitMQ over AMQPS, the test CA trusted, logging in as guest.
fn amqps() -> Vec<(&'static str, String)> {
    settings(&[
        ("JOBGATE_AMQP_URL", AMQPS_URL),
        ("JOBGATE_AMQP_CA_FILE", &pki("ca.pem")),
    ])
}

/// Kafka's SASL_SSL listener with `mechanism`, the test CA trusted.
fn kafka_sasl(mechanism: &str, password: &str) -> Vec<(&'static str, String)> {
    settings(&[
        ("JOBGATE_KAFKA_BROKERS", KAFKA_SASL_SSL),
        ("JOBGATE_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("JOBGATE_KAFKA_SASL_MECHANISM", mechanism),
        ("JOBGATE_KAFKA_SASL_USERNAME", KAFKA_USER),
        ("JOBGATE_KAFKA_SASL_PASSWORD", password),
        ("JOBGATE_KAFKA_SSL_CA_FILE", &pki("ca.pem")),
    ])
}

/// Kafka's SSL listener (client certificate required), the test CA trusted.
fn kafka_mtls(with_certificate: bool) -> Vec<(&'static str, String)> {
    let mut env = settings(&[
        ("JOBGATE_KAFKA_BROKERS", KAFKA_SSL),
        ("JOBGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
        ("JOBGATE_KAFKA_SSL_CA_FILE", &pki("ca.pem")),
    ]);
    if with_certificate {
        env.extend(settings(&[
            ("JOBGATE_KAFKA_SSL_CERT_FILE", &pki("client.pem")),
            ("JOBGATE_KAFKA_SSL_KEY_FILE", &pki("client.key")),
        ]));
    }
    env
}

/// Posts `n` jobs through `env`, drains them with a consumer through the same `env`, and
/// checks each was processed exactly once.
async fn carries_jobs(backend: Backend, env: &[(&'static str, String)], n: usize) {
    let queue = unique("tls");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], env).await;
    let ids = producer.post_many(&queue, n).await;
    let consumer = Consumer::start(backend, &queue, env).await;
    assert_processed_exactly_once(&[&consumer], &ids, PROCESS_LIMIT).await;
}

#[tokio::test]
async fn rabbitmq_over_tls_carries_jobs_end_to_end() {
    let _brokers = brokers_shared().await;
    carries_jobs(Backend::Rabbitmq, &amqps(), 20).await;
}

#[tokio::test]
async fn a_rabbitmq_client_certificate_is_the_login_with_external_and_needed_for_it() {
    let _brokers = brokers_shared().await;
    let queue = unique("tls-external");
    let _cleanup = Backend::Rabbitmq.cleanup(&[&queue]);
    let url = ("JOBGATE_AMQP_URL", AMQPS_EXTERNAL_URL.to_owned());
    let ca = ("JOBGATE_AMQP_CA_FILE", pki("ca.pem"));
    let with_certificate = vec![
        url.clone(),
        ca.clone(),
        ("JOBGATE_AMQP_CERT_FILE", pki("client.pem")),
        ("JOBGATE_AMQP_KEY_FILE", pki("client.key")),
    ];
    let producer = Producer::start(Backend::Rabbitmq, &[&queue], &with_certificate).await;
    producer.post_ok(&queue, "{}").await;
    assert_eq!(rabbit::ready_count(&queue).await, 1);
    drop(producer);

    // The same URL without the certificate: RabbitMQ refuses the EXTERNAL login.
    let (process, base) = unready_producer(Backend::Rabbitmq, &queue, &[url, ca]).await;
    refused_with(
        &process,
        &base,
        &queue,
        "Login was refused using authentication mechanism EXTERNAL",
    )
    .await;
}

#[tokio::test]
async fn a_rabbitmq_certificate_no_trusted_ca_signed_is_refused() {
    let _brokers = brokers_shared().await;
    let queue = unique("tls-untrusted");
    // amqps:// without JOBGATE_AMQP_CA_FILE: only the system's CAs, which did not sign
    // the test broker's certificate.
    let env = settings(&[("JOBGATE_AMQP_URL", AMQPS_URL)]);
    let (process, base) = unready_producer(Backend::Rabbitmq, &queue, &env).await;
    refused_with(&process, &base, &queue, "UnknownIssuer").await;
}

#[tokio::test]
async fn kafka_sasl_ssl_with_scram_sha_512_carries_jobs_end_to_end_and_the_dlq_tool_reads() {
    let _brokers = brokers_shared().await;
    let env = kafka_sasl("SCRAM-SHA-512", KAFKA_PASSWORD);
    carries_jobs(Backend::Kafka, &env, 20).await;

    // The DLQ tool's own Kafka consumer logs in the same way.
    let queue = unique("tls-dlq");
    let _cleanup = Backend::Kafka.cleanup(&[&queue]);
    let producer = Producer::start(Backend::Kafka, &[&queue], &env).await;
    drop(producer);
    let listed = dlq::run_with(Backend::Kafka, &env, &["list", "--queue", &queue, "--json"]).await;
    assert_eq!(
        listed.trim(),
        "",
        "an empty dead-letter topic lists nothing"
    );
}

#[tokio::test]
async fn kafka_sasl_ssl_takes_plain_and_scram_sha_256_logins() {
    let _brokers = brokers_shared().await;
    for mechanism in ["PLAIN", "SCRAM-SHA-256"] {
        let queue = unique("tls-sasl");
        let _cleanup = Backend::Kafka.cleanup(&[&queue]);
        let producer = Producer::start(
            Backend::Kafka,
            &[&queue],
            &kafka_sasl(mechanism, KAFKA_PASSWORD),
        )
        .await;
        // A 202 is the broker's acks=all confirm, through the SASL_SSL listener.
        producer.post_ok(&queue, "{}").await;
        assert_eq!(Backend::Kafka.pending(&queue).await, 1, "{mechanism}");
    }
}

#[tokio::test]
async fn a_wrong_kafka_password_leaves_the_producer_unready_saying_why() {
    let _brokers = brokers_shared().await;
    let queue = unique("tls-password");
    let env = kafka_sasl("SCRAM-SHA-256", "not-the-password");
    let (process, base) = unready_producer(Backend::Kafka, &queue, &env).await;
    refused_with(&process, &base, &queue, "invalid credentials").await;
}

#[tokio::test]
async fn kafka_mutual_tls_carries_jobs_end_to_end_and_needs_the_certificate() {
    let _brokers = brokers_shared().await;
    carries_jobs(Backend::Kafka, &kafka_mtls(true), 20).await;

    let queue = unique("tls-nocert");
    let (process, base) = unready_producer(Backend::Kafka, &queue, &kafka_mtls(false)).await;
    refused_with(&process, &base, &queue, "bad certificate").await;
}

/// Settings that do not fit together are refused before anything connects: exit 1, and
/// the error names the setting. No broker is involved.
#[tokio::test]
async fn settings_that_do_not_fit_stop_both_binaries_at_start() {
    for (binary, backend, env, wants) in [
        (
            "producer",
            "rabbitmq",
            settings(&[
                ("JOBGATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                ("JOBGATE_AMQP_CA_FILE", &pki("ca.pem")),
            ]),
            "JOBGATE_AMQP_CA_FILE is set but JOBGATE_AMQP_URL",
        ),
        (
            "consumer",
            "rabbitmq",
            settings(&[
                ("JOBGATE_AMQP_URL", AMQPS_URL),
                ("JOBGATE_AMQP_CERT_FILE", &pki("client.pem")),
            ]),
            "JOBGATE_AMQP_CERT_FILE is set without JOBGATE_AMQP_KEY_FILE",
        ),
        (
            "consumer",
            "kafka",
            settings(&[("JOBGATE_KAFKA_SASL_USERNAME", "someone")]),
            "SASL credentials are set but JOBGATE_KAFKA_SECURITY_PROTOCOL is plaintext",
        ),
        (
            "producer",
            "kafka",
            settings(&[("JOBGATE_KAFKA_PROPERTIES", "enable.idempotence=false")]),
            "enable.idempotence is set by jobgate itself",
        ),
        (
            "producer",
            "kafka",
            settings(&[
                ("JOBGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
                ("JOBGATE_KAFKA_SSL_CA_FILE", "/nonexistent/ca.pem"),
            ]),
            "JOBGATE_KAFKA_SSL_CA_FILE: cannot read /nonexistent/ca.pem",
        ),
    ] {
        let mut all = settings(&[
            ("JOBGATE_BACKEND", backend),
            ("JOBGATE_LISTEN", "127.0.0.1:0"),
            ("JOBGATE_QUEUES", "tls-never"),
            ("JOBGATE_QUEUE", "tls-never"),
        ]);
        all.extend(env);
        let mut process = Process::spawn(binary, binary, &all).await;
        let code = process.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(code, Some(1), "{binary} with {wants:?}: {}", process.dump());
        // The last lines may still be on their way from the pipe.
        wait_until(
            Duration::from_secs(5),
            &format!("{binary} to say {wants:?}"),
            || std::future::ready(process.dump().contains(wants)),
        )
        .await;
    }
}
