//! Project automation, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! Tasks: `ci`, `tidy`, `check-layers`, `bench [-- criterion args]`, `bench proxy`,
//! `bench redis`, `dist`, `example`, `python-sdk`, `services up|down`.
//! This crate must not depend on anything in `crates/`: it has to build even when they don't.

mod bench_proxy;
mod layers;
mod pgo;
mod services;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

const HELP: &str = "\
usage: cargo xtask <task>

tasks:
  ci                    fmt, tidy, check-layers, clippy, test, doc (fails fast)
  tidy                  check module docs and forbidden markers
  check-layers          check workspace dependency edges against the layer rule
  bench [-- ARGS...]    cargo bench for the workspace; ARGS go to criterion
  bench proxy [SECS]    load test: wrk through the proxy vs directly against a mock upstream
  bench proxy-instructions  instructions and cache misses per request under callgrind: the proxy (and its dist build, if built) and the floor
  bench redis [N]       route() on Redis vs memory: requests/s, p50/p99, Redis round
                        trips per request (needs Redis: `cargo xtask services up`)
  dist                  build the binary to ship, profile-guided: target/dist/apikeyrouter
  example               run the facade's quickstart example in release mode
  python-sdk            create target/python-sdk with the OpenAI SDK for the client tests
  services up|down      start (installing if needed) or stop the local Redis and the
                        MongoDB-compatible server the store tests use; REDIS_URL or
                        MONGODB_URL in the environment means use that server instead";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Printed by hand rather than returned from main: anyhow's Debug output
            // adds a backtrace whenever RUST_BACKTRACE is set, which buries the message.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();

    let root = project_root()?;
    let sh = Shell::new()?;
    sh.change_dir(&root);

    match task.as_deref() {
        None | Some("help" | "-h" | "--help") => {
            println!("{HELP}");
            Ok(())
        }
        Some("bench") if rest.first().map(String::as_str) == Some("proxy") => {
            let seconds = rest
                .get(1)
                .map_or(Ok(10), |s| s.parse())
                .context("seconds must be a number")?;
            bench_proxy::run(&sh, seconds)
        }
        Some("bench") if rest.first().map(String::as_str) == Some("proxy-instructions") => {
            bench_proxy::instructions(&sh)
        }
        Some("bench") if rest.first().map(String::as_str) == Some("redis") => {
            let requests: u64 = rest
                .get(1)
                .map_or(Ok(20_000), |s| s.parse())
                .context("the number of requests must be a number")?;
            let requests = requests.to_string();
            // The Redis half needs a server: start (or reuse) the one tests use.
            services::up(&sh)?;
            cmd!(
                sh,
                "cargo bench -p apikeyrouter --features redis --bench route_redis -- --requests {requests}"
            )
            .run()?;
            Ok(())
        }
        Some("bench") => bench(&sh, rest),
        Some("services") => services::run(&sh, &rest),
        Some(task) if !rest.is_empty() => {
            bail!("task `{task}` takes no arguments, got {rest:?}\n\n{HELP}")
        }
        Some("ci") => ci(&sh, &root),
        Some("tidy") => tidy::run(&root),
        Some("check-layers") => layers::run(&sh),
        Some("dist") => pgo::dist(&sh),
        Some("example") => example(&sh),
        Some("python-sdk") => python_sdk(&sh),
        Some(other) => bail!("unknown task `{other}`\n\n{HELP}"),
    }
}

/// The workspace root: the parent of this crate's manifest directory.
pub(crate) fn project_root() -> Result<PathBuf> {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = xtask_dir
        .parent()
        .with_context(|| format!("{} has no parent directory", xtask_dir.display()))?;
    Ok(root.to_path_buf())
}

/// Everything CI checks, in order, stopping at the first failed step.
fn ci(sh: &Shell, root: &Path) -> Result<()> {
    step("fmt", || Ok(cmd!(sh, "cargo fmt --all -- --check").run()?))?;
    step("tidy", || tidy::run(root))?;
    step("check-layers", || layers::run(sh))?;
    step("clippy", || {
        Ok(cmd!(
            sh,
            "cargo clippy --workspace --all-targets --all-features -- -D warnings"
        )
        .run()?)
    })?;
    step("doc", || {
        Ok(cmd!(sh, "cargo doc --workspace --no-deps --all-features")
            .env("RUSTDOCFLAGS", "-D warnings")
            .run()?)
    })?;
    step("services", || ensure_services(sh))?;
    // Tests run last so that the summary line closes the output.
    let mut totals = TestTotals::default();
    step("test", || {
        totals = run_tests(root)?;
        Ok(())
    })?;
    println!("==> ci: all steps passed");
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    Ok(())
}

/// Sums of cargo's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestTotals {
    passed: u64,
    failed: u64,
}

/// Reads `test result: ok. 12 passed; 0 failed; ...` into its counts.
fn parse_test_result(line: &str) -> Option<TestTotals> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(word)?
                .trim()
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some(TestTotals {
        passed: count("passed")?,
        failed: count("failed")?,
    })
}

/// Runs the workspace tests, echoing their output and summing the results, so CI can
/// print one closing `N passed, N failed` line.
fn run_tests(root: &Path) -> Result<TestTotals> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(["test", "--workspace", "--all-features"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let mut totals = TestTotals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(t) = parse_test_result(&line) {
                totals.passed += t.passed;
                totals.failed += t.failed;
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "cargo test failed ({} passed, {} failed)",
            totals.passed,
            totals.failed
        );
    }
    if totals.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(totals)
}

/// Prints a banner, runs one CI step and names the step if it fails.
fn step(name: &str, run: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("==> {name}");
    run().with_context(|| format!("ci step `{name}` failed"))
}

/// Starts or installs what the tests need, before `cargo test`: Redis and the
/// MongoDB-compatible server for the live-store tests (`services up`), and the Python
/// virtual environment with the official OpenAI SDK. Idempotent: what is already in
/// place is reused.
fn ensure_services(sh: &Shell) -> Result<()> {
    services::up(sh)?;
    python_sdk(sh)
}

/// Creates `target/python-sdk` with the pinned OpenAI SDK (tests/python/requirements.txt).
fn python_sdk(sh: &Shell) -> Result<()> {
    let venv = "target/python-sdk";
    let python = format!("{venv}/bin/python");
    let requirements = "tests/python/requirements.txt";
    let stamp = format!("{venv}/requirements.installed");
    let wanted = sh.read_file(requirements)?;
    if sh.path_exists(&python) && sh.read_file(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    let system_python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            cmd!(sh, "{p} --version")
                .quiet()
                .ignore_stdout()
                .ignore_stderr()
                .run()
                .is_ok()
        })
        .context("no python3 on PATH: the OpenAI SDK client tests need CPython 3.8 or later")?;
    cmd!(sh, "{system_python} -m venv {venv}").run()?;
    cmd!(
        sh,
        "{python} -m pip install --quiet --disable-pip-version-check -r {requirements}"
    )
    .run()?;
    sh.write_file(&stamp, wanted)?;
    Ok(())
}

/// `cargo bench` over the workspace; arguments after `--` are passed on to criterion.
fn bench(sh: &Shell, args: Vec<String>) -> Result<()> {
    // `cargo xtask bench -- --quick` reaches us as ["--", "--quick"].
    let criterion_args: Vec<String> = match args.split_first() {
        Some((first, rest)) if first == "--" => rest.to_vec(),
        _ => args,
    };
    // `route_redis` is among the benches and needs Redis.
    services::up(sh)?;
    // `--bench *` selects only the [[bench]] targets (criterion). Without it cargo also
    // runs every lib and bin target under libtest, which rejects criterion's flags such
    // as `--quick` and costs a release build of each unit-test harness.
    cmd!(
        sh,
        "cargo bench --workspace --all-features --bench * -- {criterion_args...}"
    )
    .run()?;
    // No HTML report: the workspace builds criterion without `html_reports`.
    println!("==> bench results: target/criterion/<benchmark>/new/estimates.json");
    Ok(())
}

/// Runs the facade's `quickstart` example in release mode.
fn example(sh: &Shell) -> Result<()> {
    cmd!(
        sh,
        "cargo run --release -p apikeyrouter --example quickstart"
    )
    .run()?;
    Ok(())
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    #[test]
    fn test_result_lines_are_parsed() {
        let line = "test result: ok. 53 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.49s";
        assert_eq!(
            parse_test_result(line),
            Some(TestTotals {
                passed: 53,
                failed: 2
            })
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
