//! Running PostgreSQL's programs: as an unprivileged user when we are root, with captured
//! output, plus file locks and process checks.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The user the server runs as when we are root.
#[derive(Clone, Copy, Debug)]
pub struct ServerUser {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// `None` when not root (the server then runs as ourselves); otherwise the `postgres`
/// user if it exists, else `nobody`. PostgreSQL refuses to run as root.
pub fn server_user() -> Option<ServerUser> {
    static USER: OnceLock<Option<ServerUser>> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        for name in ["postgres", "nobody"] {
            if let Some(user) = lookup_user(name) {
                return Some(user);
            }
        }
        panic!(
            "running as root, but neither a `postgres` nor a `nobody` user exists, and \
             PostgreSQL refuses to run as root (create one: `useradd --system postgres`)"
        );
    })
}

fn lookup_user(name: &str) -> Option<ServerUser> {
    let cname = CString::new(name).ok()?;
    // SAFETY: all pointers are valid for the call; getpwnam_r only writes into pwd/buf.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() {
            return None;
        }
        Some(ServerUser {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// A command for a server-side program (initdb, pg_ctl, postgres): runs as the server
/// user when we are root, in `cwd` (which that user can enter).
pub fn server_command(program: &Path, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    if let Some(user) = server_user() {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd.current_dir(cwd)
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .env_remove("PGHOST")
        .env_remove("PGOPTIONS");
    cmd
}

/// Give `path` to the server user (no-op unless root). Panics on failure.
pub fn chown_to_server(path: &Path) {
    let Some(user) = server_user() else { return };
    let cpath = c_path(path);
    // SAFETY: cpath is a valid C string.
    if unsafe { libc::chown(cpath.as_ptr(), user.uid, user.gid) } != 0 {
        panic!(
            "chown {} to uid {}: {}",
            path.display(),
            user.uid,
            std::io::Error::last_os_error()
        );
    }
}

/// Write a file the server will read, owned by the server user.
pub fn write_server_file(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    chown_to_server(path);
}

/// Run to completion with stdin from `input` (or /dev/null), capturing output.
/// Returns `Err(description)` if it could not be spawned.
pub fn run(cmd: &mut Command, input: Option<&str>) -> Result<Output, String> {
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_owned();
        // Write from another thread so a chatty child can't deadlock us on a full pipe.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let out = child.wait_with_output();
        let _ = writer.join();
        out.map_err(|e| format!("wait {cmd:?}: {e}"))
    } else {
        child.wait_with_output().map_err(|e| format!("wait {cmd:?}: {e}"))
    }
}

/// Runs psql as the tests use it: `-X -A -t -q -v ON_ERROR_STOP=1`, the SQL on stdin, no
/// service file or PGOPTIONS from the environment. `cmd` is psql with its connection
/// arguments (and password, if any) already set. Returns trimmed stdout, or `Err` with
/// the exit status and stderr.
pub fn run_psql(cmd: &mut Command, sql: &str) -> Result<String, String> {
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .env("PGCONNECT_TIMEOUT", "30")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS");
    let out = run(cmd, Some(sql))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "({}) {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Run and require success; returns stdout. Panics with stdout/stderr otherwise.
pub fn run_ok(cmd: &mut Command, input: Option<&str>) -> String {
    let out = run(cmd, input).unwrap_or_else(|e| panic!("{e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n--- stderr ---\n{}\n--- stdout ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An exclusive `flock` on a file, released on drop (when the fd closes).
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> FileLock {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()));
        loop {
            // SAFETY: the fd is valid for the lifetime of `file`.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return FileLock { _file: file };
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                panic!("flock {}: {err}", path.display());
            }
        }
    }
}

/// Whether a process with this pid exists and has not exited (a zombie waiting to be
/// reaped by someone else counts as dead; EPERM counts as existing).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // /proc/<pid>/stat: "pid (comm) S ...": the state follows the last ')'.
    let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false);
    !zombie
}

/// The postmaster pid recorded in `data/postmaster.pid`, if that process is alive and really
/// is the postmaster of this data directory (its cwd is the data dir): guards against pid
/// reuse, so we never signal an unrelated process.
pub fn live_postmaster(data: &Path) -> Option<i32> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if !process_alive(pid) {
        return None;
    }
    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let data = fs::canonicalize(data).ok()?;
    (cwd == data).then_some(pid)
}

/// Last resort when pg_ctl could not stop a server: SIGQUIT (immediate shutdown), then
/// SIGKILL. Never panics.
pub fn force_kill_postmaster(data: &Path) {
    let Some(pid) = live_postmaster(data) else {
        return;
    };
    // SAFETY: plain signal sends to a verified postmaster pid.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if process_alive(pid) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// `std::fs::remove_dir_all`, retried briefly (exiting backends may still be removing
/// files). Never panics.
pub fn remove_dir_quietly(dir: &Path) {
    for _ in 0..20 {
        match fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// An executable regular file?
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Directory for cluster scratch dirs: `$PGSILO_TEST_TMPDIR` if set; else `/dev/shm` when
/// it is a roomy tmpfs (copying the template there is several times faster than to disk,
/// and steadier on a busy machine); else `$TMPDIR` unless so long that the Unix socket path
/// (limited to 107 bytes) would overflow; else `/tmp`.
pub fn scratch_base() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGSILO_TEST_TMPDIR").filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("PGSILO_TEST_TMPDIR={}: {e}", dir.display()));
            return dir;
        }
        let shm = Path::new("/dev/shm");
        if shm.is_dir() && writable(shm) && available_bytes(shm) >= 4 << 30 {
            return shm.to_path_buf();
        }
        let tmp = std::env::temp_dir();
        if tmp.as_os_str().len() <= 60 && tmp.is_dir() {
            tmp
        } else {
            PathBuf::from("/tmp")
        }
    })
    .clone()
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn writable(path: &Path) -> bool {
    // SAFETY: valid C string.
    unsafe { libc::access(c_path(path).as_ptr(), libc::W_OK) == 0 }
}

fn available_bytes(path: &Path) -> u64 {
    // SAFETY: valid C string and out-pointer.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c_path(path).as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}
