//! Hot reload: a watcher on the plugins directory that reloads once events have been quiet
//! for a moment (editors and `cp` write in several steps; an atomic rename is one event).
//! A reload compares each file's sha256 with the serving version, so unrelated events cost a
//! read of three small files and nothing else.

use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::Policies;

/// Events closer together than this are one change.
const QUIET: Duration = Duration::from_millis(200);

/// Keeps the watcher alive; dropping it stops watching.
pub struct PluginWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// Watches `policies`' directory and reloads on change.
pub fn watch(policies: &Arc<Policies>) -> notify::Result<PluginWatcher> {
    let (tx, rx) = channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(policies.dir(), RecursiveMode::NonRecursive)?;
    let weak = Arc::downgrade(policies);
    std::thread::Builder::new()
        .name("kvgate-plugin-watch".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Wait for the directory to go quiet.
                loop {
                    match rx.recv_timeout(QUIET) {
                        Ok(()) => continue,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                let Some(p) = weak.upgrade() else { return };
                for o in p.reload().iter().filter(|o| o.outcome != "unchanged" && o.outcome != "absent") {
                    tracing::info!(kind = o.kind.as_str(), outcome = o.outcome, error = ?o.error, "plugins directory changed");
                }
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(PluginWatcher { _watcher: watcher })
}
