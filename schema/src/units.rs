//! Validated value types: names, sizes, CPU, prices, durations, domains. Each one's `Deserialize` fails
//! through `de::Error::custom`, so the TOML parser points at the bad value's line and column.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident, $check:path, $pattern:expr, $desc:expr) => {
        $(#[$m])*
        // Shared text: a clone is a count, not a copy (a plan of 100,000 apps clones names by the
        // hundred thousand).
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            pub fn new(s: &str) -> Result<Self, String> {
                $check(s)?;
                Ok(Self(s.into()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::new(s)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(de::Error::custom)
            }
        }
        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "pattern": $pattern, "description": $desc })
            }
        }
    };
}

string_newtype!(
    /// A resource name: a DNS label (lowercase letters, digits and `-`, at most 63 characters, starting with
    /// a letter and not ending with `-`), so it can be part of a hostname and a container name.
    Name,
    check_name,
    "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
    "A DNS label: lowercase letters, digits and '-', starting with a letter, at most 63 characters."
);

string_newtype!(
    /// An environment variable name as POSIX defines it: letters, digits and `_`, not starting with a digit.
    EnvName,
    check_env_name,
    "^[A-Za-z_][A-Za-z0-9_]*$",
    "A POSIX environment variable name."
);

string_newtype!(
    /// A fully qualified DNS name an app answers to (lowercase, at least two labels, no wildcard, no IP).
    Domain,
    check_domain,
    "^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
    "A fully qualified domain name such as www.example.com."
);

string_newtype!(
    /// Where the control plane and the other nodes reach a node's proxy on the private network: a host name
    /// or an IP address (IPv6 in brackets), with an optional port (80 when omitted). Never a loopback,
    /// link-local, unspecified or cloud-metadata address: other machines dial it.
    NodeAddress,
    check_node_address,
    "^([A-Za-z0-9._-]+|\\[[0-9A-Fa-f:.]+\\])(:[0-9]{1,5})?$",
    "host, host:port, IP, IP:port or [IPv6]:port: where other nodes reach this node's proxy."
);

string_newtype!(
    /// A file in the config repository: relative, `/`-separated, never leaving the repository (`..`) or
    /// reaching into a hidden directory such as `.git`.
    RepoPath,
    check_repo_path,
    "^[^/\\\\]",
    "A path relative to the repository root, with '/' separators, such as certs/shop.pem."
);

string_newtype!(
    /// An ACME directory URL: `https://` with a host (RFC 8555 requires HTTPS).
    AcmeDirectory,
    check_acme_directory,
    "^https://[^\\s/]+(/\\S*)?$",
    "The https URL of an ACME (RFC 8555) directory."
);

string_newtype!(
    /// An email address for the ACME account's contact (`mailto:` is added when it is sent).
    Email,
    check_email,
    "^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$",
    "An email address, such as ops@example.com."
);

string_newtype!(
    /// A cron schedule (UTC): five fields `minute hour day-of-month month day-of-week` with `*`, `*/n`,
    /// ranges and lists, or `@hourly`, `@daily`, `@weekly`, `@monthly`.
    Schedule,
    check_schedule,
    "^(@(hourly|daily|midnight|weekly|monthly)|\\S+(\\s+\\S+){4})$",
    "A cron schedule in UTC, such as \"0 3 * * *\" or \"@daily\"."
);

fn check_schedule(s: &str) -> Result<(), String> {
    crate::cron::Cron::parse(s).map(|_| ())
}

impl Schedule {
    /// The parsed schedule (it parsed when the value was made).
    pub fn cron(&self) -> crate::cron::Cron {
        crate::cron::Cron::parse(&self.0).expect("a Schedule is checked when made")
    }
}

string_newtype!(
    /// Where a database's backups go: `dir:/absolute/path` on the database's node, or
    /// `s3://bucket/prefix` on an S3-compatible store.
    BackupLocation,
    check_backup_location,
    "^(dir:/|s3://)\\S+$",
    "dir:/absolute/path on the database's node, or s3://bucket/prefix."
);

fn check_backup_location(s: &str) -> Result<(), String> {
    BackupLocation::split(s).map(|_| ())
}

impl BackupLocation {
    fn split(s: &str) -> Result<crate::database::BackupTo, String> {
        use crate::database::BackupTo;
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("a backup location holds no spaces or control characters".into());
        }
        if let Some(path) = s.strip_prefix("dir:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`dir:{path}` must be an absolute path, such as `dir:/var/backups/cairn`"
                ));
            }
            if path.split('/').any(|c| c == "..") {
                return Err("a backup directory never contains `..`".into());
            }
            return Ok(BackupTo::Dir {
                path: path.to_owned(),
            });
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let ok_bucket = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                && !bucket.starts_with(['-', '.'])
                && !bucket.ends_with(['-', '.']);
            if !ok_bucket {
                return Err(format!(
                    "`{bucket}` is not an S3 bucket name (3-63 lowercase letters, digits, `-` and `.`)"
                ));
            }
            if prefix.split('/').any(|c| c == ".." || c == ".") {
                return Err("an S3 prefix never contains `.` or `..` components".into());
            }
            return Ok(BackupTo::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_end_matches('/').to_owned(),
            });
        }
        Err(format!(
            "`{s}` is neither `dir:/absolute/path` nor `s3://bucket/prefix`"
        ))
    }

    /// The location as the agent's target.
    pub fn to(&self) -> crate::database::BackupTo {
        BackupLocation::split(&self.0).expect("a BackupLocation is checked when made")
    }
}

impl NodeAddress {
    /// The port other nodes dial when the address names none.
    pub const DEFAULT_PORT: u16 = 80;

    /// The host part, lowercase, IPv6 without brackets.
    pub fn host(&self) -> String {
        split_node_address(&self.0)
            .map(|(h, _)| {
                h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase()
            })
            .unwrap_or_default()
    }

    /// The port, [`Self::DEFAULT_PORT`] when the address names none.
    pub fn port(&self) -> u16 {
        split_node_address(&self.0)
            .ok()
            .and_then(|(_, p)| p)
            .unwrap_or(Self::DEFAULT_PORT)
    }

    /// The address as other nodes dial it (`host:port`, IPv6 in brackets), the same for every spelling of
    /// one endpoint: what uniqueness is judged on.
    pub fn endpoint(&self) -> String {
        let host = self.host();
        if host.contains(':') {
            format!("[{host}]:{}", self.port())
        } else {
            format!("{}:{}", host.trim_end_matches('.'), self.port())
        }
    }
}

/// `host` or `host:port` (`[v6]` or `[v6]:port`); the host as written.
fn split_node_address(s: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => match &s[end + 1..] {
                "" => (&s[..=end], None),
                rest => match rest.strip_prefix(':') {
                    Some(p) => (&s[..=end], Some(p)),
                    None => return Err("write the port after `]:`".into()),
                },
            },
            None => return Err("an IPv6 address opened with `[` is not closed".into()),
        }
    } else if s.matches(':').count() > 1 {
        return Err("write an IPv6 address in brackets, such as `[fd00::2]:8000`".into());
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|c| c.is_ascii_digit()) => Some(n),
            _ => return Err(format!("`{p}` is not a port (1 to 65535)")),
        },
    };
    Ok((host, port))
}

fn check_node_address(s: &str) -> Result<(), String> {
    let bad = |why: String| format!("`{s}` is not a usable node address: {why}");
    if s.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if s.len() > 260 {
        return Err(bad("it is longer than 260 characters".into()));
    }
    let (host, _) = split_node_address(s).map_err(bad)?;
    if host.is_empty() {
        return Err(bad("it has no host".into()));
    }
    if !host.starts_with('[') {
        let name = host.strip_suffix('.').unwrap_or(host);
        let label_ok =
            |l: &str| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-');
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(bad("it is not a host name or an IP address".into()));
        }
    }
    crate::source::check_host(host).map_err(bad)
}

fn check_name(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "`{s}` is not a valid name: use a DNS label (lowercase letters, digits and `-`, starting with a letter, at most 63 characters)"
        )
    };
    if s.is_empty() || s.len() > 63 {
        return Err(bad());
    }
    let b = s.as_bytes();
    if !b[0].is_ascii_lowercase()
        || b[b.len() - 1] == b'-'
        || !b
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err(bad());
    }
    Ok(())
}

fn check_env_name(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a valid environment variable name: use letters, digits and `_`, not starting with a digit"
        ))
    }
}

fn check_repo_path(s: &str) -> Result<(), String> {
    let bad = |why: &str| format!("`{s}` is not a path in the repository: {why}");
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    if s.starts_with('/') || s.contains('\\') {
        return Err(bad(
            "write it relative to the repository root, with `/` separators",
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("it holds a control character"));
    }
    for c in s.split('/') {
        if c.is_empty() {
            return Err(bad("it has an empty component"));
        }
        if c == ".." {
            return Err(bad("it leaves the repository (`..`)"));
        }
        if c.starts_with('.') && c != "." {
            return Err(bad("it reaches into a hidden file or directory"));
        }
    }
    Ok(())
}

fn check_acme_directory(s: &str) -> Result<(), String> {
    let bad = |why: &str| format!("`{s}` is not an ACME directory URL: {why}");
    let Some(rest) = s.strip_prefix("https://") else {
        return Err(bad(
            "it must start with `https://` (RFC 8555 requires HTTPS)",
        ));
    };
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it holds a space or a control character"));
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains('@') {
        return Err(bad("it needs a host (and no user name)"));
    }
    Ok(())
}

fn check_email(s: &str) -> Result<(), String> {
    let bad = || format!("`{s}` is not an email address");
    let Some((local, domain)) = s.split_once('@') else {
        return Err(bad());
    };
    if local.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || s.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';' | ':')
        })
    {
        return Err(bad());
    }
    Ok(())
}

fn check_domain(s: &str) -> Result<(), String> {
    let bad = |why: &str| format!("`{s}` is not a valid domain: {why}");
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    if s.len() > 253 {
        return Err(bad("it is longer than 253 characters"));
    }
    if s.starts_with("*.") {
        return Err(bad("wildcard domains are not supported"));
    }
    if s.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(bad("write it in lowercase"));
    }
    let labels: Vec<&str> = s.split('.').collect();
    if labels.len() < 2 {
        return Err(bad(
            "it needs at least two labels, such as `app.example.com`",
        ));
    }
    for l in &labels {
        let lb = l.as_bytes();
        if lb.is_empty() {
            return Err(bad("it has an empty label"));
        }
        if lb.len() > 63 {
            return Err(bad("a label is longer than 63 characters"));
        }
        if lb[0] == b'-' || lb[lb.len() - 1] == b'-' {
            return Err(bad("a label starts or ends with `-`"));
        }
        if !lb
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        {
            return Err(bad(
                "labels may hold only lowercase letters, digits and `-`",
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(bad("an IP address is not a domain"));
    }
    Ok(())
}

/// An amount of memory or disk in bytes, written with a binary unit: `512MiB`, `1.5GiB`, `20GiB`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

const UNITS: [(&str, u64); 6] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
];

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = (&t[..split], t[split..].trim());
        let Some(&(_, mult)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            let hint = match unit
                .to_ascii_lowercase()
                .trim_end_matches('b')
                .trim_end_matches('i')
            {
                "k" => Some("KiB"),
                "m" => Some("MiB"),
                "g" => Some("GiB"),
                "t" => Some("TiB"),
                _ => None,
            };
            return Err(match hint {
                Some(h) if !num.is_empty() => format!(
                    "`{s}` is not a valid size: use a binary unit such as `{num}{h}` (units: B, KiB, MiB, GiB, TiB)"
                ),
                _ => format!(
                    "`{s}` is not a valid size: write a number and a binary unit such as `512MiB` or `20GiB`"
                ),
            });
        };
        let value = Decimal::from_str(num)
            .map_err(|_| format!("`{s}` is not a valid size: `{num}` is not a number"))?;
        let bytes = value
            .checked_mul(Decimal::from(mult))
            .filter(|b| b.fract().is_zero())
            .and_then(|b| u64::try_from(b).ok())
            .ok_or_else(|| {
                format!("`{s}` is not a valid size: it is not a whole number of bytes or too large")
            })?;
        if bytes == 0 {
            return Err(format!(
                "`{s}` is not a valid size: it must be more than zero"
            ));
        }
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides exactly, so the text parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, mult) = UNITS
            .iter()
            .rev()
            .find(|(_, m)| self.0.is_multiple_of(*m))
            .copied()
            .unwrap_or(("B", 1));
        write!(f, "{}{unit}", self.0 / mult)
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size with a binary unit, such as \"512MiB\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "a size needs a unit: write \"{v}MiB\" or \"{v}GiB\" (a quoted string)"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[0-9]+(\\.[0-9]+)?(B|KiB|MiB|GiB|TiB|PiB)$",
            "description": "An amount with a binary unit, such as \"512MiB\" or \"20GiB\"."
        })
    }
}

/// A non-negative decimal read exactly: from a TOML integer, a float (its decimal text, not its binary
/// value) or a string.
fn decimal_from_any<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
) -> Result<Decimal, D::Error> {
    struct V(&'static str);
    impl Visitor<'_> for V {
        type Value = Decimal;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}", self.0)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Decimal, E> {
            // The shortest text that round-trips this float is the decimal the author wrote.
            Decimal::from_str(&format!("{v}"))
                .map_err(|_| E::custom(format!("`{v}` is out of range")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Decimal, E> {
            Decimal::from_str(v.trim())
                .map_err(|_| E::custom(format!("`{v}` is not a decimal number")))
        }
    }
    d.deserialize_any(V(what)).map(|v| v.normalize())
}

/// CPU in cores, a decimal with at most three places (millicores): `0.25`, `2`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cpu(u32);

impl Cpu {
    pub fn from_millis(m: u32) -> Self {
        Cpu(m)
    }
    pub fn millis(self) -> u32 {
        self.0
    }
    pub fn as_decimal(self) -> Decimal {
        Decimal::new(i64::from(self.0), 3).normalize()
    }
    fn from_decimal(d: Decimal) -> Result<Self, String> {
        if d <= Decimal::ZERO {
            return Err(format!("cpu `{d}` must be more than zero"));
        }
        // Checked: `Decimal`'s `*` panics on overflow, and `d` is whatever a manifest wrote.
        let m = d
            .checked_mul(Decimal::from(1000))
            .ok_or_else(|| format!("cpu `{d}` is too large"))?;
        if !m.fract().is_zero() {
            return Err(format!("cpu `{d}` is finer than a millicore (0.001)"));
        }
        u32::try_from(m)
            .map(Cpu)
            .map_err(|_| format!("cpu `{d}` is too large"))
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_decimal())
    }
}
impl fmt::Debug for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Cpu {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(1000) {
            s.serialize_u32(self.0 / 1000)
        } else {
            s.serialize_f64(f64::from(self.0) / 1000.0)
        }
    }
}
impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = decimal_from_any(d, "a number of cores such as 0.5 or 2")?;
        Cpu::from_decimal(v).map_err(de::Error::custom)
    }
}
impl JsonSchema for Cpu {
    fn schema_name() -> Cow<'static, str> {
        "Cpu".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "CPU cores, a decimal with at most three places (0.25 is a quarter core)."
        })
    }
}

/// A monthly price, an exact non-negative decimal in the currency `cairn.toml` names.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Price(Decimal);

impl Price {
    pub fn new(d: Decimal) -> Result<Self, String> {
        if d.is_sign_negative() && !d.is_zero() {
            return Err(format!("price `{d}` must not be negative"));
        }
        if d.scale() > 4 {
            return Err(format!("price `{d}` has more than four decimal places"));
        }
        Ok(Price(d.normalize()))
    }
    pub fn amount(self) -> Decimal {
        self.0
    }
}
impl fmt::Display for Price {
    /// Two decimal places at least, as prices are usually written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = self.0;
        if d.scale() < 2 {
            d.rescale(2);
        }
        write!(f, "{d}")
    }
}
impl fmt::Debug for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
impl Serialize for Price {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = decimal_from_any(d, "a price such as \"12.50\"")?;
        Price::new(v).map_err(de::Error::custom)
    }
}
impl JsonSchema for Price {
    fn schema_name() -> Cow<'static, str> {
        "Price".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                { "type": "number", "minimum": 0 },
                { "type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,4})?$" }
            ],
            "description": "Monthly price in the currency cairn.toml names, such as \"12.50\"."
        })
    }
}

/// A duration written as humans do: `5s`, `500ms`, `2m`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span(pub Duration);

impl Span {
    pub fn parse(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!("`{s}` is not a valid duration ({e}): write a number and a unit such as `5s`, `500ms` or `2m`")
        })?;
        if d.is_zero() {
            return Err(format!("duration `{s}` must be more than zero"));
        }
        if d > Duration::from_secs(24 * 3600) {
            return Err(format!("duration `{s}` is longer than a day"));
        }
        Ok(Span(d))
    }
    pub fn duration(self) -> Duration {
        self.0
    }
}
impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}
impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // humantime separates units with spaces ("1s 500ms"); keep the compact form.
        s.serialize_str(&self.to_string().replace(' ', ""))
    }
}
impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"5s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
                Span::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Span, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{v}s\" (a quoted string)"
                )))
            }
        }
        d.deserialize_any(V)
    }
}
impl JsonSchema for Span {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^([0-9]+ ?(ns|us|ms|s|m|h|sec|min|hr|secs|mins|hrs)\\s*)+$",
            "description": "A duration such as \"5s\", \"500ms\" or \"2m\"."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("1.5GiB").unwrap().0, 3 << 29);
        assert_eq!(ByteSize::parse("1.5GiB").unwrap().to_string(), "1536MiB");
        assert!(ByteSize::parse("512MB").unwrap_err().contains("512MiB"));
        assert!(ByteSize::parse("512").is_err());
        assert!(ByteSize::parse("0GiB").is_err());
        assert!(ByteSize::parse("0.3B").is_err());
        assert!(ByteSize::parse("99999999999PiB").is_err());
    }

    #[test]
    fn names() {
        assert!(Name::new("web-1").is_ok());
        for bad in ["", "Web", "1web", "web-", "we_b", &"a".repeat(64)] {
            assert!(Name::new(bad).is_err(), "{bad}");
        }
        assert!(EnvName::new("_X1").is_ok());
        assert!(EnvName::new("1X").is_err());
        assert!(EnvName::new("A-B").is_err());
        assert!(Domain::new("www.example.com").is_ok());
        for bad in [
            "localhost",
            "a..b",
            "-a.com",
            "*.a.com",
            "A.com",
            "1.2.3.4",
            "a_b.com",
        ] {
            assert!(Domain::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_addresses_name_a_host_and_a_port_other_machines_can_dial() {
        for (text, host, port, endpoint) in [
            ("10.0.0.2", "10.0.0.2", 80, "10.0.0.2:80"),
            ("10.0.0.2:8000", "10.0.0.2", 8000, "10.0.0.2:8000"),
            (
                "Node-A.internal",
                "node-a.internal",
                80,
                "node-a.internal:80",
            ),
            (
                "node-a.internal.:81",
                "node-a.internal.",
                81,
                "node-a.internal:81",
            ),
            ("[fd00::2]", "fd00::2", 80, "[fd00::2]:80"),
            ("[FD00::2]:8000", "fd00::2", 8000, "[fd00::2]:8000"),
            ("worker1", "worker1", 80, "worker1:80"),
        ] {
            let a = NodeAddress::new(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (a.host().as_str(), a.port(), a.endpoint().as_str()),
                (host, port, endpoint)
            );
        }
        for (bad, why) in [
            ("", "empty"),
            ("127.0.0.1:8000", "loopback"),
            ("127.1", "loopback"),
            ("localhost:80", "loopback"),
            ("[::1]:80", "loopback"),
            ("169.254.169.254", "link-local"),
            ("metadata.google.internal", "metadata"),
            ("0.0.0.0:80", "unspecified"),
            ("[fe80::1]", "link-local"),
            ("fd00::2", "brackets"),
            ("[fd00::2", "not closed"),
            ("[fd00::2]8000", "after `]:`"),
            ("10.0.0.2:0", "not a port"),
            ("10.0.0.2:65536", "not a port"),
            ("10.0.0.2:+80", "not a port"),
            ("10.0.0.2:", "not a port"),
            (":80", "no host"),
            ("a..b", "not a host name"),
            ("-a.b", "not a host name"),
            ("a b", "not a valid host name"),
            ("http://10.0.0.2", "not a port"),
            ("10.0.0.2/24", "not a valid host name"),
        ] {
            let e = NodeAddress::new(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_and_price_are_exact() {
        let c: Cpu = toml::Value::Float(0.1).try_into().unwrap();
        assert_eq!(c.millis(), 100);
        assert!(toml::Value::Float(0.0005).try_into::<Cpu>().is_err());
        let p: Price = toml::Value::String("12.50".into()).try_into().unwrap();
        assert_eq!(p.to_string(), "12.50");
        assert!(toml::Value::Integer(-1).try_into::<Price>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(Span::parse("500ms").unwrap().0, Duration::from_millis(500));
        assert!(Span::parse("5").is_err());
        assert!(Span::parse("0s").is_err());
        let s = Span(Duration::from_millis(1500));
        assert_eq!(Span::parse(&s.to_string().replace(' ', "")).unwrap(), s);
    }
}
