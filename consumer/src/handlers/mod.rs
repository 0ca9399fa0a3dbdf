//! Built-in handlers, chosen with `JOBGATE_HANDLER`.

mod log;

pub use log::LogHandler;

use std::time::Duration;

use crate::config::{ConsumerConfig, HandlerKind};
use crate::handler::Handler;

/// The handler the configuration asks for.
pub fn from_config(config: &ConsumerConfig) -> Box<dyn Handler> {
    match config.handler {
        HandlerKind::Log => Box::new(LogHandler::new(Duration::from_millis(config.log_delay_ms))),
    }
}
