//! What a routing decision optimises for, and the hard constraints it must respect.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{ModelId, ProviderId, TenantId};
use crate::money::Money;

/// A single routing goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    /// Cheapest estimated cost; ties go to the least used key.
    Cost,
    /// Best recent success rate.
    Reliability,
    /// Spread load evenly: the least used key.
    Fairness,
    /// Lowest recent latency.
    Latency,
}

impl ObjectiveKind {
    /// All kinds, in weight-array order.
    pub const ALL: [Self; 4] = [Self::Cost, Self::Reliability, Self::Fairness, Self::Latency];

    /// Lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Cost => "cost",
            Self::Reliability => "reliability",
            Self::Fairness => "fairness",
            Self::Latency => "latency",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::Cost => 0,
            Self::Reliability => 1,
            Self::Fairness => 2,
            Self::Latency => 3,
        }
    }
}

impl fmt::Display for ObjectiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ObjectiveKind {
    type Err = ObjectiveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cost" => Ok(Self::Cost),
            "reliability" => Ok(Self::Reliability),
            "fairness" => Ok(Self::Fairness),
            "latency" => Ok(Self::Latency),
            _ => Err(ObjectiveError::UnknownObjective(s.to_owned())),
        }
    }
}

/// Why an objective was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ObjectiveError {
    /// Not one of cost, reliability, fairness, latency.
    #[error("unknown objective {0:?}; expected cost, reliability, fairness or latency")]
    UnknownObjective(String),
    /// A weight below zero.
    #[error("objective weight for {kind} is negative ({weight}); weights must be zero or more")]
    NegativeWeight {
        /// Which objective.
        kind: ObjectiveKind,
        /// The weight given.
        weight: f64,
    },
    /// A weight that is NaN or infinite.
    #[error("objective weight for {kind} is not a finite number")]
    NonFiniteWeight {
        /// Which objective.
        kind: ObjectiveKind,
    },
    /// The weights add up to more than a float holds.
    #[error("objective weights are too large; use weights such as 0.7 and 0.3")]
    WeightsTooLarge,
    /// Every weight is zero: nothing to optimise.
    #[error("objective weights are all zero; give at least one a positive weight")]
    AllZero,
    /// A minimum success rate outside `[0, 1]`.
    #[error("min_success_rate must be between 0 and 1, got {0}")]
    InvalidMinSuccessRate(f64),
    /// A malformed `kind=weight` list.
    #[error("malformed objective {0:?}; expected e.g. \"cost\" or \"cost=0.7,reliability=0.3\"")]
    Malformed(String),
}

/// Hard limits on which keys may serve a request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Constraints {
    /// Skip keys whose estimated cost for this request is higher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_request: Option<Money>,
    /// Skip keys whose recent success rate is lower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_success_rate: Option<f64>,
    /// Use only these providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_providers: Option<Vec<ProviderId>>,
    /// Serve only these models (fallbacks included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_models: Option<Vec<ModelId>>,
    /// Route only within this tenant's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_tenant: Option<TenantId>,
}

impl Constraints {
    /// Whether `provider` is allowed.
    pub fn allows_provider(&self, provider: &ProviderId) -> bool {
        self.allowed_providers
            .as_ref()
            .is_none_or(|p| p.contains(provider))
    }

    /// Whether `model` is allowed.
    pub fn allows_model(&self, model: &ModelId) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|m| m.contains(model))
    }
}

/// Normalised weights over the four goals.
///
/// Invariant: finite, non-negative, summing to one. Serialized as its label
/// (`fairness`, `cost=0.70,reliability=0.30`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ObjectiveWeights([f64; 4]);

impl ObjectiveWeights {
    /// The weight of `kind`.
    pub fn weight(&self, kind: ObjectiveKind) -> f64 {
        self.0[kind.index()]
    }

    /// The single goal, when only one has weight.
    pub fn single(&self) -> Option<ObjectiveKind> {
        let mut found = None;
        for kind in ObjectiveKind::ALL {
            if self.weight(kind) > 0.0 {
                if found.is_some() {
                    return None;
                }
                found = Some(kind);
            }
        }
        found
    }
}

impl fmt::Display for ObjectiveWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(kind) = self.single() {
            return f.write_str(kind.as_str());
        }
        let mut first = true;
        for kind in ObjectiveKind::ALL {
            if self.weight(kind) > 0.0 {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                write!(f, "{}={:.2}", kind.as_str(), self.weight(kind))?;
            }
        }
        Ok(())
    }
}

impl Serialize for ObjectiveWeights {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ObjectiveWeights {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Objective::parse(&text)
            .map(|o| o.weights)
            .map_err(serde::de::Error::custom)
    }
}

/// A routing objective: weights over the four goals plus constraints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// Normalised weights.
    pub weights: ObjectiveWeights,
    /// Hard constraints.
    #[serde(default)]
    pub constraints: Constraints,
}

impl Default for Objective {
    fn default() -> Self {
        Self::primary(ObjectiveKind::Fairness)
    }
}

impl From<ObjectiveKind> for Objective {
    fn from(kind: ObjectiveKind) -> Self {
        Self::primary(kind)
    }
}

impl Objective {
    /// Optimise for one goal only.
    pub fn primary(kind: ObjectiveKind) -> Self {
        let mut weights = [0.0; 4];
        weights[kind.index()] = 1.0;
        Self {
            weights: ObjectiveWeights(weights),
            constraints: Constraints::default(),
        }
    }

    /// A weighted combination; weights are normalised to sum to one.
    ///
    /// # Errors
    /// [`ObjectiveError`] for a negative or non-finite weight, or when all are zero.
    pub fn weighted(weights: &[(ObjectiveKind, f64)]) -> Result<Self, ObjectiveError> {
        let mut w = [0.0; 4];
        for &(kind, weight) in weights {
            if !weight.is_finite() {
                return Err(ObjectiveError::NonFiniteWeight { kind });
            }
            if weight < 0.0 {
                return Err(ObjectiveError::NegativeWeight { kind, weight });
            }
            w[kind.index()] += weight;
        }
        let sum: f64 = w.iter().sum();
        if sum <= 0.0 {
            return Err(ObjectiveError::AllZero);
        }
        // Finite weights can still add up to infinity (`cost=1e308,cost=1e308`).
        if !sum.is_finite() {
            return Err(ObjectiveError::WeightsTooLarge);
        }
        for x in &mut w {
            *x /= sum;
        }
        Ok(Self {
            weights: ObjectiveWeights(w),
            constraints: Constraints::default(),
        })
    }

    /// Parses `"cost"` or `"cost=0.7,reliability=0.3"`.
    ///
    /// # Errors
    /// [`ObjectiveError`] naming what is wrong.
    pub fn parse(spec: &str) -> Result<Self, ObjectiveError> {
        if !spec.contains('=') {
            return Ok(Self::primary(spec.parse()?));
        }
        let mut weights = Vec::new();
        for part in spec.split(',') {
            let (kind, weight) = part
                .split_once('=')
                .ok_or_else(|| ObjectiveError::Malformed(spec.to_owned()))?;
            let weight: f64 = weight
                .trim()
                .parse()
                .map_err(|_| ObjectiveError::Malformed(spec.to_owned()))?;
            weights.push((kind.parse()?, weight));
        }
        Self::weighted(&weights)
    }

    /// Adds constraints.
    ///
    /// # Errors
    /// [`ObjectiveError::InvalidMinSuccessRate`] for a rate outside `[0, 1]`.
    pub fn with_constraints(mut self, constraints: Constraints) -> Result<Self, ObjectiveError> {
        if let Some(rate) = constraints.min_success_rate {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ObjectiveError::InvalidMinSuccessRate(rate));
            }
        }
        self.constraints = constraints;
        Ok(self)
    }

    /// The weight of `kind`.
    pub fn weight(&self, kind: ObjectiveKind) -> f64 {
        self.weights.weight(kind)
    }

    /// The single goal, when only one has weight.
    pub fn single(&self) -> Option<ObjectiveKind> {
        self.weights.single()
    }

    /// A short label: `fairness`, or `cost=0.70,reliability=0.30`.
    pub fn label(&self) -> String {
        self.weights.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_validated_and_normalised() {
        let o = Objective::weighted(&[
            (ObjectiveKind::Cost, 3.0),
            (ObjectiveKind::Reliability, 1.0),
        ])
        .unwrap();
        assert!((o.weight(ObjectiveKind::Cost) - 0.75).abs() < 1e-12);
        assert_eq!(o.single(), None);
        assert_eq!(
            Objective::weighted(&[(ObjectiveKind::Cost, -1.0)]),
            Err(ObjectiveError::NegativeWeight {
                kind: ObjectiveKind::Cost,
                weight: -1.0
            })
        );
        assert_eq!(
            Objective::weighted(&[(ObjectiveKind::Cost, 0.0), (ObjectiveKind::Latency, 0.0)]),
            Err(ObjectiveError::AllZero)
        );
        assert_eq!(
            Objective::weighted(&[(ObjectiveKind::Cost, f64::NAN)]),
            Err(ObjectiveError::NonFiniteWeight {
                kind: ObjectiveKind::Cost
            })
        );
        assert_eq!(
            Objective::parse("cost=1e308,cost=1e308"),
            Err(ObjectiveError::WeightsTooLarge)
        );
        assert_eq!(
            Objective::parse("cost=1e308,latency=1e308"),
            Err(ObjectiveError::WeightsTooLarge)
        );
    }

    #[test]
    fn parse_accepts_names_and_weight_lists() {
        assert_eq!(
            Objective::parse("cost").unwrap().single(),
            Some(ObjectiveKind::Cost)
        );
        let o = Objective::parse("cost=0.7,reliability=0.3").unwrap();
        assert_eq!(o.label(), "cost=0.70,reliability=0.30");
        assert!(matches!(
            Objective::parse("speed"),
            Err(ObjectiveError::UnknownObjective(_))
        ));
        assert!(matches!(
            Objective::parse("cost=abc"),
            Err(ObjectiveError::Malformed(_))
        ));
    }

    #[test]
    fn min_success_rate_is_range_checked() {
        let c = Constraints {
            min_success_rate: Some(1.5),
            ..Constraints::default()
        };
        assert_eq!(
            Objective::default().with_constraints(c),
            Err(ObjectiveError::InvalidMinSuccessRate(1.5))
        );
    }
}
