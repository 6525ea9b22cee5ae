//! Where backups go and come from: a directory on this node (written under a temporary name, fsynced,
//! renamed, so a reader never sees half an object) or an S3-compatible store (a multipart upload,
//! aborted when the dump fails, so no partial object is left). Bytes are hashed with SHA-256 as they
//! pass, never held whole in memory.
//!
//! What it must not do: put the S3 keys into an error (object_store's errors are scrubbed of them).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore, RetryConfig, WriteMultipart};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::server::{Scrub, io};
use super::{DbError, S3Access, Target};
use cairn_schema::database::BackupTo;

/// A multipart part: large enough for S3's 5 MiB minimum, small enough to keep memory flat.
const PART: usize = 8 << 20;
/// Parts in flight at once (so at most `PART * INFLIGHT` bytes buffered).
const INFLIGHT: usize = 4;

/// The secrets a target holds, for scrubbing errors.
pub(crate) fn secrets(target: &Target) -> Vec<String> {
    target
        .s3
        .iter()
        .flat_map(|s| [&s.access_key_id, &s.secret_access_key])
        .filter_map(|s| s.expose_str().ok().map(str::to_owned))
        .collect()
}

/// An object name below the target: relative, no `..`, no empty segment.
fn check_object(object: &str) -> Result<(), DbError> {
    let ok = !object.is_empty()
        && !object.starts_with('/')
        && object
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if ok {
        Ok(())
    } else {
        Err(DbError::Unsupported(format!(
            "`{object}` is not a backup object name (relative, no `.`/`..` or empty segments)"
        )))
    }
}

fn dir_root(path: &str) -> Result<PathBuf, DbError> {
    let root = PathBuf::from(path);
    if !root.is_absolute() {
        return Err(DbError::Unsupported(format!(
            "backup directory `{path}` is not an absolute path"
        )));
    }
    Ok(root)
}

fn s3_store(bucket: &str, access: Option<&S3Access>) -> Result<Arc<dyn ObjectStore>, DbError> {
    let access = access.ok_or_else(|| {
        DbError::Unsupported(format!(
            "the S3 target s3://{bucket} has no endpoint and credentials"
        ))
    })?;
    let key = access
        .access_key_id
        .expose_str()
        .map_err(|_| DbError::Unsupported("the S3 access key id is not UTF-8".into()))?;
    let secret = access
        .secret_access_key
        .expose_str()
        .map_err(|_| DbError::Unsupported("the S3 secret access key is not UTF-8".into()))?;
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(&access.region)
        .with_access_key_id(key)
        .with_secret_access_key(secret)
        // A failing store says so within seconds rather than after minutes of retries.
        .with_retry(RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
            ..RetryConfig::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(300)),
        );
    if let Some(endpoint) = &access.endpoint {
        b = b
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    b.build()
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| DbError::Unsupported(format!("the S3 target s3://{bucket}: {e}")))
}

fn s3_path(prefix: &str, object: &str) -> object_store::path::Path {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        object_store::path::Path::from(object)
    } else {
        object_store::path::Path::from(format!("{prefix}/{object}"))
    }
}

/// Where an object is, for messages (no credentials in it).
pub(crate) fn describe(target: &Target, object: &str) -> String {
    match &target.to {
        BackupTo::Dir { path } => format!("{}", Path::new(path).join(object).display()),
        BackupTo::S3 { bucket, prefix } => format!("s3://{bucket}/{}", s3_path(prefix, object)),
    }
}

/// An object being written.
pub(crate) enum Sink {
    Dir {
        tmp: PathBuf,
        dest: PathBuf,
        file: tokio::fs::File,
    },
    S3 {
        upload: WriteMultipart,
        at: String,
    },
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Dir { tmp, .. } => write!(f, "Sink::Dir({})", tmp.display()),
            Sink::S3 { at, .. } => write!(f, "Sink::S3({at})"),
        }
    }
}

impl Sink {
    pub async fn open(target: &Target, object: &str, scrub: &Scrub) -> Result<Sink, DbError> {
        check_object(object)?;
        match &target.to {
            BackupTo::Dir { path } => {
                let dest = dir_root(path)?.join(object);
                let parent = dest.parent().expect("joined below a root").to_owned();
                tokio::fs::create_dir_all(&parent)
                    .await
                    .map_err(|e| io("creating", &parent, e))?;
                let name = dest.file_name().expect("checked").to_string_lossy();
                let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
                let file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| io("creating", &tmp, e))?;
                Ok(Sink::Dir { tmp, dest, file })
            }
            BackupTo::S3 { bucket, prefix } => {
                let store = s3_store(bucket, target.s3.as_ref())?;
                let at = describe(target, object);
                let upload = store
                    .put_multipart(&s3_path(prefix, object))
                    .await
                    .map_err(|e| {
                        scrub.failed(format_args!("starting the upload to {at}"), &e.to_string())
                    })?;
                Ok(Sink::S3 {
                    upload: WriteMultipart::new_with_chunk_size(upload, PART),
                    at,
                })
            }
        }
    }

    pub async fn write(&mut self, buf: &[u8], scrub: &Scrub) -> Result<(), DbError> {
        match self {
            Sink::Dir { tmp, file, .. } => {
                file.write_all(buf).await.map_err(|e| io("writing", tmp, e))
            }
            Sink::S3 { upload, at } => {
                upload
                    .wait_for_capacity(INFLIGHT)
                    .await
                    .map_err(|e| scrub.failed(format_args!("uploading to {at}"), &e.to_string()))?;
                upload.write(buf);
                Ok(())
            }
        }
    }

    /// Makes the object visible (durably, for a directory).
    pub async fn finish(self, scrub: &Scrub) -> Result<(), DbError> {
        match self {
            Sink::Dir {
                tmp,
                dest,
                mut file,
            } => {
                let done = async {
                    file.flush().await?;
                    file.sync_all().await?;
                    drop(file);
                    tokio::fs::rename(&tmp, &dest).await?;
                    let parent = dest.parent().expect("joined below a root");
                    tokio::fs::File::open(parent).await?.sync_all().await
                }
                .await;
                if let Err(e) = done {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(io("finishing", &dest, e));
                }
                Ok(())
            }
            Sink::S3 { upload, at } => upload.finish().await.map(|_| ()).map_err(|e| {
                scrub.failed(
                    format_args!("completing the upload to {at}"),
                    &e.to_string(),
                )
            }),
        }
    }

    /// Leaves nothing behind.
    pub async fn abort(self) {
        match self {
            Sink::Dir { tmp, file, .. } => {
                drop(file);
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            Sink::S3 { upload, .. } => {
                let _ = upload.abort().await;
            }
        }
    }
}

/// Copies `object` from `target` into the new file `dest` (mode 0600), returning the hex SHA-256 of
/// the bytes. The caller compares it before using the file.
pub(crate) async fn fetch(
    target: &Target,
    object: &str,
    dest: &Path,
    scrub: &Scrub,
) -> Result<(u64, String), DbError> {
    check_object(object)?;
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dest)
        .await
        .map_err(|e| io("creating", dest, e))?;
    let mut hash = Sha256::new();
    let mut bytes = 0u64;
    match &target.to {
        BackupTo::Dir { path } => {
            use tokio::io::AsyncReadExt as _;
            let src = dir_root(path)?.join(object);
            let mut file = tokio::fs::File::open(&src)
                .await
                .map_err(|e| io("opening the backup", &src, e))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| io("reading", &src, e))?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                bytes += n as u64;
                out.write_all(&buf[..n])
                    .await
                    .map_err(|e| io("writing", dest, e))?;
            }
        }
        BackupTo::S3 { bucket, prefix } => {
            let store = s3_store(bucket, target.s3.as_ref())?;
            let at = describe(target, object);
            let got = store
                .get(&s3_path(prefix, object))
                .await
                .map_err(|e| scrub.failed(format_args!("fetching {at}"), &e.to_string()))?;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk
                    .map_err(|e| scrub.failed(format_args!("fetching {at}"), &e.to_string()))?;
                hash.update(&chunk);
                bytes += chunk.len() as u64;
                out.write_all(&chunk)
                    .await
                    .map_err(|e| io("writing", dest, e))?;
            }
        }
    }
    out.flush().await.map_err(|e| io("writing", dest, e))?;
    Ok((bytes, hex::encode(hash.finalize())))
}
