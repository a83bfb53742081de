//! Reload on change of the policy files: watches the policy's directory and every include
//! pattern's directory (so atomic-rename saves and new drop-in files are seen), debounces
//! events for [`DEBOUNCE`], then reloads. Also reloads on SIGHUP.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;

use crate::Runtime;

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Starts the file watcher and the SIGHUP handler. Both run until the process ends.
///
/// # Errors
/// A message when the file watcher cannot be created.
pub fn spawn(rt: Arc<Runtime>) -> Result<(), String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // A `.toml` file, a file of the policy in force, or one of its include directories
    // itself (created after start, or named by a later reload).
    let current = rt.clone();
    // Events name absolute paths; the policy's may be relative (`--policy policy.conf`).
    let same = |a: &PathBuf, b: &PathBuf| a == b || std::path::absolute(a).is_ok_and(|a| a == *b);
    // A policy file that is a symlink (a Kubernetes ConfigMap volume: `policy.toml ->
    // ..data/policy.toml`, `..data -> ..2026_12_01_…`) changes when a link elsewhere in the
    // directory is swapped, an event that names neither the file nor a `.toml`: any event
    // in the directory then counts.
    let relevant = move |kind: &notify::EventKind, paths: &[PathBuf]| -> bool {
        use notify::EventKind::{Create, Modify, Remove};
        use notify::event::ModifyKind;
        let policy = current.policy();
        // Links are created, renamed or removed, never written: data writes (an audit log
        // kept in the same directory) are not such a swap.
        let renamed = matches!(kind, Create(_) | Remove(_) | Modify(ModifyKind::Name(_)));
        let linked = || {
            policy
                .files
                .iter()
                .any(|f| std::fs::symlink_metadata(f).is_ok_and(|m| m.file_type().is_symlink()))
        };
        paths.iter().any(|p| {
            p.extension().is_some_and(|e| e == "toml")
                || policy.files.iter().any(|w| same(w, p))
                || policy.watch_dirs.iter().any(|d| same(d, p))
                || p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".."))
        }) || (renamed && linked())
    };
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !ev.kind.is_access()
            && relevant(&ev.kind, &ev.paths)
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("failed to start the policy file watcher: {e}"))?;
    let mut watching: HashSet<PathBuf> = HashSet::new();
    watch_all(&mut watcher, &rt.policy().watch_dirs, &mut watching);
    let file_rt = rt.clone();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until events stop for DEBOUNCE.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            // An include directory may have appeared: watch it before reading it.
            watch_all(&mut watcher, &file_rt.policy().watch_dirs, &mut watching);
            tracing::info!("policy files changed; reloading");
            if file_rt.reload().await.is_ok() {
                watch_all(&mut watcher, &file_rt.policy().watch_dirs, &mut watching);
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

/// Watches every directory in `dirs` not watched yet. A directory that does not exist yet is
/// covered by watching its parent, so its creation is seen and it is watched then.
fn watch_all(
    watcher: &mut impl notify::Watcher,
    dirs: &[PathBuf],
    watching: &mut HashSet<PathBuf>,
) {
    for d in dirs {
        if watching.contains(d) {
            continue;
        }
        match watcher.watch(d, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watching.insert(d.clone());
            }
            Err(e) => {
                let parent = d.parent().filter(|p| p.is_dir()).map(PathBuf::from);
                match parent {
                    Some(p) if !watching.contains(&p) => {
                        if watcher.watch(&p, RecursiveMode::NonRecursive).is_ok() {
                            watching.insert(p);
                        }
                    }
                    Some(_) => {}
                    None => {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch policy directory");
                    }
                }
            }
        }
    }
}
