//! Use-case services. They share one [`ApiKeyRouterCore`]: the store, the providers,
//! the local routing table and the cached configuration.

mod budgets;
mod core;
mod delivery;
mod errors;
mod ids;
mod keys;
mod quota;
mod router;
mod settings;

pub use budgets::{BudgetService, Defined};
pub use core::{ApiKeyRouterCore, ProviderSettings, VirtualKeyChange};
pub use delivery::{DEFAULT_QUEUE_CAPACITY, DeliveryStats};
pub use errors::{
    BudgetServiceError, KeyServiceError, RegisterKeyError, RouteError, RouteErrorKind,
};
pub use keys::KeyService;
pub use quota::{KeyQuota, QuotaService};
pub use router::{RequestContext, RoutedStream, RouterService, StreamTotals};
pub use settings::RouterSettings;
