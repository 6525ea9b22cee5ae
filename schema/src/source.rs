//! Where an app's code comes from: git URLs and ref names, checked so that a manifest can never point the
//! control plane or an agent at itself, its neighbours' metadata services or a local path, nor smuggle a
//! command-line option into git.

use std::borrow::Cow;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// A git remote an agent may fetch: `https://`, `ssh://` or scp-style `user@host:path`, whose host is not a
/// loopback, link-local, unspecified or cloud-metadata address in any spelling.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GitUrl(String);

/// The parts of a git URL that matter for safety checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts<'a> {
    pub scheme: &'a str,
    pub host: String,
    pub port: Option<u16>,
    pub path: &'a str,
}

impl GitUrl {
    pub fn new(s: &str) -> Result<Self, String> {
        let parts = split_git_url(s)?;
        check_host(&parts.host).map_err(|why| format!("source url `{s}` is not allowed: {why}"))?;
        Ok(GitUrl(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn parts(&self) -> UrlParts<'_> {
        split_git_url(&self.0).expect("validated at construction")
    }
}

impl fmt::Display for GitUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for GitUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
impl Serialize for GitUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for GitUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        GitUrl::new(&s).map_err(de::Error::custom)
    }
}
impl JsonSchema for GitUrl {
    fn schema_name() -> Cow<'static, str> {
        "GitUrl".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^(https://|ssh://|[A-Za-z0-9._-]+@[^/:]+:)",
            "description": "A git remote: https://host/path, ssh://user@host/path or user@host:path."
        })
    }
}

/// Splits a git URL into scheme, host and path, refusing every transport but https and ssh.
pub fn split_git_url(s: &str) -> Result<UrlParts<'_>, String> {
    let refuse = |why: &str| format!("source url `{s}` is not allowed: {why}");
    if s.is_empty() {
        return Err(refuse("it is empty"));
    }
    if s.starts_with('-') {
        return Err(refuse(
            "it starts with `-`, which git would read as an option",
        ));
    }
    if let Some((helper, _)) = s.split_once("::")
        && !helper.contains(['/', '@', ':'])
    {
        return Err(refuse(&format!(
            "the remote helper `{helper}::` is not supported; use https:// or ssh"
        )));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(refuse("it contains whitespace or control characters"));
    }
    if let Some(idx) = s.find("://") {
        let scheme = &s[..idx];
        let rest = &s[idx + 3..];
        let lower = scheme.to_ascii_lowercase();
        if lower != "https" && lower != "ssh" {
            return Err(refuse(&format!(
                "the `{scheme}` transport is not supported; use https:// or ssh"
            )));
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = (&rest[..end], &rest[end..]);
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = split_host_port(hostport).map_err(|w| refuse(&w))?;
        if path.len() <= 1 {
            return Err(refuse("it names no repository path"));
        }
        return Ok(UrlParts {
            scheme: if lower == "https" { "https" } else { "ssh" },
            host,
            port,
            path,
        });
    }
    if let Some((scheme, _)) = s.split_once(':')
        && scheme.eq_ignore_ascii_case("file")
    {
        return Err(refuse(
            "local `file:` paths are not supported; use https:// or ssh",
        ));
    }
    // scp-style: [user@]host:path, where the host part has no slash.
    if let Some(colon) = s.find(':') {
        let (authority, path) = (&s[..colon], &s[colon + 1..]);
        if !authority.contains('/') && !authority.is_empty() {
            let Some((user, host)) = authority.rsplit_once('@') else {
                return Err(refuse(
                    "write scp-style remotes with a user, as `git@host:owner/repo.git`",
                ));
            };
            if user.is_empty() {
                return Err(refuse("the user before `@` is empty"));
            }
            let host = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'))
            {
                format!("[{inner}]")
            } else {
                host.to_owned()
            };
            if path.is_empty() {
                return Err(refuse("it names no repository path"));
            }
            let (host, _) = split_host_port(&host).map_err(|w| refuse(&w))?;
            return Ok(UrlParts {
                scheme: "scp",
                host,
                port: None,
                path,
            });
        }
    }
    Err(refuse("local paths are not supported; use https:// or ssh"))
}

fn split_host_port(hostport: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let close = rest
            .find(']')
            .ok_or("the IPv6 address has no closing `]`")?;
        let host = &hostport[..close + 2];
        let after = &rest[close + 1..];
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("port `{p}` is not a number"))?,
        ),
    };
    if host.is_empty() {
        return Err("it names no host".into());
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Refuses hosts that reach the machine itself, its link or a cloud metadata service.
pub fn check_host(host: &str) -> Result<(), String> {
    if host.contains('%') {
        return Err("percent-encoded or zoned hosts are not allowed".into());
    }
    let host = host.trim_end_matches('.');
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| format!("`{inner}` is not an IPv6 address"))?;
        return check_ipv6(ip);
    }
    if let Some(ip) = parse_ipv4_loose(host)? {
        return check_ipv4(ip);
    }
    const METADATA_NAMES: [&str; 5] = [
        "metadata",
        "metadata.google.internal",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.com",
    ];
    if host == "localhost" || host.ends_with(".localhost") || host == "localhost.localdomain" {
        return Err(format!("`{host}` is a loopback name"));
    }
    if METADATA_NAMES.contains(&host) {
        return Err(format!("`{host}` is a cloud metadata service"));
    }
    if !host
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
    {
        return Err(format!("`{host}` is not a valid host name"));
    }
    Ok(())
}

/// Checks an address an agent resolved a source host to, right before it connects.
pub fn check_resolved(ip: std::net::IpAddr) -> Result<(), String> {
    match ip {
        std::net::IpAddr::V4(v4) => check_ipv4(v4),
        std::net::IpAddr::V6(v6) => check_ipv6(v6),
    }
}

fn check_ipv4(ip: Ipv4Addr) -> Result<(), String> {
    let o = ip.octets();
    if ip.is_loopback() {
        Err(format!("{ip} is a loopback address"))
    } else if ip.is_link_local() {
        Err(format!(
            "{ip} is a link-local address (cloud metadata lives there)"
        ))
    } else if ip.is_unspecified() || o[0] == 0 {
        Err(format!("{ip} is an unspecified address"))
    } else if ip.is_broadcast() || ip.is_multicast() {
        Err(format!("{ip} is not a unicast address"))
    } else if o == [100, 100, 100, 200] || o == [192, 0, 0, 192] {
        Err(format!("{ip} is a cloud metadata address"))
    } else {
        Ok(())
    }
}

fn check_ipv6(ip: Ipv6Addr) -> Result<(), String> {
    let seg = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return check_ipv4(v4);
    }
    // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) addresses carry an IPv4 address too.
    if seg[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified()
        || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        let o = ip.octets();
        return check_ipv4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if ip.is_loopback() {
        Err(format!("{ip} is a loopback address"))
    } else if ip.is_unspecified() {
        Err(format!("{ip} is an unspecified address"))
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Err(format!("{ip} is a link-local address"))
    } else if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        Err(format!("{ip} is a cloud metadata address"))
    } else if ip.is_multicast() {
        Err(format!("{ip} is not a unicast address"))
    } else {
        Ok(())
    }
}

/// Whether `ip` is on a private network (RFC 1918, shared CGNAT space, IPv6 unique-local), for operators
/// who refuse sources there too (`--refuse-private-sources`). Loopback, link-local and metadata addresses
/// are [`check_resolved`]'s, refused always.
pub fn check_public(ip: std::net::IpAddr) -> Result<(), String> {
    let private = match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || (o[0] == 100 && o[1] & 0xc0 == 64)
        }
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => return check_public(std::net::IpAddr::V4(v4)),
            None => v6.segments()[0] & 0xfe00 == 0xfc00,
        },
    };
    if private {
        Err(format!("{ip} is a private address"))
    } else {
        Ok(())
    }
}

/// Parses IPv4 the way `inet_aton` (and so curl and git) does: one to four parts, each decimal, octal
/// (`0177`) or hex (`0x7f`), the last filling the remaining bytes, so `2130706433`, `0x7f.1` and `127.1` are
/// all 127.0.0.1. `Ok(None)` when the host is not numeric at all; an error when it looks numeric but is not
/// a valid address.
fn parse_ipv4_loose(host: &str) -> Result<Option<Ipv4Addr>, String> {
    let parts: Vec<&str> = host.split('.').collect();
    // Byte-wise on purpose: a host is untrusted text, and slicing it by a byte index could cut a multibyte
    // character in two (`https://€/x.git` panicked here).
    let hex_prefix = |p: &str| {
        p.as_bytes()
            .get(..2)
            .is_some_and(|b| b.eq_ignore_ascii_case(b"0x"))
    };
    let numeric = |p: &str| {
        !p.is_empty()
            && (p.bytes().all(|c| c.is_ascii_digit())
                || (hex_prefix(p) && p.bytes().skip(2).all(|c| c.is_ascii_hexdigit())))
    };
    // A name whose last label is numeric (or hex) is read as an address by URL parsers; treat it as one.
    if !parts.last().is_some_and(|p| numeric(p)) {
        return Ok(None);
    }
    let bad = || format!("`{host}` looks like an IP address but is not a valid one");
    if parts.len() > 4 || !parts.iter().all(|p| numeric(p)) {
        return Err(bad());
    }
    let mut values = Vec::with_capacity(parts.len());
    for p in &parts {
        // Every part is ASCII here (`numeric` held), so the prefixes below are whole characters.
        let v = if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            if hex.is_empty() {
                0
            } else {
                u64::from_str_radix(hex, 16).map_err(|_| bad())?
            }
        } else if let Some(oct) = p.strip_prefix('0').filter(|o| !o.is_empty()) {
            u64::from_str_radix(oct, 8).map_err(|_| bad())?
        } else {
            p.parse::<u64>().map_err(|_| bad())?
        };
        values.push(v);
    }
    let last = values.pop().ok_or_else(bad)?;
    if values.iter().any(|&v| v > 255) {
        return Err(bad());
    }
    let rest_bytes = 4 - values.len();
    if last >= 1u64 << (8 * rest_bytes) {
        return Err(bad());
    }
    let mut n: u64 = 0;
    for (i, v) in values.iter().enumerate() {
        n |= v << (8 * (3 - i));
    }
    n |= last;
    Ok(Some(Ipv4Addr::from(u32::try_from(n).map_err(|_| bad())?)))
}

/// One operator rewrite (`--git-rewrite FROM=TO`): URLs starting with `from` are fetched from `to` + the
/// rest, like git's `url.<base>.insteadOf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub from: String,
    pub to: String,
}

/// A rewrite that cannot be parsed, or a rewritten URL that climbs out of its target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RewriteError(pub String);

impl std::str::FromStr for Rewrite {
    type Err = RewriteError;
    fn from_str(s: &str) -> Result<Self, RewriteError> {
        match s.split_once('=') {
            Some((from, to)) if !from.is_empty() && !to.is_empty() => Ok(Rewrite {
                from: from.to_owned(),
                to: to.to_owned(),
            }),
            _ => Err(RewriteError(format!(
                "`{s}` is not a rewrite: write FROM=TO, such as https://github.com/=file:///srv/mirror/"
            ))),
        }
    }
}

/// `FROM=TO`, as it is parsed: what to pass to another process's `--git-rewrite`.
impl std::fmt::Display for Rewrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.from, self.to)
    }
}

/// Operator rewrites of source URLs; the longest matching `from` wins, as with git's `insteadOf`. A
/// rewritten URL is trusted operator configuration (mirrors, GitHub Enterprise, local test remotes), so the
/// address checks a manifest's URL gets do not apply to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrites(Vec<Rewrite>);

impl Rewrites {
    pub fn new(rewrites: impl IntoIterator<Item = Rewrite>) -> Self {
        Rewrites(rewrites.into_iter().collect())
    }

    /// Parses `--git-rewrite FROM=TO` arguments.
    pub fn parse<S: AsRef<str>>(args: impl IntoIterator<Item = S>) -> Result<Self, RewriteError> {
        args.into_iter()
            .map(|a| a.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()
            .map(Rewrites)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rewritten URL, if a rewrite matches. The part after the prefix comes from a manifest, so it may
    /// not climb out of the rewrite's target with `..` (a `file://` mirror directory stays the limit).
    pub fn apply(&self, url: &str) -> Result<Option<String>, RewriteError> {
        let Some(rw) = self
            .0
            .iter()
            .filter(|r| url.starts_with(&r.from))
            .max_by_key(|r| r.from.len())
        else {
            return Ok(None);
        };
        let rest = &url[rw.from.len()..];
        if rest.split(['/', '\\']).any(|c| c == "..") || rest.contains('\0') {
            return Err(RewriteError(format!(
                "after the rewrite of `{}`, the rest of the path climbs with `..`",
                rw.from
            )));
        }
        Ok(Some(format!("{}{rest}", rw.to)))
    }
}

/// A git ref name (branch or tag) that git accepts and cannot read as an option.
pub fn check_ref_name(s: &str) -> Result<(), String> {
    let bad = |why: &str| format!("`{s}` is not a valid git ref name: {why}");
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    if s.len() > 255 {
        return Err(bad("it is longer than 255 characters"));
    }
    if s.starts_with('-') {
        return Err(bad("it starts with `-`"));
    }
    if s.contains("..") || s.contains("@{") || s == "@" || s.contains("//") {
        return Err(bad("it contains `..`, `@{` or `//`"));
    }
    if s.starts_with('/') || s.ends_with('/') || s.ends_with('.') || s.ends_with(".lock") {
        return Err(bad(
            "it starts or ends with `/`, or ends with `.` or `.lock`",
        ));
    }
    if s.split('/').any(|c| c.starts_with('.')) {
        return Err(bad("a component starts with `.`"));
    }
    if s.chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
    {
        return Err(bad("it contains whitespace or one of ~ ^ : ? * [ \\"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_real_remotes() {
        for ok in [
            "https://github.com/acme/web.git",
            "https://git.example.com:8443/acme/web",
            "ssh://git@github.com/acme/web.git",
            "git@github.com:acme/web.git",
            "https://10.0.0.5/acme/web.git",
            "https://[2001:db8::1]/acme/web.git",
        ] {
            assert!(GitUrl::new(ok).is_ok(), "{ok}: {:?}", GitUrl::new(ok));
        }
    }

    #[test]
    fn refuses_local_and_metadata_in_every_spelling() {
        for bad in [
            "http://github.com/acme/web.git",
            "git://github.com/acme/web.git",
            "file:///etc/passwd",
            "file:relative",
            "ext::sh -c touch% /tmp/pwned",
            "/srv/git/web.git",
            "../web.git",
            "https://localhost/x.git",
            "https://LOCALHOST./x.git",
            "https://127.0.0.1/x.git",
            "https://127.1/x.git",
            "https://2130706433/x.git",
            "https://0x7f000001/x.git",
            "https://0x7f.1/x.git",
            "https://0177.0.0.1/x.git",
            "https://[::1]/x.git",
            "https://[::ffff:127.0.0.1]/x.git",
            "https://[::ffff:7f00:1]/x.git",
            "https://[0:0:0:0:0:0:0:1]/x.git",
            "https://[fe80::1]/x.git",
            "https://169.254.169.254/latest/meta-data",
            "https://[::ffff:169.254.169.254]/x",
            "https://metadata.google.internal/x",
            "https://0.0.0.0/x.git",
            "https://user@127.0.0.1:443/x.git",
            "https://%31%32%37.0.0.1/x.git",
            "git@127.0.0.1:x",
            "git@[::1]:x",
            "git@localhost:x.git",
            "ssh://git@127.0.0.1/x.git",
            "-uhttps://x/y",
            "https://999.1.1.1/x.git",
        ] {
            assert!(GitUrl::new(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn rewrites_pick_the_longest_prefix_and_refuse_climbing() {
        let rw = Rewrites::parse([
            "https://github.com/=file:///srv/mirror/",
            "https://github.com/acme/=file:///srv/acme/",
        ])
        .unwrap();
        assert_eq!(
            rw.apply("https://github.com/acme/web.git")
                .unwrap()
                .as_deref(),
            Some("file:///srv/acme/web.git")
        );
        assert_eq!(
            rw.apply("https://github.com/other/x.git")
                .unwrap()
                .as_deref(),
            Some("file:///srv/mirror/other/x.git")
        );
        assert_eq!(rw.apply("https://gitlab.com/x.git").unwrap(), None);
        assert!(rw.apply("https://github.com/acme/../../etc").is_err());
        assert!("nope".parse::<Rewrite>().is_err());
    }

    #[test]
    fn ref_names() {
        for ok in ["main", "release/1.2", "v1.2.3", "feature-x"] {
            assert!(check_ref_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "a..b",
            "a b",
            "a~1",
            "x.lock",
            ".hidden",
            "a/",
            "@",
            "--upload-pack=x",
        ] {
            assert!(check_ref_name(bad).is_err(), "{bad}");
        }
    }
}
