//! The names of everything the Redis store keeps, derived from a namespace.
//!
//! Cluster layout: every name of one key entity shares the hash tag `{ns:key:<id>}`,
//! and every budget ledger shares `{ns:budgets}`, so each script touches one hash
//! slot per entity group. See the module docs of [`super`] for why budgets are
//! grouped under one tag.

use apikeyrouter_domain::{KeyId, RequestId};

/// Names under one namespace. Invariant: the namespace holds no `{`, `}` or whitespace
/// (checked by [`Names::new`]), so our hash tags are exactly the ones written here.
#[derive(Clone, Debug)]
pub(super) struct Names {
    ns: String,
}

impl Names {
    /// Names under `ns`, or `None` when `ns` is empty or holds `{`, `}` or whitespace.
    pub(super) fn new(ns: &str) -> Option<Self> {
        let valid = !ns.is_empty()
            && !ns
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace());
        valid.then(|| Self { ns: ns.to_owned() })
    }

    /// The namespace.
    pub(super) fn namespace(&self) -> &str {
        &self.ns
    }

    fn key_tag(&self, id: &KeyId) -> String {
        format!("{{{}:key:{id}}}", self.ns)
    }

    /// The hash holding a key: its fields, state and counters.
    pub(super) fn key(&self, id: &KeyId) -> String {
        format!("{}:doc", self.key_tag(id))
    }

    /// The list of a key's transitions, oldest first (JSON each).
    pub(super) fn transitions(&self, id: &KeyId) -> String {
        format!("{}:transitions", self.key_tag(id))
    }

    /// The hash of what the provider last said about a key's capacity.
    pub(super) fn observation(&self, id: &KeyId) -> String {
        format!("{}:obs", self.key_tag(id))
    }

    /// The counter that numbers registrations of one key id (see `common.lua`).
    pub(super) fn generation(&self, id: &KeyId) -> String {
        format!("{}:gen", self.key_tag(id))
    }

    /// Prefix of a key's window counters; the scripts append `<generation>:<kind>:<start>`.
    pub(super) fn window_prefix(&self, id: &KeyId) -> String {
        format!("{}:w:", self.key_tag(id))
    }

    /// A client's request counter for the minute starting at `start` (ms).
    pub(super) fn client_window(&self, client: &str, start: u64) -> String {
        format!("{{{}:client:{client}}}:rpm:{start}", self.ns)
    }

    /// The set of registered key ids.
    pub(super) fn key_ids(&self) -> String {
        format!("{{{}}}:keys", self.ns)
    }

    /// The channel on which key changes are announced (payload: the key id).
    pub(super) fn key_events(&self) -> String {
        format!("{{{}}}:key-events", self.ns)
    }

    /// The channel on which budget changes are announced (payload: the budget id).
    pub(super) fn budget_events(&self) -> String {
        format!("{{{}}}:budget-events", self.ns)
    }

    /// The channel on which virtual-key changes are announced (payload: the name).
    pub(super) fn virtual_key_events(&self) -> String {
        format!("{{{}}}:virtual-key-events", self.ns)
    }

    /// The hash of virtual keys: name to the key's JSON.
    pub(super) fn virtual_keys(&self) -> String {
        format!("{{{}}}:virtual-keys", self.ns)
    }

    /// The set of budget ids.
    pub(super) fn budget_ids(&self) -> String {
        format!("{{{}:budgets}}:ids", self.ns)
    }

    /// Prefix of budget ledger hashes; [`Self::budget`] appends the id.
    pub(super) fn budget_prefix(&self) -> String {
        format!("{{{}:budgets}}:ledger:", self.ns)
    }

    /// A budget's ledger hash (definition, period, spent, reserved).
    pub(super) fn budget(&self, id: &str) -> String {
        format!("{}{id}", self.budget_prefix())
    }

    /// Prefix of reservation hashes; [`Self::reservations`] appends the budget id.
    pub(super) fn reservations_prefix(&self) -> String {
        format!("{{{}:budgets}}:reservations:", self.ns)
    }

    /// A budget's outstanding reservations: reservation id to `amount:taken_at`.
    pub(super) fn reservations(&self, id: &str) -> String {
        format!("{}{id}", self.reservations_prefix())
    }

    /// A request's record (JSON).
    pub(super) fn request(&self, id: &RequestId) -> String {
        format!("{{{}:request:{id}}}", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_one_key_share_a_hash_tag() {
        let names = Names::new("ns").unwrap();
        let id = KeyId::new("k1");
        assert_eq!(names.key(&id), "{ns:key:k1}:doc");
        assert_eq!(names.transitions(&id), "{ns:key:k1}:transitions");
        assert_eq!(names.window_prefix(&id), "{ns:key:k1}:w:");
        assert_eq!(names.budget("b"), "{ns:budgets}:ledger:b");
        assert_eq!(names.reservations("b"), "{ns:budgets}:reservations:b");
        assert_eq!(names.key_events(), "{ns}:key-events");
    }

    #[test]
    fn namespaces_that_would_break_hash_tags_are_refused() {
        for bad in ["", "a{b", "a}b", "a b"] {
            assert!(Names::new(bad).is_none(), "{bad:?}");
        }
    }
}
