//! A check that runs every so often off the async runtime (it reads files), carrying its
//! state from one run to the next — e.g. the series it exported, so the next run can remove
//! those that went away.

use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;

/// Runs `check` on the blocking pool every `interval` until shutdown; each run gets the state
/// the previous one returned.
pub async fn every<S, F>(interval: Duration, what: &'static str, mut shutdown: Shutdown, check: F)
where
    S: Default + Send + 'static,
    F: Fn(S) -> S + Send + Sync + 'static,
{
    let check = Arc::new(check);
    let mut state = S::default();
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => return,
        }
        let (check, previous) = (check.clone(), std::mem::take(&mut state));
        match tokio::task::spawn_blocking(move || check(previous)).await {
            Ok(next) => state = next,
            Err(e) => tracing::error!(error = %e, what, "periodic check panicked"),
        }
    }
}
