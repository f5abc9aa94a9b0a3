//! `cargo xtask dist`: the `apikeyrouter` binary to ship, built with profile-guided
//! optimisation (PGO) into `target/dist/apikeyrouter`.
//!
//! Three steps: an instrumented release build; a training run of that build on the
//! request paths users run hot (chat completions through an instant mock upstream,
//! closed-loop, paced and one at a time; streamed chat, embeddings, models and the
//! management API on the demo's simulated providers); a release build that uses the
//! merged profile. The profile lets LLVM lay out and inline the hot path, which spans a
//! dozen crates, for the instruction cache: on the 2-vCPU VM it cut the proxy's CPU per
//! paced request by about a sixth (docs/benchmarks.md, session 17).
//!
//! The builds use their own target directories under `target/pgo`, so they never
//! clobber the plain release build, and each takes as long as a release build.
//! `llvm-profdata` comes from rustup's `llvm-tools` component when installed, else
//! from Debian's `llvm-19` (installed when missing), whose merger reads the raw
//! profiles of rustc's newer LLVM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::bench_proxy::{self, Guard};

/// Where the shipped binary lands.
pub const DIST_BINARY: &str = "target/dist/apikeyrouter";
/// The Debian package that provides a usable `llvm-profdata` when rustup's
/// `llvm-tools` component is not installed.
const LLVM_PACKAGE: &str = "llvm-19";
/// The oldest `/usr/lib/llvm-*` whose `llvm-profdata` reads the raw profiles of
/// rustc 1.95 (LLVM 22); older ones are passed over, so that `llvm-19` gets installed.
const OLDEST_LLVM: u32 = 19;
/// Seconds of each training load.
const TRAINING_SECS: u32 = 5;

/// Builds [`DIST_BINARY`]: instrumented build, training run, optimised build.
pub fn dist(sh: &Shell) -> Result<()> {
    let root = sh.current_dir();
    let host = cmd!(sh, "rustc --print host-tuple").quiet().read()?;
    let profdata_tool = llvm_profdata(sh, &host)?;
    // The training load is wrk's, on ports checked now rather than after a build.
    bench_proxy::ensure_wrk(sh)?;
    let ports = bench_proxy::ports()?;
    let profiles = root.join("target/pgo/profiles");
    let merged = root.join("target/pgo/merged.profdata");

    println!("==> dist: instrumented build");
    let generate = format!("-Cprofile-generate={}", profiles.display());
    build(sh, "target/pgo/generate", &host, &generate)?;
    cmd!(
        sh,
        "cargo build --release -p apikeyrouter-proxy --example mock_upstream"
    )
    .run()?;

    println!("==> dist: training run");
    if profiles.exists() {
        sh.remove_path(&profiles)?;
    }
    let instrumented = format!("target/pgo/generate/{host}/release/apikeyrouter");
    train(sh, &instrumented, &ports)?;
    cmd!(sh, "{profdata_tool} merge -o {merged} {profiles}")
        .run()
        .with_context(|| {
            format!(
                "{} could not merge the profiles; an llvm-profdata older than rustc's LLVM \
                 may not read them: `rustup component add llvm-tools` installs a matching one",
                profdata_tool.display()
            )
        })?;

    println!("==> dist: optimised build");
    let use_profile = format!("-Cprofile-use={}", merged.display());
    build(sh, "target/pgo/use", &host, &use_profile)?;
    sh.create_dir("target/dist")?;
    sh.copy_file(
        format!("target/pgo/use/{host}/release/apikeyrouter"),
        DIST_BINARY,
    )?;
    println!("==> dist: {DIST_BINARY} (profile-guided)");
    Ok(())
}

/// A release build of the `apikeyrouter` binary into `target_dir` with `rustflags`
/// added to any the caller set.
/// The explicit `--target` keeps the flags off build scripts and proc macros, which
/// would otherwise be instrumented too and write profiles of the build itself.
fn build(sh: &Shell, target_dir: &str, host: &str, rustflags: &str) -> Result<()> {
    cmd!(
        sh,
        "cargo build --release -p apikeyrouter-proxy --bin apikeyrouter --target {host}"
    )
    .env("CARGO_TARGET_DIR", target_dir)
    .env("RUSTFLAGS", with_callers_flags(rustflags))
    // Would take precedence over RUSTFLAGS.
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .run()?;
    Ok(())
}

/// `flags` after the caller's own `RUSTFLAGS`, so both builds get what the plain one does.
fn with_callers_flags(flags: &str) -> String {
    joined_flags(std::env::var("RUSTFLAGS").ok().as_deref(), flags)
}

fn joined_flags(own: Option<&str>, flags: &str) -> String {
    match own {
        Some(own) if !own.trim().is_empty() => format!("{own} {flags}"),
        _ => flags.to_owned(),
    }
}

/// Runs the instrumented `binary` on the training workload. Each server is stopped
/// with SIGTERM, so that it exits through `main` and writes its profile.
fn train(sh: &Shell, binary: &str, ports: &bench_proxy::Ports) -> Result<()> {
    let [mock_at, serve_at, demo_at] = &ports.training;
    let dir = "target/pgo";
    bench_proxy::write_files(sh, dir, mock_at, serve_at)?;
    let secs = TRAINING_SECS.to_string();
    let _mock = bench_proxy::start_mock(mock_at)?;

    let serve = bench_proxy::start_proxy(binary, dir, serve_at, false)?;
    let chat = format!("http://{serve_at}/v1/chat/completions");
    for (script, connections, threads) in [
        ("post", "64", "2"),
        ("paced", "64", "2"),
        ("post", "1", "1"),
    ] {
        cmd!(
            sh,
            "wrk -t{threads} -c{connections} -d{secs}s -s {dir}/{script}.lua {chat}"
        )
        .quiet()
        .ignore_stdout()
        .run()?;
    }
    for path in ["v1/models", "metrics", "health"] {
        cmd!(sh, "curl -sf -o /dev/null http://{serve_at}/{path}").run()?;
    }
    stop(serve)?;

    let token = "training-admin-token";
    let demo = Guard::new(
        Command::new(binary)
            .args(["demo", "--listen", demo_at])
            .env("APIKEYROUTER_ADMIN_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting the instrumented demo")?,
    );
    bench_proxy::wait_ready(&format!("http://{demo_at}/ready"), &[])?;
    let bodies = [
        (
            "stream",
            "v1/chat/completions",
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello"}]}"#,
        ),
        (
            "embed",
            "v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":["one","two"]}"#,
        ),
    ];
    for (name, path, body) in bodies {
        let script = format!("{dir}/{name}.lua");
        // Paced under the demo keys' 5,000 requests a minute, so that the profile is
        // of served requests rather than of refusals.
        let paced = format!("{}{}", bench_proxy::post_script(body), bench_proxy::PACING);
        sh.write_file(&script, paced)?;
        cmd!(
            sh,
            "wrk -t1 -c2 -d{secs}s -s {script} http://{demo_at}/{path}"
        )
        .quiet()
        .ignore_stdout()
        .run()?;
    }
    let auth = format!("Authorization: Bearer {token}");
    for path in ["api/v1/keys", "api/v1/budgets", "api/v1/policies"] {
        cmd!(
            sh,
            "curl -sf -o /dev/null -H {auth} http://{demo_at}/{path}"
        )
        .run()?;
    }
    stop(demo)
}

/// Stops a server with SIGTERM and waits for it to exit (and so write its profile).
fn stop(mut server: Guard) -> Result<()> {
    let pid = server.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Some(status) = server.try_wait()? {
            if !status.success() {
                bail!("the instrumented server exited with {status}");
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the instrumented server did not stop within 30 s of SIGTERM")
}

/// The `llvm-profdata` to merge profiles with: rustup's `llvm-tools` component, else the
/// newest under `/usr/lib/llvm-*` from [`OLDEST_LLVM`] on, else one on PATH, else
/// Debian's [`LLVM_PACKAGE`] installed now.
fn llvm_profdata(sh: &Shell, host: &str) -> Result<PathBuf> {
    if let Some(found) = installed_llvm_profdata(sh, host) {
        return Ok(found);
    }
    cmd!(sh, "apt-get install -y {LLVM_PACKAGE}")
        .run()
        .with_context(|| format!("installing {LLVM_PACKAGE} for llvm-profdata"))?;
    installed_llvm_profdata(sh, host).context(
        "no llvm-profdata found after installing it: `rustup component add llvm-tools` provides one",
    )
}

fn installed_llvm_profdata(sh: &Shell, host: &str) -> Option<PathBuf> {
    let sysroot = cmd!(sh, "rustc --print sysroot").quiet().read().ok()?;
    let rustup = Path::new(sysroot.trim()).join(format!("lib/rustlib/{host}/bin/llvm-profdata"));
    if rustup.exists() {
        return Some(rustup);
    }
    let system = newest_llvm_profdata(Path::new("/usr/lib"));
    system.or_else(|| {
        Command::new("llvm-profdata")
            .arg("--version")
            .output()
            .is_ok()
            .then(|| PathBuf::from("llvm-profdata"))
    })
}

/// The `llvm-profdata` of the newest `llvm-N` under `lib` (Debian's layout) with N at
/// least [`OLDEST_LLVM`].
fn newest_llvm_profdata(lib: &Path) -> Option<PathBuf> {
    std::fs::read_dir(lib)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let version: u32 = name.strip_prefix("llvm-")?.parse().ok()?;
            if version < OLDEST_LLVM {
                return None;
            }
            let tool = lib.join(name).join("bin/llvm-profdata");
            tool.exists().then_some((version, tool))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, tool)| tool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_flags_come_first_and_blank_ones_are_dropped() {
        assert_eq!(
            joined_flags(Some("-C target-cpu=native"), "-Cprofile-use=p"),
            "-C target-cpu=native -Cprofile-use=p"
        );
        assert_eq!(
            joined_flags(Some("  "), "-Cprofile-use=p"),
            "-Cprofile-use=p"
        );
        assert_eq!(joined_flags(None, "-Cprofile-use=p"), "-Cprofile-use=p");
    }

    #[test]
    fn the_newest_system_llvm_with_the_tool_is_chosen_and_old_ones_passed_over() {
        let lib = std::env::temp_dir().join(format!("xtask-pgo-{}", std::process::id()));
        let tool = |dir: &str| lib.join(dir).join("bin/llvm-profdata");
        let _ = std::fs::remove_dir_all(&lib);
        assert_eq!(newest_llvm_profdata(&lib), None, "no directory");
        for dir in [
            "llvm-18", "llvm-19", "llvm-20", "llvm-21", "llvm-x", "llvm-99",
        ] {
            std::fs::create_dir_all(lib.join(dir).join("bin")).unwrap();
        }
        assert_eq!(newest_llvm_profdata(&lib), None, "no tool in any");
        for dir in ["llvm-18", "llvm-19", "llvm-20", "llvm-x"] {
            std::fs::write(tool(dir), "").unwrap();
        }
        assert_eq!(newest_llvm_profdata(&lib), Some(tool("llvm-20")));
        std::fs::remove_file(tool("llvm-20")).unwrap();
        std::fs::remove_file(tool("llvm-19")).unwrap();
        assert_eq!(newest_llvm_profdata(&lib), None, "llvm-18 is too old");
        std::fs::remove_dir_all(&lib).unwrap();
    }
}
