//! Code shared by the jobgate `producer` (HTTP ingress) and `consumer` (worker).
//!
//! Layout:
//! - [`config`]: broker options common to both binaries (flags and `JOBGATE_*` variables).
//! - [`job`]: the job envelope and its one mapping to and from the wire (AMQP properties).
//! - [`broker`]: the backends behind small traits: [`broker::Publisher`] for the ingress,
//!   [`broker::JobSource`] for workers; RabbitMQ ([`broker::rabbitmq`]) and an in-memory
//!   fake for unit tests ([`broker::memory`]).
//! - [`status`]: the job status store in Redis (queued, running, ..., done), its
//!   ordered transitions in one script.
//! - [`callback`]: completion callbacks: the URL allow-list, the callbacks queue's
//!   name, the signature.
//! - [`dlq`]: the dead-letter queues: list, replay, purge (the `consumer dlq` tools and
//!   the producer's console API share it).
//! - [`backoff`]: the reconnect delay schedule; [`retry`]: attempts and retry tiers.
//! - [`telemetry`]: logging and trace export; [`metrics`]: the Prometheus encoder;
//!   [`shutdown`]: the SIGTERM/SIGINT future.

pub mod backoff;
pub mod broker;
pub mod callback;
pub mod config;
pub mod dlq;
pub mod job;
pub mod metrics;
pub mod retry;
pub mod shutdown;
pub mod status;
pub mod telemetry;
