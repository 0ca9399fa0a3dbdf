//! Built-in handlers, chosen with `JOBGATE_HANDLER`, and their options.
//!
//! - `log` ([`LogHandler`]): logs each job and succeeds.
//! - `http` ([`HttpHandler`]): POSTs each job's body to `JOBGATE_HTTP_URL`.
//! - `exec` ([`ExecHandler`]): runs `JOBGATE_EXEC_COMMAND` with the body on stdin.

mod exec;
pub(crate) mod http;
mod log;

pub use exec::ExecHandler;
pub use http::HttpHandler;
pub use log::LogHandler;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use jobgate_shared::config::SecretUrl;

use crate::handler::Handler;

/// The built-in handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HandlerKind {
    /// Logs each job (id, queue, attempt, body size) and succeeds.
    Log,
    /// POSTs each job's body to `JOBGATE_HTTP_URL`; the status code decides the outcome.
    Http,
    /// Runs `JOBGATE_EXEC_COMMAND` with the body on stdin; the exit status decides the outcome.
    Exec,
}

/// Options of the built-in handlers (flattened into the consumer's configuration).
#[derive(Debug, Clone, Args)]
pub struct HandlerArgs {
    /// Which built-in handler processes the jobs.
    #[arg(long = "handler", env = "JOBGATE_HANDLER", value_enum, default_value_t = HandlerKind::Log)]
    pub handler: HandlerKind,

    /// `log` handler: pretend each job takes this long, in milliseconds (demos, load tests).
    #[arg(long, env = "JOBGATE_LOG_DELAY_MS", default_value_t = 0)]
    pub log_delay_ms: u64,

    /// `http` handler (required there): URL each job's body is POSTed to (`http://` or
    /// `https://`); a password in it is never logged.
    #[arg(long, env = "JOBGATE_HTTP_URL", hide_env_values = true)]
    pub http_url: Option<SecretUrl>,

    /// `http` handler: timeout of one request (connect, send, answer), in milliseconds.
    #[arg(long, env = "JOBGATE_HTTP_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub http_timeout_ms: u64,

    /// `exec` handler (required there): command run for each job, split into program and
    /// arguments like a shell would (quotes, backslashes) but run without a shell.
    #[arg(long, env = "JOBGATE_EXEC_COMMAND")]
    pub exec_command: Option<String>,

    /// `exec` handler: the variables of the consumer's environment the command gets
    /// (comma list of names); everything else is withheld, jobgate's own `JOBGATE_*`
    /// settings (broker URLs, credentials) always.
    #[arg(long, env = "JOBGATE_EXEC_ENV", value_delimiter = ',',
          default_value = exec::DEFAULT_ENV_ALLOW)]
    pub exec_env: Vec<String>,
}

/// The handler the options ask for; an error when an option it needs is missing or
/// invalid.
pub fn from_args(args: &HandlerArgs) -> anyhow::Result<Box<dyn Handler>> {
    Ok(match args.handler {
        HandlerKind::Log => Box::new(LogHandler::new(Duration::from_millis(args.log_delay_ms))),
        HandlerKind::Http => {
            let url = args
                .http_url
                .as_ref()
                .context("`--handler http` needs JOBGATE_HTTP_URL (or --http-url)")?;
            Box::new(HttpHandler::new(
                url.expose(),
                Duration::from_millis(args.http_timeout_ms),
            )?)
        }
        HandlerKind::Exec => {
            let command = args
                .exec_command
                .as_deref()
                .context("`--handler exec` needs JOBGATE_EXEC_COMMAND (or --exec-command)")?;
            Box::new(ExecHandler::new(command)?.passing_env(&args.exec_env)?)
        }
    })
}

/// At most `max_chars` characters of `bytes` (the first ones, or the last ones when
/// `tail`), fit for a log line or a failure reason: invalid UTF-8 replaced, control
/// characters (newlines included) turned into spaces, runs of blanks collapsed, and `…`
/// where something was cut.
pub(crate) fn snippet(bytes: &[u8], max_chars: usize, tail: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut clean = String::with_capacity(text.len().min(4 * max_chars + 8));
    for c in text.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && (clean.is_empty() || clean.ends_with(' ')) {
            continue;
        }
        clean.push(c);
    }
    let clean = clean.trim_end();
    let count = clean.chars().count();
    if count <= max_chars {
        return clean.to_owned();
    }
    let keep = max_chars.saturating_sub(1);
    if tail {
        let start = clean
            .char_indices()
            .nth(count - keep)
            .map_or(clean.len(), |(i, _)| i);
        format!("…{}", &clean[start..])
    } else {
        let end = clean
            .char_indices()
            .nth(keep)
            .map_or(clean.len(), |(i, _)| i);
        format!("{}…", &clean[..end])
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        handler: HandlerArgs,
    }

    fn args(argv: &[&str]) -> HandlerArgs {
        let mut full = vec!["consumer"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).expect("valid flags").handler
    }

    fn error_of(args: &HandlerArgs) -> String {
        match from_args(args) {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn defaults() {
        let a = args(&[]);
        assert_eq!(a.handler, HandlerKind::Log);
        assert_eq!(a.http_timeout_ms, 30_000);
        assert!(a.http_url.is_none());
        assert!(a.exec_command.is_none());
        assert!(from_args(&a).is_ok());
    }

    #[test]
    fn http_needs_a_url() {
        let e = error_of(&args(&["--handler", "http"]));
        assert!(e.contains("JOBGATE_HTTP_URL"), "{e}");
        let e = error_of(&args(&["--handler", "http", "--http-url", "not a url"]));
        assert!(e.contains("JOBGATE_HTTP_URL"), "{e}");
        let e = error_of(&args(&["--handler", "http", "--http-url", "ftp://x/"]));
        assert!(e.contains("http"), "{e}");
        let a = args(&[
            "--handler",
            "http",
            "--http-url",
            "http://127.0.0.1:9/hook",
            "--http-timeout-ms",
            "250",
        ]);
        assert_eq!(a.http_timeout_ms, 250);
        assert!(from_args(&a).is_ok());
    }

    #[test]
    fn http_url_password_is_not_in_debug_output() {
        let a = args(&["--http-url", "https://user:hunter2@example.com/hook"]);
        let debug = format!("{a:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn http_timeout_must_be_positive() {
        assert!(Cli::try_parse_from(["consumer", "--http-timeout-ms", "0"]).is_err());
    }

    #[test]
    fn exec_needs_a_command() {
        let e = error_of(&args(&["--handler", "exec"]));
        assert!(e.contains("JOBGATE_EXEC_COMMAND"), "{e}");
        let e = error_of(&args(&["--handler", "exec", "--exec-command", "  "]));
        assert!(e.contains("JOBGATE_EXEC_COMMAND"), "{e}");
        let e = error_of(&args(&[
            "--handler",
            "exec",
            "--exec-command",
            "echo 'unclosed",
        ]));
        assert!(e.contains("JOBGATE_EXEC_COMMAND"), "{e}");
        let a = args(&["--handler", "exec", "--exec-command", "echo 'a b'"]);
        assert!(from_args(&a).is_ok());
    }

    #[test]
    fn snippets_are_short_and_single_line() {
        assert_eq!(
            snippet(b"  hello\r\n\tworld \x1b[31m ", 200, false),
            "hello world [31m"
        );
        assert_eq!(snippet(b"abcdef", 4, false), "abc…");
        assert_eq!(snippet(b"abcdef", 4, true), "…def");
        assert_eq!(snippet(b"abc", 3, true), "abc");
        assert_eq!(snippet(&[0xff, b'a'], 10, false), "\u{fffd}a");
        let long = "é".repeat(1000);
        let s = snippet(long.as_bytes(), 200, false);
        assert_eq!(s.chars().count(), 200);
        assert!(s.ends_with('…'));
    }
}
