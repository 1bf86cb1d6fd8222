//! The `vtp` command-line tool.
fn main() {
    std::process::exit(vtp::cli::main());
}
