//! Where an operator command goes: the control plane's admin API when given `--server` (or
//! `CAIRN_SERVER`) and an admin token, else the database (`--database-url` or `DATABASE_URL`).
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
        if let Some(server) = &self.server {
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
            return Ok(Target::Api(AdminClient::new(server, token)?));
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

/// A client of the admin API.
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    pub fn new(server: &str, token: String) -> Result<Self> {
        let base = server.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--server must be an http:// or https:// URL, not `{server}`");
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot make an HTTP client")?;
        Ok(AdminClient { base, token, http })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}{path}", self.base, cairn_proto::ADMIN_API)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let req = self.http.get(self.url(path));
        self.send(req).await
    }

    pub async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let req = self.http.post(self.url(path)).json(body);
        self.send(req).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let req = self.http.delete(self.url(path));
        self.send(req).await
    }

    /// A GET whose answer is not JSON (a statement's bytes).
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        self.answer(self.http.get(self.url(path))).await
    }

    /// The body of a successful answer; a refusal as an error with the control plane's message.
    async fn answer(&self, req: reqwest::RequestBuilder) -> Result<Vec<u8>> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .context("cannot read the control plane's answer")?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("the control plane refused: {status}: {message}");
        }
        Ok(bytes.to_vec())
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let bytes = self.answer(req).await?;
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
