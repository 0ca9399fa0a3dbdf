//! jobgate integration tests: the real `producer` and `consumer` binaries against real
//! brokers. The brokers are started by `scripts/brokers.sh` (from `scripts/test.sh`, or
//! from the harness itself when a test runs first).
//!
//! Every scenario of `scenarios` runs against both backends, as `rabbitmq::<name>` and
//! `kafka::<name>`; `rabbitmq_only` and `kafka_only` hold what only one broker has.
//!
//! Set `TEST_LOG=1` to see the binaries' logs.

mod helpers;
#[macro_use]
mod scenarios;
mod in_process;
mod kafka_only;
mod rabbitmq_only;
mod retries;

both_backends!(
    every_posted_job_is_processed_exactly_once_and_the_queue_ends_empty,
    three_consumer_processes_share_one_queue,
    oversized_body_gets_413_problem_and_nothing_is_published,
    unknown_queue_gets_404_problem_and_post_jobs_uses_the_first_queue,
    sigterm_lets_in_flight_jobs_finish_and_ack_within_the_grace_period,
    sigterm_with_jobs_in_flight_past_the_grace_period_loses_none,
    producer_sigterm_exits_zero_after_answering_in_flight_requests,
    broker_down_gives_503_within_the_timeout_and_both_binaries_recover,
);
