fn main() {
    eprintln!("pgsilo-loadtest: not built yet (see issue 4)");
    std::process::exit(2);
}
