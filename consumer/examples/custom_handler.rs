//! A worker with a handler of your own: every job body is a JSON object
//! `{"to": "...", "subject": "..."}`; a malformed body is a permanent failure
//! (dead-lettered), a pretend outage is a transient one (retried with backoff).
//!
//! Run it like the `consumer` binary, with the same flags and `JOBGATE_*` variables:
//!
//! ```sh
//! JOBGATE_QUEUE=emails cargo run -p consumer --example custom_handler
//! ```

use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use consumer::{ConsumerConfig, Handler, Job, Outcome};

struct SendEmail;

#[async_trait]
impl Handler for SendEmail {
    async fn handle(&self, job: &Job) -> Outcome {
        // Delivery is at least once: use job.meta.id to make sending idempotent.
        let email: serde_json::Value = match serde_json::from_slice(&job.body) {
            Ok(value) => value,
            Err(e) => {
                return Outcome::Dead {
                    reason: format!("body is not JSON: {e}"),
                }
            }
        };
        let Some(to) = email["to"].as_str() else {
            return Outcome::Dead {
                reason: "no \"to\" field".into(),
            };
        };
        if to.ends_with("@unreachable.example") {
            return Outcome::Retry {
                reason: "mail server unreachable".into(),
                delay: Some(Duration::from_secs(5)),
            };
        }
        tracing::info!(job_id = %job.meta.id, %to, attempt = job.meta.attempt, "email sent");
        Outcome::Done
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ConsumerConfig::parse();
    jobgate_shared::telemetry::init(config.broker.log_format);
    consumer::run(config, SendEmail, jobgate_shared::shutdown::signal()).await
}
