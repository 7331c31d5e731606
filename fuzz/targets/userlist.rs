//! The auth_file (userlist.txt): `"user" "secret"` lines, comments, quoting.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(list) = pgsilo::config::Userlist::parse(text, std::path::Path::new("userlist.txt")) {
            for (user, secret) in list.users() {
                assert!(list.get(user).is_some());
                let _ = secret.kind();
            }
        }
    });
}
