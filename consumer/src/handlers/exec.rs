//! The `exec` handler: runs a command for each job, with the body on stdin.

use std::ffi::OsString;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_trait::async_trait;
use jobgate_shared::job::{Job, JobMeta};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};

use super::snippet;
use crate::handler::{Handler, Outcome};

/// Of the command's stdout and of its stderr, at most the last this many bytes are kept.
const TAIL_BYTES: usize = 4096;
/// At most this many characters of stderr's tail go into a failure reason.
const REASON_STDERR_CHARS: usize = 200;
/// After the command exited, how long its stdout and stderr may stay open (held by a
/// process it left running in the background) before they are let go.
const PIPE_GRACE: Duration = Duration::from_millis(500);
/// The exit status of `EX_TEMPFAIL` (`sysexits.h`): "try again later".
const EX_TEMPFAIL: i32 = 75;

/// Runs one command (`JOBGATE_EXEC_COMMAND`) for each job.
///
/// The command is split into a program and its arguments the way a POSIX shell splits
/// words (quotes, backslashes), but no shell runs it: `echo 'a b' $HOME` runs `echo`
/// with the two arguments `a b` and `$HOME`. For pipes, redirections or variables,
/// write the shell yourself: `sh -c 'gzip > "/data/$JOB_ID.gz"'`. The program is looked
/// up in `PATH`.
///
/// - **stdin**: the job's body, byte for byte, then end of file. A command that does not
///   read it (or stops early) is fine: its exit status alone decides.
/// - **environment**: only the consumer's variables named in `JOBGATE_EXEC_ENV`
///   ([`DEFAULT_ENV_ALLOW`] by default), plus `JOB_ID`, `JOB_QUEUE`, `JOB_ATTEMPT`
///   (1-based) and `JOB_CONTENT_TYPE` (empty when the job has none). The command runs
///   what jobs say: it never gets the broker URLs or any other `JOBGATE_*` setting.
///   `JOB_ID` is always made of ASCII letters, digits and `-_.:` and is never `.` or
///   `..` (an unsafe id published by hand is replaced by a derived one), so
///   `"/data/$JOB_ID"` stays in `/data`.
/// - **stdout, stderr**: the last 4 KiB of each are kept and logged at `debug` (target
///   `consumer::handlers::exec`); the end of stderr (at most 200 characters) is part of
///   the failure reason.
/// - **working directory**: the consumer's.
///
/// | the command | outcome |
/// |---|---|
/// | exits 0 | `Done` |
/// | exits 75 (`EX_TEMPFAIL`) | `Retry` |
/// | exits with any other status | `Retry` (the reason names the status); after the last attempt the worker dead-letters the job |
/// | is killed by a signal | `Retry` (the reason names the signal) |
/// | cannot be started (no such program, not executable) | `Retry` with the error as the reason: a configuration error shows in the logs at once and as dead-lettered jobs once the attempts run out |
///
/// When the worker cancels a job (`JOBGATE_JOB_TIMEOUT_MS`), or the consumer exits with
/// the job still running (end of the shutdown grace), the command is killed (`SIGKILL`).
/// Only the command itself is: a shell script should `exec` its last program, or the
/// processes it started may live on. Output that such a process keeps writing is not
/// waited for: 0.5 s after the command exited, the job's outcome stands.
///
/// The command must be idempotent on `JOB_ID`: a job can run again after a crash.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    program: String,
    args: Vec<String>,
    /// The variables the command gets from the consumer's environment, read once at
    /// start-up.
    env: Vec<(String, OsString)>,
}

/// The consumer's variables an `exec` command gets unless `JOBGATE_EXEC_ENV` says
/// otherwise: what programs need to run, nothing of jobgate's.
pub const DEFAULT_ENV_ALLOW: &str = "PATH,HOME,LANG,LC_ALL,TZ,TMPDIR";

/// Why a name cannot be in `JOBGATE_EXEC_ENV`, if it cannot.
fn refused_env_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        Some("is not a variable name")
    } else if name.starts_with("JOBGATE_") {
        Some("is a jobgate setting (broker URLs and credentials never reach the command)")
    } else if name.starts_with("JOB_") {
        Some("is set by jobgate for each job")
    } else {
        None
    }
}

/// What one run of the command left.
#[derive(Debug)]
struct Finished {
    outcome: Outcome,
    stdout: Tail,
    stderr: Tail,
}

impl ExecHandler {
    /// A handler that runs `command`, split into words like a shell would split it.
    pub fn new(command: &str) -> anyhow::Result<Self> {
        let words = shell_words::split(command)
            .map_err(|e| anyhow!("JOBGATE_EXEC_COMMAND cannot be split into words: {e}"))?;
        let mut words = words.into_iter();
        let program = words
            .next()
            .filter(|program| !program.is_empty())
            .context("JOBGATE_EXEC_COMMAND names no program")?;
        let handler = Self {
            program,
            args: words.collect(),
            env: Vec::new(),
        };
        let default: Vec<String> = DEFAULT_ENV_ALLOW.split(',').map(str::to_owned).collect();
        handler.passing_env(&default)
    }

    /// The same handler, passing the consumer's variables `names` (those that are set)
    /// to the command instead of the default ones. An error for a name that is not a
    /// variable name, a `JOBGATE_*` setting or a `JOB_*` variable of jobgate's own.
    pub fn passing_env(mut self, names: &[String]) -> anyhow::Result<Self> {
        let mut env = Vec::new();
        for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            if let Some(why) = refused_env_name(name) {
                anyhow::bail!("JOBGATE_EXEC_ENV: {name:?} {why}");
            }
            if let Some(value) = std::env::var_os(name) {
                env.push((name.to_owned(), value));
            }
        }
        self.env = env;
        Ok(self)
    }

    /// The program that runs.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Its arguments.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    async fn run(&self, job: &Job) -> Finished {
        // One byte past the store's bound, so that it can tell the result was cut.
        let mut stdout = Tail::with_head(jobgate_shared::status::MAX_RESULT_BYTES + 1);
        let mut stderr = Tail::default();
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("JOB_ID", &job.meta.id)
            .env("JOB_QUEUE", &job.meta.queue)
            .env("JOB_ATTEMPT", job.meta.attempt.to_string())
            .env(
                "JOB_CONTENT_TYPE",
                job.meta.content_type.as_deref().unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                return Finished {
                    outcome: Outcome::Retry {
                        reason: format!("cannot run {:?}: {error}", self.program),
                        delay: None,
                    },
                    stdout,
                    stderr,
                }
            }
        };
        let stdin = child.stdin.take();
        let out = child.stdout.take();
        let err = child.stderr.take();
        let status = {
            // Feed stdin and read both outputs while waiting for the exit, so that no
            // pipe fills up and blocks the command.
            let io = async {
                tokio::join!(
                    feed(stdin, &job.body, &job.meta),
                    read_tail(out, &mut stdout, &job.meta),
                    read_tail(err, &mut stderr, &job.meta),
                )
            };
            tokio::pin!(io);
            let mut io_done = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    _ = &mut io, if !io_done => io_done = true,
                }
            };
            if !io_done {
                // The command is gone; what it wrote is in the pipes, unless something
                // it left behind holds them open.
                let _ = tokio::time::timeout(PIPE_GRACE, &mut io).await;
            }
            status
        };
        let outcome = match status {
            Ok(status) => self.outcome_of(status, &stderr),
            Err(error) => Outcome::Retry {
                reason: format!("lost track of {:?}: {error}", self.program),
                delay: None,
            },
        };
        Finished {
            outcome,
            stdout,
            stderr,
        }
    }

    fn outcome_of(&self, status: ExitStatus, stderr: &Tail) -> Outcome {
        if status.success() {
            return Outcome::Done;
        }
        let mut reason = match status.code() {
            Some(EX_TEMPFAIL) => format!("{:?} exited with status 75 (EX_TEMPFAIL)", self.program),
            Some(code) => format!("{:?} exited with status {code}", self.program),
            None => format!("{:?} {}", self.program, killed(status)),
        };
        let tail = snippet(&stderr.bytes, REASON_STDERR_CHARS, true);
        if !tail.is_empty() {
            reason.push_str("; stderr: ");
            reason.push_str(&tail);
        }
        Outcome::Retry {
            reason,
            delay: None,
        }
    }
}

#[async_trait]
impl Handler for ExecHandler {
    async fn handle(&self, job: &Job) -> Outcome {
        let finished = self.run(job).await;
        tracing::debug!(
            job_id = %job.meta.id,
            queue = %job.meta.queue,
            program = %self.program,
            outcome = ?finished.outcome,
            stdout_bytes = finished.stdout.total,
            stdout_tail = ?String::from_utf8_lossy(&finished.stdout.bytes),
            stderr_bytes = finished.stderr.total,
            stderr_tail = ?String::from_utf8_lossy(&finished.stderr.bytes),
            "command finished"
        );
        // The command's stdout is the job's result (kept when there is a status store).
        match finished.outcome {
            Outcome::Done if !finished.stdout.head.is_empty() => {
                Outcome::DoneWith(finished.stdout.head.into())
            }
            outcome => outcome,
        }
    }
}

/// How a process that has no exit code ended.
#[cfg(unix)]
fn killed(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    let Some(signal) = status.signal() else {
        return format!("ended without an exit status ({status})");
    };
    let name = match signal {
        1 => " (SIGHUP)",
        2 => " (SIGINT)",
        3 => " (SIGQUIT)",
        4 => " (SIGILL)",
        6 => " (SIGABRT)",
        7 => " (SIGBUS)",
        8 => " (SIGFPE)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        13 => " (SIGPIPE)",
        14 => " (SIGALRM)",
        15 => " (SIGTERM)",
        _ => "",
    };
    let core = if status.core_dumped() {
        ", core dumped"
    } else {
        ""
    };
    format!("was killed by signal {signal}{name}{core}")
}

#[cfg(not(unix))]
fn killed(status: ExitStatus) -> String {
    format!("ended without an exit status ({status})")
}

/// Writes the body to the command's stdin, then closes it. A command that exits without
/// reading all of it is not an error (`BrokenPipe`): its exit status decides.
async fn feed(stdin: Option<ChildStdin>, body: &[u8], meta: &JobMeta) {
    let Some(mut stdin) = stdin else { return };
    match stdin.write_all(body).await {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => {}
        Err(error) => {
            tracing::debug!(job_id = %meta.id, queue = %meta.queue, %error, "could not write the job's body to the command")
        }
    }
    // Dropping `stdin` closes it: the command sees end of file.
}

/// The last [`TAIL_BYTES`] bytes of a stream, and how many there were in all.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    total: u64,
    /// The first bytes too, up to `head_limit` (stdout: the job's result).
    head: Vec<u8>,
    head_limit: usize,
}

impl Tail {
    /// A tail that also keeps the first `limit` bytes.
    fn with_head(limit: usize) -> Self {
        Self {
            head_limit: limit,
            ..Self::default()
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let room = self.head_limit.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() >= TAIL_BYTES {
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&chunk[chunk.len() - TAIL_BYTES..]);
        } else {
            self.bytes.extend_from_slice(chunk);
            if self.bytes.len() > TAIL_BYTES {
                let excess = self.bytes.len() - TAIL_BYTES;
                self.bytes.drain(..excess);
            }
        }
    }
}

/// Reads `reader` to its end, keeping its tail.
async fn read_tail<R: AsyncRead + Unpin>(reader: Option<R>, tail: &mut Tail, meta: &JobMeta) {
    let Some(mut reader) = reader else { return };
    let mut chunk = vec![0; 8192];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => tail.push(&chunk[..n]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::debug!(job_id = %meta.id, queue = %meta.queue, %error, "could not read the command's output");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bytes::Bytes;
    use jobgate_shared::job::JobMeta;

    use super::*;

    fn job(body: impl Into<Bytes>, content_type: Option<&str>) -> Job {
        let mut meta = JobMeta::new("reports", content_type.map(str::to_owned));
        meta.attempt = 2;
        Job {
            meta,
            body: body.into(),
        }
    }

    /// `sh -c SCRIPT ARG0 ARGS...` as one command string, the way a user writes
    /// `JOBGATE_EXEC_COMMAND` (in the script, `$0` is `ARG0`).
    fn sh(script: &str, args: &[&str]) -> ExecHandler {
        let mut words = vec!["sh", "-c", script];
        words.extend_from_slice(args);
        ExecHandler::new(&shell_words::join(words)).unwrap()
    }

    fn retry_reason(outcome: Outcome) -> String {
        match outcome {
            Outcome::Retry {
                reason,
                delay: None,
            } => reason,
            other => panic!("expected Retry without delay, got {other:?}"),
        }
    }

    fn path_arg(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[tokio::test]
    async fn the_body_is_stdin_and_the_job_is_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let handler = sh(
            r#"cat > "$0/body" && printf '%s\n' "$JOB_ID" "$JOB_QUEUE" "$JOB_ATTEMPT" "$JOB_CONTENT_TYPE" "${HOME:-unset}" > "$0/env""#,
            &[path_arg(dir.path())],
        );
        let body: &'static [u8] = b"\x00\x9f\x92\x96\xff binary\r\n\x00 tail";
        let job = job(Bytes::from_static(body), Some("application/x-thing"));
        assert_eq!(handler.handle(&job).await, Outcome::Done);

        assert_eq!(std::fs::read(dir.path().join("body")).unwrap(), body);
        let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
        let lines: Vec<&str> = env.lines().collect();
        let inherited = std::env::var("HOME").unwrap_or_else(|_| "unset".into());
        assert_eq!(
            lines,
            [
                job.meta.id.as_str(),
                "reports",
                "2",
                "application/x-thing",
                inherited.as_str()
            ]
        );
    }

    /// Cargo sets `CARGO_MANIFEST_DIR` for every test process: a variable of the
    /// consumer's environment that the default allow-list does not name.
    #[tokio::test]
    async fn the_command_gets_only_the_variables_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let script = r#"printf '%s\n' "${CARGO_MANIFEST_DIR-withheld}" "${PATH:+path}" > "$0/env""#;
        let read = || std::fs::read_to_string(dir.path().join("env")).unwrap();
        let handler = sh(script, &[path_arg(dir.path())]);
        assert_eq!(handler.handle(&job("", None)).await, Outcome::Done);
        assert_eq!(read(), "withheld\npath\n");

        let allowed = vec!["PATH".to_owned(), "CARGO_MANIFEST_DIR".to_owned()];
        let handler = sh(script, &[path_arg(dir.path())])
            .passing_env(&allowed)
            .unwrap();
        assert_eq!(handler.handle(&job("", None)).await, Outcome::Done);
        assert_eq!(read(), format!("{}\npath\n", env!("CARGO_MANIFEST_DIR")));
    }

    #[test]
    fn jobgate_settings_and_job_variables_cannot_be_passed_to_the_command() {
        for name in ["JOBGATE_AMQP_URL", "JOBGATE_X", "JOB_ID", "A=B", ""] {
            let names = vec![name.to_owned(), "PATH".to_owned()];
            let refused = ExecHandler::new("true").unwrap().passing_env(&names);
            if name.is_empty() {
                // Empty entries of the comma list are skipped ("PATH,,HOME").
                assert!(refused.is_ok());
            } else {
                let error = refused.unwrap_err().to_string();
                assert!(error.contains(name), "{error}");
            }
        }
    }

    #[tokio::test]
    async fn no_content_type_is_an_empty_variable() {
        let dir = tempfile::tempdir().unwrap();
        let handler = sh(
            r#"printf '[%s]' "${JOB_CONTENT_TYPE-unset}" > "$0/ct""#,
            &[path_arg(dir.path())],
        );
        assert_eq!(handler.handle(&job("", None)).await, Outcome::Done);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ct")).unwrap(),
            "[]"
        );
    }

    #[tokio::test]
    async fn exit_zero_is_done() {
        assert_eq!(
            sh("exit 0", &[]).handle(&job("x", None)).await,
            Outcome::Done
        );
    }

    #[tokio::test]
    async fn exit_75_is_retried() {
        let outcome = sh("echo 'database busy' >&2; exit 75", &[])
            .handle(&job("x", None))
            .await;
        let reason = retry_reason(outcome);
        assert!(reason.contains("status 75 (EX_TEMPFAIL)"), "{reason}");
        assert!(reason.ends_with("stderr: database busy"), "{reason}");
    }

    #[tokio::test]
    async fn other_exit_codes_are_retried_with_the_code() {
        let reason = retry_reason(sh("exit 3", &[]).handle(&job("x", None)).await);
        assert!(reason.contains("exited with status 3"), "{reason}");
        assert!(!reason.contains("stderr"), "{reason}");
    }

    #[tokio::test]
    async fn a_signal_is_retried() {
        let reason = retry_reason(sh("kill -9 $$", &[]).handle(&job("x", None)).await);
        assert!(reason.contains("killed by signal 9 (SIGKILL)"), "{reason}");
    }

    #[tokio::test]
    async fn a_command_that_ignores_stdin_succeeds() {
        let body = Bytes::from(vec![b'z'; 1024 * 1024]);
        assert_eq!(
            ExecHandler::new("true")
                .unwrap()
                .handle(&job(body.clone(), None))
                .await,
            Outcome::Done
        );
        // Reads a little, then exits while the rest is still being written.
        assert_eq!(
            sh("head -c 10 > /dev/null", &[])
                .handle(&job(body, None))
                .await,
            Outcome::Done
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_retried_with_a_clear_reason() {
        let handler = ExecHandler::new("/nonexistent/jobgate-no-such-program --flag").unwrap();
        let reason = retry_reason(handler.handle(&job("x", None)).await);
        assert!(
            reason.contains("cannot run \"/nonexistent/jobgate-no-such-program\""),
            "{reason}"
        );
        assert!(reason.contains("No such file"), "{reason}");
    }

    #[tokio::test]
    async fn words_are_split_without_a_shell() {
        let handler = ExecHandler::new("echo 'a b'").unwrap();
        assert_eq!(handler.program(), "echo");
        assert_eq!(handler.args(), ["a b"]);

        let handler =
            ExecHandler::new(r#"printf '[%s]' 'a b' "c\"d" $HOME '>' x\ y ';' ls"#).unwrap();
        let finished = handler.run(&job("", None)).await;
        assert_eq!(finished.outcome, Outcome::Done);
        assert_eq!(
            String::from_utf8(finished.stdout.bytes).unwrap(),
            r#"[a b][c"d][$HOME][>][x y][;][ls]"#
        );
    }

    #[tokio::test]
    async fn output_is_captured_bounded_to_its_tail() {
        let handler = sh(
            "head -c 100000 /dev/zero | tr '\\000' a; echo END; head -c 50000 /dev/zero | tr '\\000' e >&2; echo 'last words' >&2; exit 4",
            &[],
        );
        let finished = handler.run(&job("", None)).await;
        assert_eq!(finished.stdout.total, 100_004);
        assert_eq!(finished.stdout.bytes.len(), TAIL_BYTES);
        assert!(finished.stdout.bytes.ends_with(b"aaaEND\n"));
        assert_eq!(finished.stderr.total, 50_011);
        assert_eq!(finished.stderr.bytes.len(), TAIL_BYTES);
        let reason = retry_reason(finished.outcome);
        assert!(reason.contains("status 4"), "{reason}");
        assert!(reason.ends_with("eeelast words"), "{reason}");
        let stderr_part = reason.split_once("stderr: ").unwrap().1;
        assert_eq!(stderr_part.chars().count(), REASON_STDERR_CHARS, "{reason}");
    }

    #[tokio::test]
    async fn stdout_is_the_result_kept_to_the_store_bound_and_one_byte_more() {
        let max = jobgate_shared::status::MAX_RESULT_BYTES;
        let outcome = sh("head -c 100000 /dev/zero | tr '\\0' r", &[])
            .handle(&job("", None))
            .await;
        let Outcome::DoneWith(result) = outcome else {
            panic!("done with a result: {outcome:?}");
        };
        // One byte past the bound tells the store the result was cut.
        assert_eq!(result.len(), max + 1);
        assert!(result.iter().all(|b| *b == b'r'));
        let quiet = sh("true", &[]).handle(&job("", None)).await;
        assert_eq!(quiet, Outcome::Done, "no output, no result");
    }

    #[tokio::test]
    async fn a_background_process_holding_the_pipes_does_not_hold_the_job() {
        let started = std::time::Instant::now();
        let outcome = sh("sleep 5 & echo started", &[])
            .handle(&job("", None))
            .await;
        assert_eq!(outcome, Outcome::DoneWith(Bytes::from_static(b"started\n")));
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    /// Whether a process is gone (or a zombie nobody reaped yet).
    fn is_gone(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // "pid (comm) STATE ..."
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn a_cancelled_job_kills_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let handler = sh(
            r#"echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec sleep 30"#,
            &[path_arg(&pid_file)],
        );
        let job = job("", None);
        let mut run = Box::pin(handler.handle(&job));
        // Let the command start and tell its pid.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let pid = loop {
            tokio::select! {
                outcome = &mut run => panic!("the command should still run: {outcome:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if let Ok(pid) = std::fs::read_to_string(&pid_file) {
                break pid.trim().to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the command did not start"
            );
        };
        assert!(!is_gone(&pid));
        // The worker cancels a job (timeout, end of the shutdown grace) by dropping it.
        drop(run);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_gone(&pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn bad_commands_are_refused() {
        assert!(ExecHandler::new("").is_err());
        assert!(ExecHandler::new("''").is_err());
        assert!(ExecHandler::new("echo \"unclosed").is_err());
    }

    #[test]
    fn the_tail_keeps_the_last_bytes() {
        let mut tail = Tail::default();
        tail.push(&[1; 3000]);
        tail.push(&[2; 3000]);
        assert_eq!(tail.total, 6000);
        assert_eq!(tail.bytes.len(), TAIL_BYTES);
        assert_eq!(
            tail.bytes[..TAIL_BYTES - 3000],
            vec![1; TAIL_BYTES - 3000][..]
        );
        assert!(tail.bytes[TAIL_BYTES - 3000..].iter().all(|&b| b == 2));
        tail.push(&[3; 10_000]);
        assert_eq!(tail.total, 16_000);
        assert!(tail.bytes.iter().all(|&b| b == 3));
        assert_eq!(tail.bytes.len(), TAIL_BYTES);
    }
}
