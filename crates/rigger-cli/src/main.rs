//! The `rigger` binary. Everything happens in [`rigger_cli::run`], so tests can call it too.

fn main() -> std::process::ExitCode {
    rigger_cli::run(std::env::args_os())
}
