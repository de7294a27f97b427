//! Backoff details a mutation run showed untested: the agent's policy values, `policy()`, and
//! that computing a delay stays cheap once the delay is capped, whatever the attempt count.

use super::*;

#[test]
fn agent_reconnect_policy_values() {
    let p = BackoffPolicy::agent_reconnect(Duration::from_secs(7));
    assert_eq!(
        p,
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(7),
            multiplier: 2,
            stable_after: Duration::from_secs(10),
        }
    );
    let b = Backoff::new(p);
    assert_eq!(b.policy(), &p);
    assert_eq!(b.current_base(), Duration::from_millis(100));
    assert_eq!(
        BackoffPolicy::default(),
        BackoffPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            multiplier: 2,
            stable_after: Duration::from_secs(60),
        }
    );
}

/// With the attempt counter saturated, the base is the cap and is computed without walking
/// four billion attempts (a loop without its early exit would not finish in the test timeout).
#[test]
fn capped_base_is_constant_time() {
    let mut b = Backoff::new(BackoffPolicy::agent_reconnect(Duration::from_secs(30)));
    b.attempts = u32::MAX;
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        assert_eq!(b.current_base(), Duration::from_secs(30));
    }
    assert_eq!(b.next_delay(0), Duration::from_secs(15));
    assert_eq!(b.attempts(), u32::MAX);
    // Multiplier 1 and a zero initial delay exit early too.
    let mut one = Backoff::new(BackoffPolicy {
        multiplier: 1,
        ..BackoffPolicy::default()
    });
    one.attempts = u32::MAX;
    assert_eq!(one.current_base(), Duration::from_millis(500));
    let mut zero = Backoff::new(BackoffPolicy {
        initial: Duration::ZERO,
        ..BackoffPolicy::default()
    });
    zero.attempts = u32::MAX;
    assert_eq!(zero.current_base(), Duration::ZERO);
    assert!(started.elapsed() < Duration::from_secs(5));
}
