//! One connection's lifecycle, apart from what is done with the connection (the split Cilium's
//! clustermesh makes): connect under a deadline, run the session, back off with jitter after a
//! failure, and report every step.
//!
//! The deadline covers everything before the first answer: TCP connect, the TLS handshake and
//! the first response. An endpoint that accepts connections and never answers (a hung process,
//! a half-open load balancer) is then a failure like any other, retried with backoff, and
//! reported as a timeout; without it the connection stays "connecting" forever and never
//! retries, even after the endpoint has recovered.
use std::{future::Future, time::Duration};

use crate::backoff::Backoff;

/// The default deadline of a connection attempt (connect, handshake, first response).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure<E> {
    /// Nothing answered within the deadline.
    #[error(
        "timed out: no answer within {} (TCP connect, TLS handshake and first response); the endpoint accepts connections but does not answer, or the network drops the replies",
        crate::duration::format(*.0)
    )]
    TimedOut(Duration),
    /// The connection or the session failed.
    #[error(transparent)]
    Failed(E),
}

/// What the lifecycle tells its handler.
#[derive(Debug)]
pub enum Event<'a, E> {
    /// An attempt starts (`attempt` 0 is the first connection; more are reconnections).
    Connecting {
        /// Attempts made before this one.
        attempt: u64,
    },
    /// The connection answered within the deadline; its session starts.
    Connected,
    /// The attempt or its session failed; the next attempt waits `delay`.
    Failed {
        /// Why.
        failure: &'a Failure<E>,
        /// The backoff before the next attempt.
        delay: Duration,
    },
}

/// How a session that did not fail ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Reconnect at once (new settings: nothing failed).
    Reconnect,
    /// Reconnect after the backoff (the session ended in a way the handler reported itself).
    Backoff,
}

/// What to do with a connection: the lifecycle calls it, the handler never loops itself.
pub trait Handler: Send {
    /// The connection, once it has answered.
    type Conn: Send;
    /// Why an attempt or a session failed.
    type Error: Send + Sync;

    /// Connects and waits for the first answer; all of it runs under the deadline.
    fn connect(&mut self) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;

    /// Uses the connection until it ends; resets `backoff` once the connection
    /// has proven healthy (a list completed, a watch was created).
    fn session(
        &mut self,
        conn: Self::Conn,
        backoff: &mut Backoff,
    ) -> impl Future<Output = Result<Next, Self::Error>> + Send;

    /// Reports a step (status, metrics, log).
    fn report(&mut self, event: Event<'_, Self::Error>) -> impl Future<Output = ()> + Send;

    /// Waits `delay` before the next attempt. A handler that must also wake
    /// for something else (a grace period ending, new settings) overrides it;
    /// it may return early.
    fn wait(&mut self, delay: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(delay)
    }
}

/// The lifecycle's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// First delay after a failure.
    pub min_backoff: Duration,
    /// Longest delay.
    pub max_backoff: Duration,
    /// Deadline of connect, handshake and first response.
    pub connect_timeout: Duration,
}

/// Runs `handler`'s connection forever (until the future is dropped).
pub async fn run<H: Handler>(handler: &mut H, settings: Settings) {
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    let mut attempt = 0u64;
    loop {
        handler.report(Event::Connecting { attempt }).await;
        attempt += 1;
        let result = match tokio::time::timeout(settings.connect_timeout, handler.connect()).await {
            Err(_) => Err(Failure::TimedOut(settings.connect_timeout)),
            Ok(Err(e)) => Err(Failure::Failed(e)),
            Ok(Ok(conn)) => {
                handler.report(Event::Connected).await;
                handler
                    .session(conn, &mut backoff)
                    .await
                    .map_err(Failure::Failed)
            }
        };
        let delay = match result {
            Ok(Next::Reconnect) => {
                backoff.reset();
                continue;
            }
            Ok(Next::Backoff) => backoff.next_delay(),
            Err(failure) => {
                let delay = backoff.next_delay();
                handler
                    .report(Event::Failed {
                        failure: &failure,
                        delay,
                    })
                    .await;
                delay
            }
        };
        handler.wait(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// What each attempt does: answer (then a session that fails or ends), fail, or hang.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Hang,
        Refuse,
        Serve { healthy: bool, end: Option<Next> },
    }

    #[derive(Default)]
    struct Fake {
        steps: VecDeque<Step>,
        log: Vec<String>,
        waits: Vec<Duration>,
    }

    impl Handler for Fake {
        type Conn = Step;
        type Error = String;

        async fn connect(&mut self) -> Result<Step, String> {
            match self.steps.pop_front().unwrap_or(Step::Hang) {
                Step::Hang => std::future::pending().await,
                Step::Refuse => Err("refused".into()),
                s => Ok(s),
            }
        }

        async fn session(&mut self, conn: Step, backoff: &mut Backoff) -> Result<Next, String> {
            let Step::Serve { healthy, end } = conn else {
                unreachable!()
            };
            if healthy {
                backoff.reset();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            end.ok_or_else(|| "session broke".to_string())
        }

        async fn report(&mut self, event: Event<'_, String>) {
            self.log.push(match event {
                Event::Connecting { attempt } => format!("connecting {attempt}"),
                Event::Connected => "connected".into(),
                Event::Failed { failure, .. } => format!("failed: {failure}"),
            });
        }

        async fn wait(&mut self, delay: Duration) {
            self.waits.push(delay);
            tokio::time::sleep(delay).await;
        }
    }

    const SETTINGS: Settings = Settings {
        min_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(10),
    };

    async fn drive(fake: &mut Fake, for_: Duration) {
        let _ = tokio::time::timeout(for_, run(fake, SETTINGS)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_endpoint_times_out_and_is_retried_until_it_answers() {
        let mut f = Fake {
            steps: [
                Step::Hang,
                Step::Hang,
                Step::Serve {
                    healthy: true,
                    end: None,
                },
            ]
            .into(),
            ..Fake::default()
        };
        drive(&mut f, Duration::from_secs(21)).await;
        assert!(
            f.log[1].starts_with("failed: timed out: no answer within 10s"),
            "{:?}",
            f.log
        );
        assert_eq!(f.log[2], "connecting 1");
        assert!(f.log[3].contains("no answer within 10s"), "{:?}", f.log);
        assert_eq!(f.log[5], "connected", "{:?}", f.log);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_on_failures_and_resets_once_healthy() {
        let mut f = Fake {
            steps: [
                Step::Refuse,
                Step::Refuse,
                Step::Refuse,
                Step::Serve {
                    healthy: true,
                    end: None,
                },
                Step::Refuse,
            ]
            .into(),
            ..Fake::default()
        };
        drive(&mut f, Duration::from_secs(5)).await;
        let w = &f.waits;
        assert!(w[0] <= Duration::from_millis(100), "{w:?}");
        assert!(w[2] >= Duration::from_millis(200), "{w:?}");
        // After the healthy session: back to the first step.
        assert!(w[3] <= Duration::from_millis(100), "{w:?}");
        assert!(w[4] <= Duration::from_millis(200), "{w:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_asks_to_reconnect_does_so_at_once() {
        let mut f = Fake {
            steps: [
                Step::Refuse,
                Step::Serve {
                    healthy: false,
                    end: Some(Next::Reconnect),
                },
                Step::Serve {
                    healthy: false,
                    end: Some(Next::Backoff),
                },
                Step::Hang,
            ]
            .into(),
            ..Fake::default()
        };
        drive(&mut f, Duration::from_secs(4)).await;
        // One wait after the refusal, none after the reconnect, one after the backoff end.
        assert_eq!(f.waits.len(), 2, "{:?} {:?}", f.waits, f.log);
        assert!(
            !f.log.iter().any(|l| l.contains("session broke")),
            "{:?}",
            f.log
        );
    }
}
