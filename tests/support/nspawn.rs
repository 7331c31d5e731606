//! A throwaway systemd machine for testing units: `systemd-nspawn --boot` on an overlay of
//! the host's own root filesystem.
//!
//! How [`Machine::boot`] does it, and why:
//! - `unshare --mount --propagation private` gives the machine a mount namespace of its
//!   own, so the tmpfs and the overlay below are never seen by the host and vanish with
//!   the last process in it (no unmounting to forget, even after a crash).
//! - A tmpfs holds the overlay's upper and work dirs; the lower layer is `/`. Nothing the
//!   machine writes reaches the host's disk, and nothing is copied (`--ephemeral` or a
//!   plain `--directory=/` would copy or share the whole root).
//! - Before booting, the overlay loses every `/etc/systemd/system/*.wants` folder and
//!   gains a `disable *` preset: no host service starts in the machine.
//! - `systemd-nspawn --boot --register=no --keep-unit --console=read-only`: the host needs
//!   no machined and no systemd as PID 1. No `--private-network`: the machine shares the
//!   host's network, so services inside reach servers the test started on 127.0.0.1 and
//!   the test reaches theirs.
//! - Commands run inside with `nsenter --target LEADER --all` (LEADER: the machine's PID 1
//!   as the host sees it); files are read and written through `/proc/LEADER/root`.
//! - Dropping the [`Machine`] sends SIGTERM to nspawn (a clean poweroff), then SIGKILL if
//!   it takes too long. If the test process dies first, nspawn gets SIGTERM by
//!   PR_SET_PDEATHSIG.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// PATH inside the machine (the host's environment is not passed in).
const MACHINE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Limit for booting (the machine is noisy: generous).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Limit for one command inside the machine, enforced there by timeout(1).
const COMMAND_TIMEOUT_SECS: u32 = 180;
/// Limit for a clean poweroff before SIGKILL.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs inside the private mount namespace: $1 mount point, $2 machine name, then the
/// extra systemd-nspawn arguments.
const BOOT_SCRIPT: &str = r#"
set -eu
mnt=$1; name=$2; shift 2
mount -t tmpfs -o mode=0755 pgsilo-nspawn "$mnt"
mkdir "$mnt/upper" "$mnt/work" "$mnt/root"
mount -t overlay pgsilo-nspawn -o "lowerdir=/,upperdir=$mnt/upper,workdir=$mnt/work" "$mnt/root"
root=$mnt/root
# No host service may start in the machine.
rm -rf "$root"/etc/systemd/system/*.wants
mkdir -p "$root/etc/systemd/system-preset"
echo 'disable *' >"$root/etc/systemd/system-preset/00-pgsilo-test.preset"
exec systemd-nspawn --quiet --boot --register=no --keep-unit --console=read-only \
  --machine="$name" --directory="$root" "$@"
"#;

/// Why this machine cannot boot a systemd container, if it cannot: not root, or
/// systemd-nspawn, systemd, unshare or nsenter missing, or no mount namespaces allowed.
/// `PGSILO_SKIP_SYSTEMD_TESTS=1` also skips.
pub fn unavailable() -> Option<String> {
    if std::env::var_os("PGSILO_SKIP_SYSTEMD_TESTS").is_some_and(|v| !v.is_empty() && v != "0") {
        return Some("PGSILO_SKIP_SYSTEMD_TESTS is set".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (mounts, namespaces, systemd-nspawn)".into());
    }
    for (program, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
    ] {
        if find_in_path(program).is_none() {
            return Some(format!("{program} not found (Debian: apt-get install {package})"));
        }
    }
    if !["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
        .iter()
        .any(|p| Path::new(p).is_file())
    {
        return Some("systemd is not installed (no /lib/systemd/systemd)".into());
    }
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "cannot create a mount namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| MACHINE_PATH.into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A booted systemd machine. Dropping it powers it off and removes everything.
pub struct Machine {
    name: String,
    /// `unshare` exec'ing sh exec'ing systemd-nspawn: one process.
    nspawn: Child,
    /// The machine's PID 1, as a host PID.
    leader: i32,
    console: PathBuf,
    /// Holds the mount point (empty as the host sees it) and the console log.
    scratch: Option<tempfile::TempDir>,
}

/// What [`Machine::boot`] takes: read-only bind mounts into the machine.
#[derive(Default)]
pub struct MachineBuilder {
    binds: Vec<(PathBuf, String)>,
}

impl MachineBuilder {
    /// Makes host path `source` (a folder or a file) visible read-only at `target`.
    pub fn bind_ro(mut self, source: impl Into<PathBuf>, target: &str) -> Self {
        self.binds.push((source.into(), target.to_string()));
        self
    }

    /// Boots the machine and waits until systemd reports it up (running or degraded).
    pub fn boot(self) -> Machine {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pgsilo-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        remove_stale_scratch_dirs();
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("create a scratch dir for the machine");
        let mnt = scratch.path().join("mnt");
        fs::create_dir(&mnt).expect("create the machine's mount point");
        let console = scratch.path().join("console.log");
        let log = fs::File::create(&console).expect("create the console log");

        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", BOOT_SCRIPT, "pgsilo-nspawn"])
            .arg(&mnt)
            .arg(&name);
        for (source, target) in &self.binds {
            let mut arg = std::ffi::OsString::from("--bind-ro=");
            arg.push(source);
            arg.push(":");
            arg.push(target);
            cmd.arg(arg);
        }
        cmd.env_clear()
            .env("PATH", MACHINE_PATH)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the console log"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let nspawn = cmd.spawn().expect("start unshare/systemd-nspawn");
        let mut machine = Machine {
            name,
            nspawn,
            leader: 0,
            console,
            scratch: Some(scratch),
        };
        machine.wait_for_boot(started);
        machine
    }
}

impl Machine {
    pub fn builder() -> MachineBuilder {
        MachineBuilder::default()
    }

    /// The machine's PID 1 as a host PID (for nsenter, /proc/PID/root).
    pub fn leader(&self) -> i32 {
        self.leader
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The machine's `/` as the host can reach it: `path("/etc/x")` is its /etc/x.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(inside.trim_start_matches('/'))
    }

    /// What the machine printed on its console so far.
    pub fn console_log(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// A command run inside the machine (all its namespaces, its root and cwd /), with a
    /// clean environment and a time limit.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("--target")
            .arg(self.leader.to_string())
            .args(["--all", "--root", "--wd", "--"])
            .args(["timeout", "--kill-after=10"])
            .arg(COMMAND_TIMEOUT_SECS.to_string())
            .args(args)
            .env_clear()
            .env("PATH", MACHINE_PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `args` inside; returns whatever happened.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {args:?}: {e}"))
    }

    /// Runs `args` inside; panics unless it succeeds. Returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        if !out.status.success() {
            panic!(
                "in machine {}: {args:?} failed ({}):\n--- stdout\n{}--- stderr\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a /bin/sh script inside; panics unless it succeeds. Returns stdout.
    pub fn sh(&self, script: &str) -> String {
        self.run_ok(&["/bin/sh", "-ec", script])
    }

    /// `systemctl is-active UNIT` ("active", "inactive", "failed", "activating", ...).
    pub fn unit_state(&self, unit: &str) -> String {
        let out = self.run(&["systemctl", "is-active", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `systemctl show -p PROPERTY --value UNIT`.
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.run_ok(&["systemctl", "show", "-p", property, "--value", unit])
            .trim()
            .to_string()
    }

    /// The unit's journal, message text only.
    pub fn journal(&self, unit: &str) -> String {
        self.run_ok(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
    }

    /// Polls `check` (Ok: done; Err: why not yet) until it succeeds; panics after `timeout`
    /// with the last reason.
    pub fn wait_for<T>(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            match check() {
                Ok(v) => return v,
                Err(why) if Instant::now() >= deadline => {
                    panic!("in machine {}: {what}: not after {timeout:?}: {why}", self.name)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn wait_for_boot(&mut self, started: Instant) {
        let deadline = started + BOOT_TIMEOUT;
        let mut last = String::from("systemd-nspawn has not started the machine yet");
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}) while booting; console:\n{}",
                    self.console_log()
                );
            }
            if self.leader == 0 {
                if let Some(pid) = find_leader(self.nspawn.id() as i32) {
                    self.leader = pid;
                }
            }
            if self.leader != 0 {
                let out = self.run(&["systemctl", "is-system-running"]);
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                match state.as_str() {
                    "running" => return,
                    "degraded" => {
                        let failed = self.run(&["systemctl", "--failed", "--no-legend"]);
                        eprintln!(
                            "machine {} booted degraded:\n{}",
                            self.name,
                            String::from_utf8_lossy(&failed.stdout)
                        );
                        return;
                    }
                    _ => {
                        last = format!(
                            "is-system-running: {state:?} {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        )
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "machine {} not up after {BOOT_TIMEOUT:?} ({last}); console:\n{}",
                    self.name,
                    self.console_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Scratch dirs are named `pgsilo-nspawn-<pid of the test process>-<random>`.
const SCRATCH_PREFIX: &str = "pgsilo-nspawn-";

/// Scratch dirs of test processes that died without cleaning up (killed): their mounts
/// are gone with their namespaces, the folders stay. Dirs of live processes are left
/// alone (their mount point is busy in their namespace, though empty as seen from here).
fn remove_stale_scratch_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(SCRATCH_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The child of `nspawn` that lives in another PID namespace: the machine's PID 1.
fn find_leader(nspawn: i32) -> Option<i32> {
    let own_ns = fs::read_link("/proc/self/ns/pid").ok()?;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid = after.split_whitespace().nth(1).and_then(|s| s.parse::<i32>().ok());
        if ppid != Some(nspawn) {
            continue;
        }
        match fs::read_link(format!("/proc/{pid}/ns/pid")) {
            Ok(ns) if ns != own_ns => return Some(pid),
            _ => {}
        }
    }
    None
}

fn signal(pid: i32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() && self.leader != 0 {
            if let Ok(out) = self
                .command(&["journalctl", "--no-pager", "-n", "150", "-o", "short-monotonic"])
                .output()
            {
                eprintln!(
                    "--- machine {} journal (last 150 lines)\n{}",
                    self.name,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        let nspawn = self.nspawn.id() as i32;
        // SIGTERM to nspawn: it asks the machine's systemd to power off.
        signal(nspawn, libc::SIGTERM);
        let deadline = Instant::now() + POWEROFF_TIMEOUT;
        loop {
            match self.nspawn.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!(
                        "machine {} did not power off in {POWEROFF_TIMEOUT:?}; killing it",
                        self.name
                    );
                    // SIGKILL to a PID namespace's init kills everything in it.
                    signal(self.leader, libc::SIGKILL);
                    signal(nspawn, libc::SIGKILL);
                    let _ = self.nspawn.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        // The mounts went with the namespace; the mount point is an empty folder again.
        if let Some(scratch) = self.scratch.take() {
            let _ = scratch.close();
        }
    }
}
