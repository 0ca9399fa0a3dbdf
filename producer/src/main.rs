#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = producer::ProducerConfig::from_env_and_args();
    jobgate_shared::telemetry::init(config.broker.log_format);
    // TLS/SASL settings that do not fit together: refused before anything connects.
    config.broker.check().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    let result = producer::run(listener, config, jobgate_shared::shutdown::signal()).await;
    jobgate_shared::telemetry::shutdown();
    result
}
