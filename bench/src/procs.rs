//! The binaries under test: spawning the release `producer` and `consumer`, waiting for
//! them, reading their peak memory, stopping them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// Where the binaries are and where their logs go.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
    pub logs: PathBuf,
}

/// A spawned binary. Killed when dropped (an error or Ctrl-C mid-run leaves nothing
/// behind).
pub struct Running {
    pub name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Binaries {
    /// Starts `binary` with `env` on top of the inherited environment minus every
    /// `JOBGATE_*` variable (the bench's settings only), logs to `<logs>/<name>.log`.
    pub fn spawn(&self, binary: &str, name: &str, env: &[(&str, String)]) -> Result<Running> {
        let program = self.dir.join(binary);
        if !program.is_file() {
            bail!(
                "{} not found: build it first (cargo build --release -p {binary})",
                program.display()
            );
        }
        self.spawn_program(&program, name, env)
    }

    /// [`Binaries::spawn`] for a program outside the binaries' directory.
    pub fn spawn_program(
        &self,
        program: &Path,
        name: &str,
        env: &[(&str, String)],
    ) -> Result<Running> {
        std::fs::create_dir_all(&self.logs)
            .with_context(|| format!("creating {}", self.logs.display()))?;
        let log = self.logs.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("JOBGATE_") {
                command.env_remove(key);
            }
        }
        command
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id().context("the child has no pid")?;
        Ok(Running {
            name: name.to_owned(),
            child,
            pid,
            log,
        })
    }
}

impl Running {
    /// An error if the process has exited (it should be serving).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); its log: {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// Peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_vm_hwm(&status).with_context(|| format!("no VmHWM line in {path}"))
    }

    /// Resident memory now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_status_kib(&status, "VmRSS").with_context(|| format!("no VmRSS line in {path}"))
    }

    /// CPU time (user + system) the process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let ticks = parse_cpu_ticks(&stat).with_context(|| format!("no CPU times in {path}"))?;
        Ok(ticks as f64 / clock_ticks_per_second())
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL. A non-zero exit after
    /// SIGTERM is an error: the binary failed to shut down.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            // Already gone: reap it and report how it ended.
            let status = self.child.wait().await?;
            bail!(
                "{} had exited before it was stopped ({status}); log: {}",
                self.name,
                self.log.display()
            );
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!(
                        "{} exited with {status} on SIGTERM; log: {}",
                        self.name,
                        self.log.display()
                    );
                }
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!(
                    "{} did not stop within {grace:?} of SIGTERM; log: {}",
                    self.name,
                    self.log.display()
                )
            }
        }
    }
}

/// The `VmHWM` figure (KiB) of a `/proc/<pid>/status` text.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    parse_status_kib(status, "VmHWM")
}

/// The figure (KiB) of line `field` of a `/proc/<pid>/status` text.
fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// utime + stime (clock ticks) of a `/proc/<pid>/stat` line. The command name (field
/// 2) may hold spaces and parentheses, so fields are counted from its closing `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields 3 (state) onwards; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK` (100 on Linux when it cannot be asked).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// A port that was free on 127.0.0.1 a moment ago (the producer binds it next).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `GET <base>/readyz` answers 200 (the producer is connected to its broker).
pub async fn wait_ready(http: &reqwest::Client, base: &str, process: &mut Running) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = format!("{base}/readyz");
    loop {
        process.check_alive()?;
        if let Ok(r) = http.get(&url).send().await {
            if r.status() == reqwest::StatusCode::OK {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready within 60 s; log: {}",
                process.name,
                process.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `<workspace>/target/release` next to the running bench binary, when it is there.
pub fn default_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_from_proc_status() {
        let status =
            "Name:\tproducer\nVmPeak:\t  900000 kB\nVmHWM:\t   20480 kB\nVmRSS:\t 10240 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(20480));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(parse_vm_hwm(&own).unwrap() > 0);
    }

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis must not shift the fields.
        let stat = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 300 0 0 0 250 75 0 0 20 0 9 0 100 1000 50";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (short) S 1"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_cpu_ticks(&own).is_some());
    }
}
