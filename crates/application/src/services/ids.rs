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

    pub(crate) fn request_id(&self) -> RequestId {
        RequestId::new(format!("req_{:016x}{:08x}", self.prefix, self.next()))
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
}
