//! The manifests tests write into config repositories, typed once: `cairn.toml` ([`settings`]) and the
//! `[plan.NAME]`, `[runtime.NAME]` and `[node.NAME]` tables ([`plan`], [`runtime`], [`node`]), each a
//! builder with the values most tests use and a method for every value a test varies. They render as TOML
//! text (`Display`), so a test writes them wherever its repository is (a directory, a git remote) and can
//! still append what only it needs.
//!
//! Values are TOML as written: `.cpu("0.25")` writes `cpu = 0.25`, `.price("5")` writes `price = 5`
//! (strings the builder quotes itself: `memory`, `disk`, `image`, ...).
//!
//! What it must not do: validate (tests of invalid manifests write their own text), or read or write
//! files.

use std::fmt;

/// `pub fn field(self, value: &str) -> Self` for each field named (`Some(value)` for the optional ones).
macro_rules! setters {
    ($ty:ident { $($field:ident),* } $(optional { $($opt:ident),* })?) => {
        impl $ty {
            $(pub fn $field(mut self, value: &str) -> Self {
                self.$field = value.into();
                self
            })*
            $($(pub fn $opt(mut self, value: &str) -> Self {
                self.$opt = Some(value.into());
                self
            })*)?
        }
    };
}

/// `cairn.toml`: `base_domain = "apps.example.com"`, no currency, no `[secrets]`.
pub fn settings() -> Settings {
    Settings {
        base_domain: "apps.example.com".into(),
        currency: None,
        recipients: None,
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    base_domain: String,
    currency: Option<String>,
    recipients: Option<Vec<String>>,
}

setters!(Settings { base_domain } optional { currency });

impl Settings {
    /// `[secrets] recipients` (age public keys; none gives `recipients = []`).
    pub fn recipients<S: AsRef<str>>(mut self, recipients: &[S]) -> Self {
        self.recipients = Some(recipients.iter().map(|r| r.as_ref().to_owned()).collect());
        self
    }
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "base_domain = \"{}\"", self.base_domain)?;
        if let Some(c) = &self.currency {
            writeln!(f, "currency = \"{c}\"")?;
        }
        if let Some(recipients) = &self.recipients {
            writeln!(f, "\n[secrets]\nrecipients = [{}]", quoted(recipients))?;
        }
        Ok(())
    }
}

/// `[plan.NAME]`: cpu 0.5, 512MiB memory, 1GiB disk, price "5.00", at most 5 replicas.
pub fn plan(name: &str) -> Plan {
    Plan {
        name: name.into(),
        cpu: "0.5".into(),
        memory: "512MiB".into(),
        disk: "1GiB".into(),
        price: "\"5.00\"".into(),
        max_replicas: 5,
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    name: String,
    cpu: String,
    memory: String,
    disk: String,
    price: String,
    max_replicas: u32,
}

// `price` as TOML: `"5.00"` (a string) or `5` (a number).
setters!(Plan { cpu, memory, price });

impl Plan {
    pub fn max_replicas(mut self, n: u32) -> Self {
        self.max_replicas = n;
        self
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[plan.{}]\ncpu = {}\nmemory = \"{}\"\ndisk = \"{}\"\nprice = {}\nmax_replicas = {}\n",
            self.name, self.cpu, self.memory, self.disk, self.price, self.max_replicas
        )
    }
}

/// `[runtime.NAME]` with only a port (8080); add what the runtime builds and runs with.
pub fn runtime(name: &str) -> Runtime {
    Runtime {
        name: name.into(),
        drivers: Vec::new(),
        image: None,
        dockerfile: false,
        build: Vec::new(),
        start: None,
        port: 8080,
    }
}

/// `[runtime.node]`: image `node:22`, `npm start` on port 3000.
pub fn node_runtime() -> Runtime {
    runtime("node")
        .image("node:22")
        .start("npm start")
        .port(3000)
}

#[derive(Debug, Clone)]
pub struct Runtime {
    name: String,
    drivers: Vec<String>,
    image: Option<String>,
    dockerfile: bool,
    build: Vec<String>,
    start: Option<String>,
    port: u16,
}

setters!(Runtime {} optional { image, start });

impl Runtime {
    pub fn drivers(mut self, drivers: &[&str]) -> Self {
        self.drivers = drivers.iter().map(|d| (*d).to_owned()).collect();
        self
    }
    /// `dockerfile = true`: the app's own Dockerfile.
    pub fn dockerfile(mut self) -> Self {
        self.dockerfile = true;
        self
    }
    pub fn build(mut self, commands: &[&str]) -> Self {
        self.build = commands.iter().map(|c| (*c).to_owned()).collect();
        self
    }
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[runtime.{}]", self.name)?;
        if !self.drivers.is_empty() {
            writeln!(f, "drivers = [{}]", quoted(&self.drivers))?;
        }
        if let Some(image) = &self.image {
            writeln!(f, "image = \"{image}\"")?;
        }
        if self.dockerfile {
            writeln!(f, "dockerfile = true")?;
        }
        if !self.build.is_empty() {
            writeln!(f, "build = [{}]", quoted(&self.build))?;
        }
        if let Some(start) = &self.start {
            writeln!(f, "start = \"{start}\"")?;
        }
        writeln!(f, "port = {}", self.port)
    }
}

/// `[node.NAME]`: 4 cpus, 8GiB memory, 100GiB disk.
pub fn node(name: &str) -> Node {
    Node {
        name: name.into(),
        cpu: "4".into(),
        memory: "8GiB".into(),
        disk: "100GiB".into(),
        recipient: None,
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    cpu: String,
    memory: String,
    disk: String,
    recipient: Option<String>,
}

// `recipient`: the node's pinned age recipient.
setters!(Node { cpu, memory, disk } optional { recipient });

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[node.{}]\ncpu = {}\nmemory = \"{}\"\ndisk = \"{}\"\n",
            self.name, self.cpu, self.memory, self.disk
        )?;
        if let Some(r) = &self.recipient {
            writeln!(f, "recipient = \"{r}\"")?;
        }
        Ok(())
    }
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_toml_tests_wrote_by_hand() {
        assert_eq!(
            plan("small")
                .cpu("0.25")
                .memory("256MiB")
                .max_replicas(3)
                .to_string(),
            "[plan.small]\ncpu = 0.25\nmemory = \"256MiB\"\ndisk = \"1GiB\"\nprice = \"5.00\"\nmax_replicas = 3\n"
        );
        assert_eq!(
            runtime("web")
                .drivers(&["docker", "process"])
                .image("debian:12")
                .start("./serve")
                .to_string(),
            "[runtime.web]\ndrivers = [\"docker\", \"process\"]\nimage = \"debian:12\"\nstart = \"./serve\"\nport = 8080\n"
        );
        assert_eq!(
            runtime("docker").dockerfile().to_string(),
            "[runtime.docker]\ndockerfile = true\nport = 8080\n"
        );
        assert_eq!(
            node("n1").cpu("2").memory("4GiB").disk("50GiB").to_string(),
            "[node.n1]\ncpu = 2\nmemory = \"4GiB\"\ndisk = \"50GiB\"\n"
        );
        assert_eq!(
            settings()
                .currency("EUR")
                .recipients(&["age1x"])
                .to_string(),
            "base_domain = \"apps.example.com\"\ncurrency = \"EUR\"\n\n[secrets]\nrecipients = [\"age1x\"]\n"
        );
        assert_eq!(
            settings().recipients::<&str>(&[]).to_string(),
            "base_domain = \"apps.example.com\"\n\n[secrets]\nrecipients = []\n"
        );
    }
}
