//! Capped exponential backoff with jitter; the caller sleeps with `tokio::time`, so tests can pause time.
use std::time::Duration;

use rand::Rng;

/// Delays for successive failed attempts: `base * 2^n`, capped, each drawn
/// uniformly from the upper half of its step so that many agents or proxies
/// do not retry in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never exceeds `cap` (nor goes below `base`).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt, jittered by the thread's RNG.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    /// The delay before the next attempt, jittered by `rng` (tests seed it).
    pub fn next_with(&mut self, rng: &mut impl Rng) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        step.mul_f64(rng.random_range(0.5..=1.0))
    }

    /// After a success: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failed attempts since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)));
        assert!(d[9] >= Duration::from_secs(1));
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_is_drawn_from_the_upper_half_and_seedable() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..8).map(|_| b.next_with(&mut rng)).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[7] >= Duration::from_secs(1));
        // Not all equal to the step: jittered.
        let mut again = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let many: Vec<Duration> = (0..16).map(|_| again.next_with(&mut rng)).collect();
        assert!(many.iter().any(|x| *x != many[0]), "{many:?}");
    }

    #[test]
    fn a_cap_below_the_base_is_the_base() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert!((0..5).all(|_| b.next_delay() <= Duration::from_secs(2)));
    }
}
