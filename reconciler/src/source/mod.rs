//! Where desired state comes from: a working directory (watched for local use) or a git remote (fetched
//! into a cache, read from the commit's tree without a checkout).
//!
//! Both hand `cairn-schema` `(path, bytes)` pairs; neither interprets manifests.

pub mod dir;
