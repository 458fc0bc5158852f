//! The `dormouse` command: a thin client of the `vmm` library.

mod cli;

use clap::Parser;

fn main() {
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
