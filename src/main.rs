//! `pgsilo CONFIG`: the command line, and nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// A per-tenant PostgreSQL connection pooler: one process per tenant, one pinned worker
/// per core, io_uring underneath.
#[derive(Parser)]
#[command(name = "pgsilo", version, about)]
struct Args {
    /// The instance's TOML config file.
    config: PathBuf,
    /// Validate the config and its auth_file, print every problem, and exit (0: valid).
    #[arg(long)]
    check: bool,
    /// Replace a running pgsilo for the same tenant without refusing a connection: take
    /// over its listening sockets, then let it drain and exit.
    #[arg(long)]
    takeover: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (config, userlist) = match pgsilo::config::check(&args.config) {
        Ok(ok) => ok,
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!("pgsilo: {} problem(s) in {}", problems.len(), args.config.display());
            return ExitCode::from(1);
        }
    };
    if args.check {
        // The certificates and keys too: a file that does not load fails the start.
        if let Err(e) = pgsilo::tls::TlsContext::load(&config.general.front_door) {
            eprintln!("{}: {e}", args.config.display());
            eprintln!("pgsilo: 1 problem(s) in {}", args.config.display());
            return ExitCode::from(1);
        }
        println!(
            "{}: configuration ok ({} database(s), {} user(s) in {})",
            args.config.display(),
            config.databases.len(),
            userlist.len(),
            userlist.path.display()
        );
        return ExitCode::SUCCESS;
    }
    pgsilo::runtime::log::init(&config.general.name, config.general.verbose.min(255) as u8);
    pgsilo::runtime::title::set_thread_name(&format!("pgsilo:{}", config.general.name));
    log::info!(
        "pgsilo {} starting, config {}",
        env!("CARGO_PKG_VERSION"),
        config.path.display()
    );
    match pgsilo::runtime::run(config, userlist, args.takeover) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("pgsilo: {e}");
            ExitCode::from(1)
        }
    }
}
