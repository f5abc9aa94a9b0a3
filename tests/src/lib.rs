//! Cross-crate integration tests: the seed's use cases played through the
//! `apikeyrouter` facade with the in-memory store and the simulated provider, and the
//! state-store conformance suite run against every store backend.
//!
//! This is the workspace's one integration-test crate; it may depend on anything.

#[cfg(test)]
mod audit_delivery;
#[cfg(test)]
mod bad_input;
#[cfg(test)]
mod cancellation;
#[cfg(test)]
mod failure_handling;
#[cfg(test)]
mod forwarding;
#[cfg(test)]
mod multi_instance;
#[cfg(test)]
mod provider_conformance;
#[cfg(test)]
mod proxy_http;
#[cfg(test)]
mod python_sdk;
#[cfg(test)]
mod redis_cluster;
#[cfg(test)]
mod round_trips;
#[cfg(test)]
mod store_conformance;
#[cfg(test)]
mod store_faults;
#[cfg(test)]
mod streaming;
#[cfg(test)]
mod support;
#[cfg(test)]
mod use_cases;
