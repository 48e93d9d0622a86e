//! Records of running children on disk (pid, start time, owner), so the owner's next
//! start reaps what escaped its previous run.

use crate::error::ChildError;
use crate::procfs::{ProcId, kill_and_wait, kill_orphaned_group};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

/// Who started a recorded process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// `hvx-node-agent`, `hvx-launcher`.
    pub kind: String,
    /// The owner process.
    pub process: ProcId,
}

/// One record: `<dir>/<pid>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    /// The child.
    pub process: ProcId,
    /// What it is (`accelerator probe`, `qemu-img convert`, `qemu`).
    pub what: String,
    /// Who started it.
    pub owner: Owner,
}

/// A record reaped by [`Tracker::reap_stale`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaped {
    /// The record.
    pub record: ProcRecord,
    /// It was still running (and was killed); else only the record was stale.
    pub killed: bool,
}

/// The records of one owner (an agent's node, a launcher's VM). Pids are those of
/// the owner's pid namespace: owners sharing a directory must share it (agent and
/// launcher pods run with `hostPID`).
#[derive(Clone, Debug)]
pub struct Tracker {
    dir: PathBuf,
    owner: Owner,
}

/// Removes its record when dropped: the child has exited or been killed by then.
#[derive(Debug)]
pub struct Tracked {
    path: Option<PathBuf>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ChildError {
    let path = path.to_path_buf();
    move |source| ChildError::Io { what, path, source }
}

impl Tracker {
    /// Records of `kind` (this process as owner) in `dir`, created if needed.
    pub fn new(dir: impl Into<PathBuf>, kind: &str) -> Result<Self, ChildError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let process = ProcId::current().ok_or_else(|| ChildError::Io {
            what: "reading the start time of this process in",
            path: PathBuf::from("/proc/self/stat"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        Ok(Self {
            dir,
            owner: Owner {
                kind: kind.to_string(),
                process,
            },
        })
    }

    /// The record directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records the child `pid` until the guard drops. A child that already exited
    /// gets no record. Failing to write is logged, not fatal: the parent-death
    /// signal still ends the child with its starter.
    pub fn track(&self, pid: u32, what: &str) -> Tracked {
        let Some(process) = ProcId::of(pid) else {
            return Tracked { path: None };
        };
        let rec = ProcRecord {
            process,
            what: what.to_string(),
            owner: self.owner.clone(),
        };
        let path = self.dir.join(format!("{pid}.json"));
        let tmp = self.dir.join(format!(".{pid}.json.tmp"));
        let written = serde_json::to_vec(&rec)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => Tracked { path: Some(path) },
            Err(e) => {
                tracing::warn!(pid, what, error = %e, "cannot record child process");
                Tracked { path: None }
            }
        }
    }

    /// The records in the directory (unreadable ones are reported and skipped).
    pub fn records(&self) -> Result<Vec<(PathBuf, ProcRecord)>, ChildError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("listing", &self.dir)(e)),
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(io_err("reading", &path))
                .and_then(|b| {
                    serde_json::from_slice(&b).map_err(|source| ChildError::Record {
                        path: path.clone(),
                        source,
                    })
                });
            match parsed {
                Ok(r) => out.push((path, r)),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping unreadable child record");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(out)
    }

    /// Kills the recorded children of previous owners of this directory that are
    /// still running (same pid *and* start time: never a recycled pid, never by name)
    /// and drops their records. Records of a live owner other than this process (a
    /// second instance sharing the directory) are left alone.
    pub fn reap_stale(&self) -> Result<Vec<Reaped>, ChildError> {
        let mut reaped = Vec::new();
        let mut errors = Vec::new();
        for (path, rec) in self.records()? {
            if rec.owner.process != self.owner.process && rec.owner.process.is_alive() {
                continue;
            }
            if rec.owner.process == self.owner.process {
                // Ours and running: not stale.
                if rec.process.is_alive() {
                    continue;
                }
            }
            let alive = rec.process.is_alive();
            // The child is gone but what it forked may not be.
            let orphans = if alive {
                0
            } else {
                kill_orphaned_group(&rec.process, Duration::from_secs(5))
            };
            if orphans > 0 {
                tracing::warn!(pid = rec.process.pid, what = %rec.what, orphans, "killed what a leftover's process group still held");
            }
            if alive && !kill_and_wait(&rec.process, Duration::from_secs(5)) {
                errors.push(ChildError::Unkillable {
                    pid: rec.process.pid,
                    what: rec.what.clone(),
                });
                continue;
            }
            let _ = std::fs::remove_file(&path);
            if alive {
                tracing::warn!(pid = rec.process.pid, what = %rec.what, owner = ?rec.owner, "killed a leftover process of a previous run");
            }
            reaped.push(Reaped {
                record: rec,
                killed: alive || orphans > 0,
            });
        }
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(reaped),
        }
    }
}

static GLOBAL: RwLock<Option<Tracker>> = RwLock::new(None);

impl Tracker {
    /// Makes this the tracker [`track`](Tracker::track_global) uses in this process
    /// (the agent's or launcher's records); library code records through it.
    pub fn install(self) {
        *GLOBAL
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(self);
    }

    /// Records `pid` with the installed tracker; without one, nothing is recorded
    /// (tests, tools) and the parent-death signal alone applies.
    pub fn track_global(pid: Option<u32>, what: &str) -> Tracked {
        let guard = GLOBAL
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (guard.as_ref(), pid) {
            (Some(t), Some(pid)) => t.track(pid, what),
            _ => Tracked { path: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        let mut c = std::process::Command::new("sleep");
        c.arg("60");
        crate::spawn(c).expect("sleep")
    }

    #[test]
    fn record_lives_as_long_as_the_guard() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = Tracker::new(dir.path().join("procs"), "test").expect("tracker");
        let mut child = sleeper();
        let g = t.track(child.id(), "sleep");
        let recs = t.records().expect("records");
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].1.what, "sleep");
        assert_eq!(recs[0].1.process.pid, child.id());
        assert_eq!(recs[0].1.owner.process.pid, std::process::id());
        // Ours and running: not stale.
        assert!(t.reap_stale().expect("reap").is_empty());
        assert!(ProcId::of(child.id()).is_some());
        let _ = child.kill();
        let _ = child.wait();
        drop(g);
        assert!(t.records().expect("records").is_empty());
    }

    #[test]
    fn reaps_what_a_dead_child_forked() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = Tracker::new(dir.path(), "test").expect("tracker");
        let mut sh = std::process::Command::new("sh");
        sh.args(["-c", "sleep 60 >/dev/null 2>&1 & echo $!; read x"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut sh = crate::spawn(sh).expect("sh");
        let g = t.track(sh.id(), "helper");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sh.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("pid");
        let grandchild = ProcId::of(line.trim().parse().expect("pid")).expect("sleep");
        // The helper exits (its record stays: as if its owner had been killed).
        drop(sh.stdin.take());
        let _ = sh.wait();
        std::mem::forget(g);
        let reaped = t.reap_stale().expect("reap");
        assert_eq!(reaped.len(), 1, "{reaped:?}");
        assert!(reaped[0].killed);
        assert!(!grandchild.is_alive(), "the helper's child survived");
        assert!(t.records().expect("records").is_empty());
    }

    #[test]
    fn reaps_only_what_a_dead_owner_left() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = Tracker::new(dir.path(), "test").expect("tracker");
        let mut left = sleeper();
        let mut other = sleeper();
        let left_id = ProcId::of(left.id()).expect("alive");
        let dead_owner = Owner {
            kind: "test".into(),
            process: ProcId {
                start_time: left_id.start_time.saturating_sub(1),
                pid: u32::MAX - 1,
                boot_id: left_id.boot_id.clone(),
            },
        };
        let live_owner = Owner {
            kind: "test".into(),
            process: ProcId::of(other.id()).expect("alive"),
        };
        let write = |name: &str, rec: &ProcRecord| {
            std::fs::write(
                dir.path().join(name),
                serde_json::to_vec(rec).expect("json"),
            )
            .expect("write")
        };
        // Left by a dead owner and running: killed.
        write(
            "1.json",
            &ProcRecord {
                process: left_id.clone(),
                what: "probe".into(),
                owner: dead_owner.clone(),
            },
        );
        // Same pid, other start time (a recycled pid): record dropped, process kept.
        write(
            "2.json",
            &ProcRecord {
                process: ProcId {
                    start_time: 1,
                    ..ProcId::of(other.id()).expect("alive")
                },
                what: "recycled".into(),
                owner: dead_owner.clone(),
            },
        );
        // A live owner's child: not touched.
        write(
            "3.json",
            &ProcRecord {
                process: ProcId::of(other.id()).expect("alive"),
                what: "busy".into(),
                owner: live_owner,
            },
        );
        let mut reaped = t.reap_stale().expect("reap");
        reaped.sort_by(|a, b| a.record.what.cmp(&b.record.what));
        assert_eq!(reaped.len(), 2, "{reaped:?}");
        assert!(reaped[0].killed && reaped[0].record.what == "probe");
        assert!(!reaped[1].killed && reaped[1].record.what == "recycled");
        assert!(!left_id.is_alive(), "the leftover still runs");
        assert!(ProcId::of(other.id()).is_some(), "killed by a stale record");
        assert_eq!(t.records().expect("records").len(), 1);
        let _ = left.wait();
        let _ = other.kill();
        let _ = other.wait();
    }
}
