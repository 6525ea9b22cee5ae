use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

use super::repo::{Repo, load_dir, load_git};
use super::{EXIT_FAILURE, read_identity};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config repository directory (default: the current directory)
    #[arg(conflicts_with = "repo")]
    dir: Option<PathBuf>,
    /// A directory or git URL to validate instead of DIR
    #[arg(long, value_name = "DIR|GIT_URL")]
    repo: Option<String>,
    /// The git ref to read when --repo is a git URL
    #[arg(long = "ref", value_name = "REF", requires = "repo")]
    git_ref: Option<String>,
    /// Also check that every secret decrypts with this age identity (or CAIRN_IDENTITY)
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let identity = read_identity(args.identity.as_ref())?;
    let mut repo = match (&args.dir, &args.repo) {
        (Some(d), _) => load_dir(d)?,
        (None, Some(r)) if std::path::Path::new(r).is_dir() => load_dir(std::path::Path::new(r))?,
        (None, Some(url)) => load_git(url, args.git_ref.as_deref().unwrap_or("main"))?,
        (None, None) => load_dir(std::path::Path::new("."))?,
    };
    if let Some(id) = &identity {
        let extra = cairn_schema::check_secrets(&repo.loaded, &repo.parsed, id);
        if !extra.is_empty() {
            repo.loaded.diagnostics.0.extend(extra);
            repo.loaded.desired = None;
        }
    }
    let Repo { loaded, .. } = repo;
    let valid = !loaded.diagnostics.has_errors() && loaded.desired.is_some();
    let errors = loaded.diagnostics.errors().count();
    let warnings = loaded.diagnostics.warnings().count();
    if args.json {
        let counts = loaded.desired.as_ref().map(|d| {
            d.counts()
                .iter()
                .map(|(k, n)| (k.plural().to_owned(), json!(n)))
                .collect::<serde_json::Map<_, _>>()
        });
        let out = json!({
            "valid": valid,
            "counts": counts,
            "errors": errors,
            "warnings": warnings,
            "diagnostics": loaded.diagnostics.0.iter().map(|d| {
                let mut v = serde_json::to_value(d).expect("diagnostic serializes");
                v["location"] = json!(d.location());
                v["rendered"] = json!(d.to_string());
                v
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for d in &loaded.diagnostics.0 {
            eprintln!("{d}\n");
        }
        match &loaded.desired {
            Some(d) if valid => {
                let counts: Vec<String> = d
                    .counts()
                    .iter()
                    .map(|(k, n)| format!("{n} {}", plural(*n, k.as_str(), k.plural())))
                    .collect();
                let checked = if identity.is_some() {
                    ", every secret decrypts"
                } else {
                    ""
                };
                println!(
                    "valid: {}{checked} ({warnings} {})",
                    counts.join(", "),
                    plural(warnings, "warning", "warnings")
                );
            }
            _ => eprintln!(
                "invalid: {errors} {}, {warnings} {}",
                plural(errors, "error", "errors"),
                plural(warnings, "warning", "warnings")
            ),
        }
    }
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}
