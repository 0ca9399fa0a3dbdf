//! jobgate `producer`: the HTTP ingress.
//!
//! A client POSTs a job body to `/jobs/{queue}`; the producer publishes it to the
//! broker and answers `202 Request received` with the job id only after the broker
//! confirmed it. Any failure is a `application/problem+json` error, never a hang.
//!
//! Layout:
//! - [`config`]: flags and `JOBGATE_*` variables.
//! - [`startup`]: [`run`] (serve a listener until a shutdown future completes) and
//!   [`app`] (the router, testable without a socket).
//! - [`server`]: accepting connections and serving HTTP/1 with a connection cap,
//!   header-read and idle timeouts; [`body_deadline`]: the body-read timeout (408).
//! - [`state`]: what handlers share. [`error`]: problem+json responses.
//! - [`auth`] and [`rate_limit`]: API keys (401) and per-client rate limits (429)
//!   in front of every route but the probes.
//! - [`in_flight`]: the in-flight limit (503 `overloaded`). [`metadata`]: `X-Job-*`
//!   and trace-context headers that travel with a job. [`callback`]: `Jobgate-Callback`
//!   (checked against `JOBGATE_CALLBACK_ALLOW`).
//! - [`idempotency`]: `Idempotency-Key` (memory or Redis store). [`job_options`]:
//!   scheduled jobs and per-job policy (`Jobgate-Delay`, `Jobgate-Not-Before`,
//!   `Jobgate-Max-Attempts`, `Jobgate-Timeout`).
//! - [`metrics`]: `GET /metrics` and what records it. [`request_id`]: `X-Request-Id`.
//! - `routes`: `jobs` (POST /jobs, /jobs/{queue}), `batch` (POST /jobs/{queue}/batch)
//!   `status` (GET/DELETE /jobs/{queue}/{job_id}) and `health` (/healthz, /readyz).
//!   [`openapi`]: GET /openapi.json.
//! - [`console`]: the web console at `/ui` and its API (`/me`, `/queues`, the
//!   dead-letter routes).

pub mod auth;
pub mod body_deadline;
pub mod callback;
pub mod config;
pub mod console;
pub mod error;
pub mod idempotency;
pub mod in_flight;
pub mod job_options;
pub mod metadata;
pub mod metrics;
pub mod openapi;
pub mod rate_limit;
pub mod request_id;
mod routes;
pub mod server;
pub mod startup;
pub mod state;
#[cfg(test)]
mod test_support;

pub use config::ProducerConfig;
pub use startup::{app, run};
pub use state::AppState;
