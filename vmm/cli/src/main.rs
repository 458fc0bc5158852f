//! The `dormouse` command: a thin client of the `vmm` library.

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod cli;

use clap::Parser;

fn main() {
    // `dormouse bench boot`'s process baseline: the cost of starting this binary, nothing more.
    if std::env::var_os(vmm_bench::floor::PROCESS_FLOOR_ENV).is_some() {
        return;
    }
    let result = if cli::firecracker::invoked_as_firecracker() {
        // Firecracker's command line, whose logging flags set up logging themselves.
        cli::firecracker::firecracker(cli::firecracker::FirecrackerCli::parse().args)
    } else if cli::jailer::invoked_as_jailer() {
        // No log of its own: the jailed `firecracker` sets up the process's one logger.
        cli::jailer::jailer(cli::jailer::JailerCli::parse().args)
    } else {
        let args = cli::Cli::parse();
        if !matches!(
            args.command,
            cli::Command::Firecracker(_) | cli::Command::Jailer(_)
        ) {
            cli::init_logging(args.log_level.as_deref());
        }
        cli::dispatch(args)
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dormouse: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
