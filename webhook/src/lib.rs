//! The GitHub integration: the webhook receiver, pull-request plan comments, commit statuses and the outbox
//! that delivers every GitHub API call.
//!
//! What it must not do: decide anything about desired state (it only records deliveries and wakes the
//! reconciler), or be bypassed: it is the only code in Cairn that talks to GitHub.
//!
//! # How a delivery flows
//!
//! 1. [`receiver`]: `POST /webhooks/github` reads the body (≤ 25 MiB), verifies its signature
//!    ([`signature`]), parses it for its event ([`events`]), records it in `webhook_deliveries` under its
//!    delivery id and wakes the worker. GitHub gets its answer here, in milliseconds.
//! 2. [`deliveries`]: the worker claims each recorded delivery, classifies it against the
//!    [`events::Routes`] the reconciler provides ([`events::classify_event`]) and calls the reconciler's
//!    [`deliveries::DeliveryHandler`] in the transaction that marks the delivery handled or ignored.
//! 3. The reconciler plans and applies, and asks for GitHub calls (commit statuses, the PR plan
//!    comment) with [`outbox::enqueue`], in its own transaction.
//! 4. [`outbox`]: the outbox worker makes each call through the [`github`] client, with retries,
//!    backoff, rate limits and dead letters.
//!
//! All SQL is in one private module (`store`); the tables are created by the migrations
//! `…153000_webhook_deliveries.sql` and `…153001_github_outbox.sql`.

pub mod deliveries;
pub mod events;
pub mod github;
pub mod outbox;
pub mod receiver;
pub mod signature;
mod store;

pub use store::StoreError;
