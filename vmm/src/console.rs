//! The guest's serial console: a line log QEMU writes (`serial.log`) and the
//! interactive unix socket (`serial.sock`, one client at a time).

use crate::{Result, VmmError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Follows the serial log file and waits for lines.
///
/// Lines read from the file but not yet examined by a `wait_for` stay queued, so
/// several protocol lines arriving in one read can be awaited one after another.
#[derive(Debug)]
pub struct SerialLog {
    path: PathBuf,
    offset: u64,
    partial: String,
    pending: std::collections::VecDeque<String>,
}

impl SerialLog {
    /// Follows `path` from its start.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
            pending: std::collections::VecDeque::new(),
        }
    }

    /// Follows `path` from its current end (only new output is seen).
    pub fn from_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Self {
            path: path.to_path_buf(),
            offset,
            partial: String::new(),
            pending: std::collections::VecDeque::new(),
        }
    }

    /// Complete lines appended since the last call (including lines still queued).
    pub fn read_new_lines(&mut self) -> Vec<String> {
        self.fill();
        self.pending.drain(..).collect()
    }

    /// Moves complete lines appended to the file into the queue.
    fn fill(&mut self) {
        let Ok(bytes) = std::fs::read(&self.path) else {
            return;
        };
        let len = bytes.len() as u64;
        if len < self.offset {
            // The log was truncated (a fresh QEMU without logappend): start over.
            self.offset = 0;
        }
        let start = usize::try_from(self.offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        self.partial
            .push_str(&String::from_utf8_lossy(&bytes[start..]));
        self.offset = len;
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            self.pending
                .push_back(line.trim_end_matches(['\r', '\n']).to_string());
        }
    }

    /// Pops queued lines up to and including the first one matching `pred`; lines
    /// after it stay queued for the next wait.
    fn take_until(&mut self, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.fill();
        while let Some(l) = self.pending.pop_front() {
            if pred(&l) {
                return Some(l);
            }
        }
        None
    }

    /// Waits for a line containing `needle`; returns that line.
    pub async fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.take_until(|l| l.contains(needle)) {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Timeout {
                    what: format!("serial line containing {needle:?}"),
                    secs: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the first complete line of any content.
    pub async fn first_line(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.take_until(|l| !l.trim().is_empty()) {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Timeout {
                    what: "a serial line".into(),
                    secs: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An interactive connection to the serial socket.
#[derive(Debug)]
pub struct SerialConsole {
    stream: UnixStream,
    buf: String,
}

impl SerialConsole {
    /// Connects to QEMU's serial socket.
    pub async fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| VmmError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            stream,
            buf: String::new(),
        })
    }

    /// Types a line (a newline is appended).
    pub async fn send_line(&mut self, line: &str) -> Result<()> {
        let mut data = line.as_bytes().to_vec();
        data.push(b'\n');
        self.stream
            .write_all(&data)
            .await
            .map_err(|e| VmmError::Io {
                what: "writing to the serial console",
                path: PathBuf::from("serial.sock"),
                source: e,
            })
    }

    /// Reads until `needle` appears in the output; returns everything read up to and
    /// including it, and keeps the rest for the next call.
    pub async fn read_until(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(i) = self.buf.find(needle) {
                let out: String = self.buf.drain(..i + needle.len()).collect();
                return Ok(out);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let read = tokio::time::timeout(left, self.stream.read(&mut chunk)).await;
            match read {
                Err(_) => {
                    return Err(VmmError::Timeout {
                        what: format!("console output {needle:?}"),
                        secs: timeout.as_secs_f64(),
                    });
                }
                Ok(Ok(0)) => return Err(VmmError::QmpProtocol("serial console closed".into())),
                Ok(Ok(n)) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Ok(Err(e)) => {
                    return Err(VmmError::Io {
                        what: "reading the serial console",
                        path: PathBuf::from("serial.sock"),
                        source: e,
                    });
                }
            }
        }
    }

    /// Runs a shell command in the guest (after `ready`) and returns its output.
    /// The output is framed by begin/end markers echoed with a split quote, so the
    /// terminal echo of the command line, the prompt and greetings never match.
    pub async fn run(&mut self, command: &str, timeout: Duration) -> Result<String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let (begin, end) = (format!("HVXBEG{nanos:09}"), format!("HVXEND{nanos:09}"));
        self.send_line(&format!(
            "echo HVX\"BEG{nanos:09}\"; {command}; echo HVX\"END{nanos:09}\""
        ))
        .await?;
        let out = self.read_until(&end, timeout).await?;
        let body = out.strip_suffix(end.as_str()).unwrap_or(&out);
        let body = body
            .rsplit_once(begin.as_str())
            .map_or(body, |(_, after)| after);
        Ok(body.trim_start_matches(['\r', '\n']).replace('\r', ""))
    }

    /// The raw stream, for bridging to a terminal.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_read_together_are_awaited_one_after_another() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        std::fs::write(&path, "boot\nHVX-GUEST disk a\nHVX-GUEST nic b\npart").expect("write log");
        let mut log = SerialLog::new(&path);
        let t = Duration::from_millis(300);
        assert_eq!(
            log.wait_for("disk", t).await.expect("line"),
            "HVX-GUEST disk a"
        );
        assert_eq!(
            log.wait_for("nic", t).await.expect("line"),
            "HVX-GUEST nic b"
        );
        // The unterminated line is not a line until its newline arrives.
        assert!(log.wait_for("part", t).await.is_err());
        std::fs::write(&path, "boot\nHVX-GUEST disk a\nHVX-GUEST nic b\npartial\n")
            .expect("append log");
        assert_eq!(log.wait_for("part", t).await.expect("line"), "partial");
    }
}
