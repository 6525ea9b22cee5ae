//! A database server in a container (the Docker driver's way): its data in a named volume, the
//! container on the host's network (it listens on its port like a process server would), restarted by
//! the engine unless stopped (so it outlives the agent, and a restarted agent adopts it by name).
//! Everything goes through the `docker` CLI, whose client tools (`docker exec`) carry passwords only in
//! their environment (`-e NAME` without a value) or on stdin, never on a command line.
//!
//! All three engines use it. What it must not do: remove a volume except for an
//! explicit drop ([`remove`]).

use std::time::Duration;

use super::server::{Scrub, Tool};
use super::{Container, DbError};

/// The docker CLI (`DOCKER_HOST` is honoured).
const DOCKER: &str = "docker";

/// How long a stopping server gets before the engine kills it.
const STOP_PATIENCE: Duration = Duration::from_secs(60);

async fn docker(args: &[&str], scrub: &Scrub) -> Result<String, DbError> {
    Tool::new(DOCKER).args(args).run(scrub).await
}

fn labels(c: &Container) -> Vec<String> {
    c.labels
        .iter()
        .flat_map(|(k, v)| ["--label".to_owned(), format!("{k}={v}")])
        .collect()
}

/// `docker <how> --user USER --entrypoint ENTRYPOINT --volume NAME:MOUNT <labels> IMAGE ARGS...`.
fn command(
    c: &Container,
    how: &[&str],
    user: &str,
    mount: &str,
    entrypoint: &str,
    args: &[String],
) -> Vec<String> {
    let mut all: Vec<String> = how.iter().map(|s| (*s).to_owned()).collect();
    all.extend([
        "--user".to_owned(),
        user.to_owned(),
        "--entrypoint".to_owned(),
        entrypoint.to_owned(),
        "--volume".to_owned(),
        format!("{}:{mount}", c.name),
    ]);
    all.extend(labels(c));
    all.push(c.image.clone());
    all.extend(args.iter().cloned());
    all
}

/// Whether the container runs (`Some(true)`), exists stopped (`Some(false)`), or does not exist.
pub(crate) async fn state(c: &Container) -> Result<Option<bool>, DbError> {
    let scrub = Scrub::default();
    match docker(
        &[
            "container",
            "inspect",
            "--format",
            "{{.State.Running}}",
            &c.name,
        ],
        &scrub,
    )
    .await
    {
        Ok(out) => Ok(Some(out.trim() == "true")),
        Err(e) if e.to_string().contains("No such") => Ok(None),
        Err(e) => Err(e),
    }
}

/// A fresh, empty volume (a half-made one from an interrupted init is removed first, with any
/// container using it).
pub(crate) async fn fresh_volume(c: &Container, scrub: &Scrub) -> Result<(), DbError> {
    let _ = docker(&["rm", "--force", &c.name], scrub).await;
    let _ = docker(&["volume", "rm", "--force", &c.name], scrub).await;
    let mut args = vec!["volume".to_owned(), "create".to_owned()];
    args.extend(labels(c));
    args.push(c.name.clone());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args, scrub).await.map(|_| ())
}

/// Runs `entrypoint args` once in a throwaway container of the image, as `user`, with the volume at
/// `mount` and `stdin` on its standard input (an init tool reading a password file from /dev/stdin).
pub(crate) async fn run_once(
    c: &Container,
    user: &str,
    mount: &str,
    entrypoint: &str,
    args: &[String],
    stdin: Vec<u8>,
    scrub: &Scrub,
) -> Result<String, DbError> {
    let all = command(
        c,
        &["run", "--rm", "--interactive", "--network", "none"],
        user,
        mount,
        entrypoint,
        args,
    );
    Tool::new(DOCKER).args(&all).stdin(stdin).run(scrub).await
}

/// Creates the server's container (not started): the image's `entrypoint args` as `user`, on the
/// host's network, the volume at `mount`, restarted by the engine unless stopped.
pub(crate) async fn create(
    c: &Container,
    user: &str,
    mount: &str,
    entrypoint: &str,
    args: &[String],
    scrub: &Scrub,
) -> Result<(), DbError> {
    let all = command(
        c,
        &[
            "create",
            "--name",
            &c.name,
            "--network",
            "host",
            "--restart",
            "unless-stopped",
        ],
        user,
        mount,
        entrypoint,
        args,
    );
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    docker(&all, scrub).await.map(|_| ())
}

/// Copies a file of this node into the (created or running) container at `path`, readable there by
/// the server's account (`docker cp` keeps the mode and makes root the owner; the file's directory on
/// this node is the agent's own, 0700).
pub(crate) async fn copy_in(
    c: &Container,
    from: &std::path::Path,
    path: &str,
    scrub: &Scrub,
) -> Result<(), DbError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(from, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| super::server::io("chmod", from, e))?;
    let from = from.to_string_lossy();
    docker(&["cp", &from, &format!("{}:{path}", c.name)], scrub)
        .await
        .map(|_| ())
}

/// Runs `args` in the running container as root (a file the agent copied in and removes).
pub(crate) async fn exec_root(c: &Container, args: &[&str], scrub: &Scrub) -> Result<(), DbError> {
    let mut all = vec!["exec", "--user", "root", &c.name];
    all.extend_from_slice(args);
    docker(&all, scrub).await.map(|_| ())
}

pub(crate) async fn start(c: &Container, scrub: &Scrub) -> Result<(), DbError> {
    docker(&["start", &c.name], scrub).await.map(|_| ())
}

/// `ready` as it is, or its error with the container's last output (why the server did not come up).
pub(crate) async fn with_logs(
    c: &Container,
    ready: Result<(), DbError>,
    scrub: &Scrub,
) -> Result<(), DbError> {
    match ready {
        Ok(()) => Ok(()),
        Err(e) => Err(scrub.failed(
            format!("{e}; the container {} said", c.name),
            &logs(c).await,
        )),
    }
}

/// The container's output.
async fn logs(c: &Container) -> String {
    let out = Tool::new(DOCKER)
        .args(["logs", "--tail", "30", &c.name])
        .command()
        .output()
        .await;
    out.map(|o| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
    .unwrap_or_default()
}

/// Stops the server (the engine's SIGTERM, then SIGKILL after a minute), keeping container and volume.
pub(crate) async fn stop(c: &Container) -> Result<(), DbError> {
    if state(c).await? == Some(true) {
        let patience = STOP_PATIENCE.as_secs().to_string();
        docker(&["stop", "--time", &patience, &c.name], &Scrub::default()).await?;
    }
    Ok(())
}

/// Removes the container and its volume: the data is gone (an explicit drop only).
pub(crate) async fn remove(c: &Container) -> Result<(), DbError> {
    let scrub = Scrub::default();
    docker(&["rm", "--force", "--volumes", &c.name], &scrub).await?;
    match docker(&["volume", "rm", "--force", &c.name], &scrub).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("No such") => Ok(()),
        Err(e) => Err(e),
    }
}
