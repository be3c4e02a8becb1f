//! Rate limits: a token bucket per key (a client address, a token), refilled at a steady
//! rate up to a burst. Idle buckets are forgotten, so the table stays small however many
//! addresses come and go.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Keys kept before idle buckets are swept.
const MAX_KEYS: usize = 4096;

/// Who a limit applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Address(IpAddr),
    Token(i64),
}

impl Key {
    /// The key of a request or message: its token where it has one, so that clients
    /// sharing an address (a proxy, a NAT) with tokens of their own never share a
    /// budget; the client's address otherwise.
    pub fn of(client: IpAddr, principal: Option<&crate::auth::Principal>) -> Key {
        match principal {
            Some(p) => Key::Token(p.token_id),
            None => Key::Address(client),
        }
    }
}

/// Token buckets by key.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<Key, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            per_second,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one unit from every key's bucket, or none if any is empty; then says how
    /// long to wait.
    pub fn take(&self, keys: &[Key], now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > MAX_KEYS {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (level, at)| {
                *level + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let mut levels = Vec::with_capacity(keys.len());
        for key in keys {
            let (level, at) = buckets.get(key).copied().unwrap_or((self.burst, now));
            let level =
                (level + now.duration_since(at).as_secs_f64() * self.per_second).min(self.burst);
            if level < 1.0 {
                return Err(Duration::from_secs_f64((1.0 - level) / self.per_second));
            }
            levels.push(level);
        }
        for (key, level) in keys.iter().zip(levels) {
            buckets.insert(key.clone(), (level - 1.0, now));
        }
        Ok(())
    }
}

/// Open connections per client address.
#[derive(Default)]
pub struct AddressSlots {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection slot of an address until dropped.
pub struct Slot {
    slots: Arc<AddressSlots>,
    address: IpAddr,
}

impl AddressSlots {
    /// A slot for `address`, unless it already has `max` connections open.
    pub fn take(self: &Arc<Self>, address: IpAddr, max: usize) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(address).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            address,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> Key {
        Key::Address(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn bucket_trips_and_refills() {
        let limiter = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take(&[addr(1)], t0).is_ok());
        }
        let wait = limiter.take(&[addr(1)], t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(
            limiter.take(&[addr(2)], t0).is_ok(),
            "other addresses are not affected"
        );
        assert!(limiter
            .take(&[addr(1)], t0 + Duration::from_millis(500))
            .is_ok());
        assert!(limiter
            .take(&[addr(1)], t0 + Duration::from_millis(500))
            .is_err());
    }

    #[test]
    fn every_key_must_have_room() {
        let limiter = RateLimiter::new(1.0, 1.0);
        let t0 = Instant::now();
        assert!(limiter.take(&[addr(1), Key::Token(7)], t0).is_ok());
        assert!(
            limiter.take(&[addr(2), Key::Token(7)], t0).is_err(),
            "the token is spent"
        );
        assert!(
            limiter.take(&[addr(2)], t0).is_ok(),
            "a refused take spends nothing"
        );
    }

    #[test]
    fn address_slots_are_counted_and_released() {
        let slots = Arc::new(AddressSlots::default());
        let ip = IpAddr::from([127, 0, 0, 1]);
        let a = slots.take(ip, 2).unwrap();
        let _b = slots.take(ip, 2).unwrap();
        assert!(slots.take(ip, 2).is_none());
        drop(a);
        assert!(slots.take(ip, 2).is_some());
    }
}
