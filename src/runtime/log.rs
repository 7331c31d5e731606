//! PgBouncer-style log lines on stderr, so journald (or a terminal) takes them as they are:
//! `2026-11-26 04:00:00.123 UTC [4242] tenant_a LOG message`.

use std::io::Write;
use std::sync::OnceLock;

struct StderrLogger {
    name: String,
    pid: u32,
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Installs the logger once per process; later calls only adjust the level (a reload may
/// change `verbose`).
pub fn init(name: &str, verbose: u8) {
    let logger = LOGGER.get_or_init(|| StderrLogger {
        name: name.to_string(),
        pid: std::process::id(),
    });
    let _ = log::set_logger(logger);
    set_verbosity(verbose);
}

pub fn set_verbosity(verbose: u8) {
    log::set_max_level(match verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => "ERROR",
            log::Level::Warn => "WARNING",
            log::Level::Info => "LOG",
            log::Level::Debug => "DEBUG",
            log::Level::Trace => "NOISE",
        };
        // humantime gives RFC 3339; PgBouncer's layout puts a space and the zone name there.
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let ts = ts.trim_end_matches('Z').replacen('T', " ", 1);
        let line = format!("{ts} UTC [{}] {} {level} {}\n", self.pid, self.name, record.args());
        // One write per line keeps lines from different threads whole.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}
