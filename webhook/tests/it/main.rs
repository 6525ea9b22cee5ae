//! Integration tests of the GitHub integration, one binary with a module per area. They need
//! PostgreSQL (see `cairn-testkit`); the ones that replay GitHub's real payloads and API recordings
//! need `CAIRN_GITHUB_FIXTURES` (CI sets it to `../shared/fixtures/github`) and skip without it.

mod deliveries;
mod flow;
mod github_api;
mod pulls;
mod receiver;
mod statuses;
mod support;
mod world;
