//! Token-bucket rate limiting for virtio devices (Firecracker's `{bandwidth, ops}` model).
//!
//! A `RateLimiter` has up to two buckets: `bandwidth` (tokens are bytes) and `ops` (tokens are
//! requests or frames). Each bucket holds at most `size` tokens, starts full, and refills at
//! `size` tokens per `refill_time` milliseconds, continuously (a fraction of a token's time is
//! carried over, never lost). `one_time_burst` is extra credit spent before the bucket's own
//! tokens and never refilled. A bucket with `size` 0 or `refill_time` 0 limits nothing: it is
//! the same as no bucket (how Firecracker's API removes a limit).
//!
//! A request that costs more than the bucket can ever hold (a 256 KiB write against a 64 KiB
//! bucket) would otherwise wait forever: it is let through when the bucket is full, and the
//! excess becomes a debt that the refill pays off before the bucket gains tokens again. The
//! average rate therefore holds for any request size; only the burst is larger.
//!
//! When a request is refused the limiter arms its timerfd for the moment the tokens it lacks
//! will be there and says it is blocked; the device stops taking work from its queue (or
//! stops reading its TAP), and resumes when its event loop sees the timer.
//!
//! Arithmetic is on u128 with checked multiplications: no input (any u64 size, burst or
//! refill time, any elapsed time) overflows or panics; a wait that does not fit is capped at
//! `MAX_WAIT`, after which the device simply looks again.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// The longest the timer is armed for; a device looks again after it.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// The shortest: re-evaluate "now" without arming a zero timer (which would disarm it).
const MIN_WAIT: Duration = Duration::from_micros(10);
const NANOS_PER_MS: u128 = 1_000_000;

/// Errors of a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("cannot create the rate limiter's timer")]
    Timer(#[source] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// One token bucket as configured (Firecracker's `TokenBucket`; `refill_time` in ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full (bytes or operations).
    pub size: u64,
    /// Extra tokens available once, at the start, spent before the bucket's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty to full.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// `size` tokens per `refill_ms` milliseconds, no burst.
    pub fn new(size: u64, refill_ms: u64) -> Self {
        TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: refill_ms,
        }
    }

    /// False for a bucket of size 0 or refill time 0: it limits nothing.
    pub fn limits(&self) -> bool {
        self.size > 0 && self.refill_time > 0
    }

    fn check(&self, what: &str) -> Result<(), RateLimiterError> {
        if !self.limits() && self.one_time_burst.unwrap_or(0) > 0 {
            return Err(RateLimiterError::Invalid(format!(
                "{what}: one_time_burst needs a bucket with a size and a refill_time above 0 (size 0 or refill_time 0 means no limit)"
            )));
        }
        Ok(())
    }
}

/// A device's limiter as configured: each bucket optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests (virtio-blk) or frames (virtio-net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// True when neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        !self.bandwidth.is_some_and(|b| b.limits()) && !self.ops.is_some_and(|b| b.limits())
    }

    /// Refuses a burst on a bucket that limits nothing (`what` names the field in the error).
    pub fn validate(&self, what: &str) -> Result<(), RateLimiterError> {
        if let Some(b) = &self.bandwidth {
            b.check(&format!("{what}.bandwidth"))?;
        }
        if let Some(b) = &self.ops {
            b.check(&format!("{what}.ops"))?;
        }
        Ok(())
    }

    /// The same limits with the buckets that limit nothing left out.
    pub fn normalized(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.filter(TokenBucketConfig::limits),
            ops: self.ops.filter(TokenBucketConfig::limits),
        }
    }

    /// The limits as they are kept in a configuration: normalized, None when nothing is left.
    pub fn effective(&self) -> Option<RateLimiterConfig> {
        let n = self.normalized();
        (!n.is_unlimited()).then_some(n)
    }

    /// PATCH semantics: a bucket `update` gives replaces this one (a bucket of size 0 or
    /// refill time 0 removes it); a bucket it leaves out stays as it is.
    pub fn merged(&self, update: &RateLimiterConfig) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: update.bandwidth.or(self.bandwidth),
            ops: update.ops.or(self.ops),
        }
        .normalized()
    }
}

/// One live bucket (only for a configuration that limits something).
#[derive(Clone, Debug)]
struct TokenBucket {
    size: u64,
    refill_ms: u64,
    /// Tokens in the bucket, at most `size`.
    budget: u64,
    /// What is left of the one-time burst.
    burst: u64,
    /// Tokens an oversized request took beyond `size`, paid back before `budget` grows.
    debt: u64,
    /// The time the tokens were last brought up to date.
    last: Instant,
}

/// Outcome of looking at a bucket for `n` tokens.
enum Check {
    Ok,
    /// Lacking tokens: how long until they are there.
    Wait(Duration),
}

impl TokenBucket {
    fn new(cfg: &TokenBucketConfig, now: Instant) -> Option<TokenBucket> {
        cfg.limits().then(|| TokenBucket {
            size: cfg.size,
            refill_ms: cfg.refill_time,
            budget: cfg.size,
            burst: cfg.one_time_burst.unwrap_or(0),
            debt: 0,
            last: now,
        })
    }

    fn period_ns(&self) -> u128 {
        u128::from(self.refill_ms) * NANOS_PER_MS
    }

    /// Adds the tokens earned since `last`: debt first, then the budget, up to `size`.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        if elapsed == 0 {
            return;
        }
        let missing = u128::from(self.debt) + u128::from(self.size - self.budget);
        let earned = elapsed
            .checked_mul(u128::from(self.size))
            .map_or(u128::MAX, |x| x / self.period_ns());
        if earned >= missing {
            self.debt = 0;
            self.budget = self.size;
            self.last = now;
            return;
        }
        let paid = earned.min(u128::from(self.debt));
        // paid <= debt and earned - paid < size - budget: both fit in u64.
        self.debt -= paid as u64;
        self.budget += (earned - paid) as u64;
        // Move `last` by the time those whole tokens took (<= elapsed, so no overflow), so
        // the fraction of the next token is kept.
        let used_ns = earned * self.period_ns() / u128::from(self.size);
        self.last += duration_from_nanos(used_ns);
    }

    /// Whether `n` tokens can be taken now (after `refill`).
    fn check(&self, n: u64, now: Instant) -> Check {
        let Some(rest) = n.checked_sub(self.burst).filter(|r| *r > 0) else {
            return Check::Ok;
        };
        if self.debt == 0 && (rest <= self.budget || self.budget == self.size) {
            return Check::Ok;
        }
        // Enough tokens for `rest`, or a full bucket for an oversized request, after the debt.
        let target = rest.min(self.size);
        let deficit = u128::from(self.debt) + u128::from(target.saturating_sub(self.budget));
        let Some(ns) = deficit.checked_mul(self.period_ns()) else {
            return Check::Wait(MAX_WAIT);
        };
        let ns = ns.div_ceil(u128::from(self.size));
        // The fraction of a token earned since `last` counts already.
        let since = now.saturating_duration_since(self.last).as_nanos();
        Check::Wait(duration_from_nanos(ns.saturating_sub(since)))
    }

    /// Takes `n` tokens; `check` said yes.
    fn take(&mut self, n: u64) {
        let rest = n.saturating_sub(self.burst);
        self.burst = self.burst.saturating_sub(n);
        if rest <= self.budget {
            self.budget -= rest;
        } else {
            // Oversized request on a full bucket: the excess is owed.
            self.debt = self.debt.saturating_add(rest - self.budget);
            self.budget = 0;
        }
    }

    /// New limits, keeping what is in the bucket and what is left of the burst (each capped
    /// by the new limits), as Firecracker does on PATCH.
    fn reconfigure(&mut self, cfg: &TokenBucketConfig, now: Instant) {
        self.refill(now);
        self.size = cfg.size;
        self.refill_ms = cfg.refill_time;
        self.budget = self.budget.min(cfg.size);
        self.burst = self.burst.min(cfg.one_time_burst.unwrap_or(0));
        self.last = now;
    }
}

fn duration_from_nanos(ns: u128) -> Duration {
    let secs = ns / 1_000_000_000;
    match u64::try_from(secs) {
        // The remainder is below 10^9.
        Ok(s) => Duration::new(s, (ns % 1_000_000_000) as u32),
        Err(_) => Duration::MAX,
    }
}

/// A device's limiter: the live buckets, the timer that ends a wait, and the configuration
/// they came from.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    config: RateLimiterConfig,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with `cfg`'s buckets (none: it lets everything through) and its timer.
    pub fn new(cfg: &RateLimiterConfig) -> Result<RateLimiter, RateLimiterError> {
        cfg.validate("rate_limiter")?;
        // Never read (see `on_timer`), so it needs no O_NONBLOCK.
        let timer = TimerFd::new().map_err(|e| RateLimiterError::Timer(e.into()))?;
        let now = Instant::now();
        let cfg = cfg.normalized();
        Ok(RateLimiter {
            bandwidth: cfg
                .bandwidth
                .as_ref()
                .and_then(|b| TokenBucket::new(b, now)),
            ops: cfg.ops.as_ref().and_then(|b| TokenBucket::new(b, now)),
            config: cfg,
            timer,
            blocked: false,
        })
    }

    /// The limits in force (buckets that limit nothing left out).
    pub fn config(&self) -> RateLimiterConfig {
        self.config
    }

    /// No bucket: every request goes through without looking at the clock.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// A request was refused and the timer has not fired yet: take no more work.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer's fd, for the device's event loop registration.
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }

    /// Takes one operation and `bytes()` bytes together, or nothing (false, timer armed).
    /// Without a bucket it says yes at once: neither the clock nor `bytes` is looked at.
    pub fn consume_request(&mut self, bytes: impl FnOnce() -> u64) -> bool {
        if self.is_unlimited() {
            return true;
        }
        self.consume_request_at(bytes(), Instant::now())
    }

    fn consume_request_at(&mut self, bytes: u64, now: Instant) -> bool {
        let mut wait = None;
        for (b, n) in [(self.ops.as_mut(), 1), (self.bandwidth.as_mut(), bytes)] {
            if let Some(b) = b {
                b.refill(now);
                if let Check::Wait(d) = b.check(n, now) {
                    wait = Some(wait.map_or(d, |w: Duration| w.max(d)));
                }
            }
        }
        if let Some(d) = wait {
            self.block_for(d);
            return false;
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes);
        }
        true
    }

    fn block_for(&mut self, d: Duration) {
        self.blocked = true;
        let d = d.clamp(MIN_WAIT, MAX_WAIT);
        if let Err(e) = self.timer.reset(d, None) {
            // Without the timer the device would wait forever: retry at the next event.
            log::error!("rate limiter: cannot arm the timer: {e}");
            self.blocked = false;
        }
    }

    /// The timer fired: disarm it; the device may take work again (and re-arms it through
    /// `block_for` if it is refused again).
    ///
    /// Disarming (timerfd_settime) also zeroes the expiration count, which is what makes the
    /// fd readable: the timer is never read, so nothing can block on it, and the fd is not
    /// readable any more whatever the device does next (it may be inactive and not look at
    /// its limiter at all), so the level-triggered event loop does not see it again. A
    /// stale event finds a disarmed timer and only unblocks the device, which looks again.
    pub fn on_timer(&mut self) {
        if let Err(e) = self.timer.clear() {
            log::error!("rate limiter: cannot disarm the timer: {e}");
        }
        self.blocked = false;
    }

    /// PATCH: a bucket `update` names replaces this one's limits (keeping its tokens, capped),
    /// or removes it when it limits nothing; a bucket it leaves out is kept. A blocked limiter
    /// is re-evaluated at once through its timer.
    pub fn update_buckets(&mut self, update: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        update.validate("rate_limiter")?;
        let now = Instant::now();
        for (slot, new) in [
            (&mut self.bandwidth, update.bandwidth),
            (&mut self.ops, update.ops),
        ] {
            match new {
                None => {}
                Some(cfg) if !cfg.limits() => *slot = None,
                Some(cfg) => match slot {
                    Some(b) => b.reconfigure(&cfg, now),
                    None => *slot = TokenBucket::new(&cfg, now),
                },
            }
        }
        self.config = self.config.merged(update);
        if self.blocked {
            self.block_for(MIN_WAIT);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(bw: Option<(u64, u64, u64)>, ops: Option<(u64, u64, u64)>) -> RateLimiter {
        let b = |(size, burst, refill): (u64, u64, u64)| TokenBucketConfig {
            size,
            one_time_burst: (burst > 0).then_some(burst),
            refill_time: refill,
        };
        RateLimiter::new(&RateLimiterConfig {
            bandwidth: bw.map(b),
            ops: ops.map(b),
        })
        .unwrap()
    }

    fn bw(rl: &RateLimiter) -> &TokenBucket {
        rl.bandwidth.as_ref().unwrap()
    }

    fn ops(rl: &RateLimiter) -> &TokenBucket {
        rl.ops.as_ref().unwrap()
    }

    fn start(rl: &RateLimiter) -> Instant {
        rl.bandwidth
            .as_ref()
            .or(rl.ops.as_ref())
            .map(|b| b.last)
            .unwrap()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn starts_full_and_refills_at_the_configured_rate() {
        // 1000 bytes per 100 ms = 10 000 bytes/s.
        let mut rl = limiter(Some((1000, 0, 100)), None);
        let t0 = start(&rl);
        assert!(rl.consume_request_at(1000, t0));
        assert!(!rl.consume_request_at(1, t0));
        assert!(rl.is_blocked());
        // 10 ms earn 100 tokens, not 101.
        assert!(rl.consume_request_at(100, t0 + 10 * MS));
        assert!(!rl.consume_request_at(1, t0 + 10 * MS));
        // Fractions carry over: 0.1 ms (1 token) at a time, 10 times.
        let mut t = t0 + 10 * MS;
        for _ in 0..10 {
            t += Duration::from_micros(100);
            assert!(rl.consume_request_at(1, t));
        }
        // Over a long run the rate is exact: 10 s of 250-byte requests.
        let mut served = 0u64;
        let mut t = t + 200 * MS; // refilled completely
        assert!(rl.consume_request_at(1000, t));
        let end = t + Duration::from_secs(10);
        while t < end {
            if rl.consume_request_at(250, t) {
                served += 250;
            } else {
                t += Duration::from_micros(500);
            }
        }
        assert!((99_750..=100_250).contains(&served), "{served}");
    }

    #[test]
    fn refused_requests_say_how_long_to_wait() {
        let mut rl = limiter(Some((1000, 0, 100)), None);
        let t0 = start(&rl);
        assert!(rl.consume_request_at(1000, t0));
        let b = bw(&rl);
        match b.check(500, t0) {
            Check::Wait(d) => assert_eq!(d, 50 * MS),
            Check::Ok => panic!("empty bucket"),
        }
        // 20 ms later, 30 ms remain for 500 tokens.
        match b.check(500, t0 + 20 * MS) {
            Check::Wait(d) => assert_eq!(d, 30 * MS),
            Check::Ok => panic!(),
        }
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let mut rl = limiter(Some((100, 500, 1000)), None);
        let t0 = start(&rl);
        assert!(rl.consume_request_at(550, t0)); // 500 burst + 50 budget
        assert_eq!(bw(&rl).burst, 0);
        assert_eq!(bw(&rl).budget, 50);
        let t = t0 + Duration::from_secs(100);
        assert!(rl.consume_request_at(100, t));
        assert!(!rl.consume_request_at(1, t));
    }

    #[test]
    fn oversized_requests_pass_on_a_full_bucket_and_are_paid_back() {
        // 100 tokens per second; a request of 350.
        let mut rl = limiter(Some((100, 0, 1000)), None);
        let t0 = start(&rl);
        assert!(rl.consume_request_at(350, t0));
        assert_eq!(bw(&rl).debt, 250);
        // The debt takes 2.5 s, then 1 s for the bucket to be full again.
        assert!(!rl.consume_request_at(350, t0 + 3400 * MS));
        assert!(rl.consume_request_at(350, t0 + 3500 * MS));
        // A small request waits for the debt too.
        assert!(!rl.consume_request_at(1, t0 + 5990 * MS));
        assert!(rl.consume_request_at(1, t0 + 6010 * MS));
    }

    #[test]
    fn request_takes_both_buckets_or_neither() {
        // 2 ops per second; 1000 bytes per 100 s (10 bytes/s).
        let mut rl = limiter(Some((1000, 0, 100_000)), Some((2, 0, 1000)));
        let t0 = start(&rl);
        assert!(rl.consume_request_at(100, t0));
        assert!(rl.consume_request_at(100, t0));
        assert!(!rl.consume_request_at(100, t0));
        assert_eq!(bw(&rl).budget, 800, "no bytes taken");
        let t = t0 + Duration::from_secs(1);
        assert!(!rl.consume_request_at(900, t), "810 bytes, 900 asked");
        assert_eq!(ops(&rl).budget, 2, "no op taken");
        assert!(rl.consume_request_at(800, t));
        assert_eq!(bw(&rl).budget, 10, "both taken together");
        assert_eq!(ops(&rl).budget, 1);
    }

    #[test]
    fn huge_values_neither_overflow_nor_panic() {
        let m = u64::MAX;
        for (size, burst, refill) in [
            (m, m, m),
            (m, 0, 1),
            (1, 0, m),
            (m, m, 1),
            (1, m, 1),
            (2, 0, m / 2),
        ] {
            let mut rl = limiter(Some((size, burst, refill)), Some((size, burst, refill)));
            let t0 = start(&rl);
            for (n, dt) in [
                (m, Duration::ZERO),
                (m, Duration::from_secs(1)),
                (1, Duration::from_secs(u64::from(u32::MAX))),
                (m, Duration::from_secs(u64::from(u32::MAX))),
                (0, Duration::ZERO),
            ] {
                let t = t0.checked_add(dt).unwrap_or(t0);
                let _ = rl.consume_request_at(n, t);
                let _ = rl.consume_request_at(n, t);
                let _ = bw(&rl).check(m, t);
            }
            rl.update_buckets(&RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig::new(m, m)),
                ops: Some(TokenBucketConfig::new(1, 1)),
            })
            .unwrap();
            let _ = rl.consume_request_at(m, t0 + Duration::from_secs(1));
        }
        // A refill time of u64::MAX ms: one token of a 2-token bucket takes ~2.9e8 years;
        // the wait is capped by block_for, the computation itself does not overflow.
        let mut rl = limiter(Some((2, 0, m)), None);
        let t0 = start(&rl);
        assert!(rl.consume_request_at(2, t0));
        assert!(!rl.consume_request_at(1, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn updates_keep_tokens_capped_and_follow_patch_semantics() {
        // 1 token per 100 ms: the few microseconds between calls earn nothing.
        let mut rl = limiter(Some((1000, 300, 100_000)), Some((10, 0, 1000)));
        let t0 = start(&rl);
        // 700 bytes: burst 300 + budget 400.
        assert!(rl.consume_request_at(700, t0));
        // Bigger bucket: the 600 left stay 600 (not refilled to full).
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(5000, 100)),
            ops: None,
        })
        .unwrap();
        let b = bw(&rl);
        assert_eq!((b.size, b.budget, b.burst), (5000, 600, 0));
        assert_eq!(ops(&rl).size, 10, "ops left out: kept");
        // Smaller bucket: capped.
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(100, 100)),
            ops: None,
        })
        .unwrap();
        assert_eq!(bw(&rl).budget, 100);
        // Size 0 removes the ops bucket; refill 0 the bandwidth one.
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::new(0, 0)),
        })
        .unwrap();
        assert!(rl.ops.is_none() && rl.bandwidth.is_some());
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(5, 0)),
            ops: None,
        })
        .unwrap();
        assert!(rl.is_unlimited());
        assert_eq!(rl.config(), RateLimiterConfig::default());
        assert!(rl.consume_request(|| u64::MAX));
        assert!(
            rl.consume_request(|| unreachable!("an unlimited limiter counts no bytes")),
            "unlimited: nothing computed"
        );
        // From unlimited to limited: a new, full bucket.
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::new(1, 1000)),
        })
        .unwrap();
        assert!(rl.consume_request(|| 0));
        assert!(!rl.consume_request(|| 0));
        assert!(rl.is_blocked());
        assert_eq!(
            rl.config(),
            RateLimiterConfig {
                bandwidth: None,
                ops: Some(TokenBucketConfig::new(1, 1000))
            }
        );
    }

    #[test]
    fn a_blocked_limiter_wakes_through_its_timer() {
        let mut rl = limiter(None, Some((1, 0, 300)));
        assert!(rl.consume_request(|| 0));
        assert!(!rl.consume_request(|| 0));
        assert!(rl.is_blocked());
        let mut pfd = libc::pollfd {
            fd: rl.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(r, 1, "the timer fires");
        rl.on_timer();
        assert!(!rl.is_blocked());
        // SAFETY: as above.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert_eq!(r, 0, "not readable after on_timer: no busy event loop");
        assert!(rl.consume_request(|| 0));
        // A stale timer event does not block (or break) anything.
        rl.on_timer();
        assert!(!rl.is_blocked());
        // An update while blocked fires the timer at once.
        assert!(!rl.consume_request(|| 0));
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::new(0, 0)),
        })
        .unwrap();
        // SAFETY: as above.
        let r = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(r, 1);
        rl.on_timer();
        assert!(rl.consume_request(|| 0));
    }

    #[test]
    fn config_validation_and_merge() {
        let bad = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 0,
                one_time_burst: Some(10),
                refill_time: 100,
            }),
            ops: None,
        };
        let e = bad.validate("rate_limiter").unwrap_err().to_string();
        assert!(
            e.contains("rate_limiter.bandwidth") && e.contains("one_time_burst"),
            "{e}"
        );
        assert!(RateLimiter::new(&bad).is_err());
        let a = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(10, 10)),
            ops: Some(TokenBucketConfig::new(1, 1)),
        };
        let m = a.merged(&RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(0, 0)),
            ops: None,
        });
        assert_eq!(m.bandwidth, None);
        assert_eq!(m.ops, a.ops);
        assert!(RateLimiterConfig::default().is_unlimited());
        assert_eq!(RateLimiterConfig::default().effective(), None);
        assert_eq!(a.effective(), Some(a));
        assert_eq!(m.effective(), Some(m));
        let none_left = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(0, 100)),
            ops: Some(TokenBucketConfig::new(5, 0)),
        };
        assert_eq!(none_left.effective(), None);
        let one_left = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(0, 100)),
            ops: a.ops,
        };
        assert_eq!(
            one_left.effective(),
            Some(RateLimiterConfig {
                bandwidth: None,
                ops: a.ops
            })
        );
        assert!(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(0, 100)),
            ops: None
        }
        .is_unlimited());
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"bandwidth":{"size":10,"refill_time":10},"ops":{"size":1,"refill_time":1}}"#
        );
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bw":{}}"#).is_err());
    }
}
