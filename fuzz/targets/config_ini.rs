//! A PgBouncer ini read as pgsilo's config (`Config::from_ini_str`), `%include` too, but
//! for resolving a listen_addr host name (see `without_name_lookups`).
//! Input: the main file, NUL, the text every `%include` reads (itself maybe including).

use pgsilo_fuzz::{split_nul, without_name_lookups};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let parts = split_nul(data, 2);
        let (Ok(main), Ok(included)) = (std::str::from_utf8(parts[0]), std::str::from_utf8(parts[1])) else {
            return;
        };
        let (main, included) = (without_name_lookups(main), without_name_lookups(included));
        let main = main.as_str();
        let load = |_: &std::path::Path| Ok(included.clone());
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
