//! Waiting on conditions (never fixed sleeps): poll until a check says done.

use crate::E2eError;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// What one poll found: done with a value, or not yet (with what was seen, for
/// the timeout message).
#[derive(Debug)]
pub enum Poll<T> {
    Done(T),
    NotYet(String),
}

/// Polls `check` every `interval` until it returns `Poll::Done` or `timeout`
/// passes. Errors from `check` end the wait at once.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Result<T, E2eError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, E2eError>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await? {
            Poll::Done(value) => return Ok(value),
            Poll::NotYet(seen) => seen,
        };
        if start.elapsed() >= timeout {
            return Err(E2eError::Timeout {
                what: what.to_string(),
                waited: start.elapsed(),
                last,
            });
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_done() {
        let mut calls = 0;
        let got = wait_until(
            "three calls",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                calls += 1;
                let n = calls;
                async move {
                    Ok(if n >= 3 {
                        Poll::Done(n)
                    } else {
                        Poll::NotYet(format!("call {n}"))
                    })
                }
            },
        )
        .await;
        assert_eq!(got.ok(), Some(3));
    }

    #[tokio::test]
    async fn timeout_reports_what_and_last_seen() {
        let got: Result<(), _> = wait_until(
            "never",
            Duration::from_millis(20),
            Duration::from_millis(5),
            || async { Ok(Poll::NotYet("still pending".to_string())) },
        )
        .await;
        let msg = got.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("never") && msg.contains("still pending"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn check_errors_end_the_wait() {
        let got: Result<(), _> = wait_until(
            "failing",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || async { Err(E2eError::Check("boom".to_string())) },
        )
        .await;
        assert!(matches!(got, Err(E2eError::Check(_))));
    }
}
