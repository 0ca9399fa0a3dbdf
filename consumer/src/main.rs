use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = consumer::ConsumerConfig::parse();
    jobgate_shared::telemetry::init(config.broker.log_format);
    let handler = consumer::handlers::from_config(&config);
    consumer::worker::run_boxed(config, handler, jobgate_shared::shutdown::signal()).await
}
