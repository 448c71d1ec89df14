//! tollgate binary entry point.
fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
