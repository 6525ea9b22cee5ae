//! `cairn-agent`: the node agent. A thin binary: it parses arguments and calls the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let parsed = match cairn_agent::cli::completions(std::env::args_os()) {
        Some(done) => done.map(|()| None),
        None => cairn_agent::cli::Args::try_parse().map(Some),
    };
    let args = match parsed {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(64),
            };
        }
    };
    match cairn_agent::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
