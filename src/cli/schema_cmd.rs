use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which file's schema: a manifest, or the repository settings file cairn.toml
    #[arg(value_enum, default_value = "manifest")]
    which: Which,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Which {
    Manifest,
    Settings,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let schema = match args.which {
        Which::Manifest => cairn_schema::json_schema::manifest(),
        Which::Settings => cairn_schema::json_schema::settings(),
    };
    let text = serde_json::to_string_pretty(&schema)?;
    // `cairn schema | head` closes the pipe early; that is not an error worth a panic.
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}
