// jemalloc instead of glibc's malloc: under load glibc's malloc, free and fastbin
// consolidation took 16 % of the producer's CPU; jemalloc cut the CPU per request by 15
// to 25 % (bench/notes.md, "The allocator and the open loop's tail").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = producer::ProducerConfig::from_env_and_args();
    jobgate_shared::telemetry::init(config.broker.log_format);
    // TLS/SASL settings that do not fit together: refused before anything connects.
    config.broker.check().map_err(anyhow::Error::msg)?;
    let listener = producer::server::bind(&config.listen, config.listen_backlog).await?;
    let result = producer::run(listener, config, jobgate_shared::shutdown::signal()).await;
    jobgate_shared::telemetry::shutdown();
    result
}
