//! Identifier newtypes. Cheap to clone (`Arc<str>`), ordered, hashable, and never secret.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps an identifier; callers validate where the value comes from outside.
            pub fn new(value: impl Into<Arc<str>>) -> Self {
                Self(value.into())
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad` honours width and alignment, so ids line up in tables.
                f.pad(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self::new(value)
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self::new(value)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// Stable identifier of an API key. Derived from nothing secret.
    KeyId
);
string_id!(
    /// Identifier of a registered provider instance (e.g. `openai`, `anthropic-eu`).
    ProviderId
);
string_id!(
    /// A model name as the provider knows it (e.g. `gpt-4o`).
    ModelId
);
string_id!(
    /// A tenant (customer) that owns keys and sends requests.
    TenantId
);
string_id!(
    /// Identifier of one routed request, shared by its decision and audit record.
    RequestId
);
