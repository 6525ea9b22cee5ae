//! The GitHub integration: the webhook receiver, pull-request plan comments, commit statuses and the outbox
//! that delivers every GitHub API call.
//!
//! What it must not do: decide anything about desired state (it records deliveries, asks remotes for
//! heads and wakes the reconciler, which re-reads everything), or be bypassed: it is the only code in
//! Cairn that talks to GitHub. It depends on the reconciler; the reconciler never depends on it (it
//! tells it what it did through `cairn_reconciler::hooks`).
//!
//! # How a delivery flows
//!
//! 1. [`receiver`]: `POST /webhooks/github` reads the body (≤ 25 MiB), verifies its signature
//!    ([`signature`]), parses it for its event ([`events`]), records it in `webhook_deliveries` under its
//!    delivery id and wakes the worker. GitHub gets its answer here, in milliseconds.
//! 2. [`deliveries`]: the worker claims each recorded delivery, classifies it against the
//!    [`events::Routes`] of the applied state ([`events::classify_event`]) and calls the
//!    [`deliveries::DeliveryHandler`] ([`handler::CairnHandler`]) in the transaction that marks the
//!    delivery handled or ignored. The handler only records and notifies:
//!    - a config push wakes the reconciler, which fetches and applies the branch head;
//!    - an app source push asks [`heads`] to read the branch head from the remote; the head checker
//!      records it and wakes the reconciler, which plans a release and its deploy tasks;
//!    - a pull request is recorded for [`pulls`], which fetches `refs/pull/N/head`, plans it without
//!      applying, and enqueues the plan comment and the `cairn/plan` status.
//! 3. The reconciler applies; [`statuses`] (its hooks) enqueue `cairn/apply` and `cairn/deploy/<app>`
//!    statuses in the apply's own transaction.
//! 4. [`outbox`]: the outbox worker makes each call through the [`github`] client, with retries,
//!    backoff, rate limits and dead letters.
//!
//! The same outbox machinery (the row's life and its statements in `store`) delivers the events the
//! reconciler records to the notification sinks declared in git: [`notify`] (Standard Webhooks
//! signatures, Slack and Discord messages, the delivery ledger).
//!
//! [`service`] starts all of it for `cairn serve`. All SQL is in one private module (`store`); the
//! tables are created by the migrations `…153000_webhook_deliveries.sql`, `…153001_github_outbox.sql`
//! and `…161933_webhook_work.sql`.

pub mod admin;
pub mod deliveries;
pub mod events;
pub mod github;
pub mod handler;
pub mod heads;
pub mod notify;
pub mod outbox;
pub mod pulls;
pub mod receiver;
pub mod service;
pub mod signature;
pub mod statuses;
mod store;

pub use store::StoreError;
