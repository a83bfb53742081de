//! Reload on change of the policy files: watches the policy's directory and every include
//! pattern's directory (so atomic-rename saves and new drop-in files are seen), debounces
//! events for [`DEBOUNCE`], then reloads. Also reloads on SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};

use crate::Runtime;

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Starts the file watcher and the SIGHUP handler. Both run until the process ends.
///
/// # Errors
/// A message when the file watcher cannot be created.
pub fn spawn(rt: Arc<Runtime>) -> Result<(), String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watched = rt.policy().files.clone();
    let relevant = move |paths: &[PathBuf]| -> bool {
        paths
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "toml") || watched.iter().any(|w| w == p))
    };
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !ev.kind.is_access()
            && relevant(&ev.paths)
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("failed to start the policy file watcher: {e}"))?;
    let mut dirs = rt.policy().watch_dirs.clone();
    for d in &dirs {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch policy directory");
        }
    }
    let file_rt = rt.clone();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until events stop for DEBOUNCE.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            tracing::info!("policy files changed; reloading");
            if file_rt.reload().await.is_ok() {
                let now = file_rt.policy().watch_dirs.clone();
                for d in now.iter().filter(|d| !dirs.contains(d)) {
                    let _ = watcher.watch(d, RecursiveMode::NonRecursive);
                }
                dirs = now;
            }
        }
    });
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP; reloading the policy");
                        let _ = rt.reload().await;
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot install the SIGHUP handler"),
        }
    }
    Ok(())
}
