//! Identifier generation: unique, unguessable enough for ids (not for secrets), and
//! cheap (no system call per request).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use apikeyrouter_domain::{KeyId, RequestId, ReservationId};

/// Generates request, key and reservation ids.
#[derive(Debug)]
pub(crate) struct IdGenerator {
    prefix: u64,
    counter: AtomicU64,
    hasher: RandomState,
}

impl IdGenerator {
    pub(crate) fn new() -> Self {
        let hasher = RandomState::new();
        // RandomState is seeded from the OS once per process; hashing nothing with it
        // gives a random 64-bit instance prefix.
        let prefix = hasher.build_hasher().finish();
        Self {
            prefix,
            counter: AtomicU64::new(1),
            hasher,
        }
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// `req_` and the instance prefix and counter in hex (`{:016x}{:08x}`), written
    /// without the formatting machinery: it ran on every request (about 1% of the
    /// proxy's instructions).
    pub(crate) fn request_id(&self) -> RequestId {
        let n = self.next();
        let counter_digits = (16 - n.leading_zeros() / 4).max(8) as usize;
        let mut id = String::with_capacity(4 + 16 + counter_digits);
        id.push_str("req_");
        push_hex(&mut id, self.prefix, 16);
        push_hex(&mut id, n, counter_digits);
        RequestId::new(id)
    }

    pub(crate) fn key_id(&self) -> KeyId {
        let n = self.next();
        let mut h = self.hasher.build_hasher();
        h.write_u64(n);
        KeyId::new(format!("key_{:016x}", h.finish()))
    }

    pub(crate) fn reservation_id(&self) -> ReservationId {
        // Distinct across instances sharing a store: the high bits carry the prefix.
        ReservationId((self.prefix << 40) ^ self.next())
    }
}

/// Appends the low `digits` hex digits of `value`, most significant first.
fn push_hex(out: &mut String, value: u64, digits: usize) {
    for shift in (0..digits).rev() {
        let nibble = (value >> (shift * 4)) & 0xf;
        out.push(char::from(b"0123456789abcdef"[nibble as usize]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_prefixed() {
        let g = IdGenerator::new();
        let a = g.request_id();
        let b = g.request_id();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("req_"));
        assert!(g.key_id().as_str().starts_with("key_"));
        assert_ne!(g.key_id(), g.key_id());
        assert_ne!(g.reservation_id(), g.reservation_id());
    }

    #[test]
    fn request_ids_are_the_prefix_and_counter_in_hex() {
        let g = IdGenerator::new();
        let n = g.counter.load(Ordering::Relaxed);
        let expected = format!("req_{:016x}{:08x}", g.prefix, n);
        assert_eq!(g.request_id().as_str(), expected);
        // A counter past eight hex digits keeps all of them.
        g.counter.store(0x1_2345_6789, Ordering::Relaxed);
        let expected = format!("req_{:016x}123456789", g.prefix);
        assert_eq!(g.request_id().as_str(), expected);
    }
}
