//! `cairn certs`: every declared name set's certificate (state, issuer, expiry, why it waits or failed),
//! from the admin API or the database. Never a key.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use cairn_proto::admin::CertificateInfo;

use super::control::runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin API (--server, CAIRN_SERVER and CAIRN_TOKEN) or else the database
    #[command(flatten)]
    target: super::args::TargetArgs,
    /// Print the certificates as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let certs: Vec<CertificateInfo> = match args.target.resolve()? {
            super::remote::Target::Api(api) => api.get("/certs").await?,
            super::remote::Target::Db(url) => {
                let pool = cairn_reconciler::store::connect(&url, 2)
                    .await
                    .context("cannot connect to the database")?;
                cairn_reconciler::store::migrate(&pool)
                    .await
                    .context("cannot migrate the database")?;
                cairn_reconciler::certs::list(&pool).await?
            }
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&certs)?);
        } else {
            print!("{}", render(&certs));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The certificates as text: one block per name set.
pub fn render(certs: &[CertificateInfo]) -> String {
    let mut out = String::new();
    if certs.is_empty() {
        out.push_str("No certificates: add `[tls]` to cairn.toml to order them for every app.\n");
        return out;
    }
    for c in certs {
        let state = match c.state.as_str() {
            "waiting_dns" => "waiting for DNS",
            other => other,
        };
        let _ = writeln!(out, "{} ({}): {state}", c.names.join(", "), c.app);
        if let Some(t) = c.not_after {
            let warn = if c.expires_soon {
                "  WARNING: expires within 14 days"
            } else {
                ""
            };
            let _ = writeln!(out, "  expires {}{warn}", t.format("%Y-%m-%d %H:%M UTC"));
        }
        if let Some(i) = &c.issuer {
            let _ = writeln!(
                out,
                "  issuer {i}, serial {}",
                c.serial.as_deref().unwrap_or("?")
            );
        }
        if let Some(e) = &c.last_error {
            let _ = writeln!(out, "  last attempt failed ({} in a row): {e}", c.attempts);
        }
        let next = c.next_attempt_at.format("%Y-%m-%d %H:%M UTC");
        let _ = match c.state.as_str() {
            "issued" => writeln!(out, "  renews around {next}"),
            "ordering" | "renewing" => Ok(()),
            _ => writeln!(out, "  next attempt {next}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    #[test]
    fn waiting_and_issued_certificates_say_why_and_when() {
        let t = |d| chrono::Utc.with_ymd_and_hms(2026, 12, d, 10, 0, 0).unwrap();
        let certs = [
            CertificateInfo {
                app: "shop".into(),
                names: vec!["shop.apps.example.com".into(), "shop.example.com".into()],
                state: "waiting_dns".into(),
                issuer: None,
                serial: None,
                not_after: None,
                expires_soon: false,
                last_error: Some("`shop.example.com` resolves to 192.0.2.7, which refused the connection or is unreachable at /.well-known/acme-challenge/ (port 80): point its DNS at the ingress nodes".into()),
                attempts: 3,
                next_attempt_at: t(6),
                issued_at: None,
            },
            CertificateInfo {
                app: "web".into(),
                names: vec!["web.apps.example.com".into()],
                state: "issued".into(),
                issuer: Some("CN=Pebble Intermediate CA".into()),
                serial: Some("0a1b".into()),
                not_after: Some(t(15)),
                expires_soon: true,
                last_error: None,
                attempts: 0,
                next_attempt_at: t(10),
                issued_at: Some(t(1)),
            },
        ];
        insta::assert_snapshot!(render(&certs));
        assert!(render(&[]).contains("[tls]"));
    }
}
