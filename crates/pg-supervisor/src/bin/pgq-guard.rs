//! The guard process (safety rule S4); see `pg_supervisor::guard`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(pg_supervisor::run_guard(&args));
}
