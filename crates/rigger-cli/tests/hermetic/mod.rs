//! The `rigger` binary as every test runs it: hermetic. Nothing of the shell or the machine
//! running the tests reaches it: no AWS credentials, profile, region, config or credentials
//! file, and no instance metadata service, so no test can reach real AWS whatever the machine
//! has (a test that talks to the emulator sets the emulator's fake credentials afterwards);
//! no log filter or colour setting changes what it prints.

// Each test binary uses part of it.
#![allow(dead_code)]

use std::process::Command;

pub fn rigger_binary() -> Command {
    hermetic(Command::new(env!("CARGO_BIN_EXE_rigger")))
}

/// `command` (rigger, or a script that runs it) with nothing of the environment that could
/// reach real AWS or change what rigger prints.
pub fn hermetic(mut command: Command) -> Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            command.env_remove(name);
        }
    }
    command
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    command
}
