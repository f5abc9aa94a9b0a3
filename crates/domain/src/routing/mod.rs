//! Routing: objectives and constraints, the incremental routing table that picks a key,
//! and the decision that explains the pick.

mod decision;
mod objective;
mod table;

pub use decision::{
    Alternative, CandidateRow, Decision, IneligibleCounts, KeyMetrics, LossReason, NoEligibleKey,
};
pub use objective::{Constraints, Objective, ObjectiveError, ObjectiveKind, ObjectiveWeights};
pub use table::{Ineligibility, ProviderOffer, RouteQuery, RoutingTable};
