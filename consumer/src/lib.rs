//! jobgate `consumer`: the worker that drains job queues.
//!
//! Users run the `consumer` binary with a built-in handler, or write their own
//! [`Handler`] in Rust and call [`run`] to get the whole worker around it: broker
//! connection and reconnects, bounded concurrency, settle-after-outcome, graceful
//! shutdown.
//!
//! Handlers must be idempotent on the job id: delivery is at least once.
//!
//! Layout:
//! - [`config`]: flags and `JOBGATE_*` variables.
//! - [`handler`]: the [`Handler`] trait and [`Outcome`].
//! - [`handlers`]: built-in handlers (`log`).
//! - [`worker`]: the loop that takes deliveries and runs the handler.
//! - [`backend`]: the job source and publishers of the configured broker, as the
//!   binary builds them (public for embedders that wrap the source).
//! - [`callback`]: completion callbacks: the message queued when a job ends, and the
//!   handler of the callbacks queues that POSTs it, signed.
//! - [`settle`]: what becomes of a job after an attempt (ack, retry tier, dead letter).
//! - [`schedule`]: scheduled jobs not due yet hop through the delay tiers;
//!   [`job_policy`]: a job's own attempt limit and timeout, under the ceilings.
//! - [`metrics`]: the worker's Prometheus metrics; [`probes`]: the listener that serves
//!   them with `/healthz` and `/readyz` (`JOBGATE_METRICS_LISTEN`).

pub mod backend;
pub mod callback;
pub mod config;
pub mod handler;
pub mod handlers;
pub mod job_policy;
pub mod metrics;
pub mod probes;
pub mod schedule;
pub mod settle;
pub mod worker;

pub use config::ConsumerConfig;
pub use handler::{Handler, Outcome};
pub use jobgate_shared::job::{Job, JobMeta};
pub use metrics::WorkerMetrics;
pub use worker::{run, run_with_source, run_with_source_and_metrics, WorkerOptions};
