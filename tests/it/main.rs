//! jobgate integration tests: the real `producer` and `consumer` binaries against real
//! brokers. The brokers are started by `scripts/brokers.sh` (from `scripts/test.sh`, or
//! from the harness itself when a test runs first).
//!
//! Scenarios run against both backends through `on_both_backends!`, as
//! `<module>::rabbitmq::<name>` and `<module>::kafka::<name>`: `scenarios` (ingress and
//! delivery), `retries` (job processing), `in_process` (the library with test handlers), `idempotency` (`Idempotency-Key`,
//! memory and Redis stores).
//! `rabbitmq_only` and `kafka_only` hold what only one broker has; `junk` puts
//! hand-made, extreme messages on the queues of both; `give_back` and `redelivery`
//! hold what becomes of a job whose outcome cannot be published, or whose consumer
//! dies while running it. `tls` runs both binaries through the brokers' TLS and SASL
//! listeners. `amqp_nodes` gives `JOBGATE_AMQP_URL` a list of RabbitMQ nodes, some
//! dead.
//!
//! `status` and `status_store` hold job status (issue 16): the routes with the real
//! binaries on both backends, and the store's transition rules against Redis.
//! `scheduled` holds scheduled jobs and per-job policy (issue 16).
//!
//! `callbacks` holds completion callbacks (issue 16): a callback server on loopback,
//! signatures verified, retries, redirects, the allow-list at submit and in the consumer.
//!
//! `console` holds the web console (issue 17) in headless Chromium, driven through
//! Debian's chromedriver (`browser`; `scripts/browser.sh` installs both).
//!
//! `queue_names` holds queue lists whose broker names collide, and Kafka's topic admin
//! calls given a topic twice.
//!
//! Set `TEST_LOG=1` to see the binaries' logs.

#[macro_use]
mod macros;

mod alarm;
mod amqp_nodes;
mod auth;
mod batch;
mod browser;
mod callbacks;
mod clusters;
mod console;
mod consumer_metrics;
mod faults;
mod give_back;
mod helpers;
mod idempotency;
mod idempotency_store;
mod in_process;
mod junk;
mod kafka_only;
mod manifests;
mod metadata;
mod observability;
mod publisher;
mod queue_names;
mod rabbitmq_only;
mod redelivery;
mod retries;
mod scenarios;
mod scheduled;
mod setup;
mod slow_clients;
mod status;
mod status_store;
mod tls;
