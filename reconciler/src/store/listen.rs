//! A LISTEN connection kept open for a background loop: notifications on one channel become in-process
//! wake-ups, and a lost connection is made again (with a growing pause while PostgreSQL refuses it).
//!
//! What it must not do: carry work in a notification (a payload only says whom to wake; the woken loop
//! reads the tables), or take the place of the loops' polling: anything notified while no connection
//! listens is found by their next pass, which [`Heard::Listening`] asks for after every (re)connect.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::worker::Shutdown;

/// The channel replica output is announced on (`store::releases`); the payload is the app.
pub const REPLICA_OUTPUT: &str = "cairn_replica_output";
/// The channel build output is announced on (`queue::sql`); the payload is the app.
pub const BUILD_OUTPUT: &str = "cairn_build_output";

/// What [`forward`] heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard<'a> {
    /// The connection listens (again): notifications sent meanwhile were missed.
    Listening,
    /// A notification and its payload.
    Notified(&'a str),
}

/// Listens on `channel` until `shutdown` is triggered, calling `on` with what it hears. `what` names the
/// notifications in logs ("webhook work").
pub async fn forward(
    pool: PgPool,
    channel: &'static str,
    what: &'static str,
    mut on: impl FnMut(Heard<'_>) + Send,
    shutdown: &Shutdown,
) {
    let mut retry = Duration::from_millis(500);
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            () = shutdown.wait() => return,
            l = listener => match l {
                Ok(l) => {
                    retry = Duration::from_millis(500);
                    l
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN for {what}; retrying");
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(30));
                    continue;
                }
            },
        };
        on(Heard::Listening);
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => on(Heard::Notified(n.payload())),
                    // The connection was lost (a failover, say): the next call takes a new one from the
                    // pool, which goes to the primary; what was notified meanwhile was missed.
                    Ok(None) => {
                        tracing::warn!("lost the {what} listener; reconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the {what} listener; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}
