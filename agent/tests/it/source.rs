//! Fetching an app's source at an exact commit with gix, from a real git remote.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use cairn_agent::source::FetchKind;
use cairn_agent::{Resolve, Rewrites, SourceError, SourceSpec, Sources};
use cairn_schema::GitUrl;

use crate::support::{AppRepo, bounded, tools};

#[tokio::test]
async fn fetches_an_older_commit_by_id_one_commit_deep_and_reuses_the_cache() {
    if !tools("fetches_an_older_commit_by_id") {
        return;
    }
    bounded(60, async {
        let tmp = tempfile::tempdir().unwrap();
        let repo = AppRepo::new(tmp.path(), "web");
        let c1 = repo.commit(
            &[
                ("README", "one\n", false),
                ("bin/run", "#!/bin/sh\necho hi\n", true),
            ],
            "one",
        );
        std::os::unix::fs::symlink("README", tmp.path().join("work/web/LINK")).unwrap();
        let c2 = repo.commit(
            &[("README", "two\n", false), ("deep/a/b/c.txt", "c\n", false)],
            "two",
        );
        let _c3 = repo.commit(&[("README", "three\n", false)], "three");

        let sources = Sources::new(tmp.path().join("cache"), repo.rewrites());
        let spec = SourceSpec {
            url: repo.url.clone(),
            commit: c2.clone(),
        };
        let dest = tmp.path().join("out");
        let got = sources
            .checkout(&spec, &dest, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(got.fetch, FetchKind::ShallowById);
        assert_eq!(
            std::fs::read_to_string(dest.join("README")).unwrap(),
            "two\n"
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("deep/a/b/c.txt")).unwrap(),
            "c\n"
        );
        let mode = std::fs::metadata(dest.join("bin/run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "the executable bit is kept");
        assert_eq!(
            std::fs::read_link(dest.join("LINK")).unwrap().to_str(),
            Some("README")
        );
        assert!(!dest.join(".git").exists());
        let cache = sources.cache_dir(&repo.url);
        let shallow = std::fs::read_to_string(cache.join("shallow")).unwrap();
        assert_eq!(shallow.trim(), c2, "only the asked-for commit was fetched");

        // The commit is cached now; the remote is not asked again.
        std::fs::rename(&repo.bare, tmp.path().join("gone.git")).unwrap();
        let again = sources
            .checkout(&spec, &tmp.path().join("out2"), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(again.fetch, FetchKind::Cached);
        assert_eq!(again.files, got.files);
        let _ = c1;
    })
    .await;
}

#[tokio::test]
async fn a_commit_the_remote_does_not_have_is_a_typed_error() {
    if !tools("a_commit_the_remote_does_not_have") {
        return;
    }
    bounded(60, async {
        let tmp = tempfile::tempdir().unwrap();
        let repo = AppRepo::new(tmp.path(), "web");
        repo.commit(&[("README", "one\n", false)], "one");
        let sources = Sources::new(tmp.path().join("cache"), repo.rewrites());
        let spec = SourceSpec {
            url: repo.url.clone(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
        };
        let err = sources
            .checkout(&spec, &tmp.path().join("out"), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SourceError::CommitMissing { .. } | SourceError::Fetch { .. }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("0123456789abcdef"), "{err}");
        assert!(err.to_string().contains("rewritten to file://"), "{err}");
    })
    .await;
}

#[derive(Debug)]
struct ToLoopback;
impl Resolve for ToLoopback {
    fn resolve(&self, _: &str, _: u16) -> std::io::Result<Vec<IpAddr>> {
        Ok(vec!["127.0.0.1".parse().unwrap()])
    }
}

#[tokio::test]
async fn a_host_resolving_to_loopback_is_refused_before_connecting_unless_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let url = GitUrl::new("https://git.example.com/acme/web.git").unwrap();
    let spec = SourceSpec {
        url: url.clone(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
    };
    let plain = Sources::with_resolver(
        tmp.path().join("c1"),
        Rewrites::default(),
        Arc::new(ToLoopback),
    );
    let err = plain
        .checkout(&spec, &tmp.path().join("out"), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SourceError::Refused { why, .. } if why.contains("127.0.0.1 is a loopback address")),
        "{err:?}"
    );
    assert!(!tmp.path().join("out").exists(), "nothing was written");

    // The same URL rewritten by the operator is trusted: it reaches the (missing) local path instead.
    let rewritten = Sources::with_resolver(
        tmp.path().join("c2"),
        Rewrites::parse([format!(
            "https://git.example.com/=file://{}/",
            tmp.path().display()
        )])
        .unwrap(),
        Arc::new(ToLoopback),
    );
    let err = rewritten
        .checkout(&spec, &tmp.path().join("out"), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Fetch { .. }), "{err:?}");
}
