//! `chorus`: see `cli` for the commands and `app` for what `serve` runs.

fn main() -> std::process::ExitCode {
    chorus::cli::main()
}
