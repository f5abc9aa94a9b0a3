//! `cargo xtask check-layers`: checks workspace dependency edges against the layer rule.
//!
//! The rule (see STYLE.md, DEPENDENCY RULE) is an allow-list per workspace crate;
//! arrows point inward, towards `apikeyrouter-domain`. A workspace crate without an
//! entry in [`RULES`] is itself an error, so a new crate needs a deliberate rule.

use std::collections::BTreeSet;
use std::fmt;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use xshell::{Shell, cmd};

const DOMAIN: &str = "apikeyrouter-domain";
const APPLICATION: &str = "apikeyrouter-application";
const ADAPTERS_PROVIDERS: &str = "apikeyrouter-adapters-providers";
const ADAPTERS_STORES: &str = "apikeyrouter-adapters-stores";
const OBSERVABILITY: &str = "apikeyrouter-observability";
const FACADE: &str = "apikeyrouter";
const PROXY: &str = "apikeyrouter-proxy";
const TESTS: &str = "apikeyrouter-tests";
const XTASK: &str = "xtask";

/// External crates that `apikeyrouter-domain` may use as normal dependencies.
const DOMAIN_EXTERNAL_ALLOWED: &[&str] = &["serde", "thiserror", "foldhash"];

/// Which workspace crates a workspace crate may depend on.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Any,
    Only(&'static [&'static str]),
}

/// The allow-list. It applies to normal, build and dev dependencies alike, so
/// dev-dependencies also point inward.
const RULES: &[(&str, Rule)] = &[
    (DOMAIN, Rule::Only(&[])),
    (APPLICATION, Rule::Only(&[DOMAIN])),
    (ADAPTERS_PROVIDERS, Rule::Only(&[APPLICATION, DOMAIN])),
    (ADAPTERS_STORES, Rule::Only(&[APPLICATION, DOMAIN])),
    (OBSERVABILITY, Rule::Only(&[APPLICATION, DOMAIN])),
    (
        FACADE,
        Rule::Only(&[
            DOMAIN,
            APPLICATION,
            ADAPTERS_PROVIDERS,
            ADAPTERS_STORES,
            OBSERVABILITY,
        ]),
    ),
    (PROXY, Rule::Only(&[FACADE])),
    (TESTS, Rule::Any),
    (XTASK, Rule::Only(&[])),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DepKind {
    Normal,
    Build,
    Dev,
}

impl fmt::Display for DepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DepKind::Normal => "normal",
            DepKind::Build => "build",
            DepKind::Dev => "dev",
        })
    }
}

/// One declared dependency of a workspace crate.
#[derive(Debug, Clone)]
pub(crate) struct Edge {
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) kind: DepKind,
}

/// Runs `cargo metadata` and fails with every forbidden edge.
pub(crate) fn run(sh: &Shell) -> Result<()> {
    // --no-deps: declared dependencies are all we check, and it needs no resolution.
    let json = cmd!(sh, "cargo metadata --format-version 1 --no-deps")
        .quiet()
        .read()?;
    let metadata: Value = serde_json::from_str(&json).context("parsing `cargo metadata` output")?;
    let (members, edges) = edges_from_metadata(&metadata)?;
    let violations = check(&members, &edges);
    if !violations.is_empty() {
        bail!(
            "check-layers: {} forbidden dependency edge(s) (a new edge needs an ARCHITECTURE.md edit):\n  {}",
            violations.len(),
            violations.join("\n  ")
        );
    }
    println!(
        "check-layers: {} workspace crates, {} dependency edges, all allowed",
        members.len(),
        edges.len()
    );
    Ok(())
}

/// Extracts workspace member names and their declared dependencies.
fn edges_from_metadata(metadata: &Value) -> Result<(Vec<String>, Vec<Edge>)> {
    let member_ids: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .context("cargo metadata: missing `workspace_members`")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let packages = metadata["packages"]
        .as_array()
        .context("cargo metadata: missing `packages`")?;

    let mut members = Vec::new();
    let mut edges = Vec::new();
    for package in packages {
        let is_member = package["id"]
            .as_str()
            .is_some_and(|id| member_ids.contains(id));
        if !is_member {
            continue;
        }
        let from = package["name"]
            .as_str()
            .context("cargo metadata: package without `name`")?;
        members.push(from.to_owned());
        let dependencies = package["dependencies"]
            .as_array()
            .with_context(|| format!("cargo metadata: `{from}` has no `dependencies`"))?;
        for dependency in dependencies {
            let to = dependency["name"].as_str().with_context(|| {
                format!("cargo metadata: dependency of `{from}` without `name`")
            })?;
            let kind = match dependency["kind"].as_str() {
                None => DepKind::Normal,
                Some("build") => DepKind::Build,
                Some("dev") => DepKind::Dev,
                Some(other) => bail!("cargo metadata: unknown dependency kind `{other}`"),
            };
            edges.push(Edge {
                from: from.to_owned(),
                to: to.to_owned(),
                kind,
            });
        }
    }
    Ok((members, edges))
}

/// Returns one message per forbidden edge (sorted, deduplicated); empty means all allowed.
///
/// `members` are the workspace package names; an edge whose `to` is a member is
/// workspace-internal, any other edge is external.
pub(crate) fn check(members: &[String], edges: &[Edge]) -> Vec<String> {
    let rule_of = |name: &str| {
        RULES
            .iter()
            .find(|(pkg, _)| *pkg == name)
            .map(|(_, rule)| *rule)
    };
    let mut violations = BTreeSet::new();

    for member in members {
        if rule_of(member).is_none() {
            violations.insert(format!(
                "workspace crate `{member}` has no layer rule (add it to xtask/src/layers.rs)"
            ));
        }
    }

    for edge in edges {
        let Edge { from, to, kind } = edge;
        let is_internal = members.iter().any(|member| member == to);
        if is_internal {
            // A dev-dependency on itself (to enable e.g. `test-util`) adds no edge.
            if *kind == DepKind::Dev && from == to {
                continue;
            }
            if let Some(Rule::Only(allowed)) = rule_of(from) {
                if !allowed.contains(&to.as_str()) {
                    violations.insert(format!("forbidden edge: {from} -> {to} ({kind})"));
                }
            }
        } else if from == DOMAIN
            && *kind != DepKind::Dev
            && !DOMAIN_EXTERNAL_ALLOWED.contains(&to.as_str())
        {
            violations.insert(format!(
                "forbidden external dependency: {from} -> {to} ({kind}); domain may only use {}",
                DOMAIN_EXTERNAL_ALLOWED.join(", ")
            ));
        }
    }
    violations.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(from: &str, to: &str, kind: DepKind) -> Edge {
        Edge {
            from: from.to_owned(),
            to: to.to_owned(),
            kind,
        }
    }

    fn members() -> Vec<String> {
        [
            DOMAIN,
            APPLICATION,
            ADAPTERS_PROVIDERS,
            ADAPTERS_STORES,
            OBSERVABILITY,
            FACADE,
            PROXY,
            TESTS,
            XTASK,
        ]
        .map(String::from)
        .to_vec()
    }

    fn allowed_graph() -> Vec<Edge> {
        vec![
            edge(DOMAIN, "serde", DepKind::Normal),
            edge(DOMAIN, "thiserror", DepKind::Normal),
            edge(DOMAIN, "proptest", DepKind::Dev),
            edge(DOMAIN, DOMAIN, DepKind::Dev),
            edge(APPLICATION, DOMAIN, DepKind::Normal),
            edge(APPLICATION, "async-trait", DepKind::Normal),
            edge(ADAPTERS_PROVIDERS, APPLICATION, DepKind::Normal),
            edge(ADAPTERS_PROVIDERS, DOMAIN, DepKind::Normal),
            edge(ADAPTERS_STORES, APPLICATION, DepKind::Normal),
            edge(ADAPTERS_STORES, APPLICATION, DepKind::Dev),
            edge(OBSERVABILITY, APPLICATION, DepKind::Normal),
            edge(FACADE, ADAPTERS_STORES, DepKind::Normal),
            edge(FACADE, OBSERVABILITY, DepKind::Normal),
            edge(PROXY, FACADE, DepKind::Normal),
            edge(PROXY, "axum", DepKind::Normal),
            edge(TESTS, PROXY, DepKind::Normal),
            edge(TESTS, ADAPTERS_STORES, DepKind::Dev),
            edge(XTASK, "anyhow", DepKind::Normal),
        ]
    }

    #[test]
    fn allowed_graph_passes() {
        assert_eq!(check(&members(), &allowed_graph()), Vec::<String>::new());
    }

    #[test]
    fn domain_to_application_is_reported() {
        let mut edges = allowed_graph();
        edges.push(edge(DOMAIN, APPLICATION, DepKind::Normal));
        assert_eq!(
            check(&members(), &edges),
            vec!["forbidden edge: apikeyrouter-domain -> apikeyrouter-application (normal)"]
        );
    }

    #[test]
    fn outward_dev_dependency_and_domain_tokio_are_reported() {
        let edges = vec![
            edge(ADAPTERS_STORES, ADAPTERS_PROVIDERS, DepKind::Dev),
            edge(PROXY, ADAPTERS_STORES, DepKind::Normal),
            edge(DOMAIN, "tokio", DepKind::Normal),
        ];
        assert_eq!(check(&members(), &edges).len(), 3);
    }

    #[test]
    fn crate_without_rule_is_reported() {
        let mut members = members();
        members.push("apikeyrouter-new".to_owned());
        assert_eq!(check(&members, &[]).len(), 1);
    }
}
