//! `chorus`: see `cli` for the commands and `app` for what `serve` runs.

/// mimalloc instead of the system allocator: under load, glibc's malloc/free took about a fifth
/// of the server's CPU in profiles of the request path (load-tests/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    chorus::cli::main()
}
