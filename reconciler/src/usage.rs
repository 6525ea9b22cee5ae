//! The usage rollup worker `cairn serve` runs (issue 20): every period it rolls up the hours since the
//! last final one, the hours late reports reached back into, the current hour provisionally, and closes
//! the months whose late window has passed (`store::usage::roll_up`). The arithmetic is
//! `cairn_plan::usage`; what is recorded and stored is `store/usage.rs`.
//!
//! What it must not do: hold a transaction across more than one hour's rollup, or fail anything but
//! its own pass (a failed pass is logged and tried again next period; rollups are idempotent).

use std::time::Duration;

use sqlx::PgPool;

use crate::store::{StoreError, usage};
use crate::worker::{Shutdown, Worker};

/// How often `cairn serve` rolls usage up by default.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(60);

/// Rolls usage up every `period` until `shutdown`.
pub async fn rollup_loop(pool: PgPool, period: Duration, shutdown: &Shutdown) {
    Worker::new("cannot roll usage up", period)
        .failures_as_warnings()
        .run(shutdown, |_| async {
            let now = usage::db_now(&pool).await?;
            let pass = usage::roll_up(&pool, now).await?;
            tracing::debug!(hours = pass.hours, "usage rolled up");
            for m in &pass.months_closed {
                tracing::info!(month = %m, "usage month closed: statement written");
            }
            Ok::<_, StoreError>(None)
        })
        .await
}
