//! tollgate binary entry point.
fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
