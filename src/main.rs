//! tollgate binary entry point.

// mimalloc instead of glibc malloc: glibc's malloc/free were ~10% of the request path's CPU
// under load (bench/profile.sh); see BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
