//! `pgsilo CONFIG`: the command line, and nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A per-tenant PostgreSQL connection pooler: one process per tenant, one pinned worker
/// per core, io_uring underneath.
#[derive(Parser)]
#[command(
    name = "pgsilo",
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    /// The instance's config file: pgsilo's TOML, or a PgBouncer ini (`.ini`, or any file
    /// with a `[pgbouncer]` section) read as PgBouncer reads it.
    #[arg(required = true)]
    config: Option<PathBuf>,
    /// Validate the config and its auth_file, print every problem, and exit (0: valid).
    #[arg(long)]
    check: bool,
    /// Replace a running pgsilo for the same tenant without refusing a connection: take
    /// over its listening sockets, then let it drain and exit.
    #[arg(long)]
    takeover: bool,
    /// Refuse PgBouncer settings pgsilo does not implement, instead of warning about
    /// them.
    #[arg(long)]
    strict: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the pgsilo TOML equivalent of a PgBouncer ini file.
    Convert {
        /// The PgBouncer config (pgbouncer.ini).
        file: PathBuf,
        /// Refuse PgBouncer settings pgsilo does not implement, instead of leaving them
        /// out with a warning.
        #[arg(long)]
        strict: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Convert { file, strict }) = &args.command {
        return convert(file, *strict);
    }
    let Some(path) = args.config else {
        // clap requires CONFIG when there is no subcommand.
        return ExitCode::from(2);
    };
    let checked = match pgsilo::config::check_with(&path, args.strict) {
        Ok(checked) => checked,
        Err(problems) => return report_problems(&problems, &path),
    };
    if args.check {
        for note in &checked.notes {
            eprintln!("note: {note}");
        }
        for warning in &checked.warnings {
            eprintln!("warning: {warning}");
        }
        // The certificates and keys too: a file that does not load fails the start.
        if let Err(e) = pgsilo::tls::TlsContext::load(&checked.config.general.front_door) {
            eprintln!("{}: {e}", path.display());
            eprintln!("pgsilo: 1 problem(s) in {}", path.display());
            return ExitCode::from(1);
        }
        println!(
            "{}: configuration ok ({} database(s), {} user(s) in {})",
            path.display(),
            checked.config.databases.len(),
            checked.userlist.len(),
            checked.userlist.path.display()
        );
        return ExitCode::SUCCESS;
    }
    let config = checked.config;
    pgsilo::runtime::log::init(&config.general.name, config.general.verbose.min(255) as u8);
    pgsilo::runtime::title::set_thread_name(&format!("pgsilo:{}", config.general.name));
    log::info!(
        "pgsilo {} starting, config {}",
        env!("CARGO_PKG_VERSION"),
        config.path.display()
    );
    for note in &checked.notes {
        log::info!("{note}");
    }
    for warning in &checked.warnings {
        log::warn!("{warning}");
    }
    match pgsilo::runtime::run(config, checked.userlist, args.takeover) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("pgsilo: {e}");
            ExitCode::from(1)
        }
    }
}

fn report_problems(problems: &[String], path: &std::path::Path) -> ExitCode {
    for p in problems {
        eprintln!("{p}");
    }
    eprintln!("pgsilo: {} problem(s) in {}", problems.len(), path.display());
    ExitCode::from(1)
}

/// `pgsilo convert FILE`: the TOML on stdout, what was left out on stderr.
fn convert(file: &std::path::Path, strict: bool) -> ExitCode {
    match pgsilo::config::convert(file, strict) {
        Ok(converted) => {
            for note in &converted.notes {
                eprintln!("note: {note}");
            }
            for warning in &converted.warnings {
                eprintln!("warning: {warning}");
            }
            print!("{}", converted.toml);
            ExitCode::SUCCESS
        }
        Err(problems) => report_problems(&problems, file),
    }
}
