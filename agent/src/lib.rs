//! The node agent (`cairn-agent`): joins the control plane, heartbeats, leases tasks and runs them through a
//! driver (Docker or supervised processes), and serves the node's HTTP proxy.
//!
//! This library is the node-side machinery that makes a replica run; the binary (join, heartbeat, lease)
//! drives it:
//!
//! - [`spec`]: the deploy task's payload ([`ReplicaSpec`]) and the checks that refuse a task asking for
//!   weaker isolation;
//! - [`source`]: the app's source at an exact commit, fetched with gix into a per-repo cache;
//! - [`driver`]: the [`Driver`] trait and its two implementations, [`DockerDriver`] and
//!   [`ProcessDriver`];
//! - [`health`]: the HTTP health check a new replica must pass;
//! - [`proxy`]: the node's HTTP reverse proxy, routing by `Host` to this node's healthy replicas, or over
//!   the authenticated internal hop to another node's proxy that has one;
//! - [`deploy`]: the health-gated replace that ties them together ([`Deployer`]);
//! - [`logs`]: log lines, sinks, and the log filter that keeps secrets out of dependency debug output;
//! - [`client`], [`node`]: the agent API's client and the agent loop (join, heartbeat, lease, report);
//! - [`routes`]: follows the control plane's cluster route table and hop key into the proxy;
//! - [`metrics`]: what the proxy counts and times, and the `/metrics` endpoint serving it;
//! - [`housekeeping`]: replica output shipped to the control plane, old images removed;
//! - [`runner`]: how a leased task is carried out ([`DriverRunner`] through the drivers above, and the
//!   test-only `recording::RecordingRunner`, behind the `recording` feature); [`datadir`]: identity, credential and the slot book;
//! - [`cli`]: the `cairn-agent` binary's flags; [`dev`]: what `cairn dev` asks of the local Docker engine.
//!
//! What it must not do: read the config repository or Postgres (it knows only the tasks it leases), or run
//! anything a manifest could use to weaken isolation (privileged mode, host networking, host mounts).
//! It is the only code in Cairn that talks to Docker.

pub mod cli;
pub mod client;
pub mod database;
pub mod datadir;
pub mod dbtasks;
pub mod deploy;
pub mod dev;
pub mod driver;
pub mod health;
pub mod housekeeping;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod proxy;
#[cfg(feature = "recording")]
pub mod recording;
pub mod routes;
pub mod runner;
pub mod source;
pub mod spec;

pub use deploy::{
    DeployError, DeployFailure, DeployReport, Deployer, DeployerConfig, ImageSource, Stage, Timings,
};
pub use driver::docker::{DockerConfig, DockerDriver};
pub use driver::process::{ProcessConfig, ProcessDriver};
pub use driver::{
    Driver, DriverError, DriverKind, ImageId, Replica, ReplicaId, ReplicaState, ReplicaStatus,
};
pub use logs::{LogLine, LogSink, LogStream};
pub use proxy::{
    Backend, ClusterTable, HopKey, Listener, Proxy, ProxyConfig, RouteInfo, TlsCertificate,
    TlsTable,
};
pub use runner::{DriverRunner, Runner};
pub use source::{Checkout, FetchKind, Resolve, Rewrite, Rewrites, SourceError, Sources};
pub use spec::{BuildSpec, HealthSpec, ImageRef, Limits, ReplicaSpec, SourceSpec, SpecError};
