//! The GitHub integration: the webhook receiver, pull-request plan comments, commit statuses and the outbox
//! that delivers every GitHub API call.
//!
//! What it must not do: decide anything about desired state (it only records deliveries and wakes the
//! reconciler), or be bypassed: it is the only code in Cairn that talks to GitHub.

pub mod deliveries;
pub mod events;
pub mod github;
pub mod outbox;
pub mod receiver;
pub mod signature;
mod store;

pub use store::StoreError;
