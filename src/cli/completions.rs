//! `cairn completions SHELL`: a completion script for bash, zsh, fish, elvish or PowerShell on stdout,
//! generated from the same clap definitions the commands parse with, so it never goes stale.

use std::process::ExitCode;

use anyhow::Result;
use clap::CommandFactory as _;

#[derive(Debug, clap::Args)]
#[command(after_help = "Install, for example:\n  \
    bash: cairn completions bash > /etc/bash_completion.d/cairn\n  \
    zsh:  cairn completions zsh > \"${fpath[1]}/_cairn\"\n  \
    fish: cairn completions fish > ~/.config/fish/completions/cairn.fish")]
pub struct Args {
    /// The shell to complete for
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "cairn", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
