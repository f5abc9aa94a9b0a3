//! Ports: the traits through which the services reach the outside world.
//!
//! Each is object safe (`#[async_trait]`, `Send + Sync + 'static`) and held as
//! `Arc<dyn Port>`. Mocks are generated for tests (feature `test-util`).

mod audit;
mod cipher;
mod clock;
mod provider;
mod store;

pub use audit::{AuditError, AuditSink};
pub use cipher::{CipherError, SecretCipher};
pub use clock::{Clock, ManualClock, SystemClock};
pub use provider::{
    ChatChunk, ChatResponse, ChatStream, EmbeddingCall, EmbeddingResponse, FinishReason, ModelSet,
    Provider, ProviderCall, ProviderError, StreamStart, ToolCallDelta,
};
pub use store::{
    BudgetStore, Charge, ChargeRejection, ClientLimit, KeyOutcome, KeyStore, ReclaimedReservations,
    RequestLog, Settled, Settlement, StateStore, StoreChange, StoreChanges, StoreError,
    StoreErrorKind, StoreHealth, UsageLedger, Verdict, VirtualKeyStore,
};

#[cfg(any(test, feature = "test-util"))]
pub use audit::MockAuditSink;
#[cfg(any(test, feature = "test-util"))]
pub use provider::MockProvider;
