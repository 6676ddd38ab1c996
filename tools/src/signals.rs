//! SIGINT / SIGTERM: the first one cancels the migration (so the source devices are walked back to
//! RUNNING, the destination devices reset and a partial `file:` output removed) and the command
//! then exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as shells expect;
//! a second one exits at once with the same status.
//!
//! The signals are blocked in every thread (the mask is set before any thread is spawned and
//! inherited) and taken synchronously with `sigwait` on one dedicated thread: no async-signal
//! handler code at all.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::signal::{SigSet, Signal};

type Hook = Box<dyn Fn() + Send>;

/// The first signal received (0: none). Process-wide, as signals are.
static FIRED: AtomicI32 = AtomicI32::new(0);

/// The exit status for a command ended by the signal received, if one was: 128 + its number.
pub fn exit_status() -> Option<u8> {
    match FIRED.load(Ordering::SeqCst) {
        0 => None,
        n => u8::try_from(128 + n).ok(),
    }
}

/// Where cancellation hooks are registered; shared with the signal thread.
#[derive(Clone, Default)]
pub struct Cancel {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    fired: AtomicBool,
    hooks: Mutex<Vec<Hook>>,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("fired", &self.is_cancelled())
            .finish()
    }
}

impl Cancel {
    /// Whether a cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.inner.fired.load(Ordering::SeqCst)
    }

    /// Runs `hook` on cancellation, or right now if it already happened.
    pub fn on_cancel(&self, hook: impl Fn() + Send + 'static) {
        let mut hooks = self
            .inner
            .hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.is_cancelled() {
            drop(hooks);
            hook();
        } else {
            hooks.push(Box::new(hook));
        }
    }

    /// Requests cancellation: runs every registered hook once.
    pub fn cancel(&self) {
        let hooks = {
            let mut hooks = self
                .inner
                .hooks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if self.inner.fired.swap(true, Ordering::SeqCst) {
                return;
            }
            std::mem::take(&mut *hooks)
        };
        for hook in hooks {
            hook();
        }
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and every thread it spawns afterwards) and
/// starts the thread that turns them into [`Cancel::cancel`]. Call first thing in `main`.
pub fn install(cancel: &Cancel) -> Result<(), nix::errno::Errno> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    let cancel = cancel.clone();
    std::thread::Builder::new()
        .name("vfmig-signals".into())
        .spawn(move || {
            let mut seen = 0u32;
            while let Ok(sig) = set.wait() {
                seen += 1;
                if seen == 1 {
                    FIRED.store(sig as i32, Ordering::SeqCst);
                    cancel.cancel();
                } else {
                    say!("vfmig: {sig} again: exiting without cleaning up");
                    std::process::exit(i32::from(exit_status().unwrap_or(1)));
                }
            }
        })
        .map_err(|_| nix::errno::Errno::EAGAIN)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn hooks_run_once_and_late_hooks_run_immediately() {
        let c = Cancel::default();
        let n = Arc::new(AtomicU32::new(0));
        let n1 = n.clone();
        c.on_cancel(move || {
            n1.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!c.is_cancelled());
        c.cancel();
        c.cancel();
        assert_eq!(n.load(Ordering::SeqCst), 1, "a hook runs once");
        let n2 = n.clone();
        c.on_cancel(move || {
            n2.fetch_add(10, Ordering::SeqCst);
        });
        assert_eq!(
            n.load(Ordering::SeqCst),
            11,
            "registered after cancel: runs at once"
        );
    }
}
