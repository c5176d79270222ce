//! The agent's long-running async tasks, owned in one place: each has a name, a task that ends
//! before shutdown (an error, a panic, or a plain return) is a death reported with its cause,
//! and shutdown waits for every task up to a deadline, then aborts what is left.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};

/// A task that ended while the agent was running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// The task's name.
    pub task: &'static str,
    /// Its error, its panic message, or that it returned.
    pub cause: String,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} ended: {}", self.task, self.cause)
    }
}

/// Named tasks in a [`JoinSet`].
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    /// Starts `task` under `name`. It is meant to run until shutdown: ending earlier is a death.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether no task runs.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next task to end, with why; pending forever while none ends (or none runs).
    /// Cancel-safe: it can be a `select!` branch.
    pub async fn death(&mut self) -> Death {
        let Some(joined) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, cause) = match joined {
            Ok((id, Ok(()))) => (id, "it returned".to_string()),
            Ok((id, Err(e))) => (id, format!("{e:#}")),
            Err(e) => (e.id(), join_error(e)),
        };
        Death { task: self.names.remove(&id).unwrap_or("unnamed"), cause }
    }

    /// Once shutdown has been signalled: waits up to `deadline` for every task to return,
    /// logging the ones that fail while stopping, then aborts those still running.
    pub async fn stop(mut self, deadline: Duration) {
        let drain = async {
            while let Some(joined) = self.set.join_next_with_id().await {
                match joined {
                    Ok((id, Ok(()))) => {
                        self.names.remove(&id);
                    }
                    Ok((id, Err(e))) => {
                        let task = self.names.remove(&id).unwrap_or("unnamed");
                        tracing::warn!(task, error = %format!("{e:#}"), "task failed while stopping");
                    }
                    Err(e) => {
                        let task = self.names.remove(&e.id()).unwrap_or("unnamed");
                        tracing::warn!(task, cause = %join_error(e), "task failed while stopping");
                    }
                }
            }
        };
        if tokio::time::timeout(deadline, drain).await.is_err() {
            let mut left: Vec<&str> = self.names.values().copied().collect();
            left.sort_unstable();
            tracing::warn!(?deadline, tasks = ?left, "tasks did not stop in time; aborted");
            self.set.shutdown().await;
        }
    }
}

/// A join error as a cause: the panic's message, or that the task was cancelled.
pub fn join_error(e: JoinError) -> String {
    if !e.is_panic() {
        return "cancelled".into();
    }
    let payload = e.into_panic();
    panic_message(&*payload)
}

/// The message of a panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let message = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
    format!("panicked: {}", message.unwrap_or_else(|| "(no message)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn errors_panics_and_returns_are_deaths_with_their_cause() {
        let mut tasks = Tasks::default();
        tasks.spawn("forever", std::future::pending());
        tasks.spawn("failing", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            anyhow::bail!("the watch broke")
        });
        tasks.spawn("panicking", async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            panic!("index out of bounds")
        });
        tasks.spawn("returning", async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(())
        });
        assert_eq!(tasks.death().await, Death { task: "failing", cause: "the watch broke".into() });
        assert_eq!(tasks.death().await, Death { task: "panicking", cause: "panicked: index out of bounds".into() });
        assert_eq!(tasks.death().await, Death { task: "returning", cause: "it returned".into() });
        assert_eq!(tasks.len(), 1);
        let still = tokio::time::timeout(Duration::from_secs(3600), tasks.death()).await;
        assert!(still.is_err(), "a task that runs is no death");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_waits_for_tasks_up_to_the_deadline_then_aborts_them() {
        let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Tasks::default();
        for (name, cleanup) in [("quick", 1), ("slow", 2), ("stuck", 3600)] {
            let (mut stop, finished) = (stop.subscribe(), finished.clone());
            tasks.spawn(name, async move {
                let _ = stop.recv().await;
                tokio::time::sleep(Duration::from_secs(cleanup)).await;
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            });
        }
        stop.send(()).unwrap();
        let started = tokio::time::Instant::now();
        tasks.stop(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5), "waited for the deadline, not for the stuck task");
        assert_eq!(finished.load(std::sync::atomic::Ordering::SeqCst), 2, "the two that could stop in time did");
    }
}
