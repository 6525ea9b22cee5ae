//! The node agent (`cairn-agent`): joins the control plane, heartbeats, leases tasks and runs them through a
//! driver (Docker or supervised processes), and serves the node's HTTP proxy.
//!
//! What it must not do: read the config repository or Postgres (it knows only the tasks it leases), or run
//! anything a manifest could use to weaken isolation (privileged mode, host networking, host mounts).
//! It is the only code in Cairn that talks to Docker.
