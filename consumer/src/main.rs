use std::process::ExitCode;

use clap::Parser;
use consumer::config::Command;

mod dlq;

#[tokio::main]
async fn main() -> ExitCode {
    let config = consumer::ConsumerConfig::parse();
    jobgate_shared::telemetry::init(config.broker.log_format);
    // TLS/SASL settings that do not fit together: refused before anything connects.
    if let Err(error) = config.broker.check() {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    let code = match &config.command {
        Some(Command::Dlq(command)) => dlq::run(&config, command).await,
        None => match run_worker(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
    };
    // The last job spans, when traces are exported.
    jobgate_shared::telemetry::shutdown();
    code
}

async fn run_worker(config: consumer::ConsumerConfig) -> anyhow::Result<()> {
    let handler = consumer::handlers::from_args(&config.handler)?;
    consumer::worker::run_boxed(config, handler, jobgate_shared::shutdown::signal()).await
}
