//! Where an operator command goes: the control plane's admin API when given `--server` (or
//! `CAIRN_SERVER`) and an admin token, else the database (`--database-url` or `DATABASE_URL`).
//!
//! Several control planes: `--server` repeated or a comma list; a command goes to the first that can be
//! reached, and moves to the next when one refuses the connection or answers 502, 503 or 504 (its
//! request never reached a working control plane, so sending it again is safe).
//!
//! The admin token comes from `CAIRN_TOKEN` or `--token-file FILE`, never from an argument: arguments
//! show up in `ps` and in shell history.

use anyhow::{Context, Result, bail};
use cairn_proto::ErrorBody;
use serde::de::DeserializeOwned;

use super::args::TargetArgs;

/// The resolved target.
#[derive(Debug)]
pub enum Target {
    Api(AdminClient),
    Db(String),
}

impl TargetArgs {
    pub fn resolve(&self) -> Result<Target> {
        if !self.server.is_empty() {
            let server = self.server.join(",");
            let token = match &self.token_file {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read the token file {}", p.display()))?
                    .trim()
                    .to_owned(),
                None => std::env::var("CAIRN_TOKEN")
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            };
            if token.is_empty() {
                bail!(
                    "--server needs an admin token: set CAIRN_TOKEN or pass --token-file FILE \
                     (`cairn token create` makes one)"
                );
            }
            return Ok(Target::Api(AdminClient::new(&server, token)?));
        }
        match &self.database_url {
            Some(url) => Ok(Target::Db(url.clone())),
            None => bail!(
                "say where the control plane is: --server URL (or CAIRN_SERVER) with CAIRN_TOKEN, or \
                 --database-url URL (or DATABASE_URL)"
            ),
        }
    }
}

/// A client of the admin API of one or more control planes.
pub struct AdminClient {
    bases: Vec<String>,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("bases", &self.bases)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client of the control planes at `server`: URLs separated by commas.
    pub fn new(server: &str, token: String) -> Result<Self> {
        let mut bases = Vec::new();
        for s in server.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let base = s.trim_end_matches('/').to_owned();
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                bail!("--server must be an http:// or https:// URL, not `{s}`");
            }
            bases.push(base);
        }
        if bases.is_empty() {
            bail!("--server names no control plane");
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("cannot make an HTTP client")?;
        Ok(AdminClient { bases, token, http })
    }

    fn url(base: &str, path: &str) -> String {
        format!("{base}{}{path}", cairn_proto::ADMIN_API)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(|b| self.http.get(Self::url(b, path))).await
    }

    pub async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send(|b| self.http.post(Self::url(b, path)).json(body))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(|b| self.http.delete(Self::url(b, path))).await
    }

    /// A GET whose answer is not JSON (a statement's bytes).
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        self.answer(|b| self.http.get(Self::url(b, path))).await
    }

    /// The body of a successful answer; a refusal as an error with the control plane's message. Tries
    /// each control plane in turn while one cannot take the request.
    async fn answer(&self, make: impl Fn(&str) -> reqwest::RequestBuilder) -> Result<Vec<u8>> {
        let mut unavailable = Vec::new();
        for base in &self.bases {
            let resp = match make(base).bearer_auth(&self.token).send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() && base != self.bases.last().unwrap_or(base) => {
                    unavailable.push(format!("{base}: cannot connect"));
                    continue;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e))
                        .with_context(|| format!("cannot reach the control plane at {base}"));
                }
            };
            let status = resp.status();
            let bytes = resp
                .bytes()
                .await
                .context("cannot read the control plane's answer")?;
            if matches!(status.as_u16(), 502..=504) && base != self.bases.last().unwrap_or(base) {
                unavailable.push(format!("{base}: {status}"));
                continue;
            }
            if !unavailable.is_empty() {
                tracing::info!(skipped = ?unavailable, "answered by {base}");
            }
            if !status.is_success() {
                let message = serde_json::from_slice::<ErrorBody>(&bytes)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
                bail!("the control plane refused: {status}: {message}");
            }
            return Ok(bytes.to_vec());
        }
        bail!(
            "no control plane could be reached: {}",
            unavailable.join("; ")
        )
    }

    async fn send<T: DeserializeOwned>(
        &self,
        make: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<T> {
        let bytes = self.answer(make).await?;
        serde_json::from_slice(&bytes)
            .context("the control plane's answer is not what this cairn expects")
    }
}

/// A small pool on the database at `url`, its schema brought up to date.
pub async fn connect_db(url: &str) -> Result<sqlx::PgPool> {
    let pool = cairn_reconciler::store::connect(url, 2)
        .await
        .context("cannot connect to the database")?;
    cairn_reconciler::store::migrate(&pool)
        .await
        .context("cannot migrate the database")?;
    Ok(pool)
}
