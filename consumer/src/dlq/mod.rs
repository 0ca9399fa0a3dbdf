//! `consumer dlq list|replay|purge`: operator tools for the dead-letter queue `Q.dlq`
//! of a job queue `Q`, on either backend. What each does on the broker is
//! [`jobgate_shared::dlq`] (the producer's console API shares it); this is the command
//! line around it.
//!
//! Exit codes: 0 done, 1 broker or operational error (message on stderr), 2 usage.
//! Results go to stdout, logs to stderr.

use std::fmt::Write as _;
use std::process::ExitCode;

use consumer::config::{ConsumerConfig, DlqCommand};
use jobgate_shared::broker::dlq_name;
use jobgate_shared::dlq::{
    self, escape_preview, json_line, DeadJob, DlqError, DlqSettings, PREVIEW_CHARS,
};

/// Longest reason shown in the table (JSON has it whole).
const TABLE_REASON_CHARS: usize = 40;

type Result<T, E = DlqError> = std::result::Result<T, E>;

fn exit_code(error: &DlqError) -> ExitCode {
    match error {
        DlqError::Usage(_) => ExitCode::from(2),
        DlqError::NotFound(_) | DlqError::Failed(_) => ExitCode::from(1),
    }
}

/// The dlq operations' settings from the consumer's configuration.
pub fn settings(config: &ConsumerConfig) -> DlqSettings {
    DlqSettings {
        broker: config.broker.clone(),
        retry_tiers: config.retry_policy().tiers(),
        publish_timeout: config.publish_timeout(),
    }
}

/// Runs one dlq command and prints its result; returns the process exit code.
pub async fn run(config: &ConsumerConfig, command: &DlqCommand) -> ExitCode {
    match execute(config, command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            exit_code(&error)
        }
    }
}

async fn execute(config: &ConsumerConfig, command: &DlqCommand) -> Result<()> {
    let settings = settings(config);
    match command {
        DlqCommand::List(args) => {
            let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
            let listing = dlq::list(&settings, &args.queue, limit).await?;
            let dlq = dlq_name(&args.queue);
            if listing.jobs.is_empty() {
                if args.json {
                    eprintln!("no dead jobs in {dlq}");
                } else {
                    println!("no dead jobs in {dlq}");
                }
            } else if args.json {
                for job in &listing.jobs {
                    println!("{}", json_line(job));
                }
            } else {
                print!("{}", table(&listing.jobs));
                println!("{}", summary(&dlq, listing.jobs.len(), listing.total));
            }
            Ok(())
        }
        DlqCommand::Replay(args) => {
            if let Some(id) = &args.job_id {
                if id.trim().is_empty() {
                    return Err(DlqError::Usage("--job-id must not be empty".into()));
                }
            }
            let limit = args
                .limit
                .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
            let status = config
                .status
                .store()
                .map_err(|error| DlqError::failed(error.to_string()))?;
            let replayed = dlq::replay(
                &settings,
                &args.queue,
                limit,
                args.job_id.as_deref(),
                status.as_ref(),
            )
            .await?;
            println!(
                "replayed {replayed} dead {} from {} to {}",
                jobs_word(replayed),
                dlq_name(&args.queue),
                args.queue
            );
            Ok(())
        }
        DlqCommand::Purge(args) => {
            let dlq = dlq_name(&args.queue);
            if !args.yes {
                return Err(DlqError::Usage(format!(
                    "purge removes every dead job in {dlq} for good; run it again with --yes to confirm"
                )));
            }
            let purged = dlq::purge(&settings, &args.queue).await?;
            println!("purged {purged} dead {} from {dlq}", jobs_word(purged));
            Ok(())
        }
    }
}

fn jobs_word(n: u64) -> &'static str {
    if n == 1 {
        "job"
    } else {
        "jobs"
    }
}

/// A table cell: the value escaped (headers of a hand-made message may hold control
/// characters that would drive the operator's terminal) and cut, or `-` without one.
fn or_dash(value: Option<&str>, max: usize) -> String {
    value
        .filter(|v| !v.is_empty())
        .map_or_else(|| "-".to_owned(), |v| escape_preview(v.as_bytes(), max))
}

/// The human table of `list`: one row per dead job, columns aligned.
pub fn table(jobs: &[DeadJob]) -> String {
    let header = [
        "JOB ID",
        "ATTEMPTS",
        "FAILED AT",
        "CONTENT TYPE",
        "SIZE",
        "REASON",
        "BODY",
    ];
    let rows: Vec<[String; 7]> = jobs
        .iter()
        .map(|job| {
            [
                escape_preview(job.meta.id.as_bytes(), PREVIEW_CHARS),
                job.attempts().to_string(),
                or_dash(job.failed_at(), PREVIEW_CHARS),
                or_dash(job.meta.content_type.as_deref(), PREVIEW_CHARS),
                job.body.len().to_string(),
                or_dash(job.reason(), TABLE_REASON_CHARS),
                escape_preview(&job.body, PREVIEW_CHARS),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                let _ = write!(text, "{cell}{}  ", " ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// The line under the table: how many were shown, and of how many.
fn summary(dlq: &str, shown: usize, total: Option<u64>) -> String {
    match total {
        Some(total) if total > shown as u64 => {
            format!("{shown} of {total} dead jobs in {dlq} shown (--limit to see more)")
        }
        _ => format!("{shown} dead {} in {dlq}", jobs_word(shown as u64)),
    }
}
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, UNIX_EPOCH};

    use clap::Parser;
    use consumer::config::Command;

    use bytes::Bytes;
    use jobgate_shared::config::Backend;
    use jobgate_shared::dlq::replay_meta;
    use jobgate_shared::job::{
        JobMeta, HEADER_ATTEMPTS, HEADER_DUE_AT, HEADER_ERROR, HEADER_FAILED_AT, HEADER_LAST_ERROR,
        HEADER_ORIGINAL_QUEUE, HEADER_REPLAYS,
    };

    use super::*;

    fn parse(args: &[&str]) -> Result<ConsumerConfig, clap::Error> {
        ConsumerConfig::try_parse_from(args)
    }

    fn dlq(args: &[&str]) -> DlqCommand {
        match parse(args).unwrap().command {
            Some(Command::Dlq(command)) => command,
            None => panic!("no subcommand in {args:?}"),
        }
    }

    #[test]
    fn no_subcommand_runs_the_worker() {
        assert!(parse(&["consumer"]).unwrap().command.is_none());
        assert!(parse(&["consumer", "--queue", "a,b"])
            .unwrap()
            .command
            .is_none());
    }

    #[test]
    fn list_takes_its_own_queue_limit_and_json() {
        let DlqCommand::List(args) = dlq(&["consumer", "dlq", "list", "--queue", "mail"]) else {
            panic!("not list")
        };
        assert_eq!(args.queue, "mail");
        assert_eq!(args.limit, 20);
        assert!(!args.json);
        let DlqCommand::List(args) = dlq(&[
            "consumer", "dlq", "list", "--queue", "mail", "--limit", "3", "--json",
        ]) else {
            panic!("not list")
        };
        assert_eq!((args.limit, args.json), (3, true));
    }

    #[test]
    fn top_level_options_and_the_subcommand_queue_do_not_mix() {
        let config = parse(&[
            "consumer",
            "--queue",
            "other",
            "--backend",
            "kafka",
            "dlq",
            "list",
            "--queue",
            "mail",
        ])
        .unwrap();
        assert_eq!(config.queue, vec!["other"]);
        assert_eq!(config.broker.backend, Backend::Kafka);
        let Some(Command::Dlq(DlqCommand::List(args))) = config.command else {
            panic!("not list")
        };
        assert_eq!(args.queue, "mail");
    }

    #[test]
    fn replay_defaults_to_all_and_takes_a_job_id() {
        let DlqCommand::Replay(args) = dlq(&["consumer", "dlq", "replay", "--queue", "q"]) else {
            panic!("not replay")
        };
        assert_eq!((args.limit, args.job_id), (None, None));
        let DlqCommand::Replay(args) = dlq(&[
            "consumer", "dlq", "replay", "--queue", "q", "--limit", "5", "--job-id", "abc",
        ]) else {
            panic!("not replay")
        };
        assert_eq!(args.limit, Some(5));
        assert_eq!(args.job_id.as_deref(), Some("abc"));
    }

    #[test]
    fn purge_without_yes_parses_and_is_then_refused() {
        let DlqCommand::Purge(args) = dlq(&["consumer", "dlq", "purge", "--queue", "q"]) else {
            panic!("not purge")
        };
        assert!(!args.yes);
        let config = parse(&["consumer", "dlq", "purge", "--queue", "q"]).unwrap();
        let command = config.command.clone().map(|Command::Dlq(c)| c).unwrap();
        // Refused before any broker is contacted: no runtime I/O happens here.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let error = rt.block_on(execute(&config, &command)).unwrap_err();
        assert!(matches!(error, DlqError::Usage(_)), "{error:?}");
        assert!(error.to_string().contains("--yes"));
        assert_eq!(exit_code(&error), ExitCode::from(2));
        let DlqCommand::Purge(args) = dlq(&["consumer", "dlq", "purge", "--queue", "q", "--yes"])
        else {
            panic!("not purge")
        };
        assert!(args.yes);
    }

    #[test]
    fn bad_usage_is_a_clap_error() {
        for args in [
            &["consumer", "dlq", "list"][..], // --queue is required
            &["consumer", "dlq", "list", "--queue", "not ok"], // invalid name
            &["consumer", "dlq", "list", "--queue", "amq.x"], // reserved name
            &["consumer", "dlq", "list", "--queue", "q", "--limit", "0"],
            &["consumer", "dlq", "replay", "--queue", "q", "--limit", "x"],
            &["consumer", "dlq", "purge", "--queue", "q", "--force"],
            &["consumer", "dlq", "peek", "--queue", "q"],
            &["consumer", "dlq"],
        ] {
            let error = parse(args).expect_err(&format!("{args:?} should not parse"));
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn the_subcommand_queue_has_no_environment_variable() {
        use clap::CommandFactory;
        let command = ConsumerConfig::command();
        let dlq = command.find_subcommand("dlq").unwrap();
        for name in ["list", "replay", "purge"] {
            let sub = dlq.find_subcommand(name).unwrap();
            let queue = sub.get_arguments().find(|a| a.get_id() == "queue").unwrap();
            assert!(
                queue.get_env().is_none(),
                "{name} --queue must not read JOBGATE_QUEUE"
            );
            assert!(queue.is_required_set(), "{name} --queue is required");
        }
    }

    #[test]
    fn previews_escape_what_is_not_printable() {
        assert_eq!(escape_preview(br#"{"to":"ada"}"#, 80), r#"{"to":"ada"}"#);
        assert_eq!(escape_preview(b"a\nb\tc\r\\", 80), r"a\nb\tc\r\\");
        assert_eq!(escape_preview(b"\x00\x1b[1m\x7f", 80), r"\x00\x1b[1m\x7f");
        assert_eq!(escape_preview(b"\xff\xfeok", 80), r"\xff\xfeok");
        assert_eq!(escape_preview("héllo ✓".as_bytes(), 80), "héllo ✓");
        assert_eq!(escape_preview("a\u{85}b".as_bytes(), 80), r"a\u{85}b");
        assert_eq!(escape_preview(b"", 80), "");
    }

    #[test]
    fn previews_are_cut_at_80_characters_never_inside_an_escape() {
        let long = "x".repeat(200);
        let preview = escape_preview(long.as_bytes(), PREVIEW_CHARS);
        assert_eq!(preview.chars().count(), PREVIEW_CHARS);
        assert!(preview.ends_with('…'));
        let exact = "y".repeat(80);
        assert_eq!(escape_preview(exact.as_bytes(), 80), exact);
        // 78 plain characters, then escapes: `\x00` (4 characters) does not fit.
        let mut bytes = vec![b'z'; 78];
        bytes.extend_from_slice(&[0, 0, 0]);
        let preview = escape_preview(&bytes, 80);
        assert_eq!(preview, format!("{}…", "z".repeat(78)));
        let binary = vec![0xffu8; 100];
        let preview = escape_preview(&binary, 80);
        assert!(preview.chars().count() <= 80);
        assert!(preview.ends_with("\\xff…"));
    }

    fn dead_meta() -> JobMeta {
        let mut headers = BTreeMap::new();
        for (name, value) in [
            (HEADER_ERROR, "exit status 1"),
            (HEADER_ATTEMPTS, "5"),
            (HEADER_FAILED_AT, "2025-01-02T03:04:05.678Z"),
            (HEADER_ORIGINAL_QUEUE, "mail"),
            (HEADER_DUE_AT, "1700000000000"),
            (HEADER_LAST_ERROR, "timeout"),
            ("x-first-death-reason", "rejected"),
            ("x-last-death-queue", "mail"),
            ("x-job-tenant", "acme"),
            ("traceparent", "00-abc-def-01"),
        ] {
            headers.insert(name.to_owned(), value.to_owned());
        }
        JobMeta {
            id: "0190-job".into(),
            queue: "mail.dlq".into(),
            content_type: Some("application/json".into()),
            enqueued_at: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            attempt: 5,
            headers,
            redeliveries: 0,
        }
    }

    #[test]
    fn replay_resets_the_attempt_strips_dead_letter_headers_and_counts_the_replay() {
        let dead = dead_meta();
        let back = replay_meta(&dead, "mail");
        assert_eq!(back.queue, "mail");
        assert_eq!(back.attempt, 1);
        assert_eq!(back.id, dead.id);
        assert_eq!(back.content_type, dead.content_type);
        assert_eq!(back.enqueued_at, dead.enqueued_at);
        let names: Vec<&str> = back.headers.keys().map(String::as_str).collect();
        assert_eq!(names, vec!["traceparent", "x-job-tenant", HEADER_REPLAYS]);
        assert_eq!(back.headers[HEADER_REPLAYS], "1");
        // Dead again and replayed again: its second replay; junk counts as none.
        assert_eq!(replay_meta(&back, "mail").headers[HEADER_REPLAYS], "2");
        let mut junk = dead_meta();
        junk.headers
            .insert(HEADER_REPLAYS.to_owned(), "many".to_owned());
        assert_eq!(replay_meta(&junk, "mail").headers[HEADER_REPLAYS], "1");
    }

    #[test]
    fn a_dead_job_shows_its_reason_attempts_and_time() {
        let job = DeadJob {
            meta: dead_meta(),
            body: Bytes::from_static(b"{\"to\":\"ada\"}\n"),
            position: Some((2, 41)),
        };
        assert_eq!(job.attempts(), 5);
        assert_eq!(job.reason(), Some("exit status 1"));
        let json = json_line(&job);
        assert_eq!(json["job_id"], "0190-job");
        assert_eq!(json["attempts"], 5);
        assert_eq!(json["body_size"], 13);
        assert_eq!(json["body_preview"], r#"{"to":"ada"}\n"#);
        assert_eq!(json["failed_at"], "2025-01-02T03:04:05.678Z");
        assert_eq!(json["partition"], 2);
        assert_eq!(json["offset"], 41);
        let table = table(std::slice::from_ref(&job));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("JOB ID"));
        assert!(lines[1].contains("exit status 1"));
        assert!(lines[1].ends_with(r#"{"to":"ada"}\n"#));

        // A message dead-lettered by RabbitMQ itself, without our headers.
        let mut bare = dead_meta();
        bare.headers.retain(|k, _| k == "x-first-death-reason");
        bare.attempt = 3;
        let job = DeadJob {
            meta: bare,
            body: Bytes::new(),
            position: None,
        };
        assert_eq!(job.attempts(), 3);
        assert_eq!(job.reason(), Some("rejected"));
        assert!(json_line(&job).get("partition").is_none());
    }

    #[test]
    fn a_dead_job_with_extreme_metadata_prints_escaped_without_a_panic() {
        let mut meta = dead_meta();
        meta.enqueued_at = UNIX_EPOCH.checked_add(Duration::from_secs(253_402_300_800));
        meta.content_type = Some("\u{1b}[31mred".into());
        meta.headers
            .insert(HEADER_ERROR.into(), "\u{1b}]0;pwned\u{7}\r\n".into());
        meta.headers
            .insert(HEADER_FAILED_AT.into(), "\u{9b}2J".into());
        let job = DeadJob {
            meta,
            body: Bytes::from_static(b"\x1b[2J"),
            position: None,
        };
        let json = json_line(&job);
        assert!(json["enqueued_at"].is_null(), "year 10000 is not RFC 3339");
        let table = table(std::slice::from_ref(&job));
        assert!(
            !table.chars().any(|c| c.is_control() && c != '\n'),
            "{table:?}"
        );
        assert!(table.contains("\\x1b[31mred"), "{table}");
    }

    #[test]
    fn the_summary_says_when_more_are_waiting() {
        assert_eq!(summary("q.dlq", 1, Some(1)), "1 dead job in q.dlq");
        assert_eq!(
            summary("q.dlq", 20, Some(35)),
            "20 of 35 dead jobs in q.dlq shown (--limit to see more)"
        );
        assert_eq!(summary("q.dlq", 2, None), "2 dead jobs in q.dlq");
    }
}
