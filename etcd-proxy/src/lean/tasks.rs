//! Work a service hands to the connection that carries its request, to be polled on the
//! connection's own task instead of a task of its own.
//!
//! A watch stream is such work: everything it writes goes to its connection, and it is woken
//! for every update. On a task of its own, each update woke that task, which then woke the
//! connection's task to write: two wake-ups, two trips through the runtime's queue and a
//! channel's waker per response, for each of thousands of connections. Polled by the
//! connection, an update wakes the connection once, and the same round that runs the stream
//! writes what it produced.
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

/// One piece of work: it ends when it has nothing more to do (or when the
/// connection, which owns it, goes).
pub type LocalFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The work handed to one connection and not yet taken by it; every request
/// of a lean connection carries it as an extension.
#[derive(Clone, Default)]
pub struct ConnTasks(Arc<Mutex<Vec<LocalFuture>>>);

impl std::fmt::Debug for ConnTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTasks").finish_non_exhaustive()
    }
}

impl ConnTasks {
    /// Hands `work` to the connection; it is polled from the connection's
    /// next round on, with the connection's waker.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.lock().push(Box::pin(work));
    }

    /// Moves the work handed over since the last call into `into`; true if
    /// there was any.
    pub(super) fn take_new(&self, into: &mut Vec<LocalFuture>) -> bool {
        let mut new = self.lock();
        if new.is_empty() {
            return false;
        }
        into.append(&mut new);
        // Most connections are handed one piece of work in their life.
        *new = Vec::new();
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<LocalFuture>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
