//! Installing the process-wide tracing subscriber: structured logs to stderr, as JSON
//! lines or human-readable text, filtered by `RUST_LOG` or a default filter.
//!
//! Only binaries (and tests) should call [`init_tracing`]; libraries just emit events.

use std::error::Error;
use std::io::IsTerminal;

use thiserror::Error;
use tracing_subscriber::EnvFilter;

/// How log events are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Multi-line human-readable text, coloured when stderr is a terminal.
    #[default]
    Pretty,
}

/// Installing the subscriber failed.
#[derive(Debug, Error)]
pub enum TracingError {
    /// A filter (from `RUST_LOG` or the default) does not parse.
    #[error("invalid log filter {directives:?} from {origin}: {source}")]
    InvalidFilter {
        /// The filter text.
        directives: String,
        /// Where it came from: `RUST_LOG` or `the default`.
        origin: &'static str,
        /// Why it does not parse.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber is already installed (for example by an earlier call).
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled(#[source] Box<dyn Error + Send + Sync + 'static>),
}

/// Installs the global subscriber: events at or above the filter, printed in `format`
/// to stderr.
///
/// The filter is `RUST_LOG` when it is set and not blank, else `default_filter`
/// (for example `"info,apikeyrouter=debug"`); both use the
/// [`EnvFilter`] directive syntax.
///
/// # Errors
/// [`TracingError::InvalidFilter`] when the filter in use does not parse, and
/// [`TracingError::AlreadyInstalled`] when a global subscriber already exists (so a
/// second call fails instead of panicking).
pub fn init_tracing(format: LogFormat, default_filter: &str) -> Result<(), TracingError> {
    let from_env = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let filter = build_filter(from_env.as_deref(), default_filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
        LogFormat::Pretty => builder
            .pretty()
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    res.map_err(TracingError::AlreadyInstalled)
}

/// The filter from the environment's value when it is set and not blank, else from
/// `default_filter`.
fn build_filter(from_env: Option<&str>, default_filter: &str) -> Result<EnvFilter, TracingError> {
    let (directives, origin) = match from_env {
        Some(value) if !value.trim().is_empty() => (value, "RUST_LOG"),
        _ => (default_filter, "the default"),
    };
    EnvFilter::try_new(directives).map_err(|source| TracingError::InvalidFilter {
        directives: directives.to_owned(),
        origin,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_filter_wins_unless_blank() {
        let from_env = build_filter(Some("warn"), "debug").unwrap();
        assert_eq!(from_env.to_string(), "warn");
        let blank = build_filter(Some("  "), "debug").unwrap();
        assert_eq!(blank.to_string(), "debug");
        let unset = build_filter(None, "info,apikeyrouter=debug").unwrap();
        assert!(unset.to_string().contains("apikeyrouter=debug"));
    }

    #[test]
    fn invalid_filter_is_an_error_naming_its_origin() {
        let err = build_filter(Some("apikeyrouter=loud"), "info").unwrap_err();
        assert!(
            matches!(
                err,
                TracingError::InvalidFilter {
                    origin: "RUST_LOG",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    /// The only test in this crate that installs the global subscriber.
    #[test]
    fn second_install_is_an_error_not_a_panic() {
        // The first call may fail only if `RUST_LOG` is set to garbage; either way a
        // second call must not succeed.
        let _first = init_tracing(LogFormat::Json, "info");
        assert!(init_tracing(LogFormat::Pretty, "info").is_err());
    }
}
