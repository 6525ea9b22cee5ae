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
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(ExitCode::SUCCESS)
}
