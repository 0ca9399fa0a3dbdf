//! The one macro that runs a scenario on both backends.

/// A backstop far above any scenario's own limits, so a hang fails instead of blocking
/// the run.
pub const SCENARIO_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// For each scenario `name(backend: Backend)` of the invoking module, generates the
/// tests `rabbitmq::name` and `kafka::name` beside it, each bounded by
/// [`SCENARIO_LIMIT`].
macro_rules! on_both_backends {
    ($($scenario:ident),+ $(,)?) => {
        /// The scenarios against RabbitMQ.
        mod rabbitmq {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let scenario = super::$scenario($crate::helpers::Backend::Rabbitmq);
                    tokio::time::timeout($crate::macros::SCENARIO_LIMIT, scenario)
                        .await
                        .expect("the scenario finished within SCENARIO_LIMIT")
                }
            )+
        }

        /// The scenarios against Kafka.
        mod kafka {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let scenario = super::$scenario($crate::helpers::Backend::Kafka);
                    tokio::time::timeout($crate::macros::SCENARIO_LIMIT, scenario)
                        .await
                        .expect("the scenario finished within SCENARIO_LIMIT")
                }
            )+
        }
    };
}
