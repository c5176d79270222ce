//! Shutdown as one small type: a broadcast receiver that remembers it has fired.

use tokio::sync::broadcast;

/// Listens for the shutdown signal.
#[derive(Debug)]
pub struct Shutdown {
    fired: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    /// A listener on `notify`.
    pub fn new(notify: broadcast::Receiver<()>) -> Shutdown {
        Shutdown { fired: false, notify }
    }

    /// Waits for the signal (returns at once if it has fired). A dropped sender counts.
    pub async fn recv(&mut self) {
        if self.fired {
            return;
        }
        let _ = self.notify.recv().await;
        self.fired = true;
    }
}
