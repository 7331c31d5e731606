//! A PgBouncer ini read as pgsilo's config (`Config::from_ini_str`), `%include` too.
//! Input: the main file, NUL, the text every `%include` reads (itself maybe including).

use pgsilo_fuzz::split_nul;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let parts = split_nul(data, 2);
        let (Ok(main), Ok(included)) = (std::str::from_utf8(parts[0]), std::str::from_utf8(parts[1])) else {
            return;
        };
        let load = |_: &std::path::Path| Ok(included.to_string());
        let path = std::path::Path::new("/etc/pgbouncer/pgbouncer.ini");
        let _ = pgsilo::config::is_pgbouncer_config(path, main);
        match pgsilo::config::Config::from_ini_str(main, path, &load) {
            Ok(config) => {
                let _ = config.config_items();
            }
            Err(e) => {
                let _ = e.messages();
            }
        }
    });
}
