//! Python virtual environments for the tests: `cairn_testkit::pyenv` (shared with the crates' own test
//! suites, e.g. the agent's S3 server for database backups).

pub use cairn_testkit::pyenv::venv;
