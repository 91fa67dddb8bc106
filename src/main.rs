//! The `imago` command line: local generation, the worker, its clients and developer tools.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Every freed heap block is zeroed first: Private Mode's net for copies of user content made inside libraries.
#[global_allocator]
static ALLOCATOR: imago::private::ZeroOnFree = imago::private::ZeroOnFree(std::alloc::System);

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(args.verbose);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
