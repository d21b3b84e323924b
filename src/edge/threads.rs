//! Connection threads: each accepted socket is served, for its whole life, by one of a few
//! single-threaded runtimes, taken in turn.
//!
//! Why not one multi-threaded runtime: a connection's work is a chain of short steps (client
//! socket, edge, core socket, and back) and on a work-stealing runtime those steps hop between
//! workers, each hop a cross-thread wake-up. Measured on 2 cores (BENCHMARKS.md, "Connection
//! threads"): a QoS 1 publisher waiting for each ack lost about 15-30% with two work-stealing
//! workers against one, while 1,000 bridge sessions at 100,000 deliveries/s need more than one
//! thread. Pinning each connection to one thread gives both: a connection's steps stay on its
//! thread, and connections spread over all of them.
//!
//! Everything a connection spawns (a bridge session's relay, `spawn_blocking` work) runs on the
//! same thread's runtime. Tokio's synchronisation types work across runtimes, so connections on
//! different threads still share the registry, the semaphores and the metrics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    #[error("cannot start connection thread {index}: {source}")]
    Start {
        index: usize,
        source: std::io::Error,
    },
}

/// The connection threads; none means connections run on the caller's runtime.
pub struct ConnectionThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Each thread's stop signal and join handle, taken by [`ConnectionThreads::stop`].
    threads: Mutex<Vec<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl ConnectionThreads {
    /// Starts `count` threads (0: none, and connections run on the caller's runtime), each
    /// driving a current-thread runtime until [`stop`](Self::stop).
    pub fn start(count: usize) -> Result<ConnectionThreads, ThreadsError> {
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| ThreadsError::Start { index, source })?;
            handles.push(runtime.handle().clone());
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let join = std::thread::Builder::new()
                .name(format!("vigil-conn-{index}"))
                .spawn(move || {
                    // A dropped sender stops the thread too.
                    let _ = runtime.block_on(stop_rx);
                    // Dropping the runtime cancels what is still running on it; shutdown has
                    // already waited for the connections by then.
                })
                .map_err(|source| ThreadsError::Start { index, source })?;
            threads.push((stop_tx, join));
        }
        Ok(ConnectionThreads {
            handles,
            next: AtomicUsize::new(0),
            threads: Mutex::new(threads),
        })
    }

    /// The runtime for the next connection, in turn; `None` without threads of its own.
    pub fn pick(&self) -> Option<&Handle> {
        if self.handles.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles.get(i)
    }

    /// Stops every thread and waits for it (except the calling thread, should it be one of
    /// them): call after the connections have ended.
    pub fn stop(&self) {
        let threads = match self.threads.lock() {
            Ok(mut list) => std::mem::take(&mut *list),
            Err(_) => return,
        };
        let me = std::thread::current().id();
        for (stop, join) in threads {
            let _ = stop.send(());
            if join.thread().id() != me {
                let _ = join.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_spread_in_turn_and_stay_on_their_thread() {
        let threads = ConnectionThreads::start(2).expect("threads start");
        let names: Vec<String> = (0..4)
            .map(|_| {
                let rt = threads.pick().expect("a runtime").clone();
                let (tx, rx) = std::sync::mpsc::channel();
                rt.spawn(async move {
                    // A task spawned from a connection lands on the same thread.
                    let inner =
                        tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                            .await
                            .ok()
                            .flatten();
                    let outer = std::thread::current().name().map(str::to_owned);
                    let _ = tx.send((outer, inner));
                });
                let (outer, inner) = rx.recv().expect("task ran");
                assert_eq!(outer, inner);
                outer.expect("named thread")
            })
            .collect();
        assert_eq!(
            names,
            [
                "vigil-conn-0",
                "vigil-conn-1",
                "vigil-conn-0",
                "vigil-conn-1"
            ]
        );
        threads.stop();
        threads.stop();
    }

    #[test]
    fn without_threads_nothing_is_picked() {
        let threads = ConnectionThreads::start(0).expect("no threads");
        assert!(threads.pick().is_none());
    }
}
