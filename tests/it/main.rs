//! jobgate integration tests: the real `producer` and `consumer` binaries against a
//! real RabbitMQ. The brokers are started by `scripts/brokers.sh` (from
//! `scripts/test.sh`, or from the harness itself when a test runs first).
//!
//! Set `TEST_LOG=1` to see the binaries' logs.

mod helpers;
mod rabbitmq;
