//! The in-memory store: every state-store port held in process memory, lost on
//! restart. For development, tests and single-instance deployments.
//!
//! Depends on the domain and application crates and `std` only.

mod store;

pub use store::MemoryStore;

#[cfg(test)]
mod tests;
