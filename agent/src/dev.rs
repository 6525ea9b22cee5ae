//! What `cairn dev` needs from the Docker engine on the developer's machine, kept here because this crate
//! is the only code in Cairn that talks to Docker: whether an engine answers, a base image with a static
//! busybox built from the host's binary (so the examples run with no registry access), and removing every
//! container of an installation when `cairn dev` stops (and, for tests and benchmarks that made an
//! installation of their own, its images).
//!
//! What it must not do: pull anything, or touch containers of another installation (every container
//! removed carries the installation's label; the engine filters on it).

use std::collections::HashMap;
use std::path::Path;

use bollard::Docker;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, StopContainerOptionsBuilder,
};
use cairn_schema::Name;
use futures_util::StreamExt;

use crate::driver::DriverError;
use crate::driver::docker::{connect_engine, installation_containers};
use crate::driver::label;

/// The engine, when one answers (`DOCKER_HOST` or the default socket).
pub async fn engine() -> Result<Docker, DriverError> {
    connect_engine().await
}

/// The label on images `cairn dev` builds itself.
pub const DEV_IMAGE_LABEL: &str = "cairn.dev-image";

/// Builds `tag` (`FROM scratch`, the host's static busybox as `/bin/busybox` and its applets linked in
/// `/bin`, so `/bin/sh` exists) unless an image with that tag exists. Returns whether it built one.
/// `busybox` must be statically linked: the image has no C library.
pub async fn ensure_busybox_image(
    docker: &Docker,
    tag: &str,
    busybox: &Path,
) -> Result<bool, DriverError> {
    match docker.inspect_image(tag).await {
        Ok(_) => return Ok(false),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(DriverError::docker(format!("inspect image {tag}"), e)),
    }
    let labels = HashMap::from([(DEV_IMAGE_LABEL.to_owned(), "busybox".to_owned())]);
    build_busybox_image(docker, tag, busybox, &labels).await?;
    Ok(true)
}

/// Builds `tag` from scratch with the static `busybox` in it (the classic builder, no pull), labelled
/// with `labels` from its first step on, so that even the leftovers of a failed build can be found by
/// label. Used by `cairn dev` and by the tests, which label it with their installation.
pub async fn build_busybox_image(
    docker: &Docker,
    tag: &str,
    busybox: &Path,
    labels: &HashMap<String, String>,
) -> Result<(), DriverError> {
    let pack = |e: std::io::Error| DriverError::DockerMessage {
        op: format!("pack the build context of {tag}"),
        message: e.to_string(),
    };
    let binary = std::fs::read(busybox).map_err(|e| DriverError::DockerMessage {
        op: format!("read {}", busybox.display()),
        message: e.to_string(),
    })?;
    let mut sorted: Vec<(&String, &String)> = labels.iter().collect();
    sorted.sort();
    let label_line: String = sorted
        .iter()
        .map(|(k, v)| {
            format!(
                " {k}={}",
                serde_json::to_string(v).expect("strings serialize")
            )
        })
        .collect();
    let label_line = if label_line.is_empty() {
        String::new()
    } else {
        format!("LABEL{label_line}\n")
    };
    let dockerfile = format!(
        "FROM scratch\n{label_line}COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n"
    );
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data, mode) in [
        ("Dockerfile", dockerfile.as_bytes(), 0o644),
        ("busybox", binary.as_slice(), 0o755),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        tar.append_data(&mut h, name, data).map_err(pack)?;
    }
    let body = tar.into_inner().map_err(pack)?;
    let opts = BuildImageOptionsBuilder::default()
        .t(tag)
        .rm(true)
        .forcerm(true)
        .labels(labels)
        .build();
    let mut stream = docker.build_image(opts, None, Some(bollard::body_full(body.into())));
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| DriverError::docker(format!("build {tag}"), e))?;
        if let Some(detail) = info.error_detail {
            return Err(DriverError::DockerMessage {
                op: format!("build {tag}"),
                message: detail.message.unwrap_or_default(),
            });
        }
    }
    Ok(())
}

/// Ids of every container (running or not) labelled with this installation.
pub async fn containers(docker: &Docker, installation: &Name) -> Result<Vec<String>, DriverError> {
    let list = installation_containers(docker, installation).await?;
    Ok(list.into_iter().filter_map(|c| c.id).collect())
}

/// Stops (SIGTERM, SIGKILL after `grace`) and removes every container of this installation, all at once.
/// Returns how many there were. Meant for after the installation's agents stopped: a container they
/// still manage would be removed under them.
pub async fn remove_containers(
    docker: &Docker,
    installation: &Name,
    grace: std::time::Duration,
) -> Result<usize, DriverError> {
    let ids = containers(docker, installation).await?;
    let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
    let results =
        futures_util::future::join_all(ids.iter().map(|id| remove_one(docker, id, t))).await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(ids.len())
}

async fn remove_one(docker: &Docker, id: &str, grace_secs: i32) -> Result<(), DriverError> {
    // An error here (already stopped, already gone) is settled by the forced removal below.
    let _ = docker
        .stop_container(
            id,
            Some(StopContainerOptionsBuilder::default().t(grace_secs).build()),
        )
        .await;
    {
        match docker
            .remove_container(
                id,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await
        {
            Ok(()) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => {}
            Err(e) => return Err(DriverError::docker(format!("remove container {id}"), e)),
        }
    }
    Ok(())
}

/// Removes every image labelled with this installation (forced), children before parents: a few passes,
/// each removing what the one before freed. For tests and benchmarks that made an installation of their
/// own, after [`remove_containers`]; `cairn dev` keeps its images as a cache. Returns how many went.
pub async fn remove_images(docker: &Docker, installation: &Name) -> Result<usize, DriverError> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{}={installation}", label::INSTALLATION)],
    )]);
    let mut removed = 0;
    for _ in 0..6 {
        let images = docker
            .list_images(Some(
                ListImagesOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| DriverError::docker("list images", e))?;
        if images.is_empty() {
            break;
        }
        for i in images {
            let opts = RemoveImageOptionsBuilder::default().force(true).build();
            // A parent still held by a child is removed in a later pass.
            if docker.remove_image(&i.id, Some(opts), None).await.is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}
