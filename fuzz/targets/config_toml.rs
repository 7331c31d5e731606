//! pgsilo's TOML config (`Config::from_str`): parsing and every check on it, but for
//! resolving a listen_addr host name (see `without_name_lookups`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let text = &pgsilo_fuzz::without_name_lookups(text);
        match pgsilo::config::Config::from_str(text, std::path::Path::new("/etc/pgsilo/tenant.toml")) {
            Ok(config) => {
                let _ = config.config_items();
            }
            Err(e) => {
                let _ = e.messages();
            }
        }
    });
}
