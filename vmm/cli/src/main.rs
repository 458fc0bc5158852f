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
    let args = cli::Cli::parse();
    cli::init_logging(args.log_level.as_deref());
    let code = match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dormouse: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
