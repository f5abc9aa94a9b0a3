//! `cargo xtask bench proxy`: load test of the proxy against an instant mock upstream,
//! measured directly against the mock and through the proxy in the same run.
//!
//! Uses `wrk` (installed from Debian's packages when missing) at fixed concurrency,
//! 1,000 keys configured, and reports RPS, p50/p99 latency, the latency the proxy adds,
//! the CPU time each process spends per request (user + system, from `/proc/PID/stat`,
//! which stays meaningful when other work shares the machine and makes RPS noisy) and
//! the proxy's resident memory.
//!
//! A third server, the bare forwarder example (axum + a pooled hyper client, both JSON
//! bodies parsed and re-serialised, nothing else), is measured at 64 connections,
//! closed-loop and paced, as the floor: what the HTTP and JSON layers alone cost and
//! add on this machine.
//!
//! At 64 connections a closed-loop test measures queueing as much as the proxy: by
//! Little's law latency = 64 / throughput, so the added p50 there is bounded below by
//! the proxy's CPU cost times the queue. The latency the proxy adds to one request is
//! therefore also measured below saturation: with a single connection, and with 64
//! connections that each pause a random 10–30 ms between requests (wrk's `delay`),
//! i.e. 64 concurrent clients at roughly a third of the proxy's saturation rate.
//!
//! The proxy measured is the binary to ship, built by `cargo xtask dist` with
//! profile-guided optimisation, on its default runtime (per core, on Linux); the same
//! binary on the shared runtime (`[server] runtime = "shared"`, set through the
//! environment) and the plain release build are measured beside it. All servers run
//! from the start. The paced runs come in [`PACED_ROUNDS`] rounds of every path, each
//! round starting one path later, and the report takes the medians of the rounds.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::pgo;

/// The mock listens on this port and the proxy on the next; `BENCH_PROXY_PORT`
/// overrides it (e.g. when another checkout's bench holds the default ports).
const DEFAULT_PORT: u16 = 19100;
const CONNECTIONS: u32 = 64;
/// Connections of the below-saturation run (one request in flight at a time).
const LOW_CONNECTIONS: u32 = 1;
/// Rounds of the paced runs. Each round runs every path once, one after another, so
/// that the VM's drifting speed reaches them all alike; the report takes the median.
const PACED_ROUNDS: usize = 3;
/// Each paced connection waits a random 10–30 ms before each request.
pub(crate) const PACING: &str = "function delay()\n  return math.random(10, 30)\nend\n";
const N_KEYS: usize = 1_000;
/// The proxy as `cargo build --release` makes it, without profile-guided optimisation.
const PLAIN_BINARY: &str = "target/release/apikeyrouter";

/// Kills a child process when dropped.
pub(crate) struct Guard(Child);

impl Guard {
    pub(crate) fn new(child: Child) -> Self {
        Self(child)
    }
}

impl std::ops::Deref for Guard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Default)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, factor) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * factor)
}

fn parse_wrk(out: &str) -> Result<Run> {
    let mut run = Run::default();
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().context("Requests/sec")?;
        } else if let Some(v) = line.strip_prefix("50%") {
            run.p50_us = parse_duration_us(v).context("p50")?;
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_us = parse_duration_us(v).context("p99")?;
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            run.requests = n.trim().parse().context("requests")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bail!(
                "{} of the requests failed; the figures would be of errors:\n{out}",
                v.trim()
            );
        }
    }
    if run.rps == 0.0 {
        bail!("wrk output had no results:\n{out}");
    }
    Ok(run)
}

/// Waits until `curl -sf [extra] url` succeeds.
pub(crate) fn wait_ready(url: &str, extra: &[&str]) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if Command::new("curl")
            .arg("-sf")
            .args(extra)
            .arg(url)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{url} did not become ready")
}

fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

/// CPU time (user + system) a process has used so far, in microseconds.
fn cpu_us(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .context("utime/stime")
    };
    Ok((ticks(14)? + ticks(15)?) * 1e6 / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A wrk run with the CPU each process spent per request during it.
#[derive(Debug, Default)]
struct Measured {
    run: Run,
    mock_cpu_us: f64,
    proxy_cpu_us: f64,
}

fn measured(pids: (u32, u32), run: impl FnOnce() -> Result<Run>) -> Result<Measured> {
    let before = (cpu_us(pids.0)?, cpu_us(pids.1)?);
    let run = run()?;
    let after = (cpu_us(pids.0)?, cpu_us(pids.1)?);
    let n = run.requests.max(1) as f64;
    Ok(Measured {
        mock_cpu_us: (after.0 - before.0) / n,
        proxy_cpu_us: (after.1 - before.1) / n,
        run,
    })
}

/// Where the bench's servers, and the training run of `cargo xtask dist`, listen.
pub(crate) struct Ports {
    mock_at: String,
    proxy_at: String,
    bare_at: String,
    shared_at: String,
    plain_at: String,
    /// The mock, the instrumented server and its demo during `cargo xtask dist`.
    pub(crate) training: [String; 3],
}

/// Consecutive ports from `BENCH_PROXY_PORT` (default 19100), checked free: a leftover
/// server on one of them would be measured instead of ours.
pub(crate) fn ports() -> Result<Ports> {
    let port: u16 = match std::env::var("BENCH_PROXY_PORT") {
        Ok(v) => v.parse().context("BENCH_PROXY_PORT")?,
        Err(_) => DEFAULT_PORT,
    };
    let at = |offset: u16| format!("127.0.0.1:{}", port + offset);
    let ports = Ports {
        mock_at: at(0),
        proxy_at: at(1),
        bare_at: at(2),
        shared_at: at(3),
        plain_at: at(4),
        training: [at(5), at(6), at(7)],
    };
    for addr in [
        &ports.mock_at,
        &ports.proxy_at,
        &ports.bare_at,
        &ports.shared_at,
        &ports.plain_at,
    ]
    .into_iter()
    .chain(&ports.training)
    {
        if std::net::TcpListener::bind(addr).is_err() {
            bail!("{addr} is in use; stop what listens there or set BENCH_PROXY_PORT");
        }
    }
    Ok(ports)
}

/// Installs wrk when missing.
pub(crate) fn ensure_wrk(sh: &Shell) -> Result<()> {
    if cmd!(sh, "wrk --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        // wrk prints its version and exits 1; a missing binary is what fails to spawn.
        if Command::new("wrk").arg("--version").output().is_err() {
            cmd!(sh, "apt-get install -y wrk")
                .run()
                .context("installing wrk (apt-get install -y wrk)")?;
        }
    }
    Ok(())
}

/// Writes into `dir` the proxy's configuration (listening on `proxy_at`, 1,000 keys
/// of one provider at the mock on `mock_at`) and wrk's scripts: `post.lua`, one chat
/// completion, and `paced.lua`, the same with each connection pausing 10–30 ms.
pub(crate) fn write_files(sh: &Shell, dir: &str, mock_at: &str, proxy_at: &str) -> Result<()> {
    sh.create_dir(dir)?;
    let mut config = format!(
        "listen = \"{proxy_at}\"\n[routing]\nobjective = \"fairness\"\n[[providers]]\nid = \"mock\"\nkind = \"openai-compatible\"\nbase_url = \"http://{mock_at}/v1\"\nmodels = [\"gpt-4o-mini\"]\n"
    );
    for i in 0..N_KEYS {
        config.push_str(&format!(
            "[[keys]]\nprovider = \"mock\"\nmaterial = \"sk-bench-{i:08}\"\n"
        ));
    }
    sh.write_file(format!("{dir}/proxy.toml"), config)?;
    let post = post_script(
        r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"What is the capital of France?"}]}"#,
    );
    sh.write_file(format!("{dir}/paced.lua"), format!("{post}{PACING}"))?;
    sh.write_file(format!("{dir}/post.lua"), post)?;
    Ok(())
}

/// A wrk script that POSTs `json` (which must not hold a single quote).
pub(crate) fn post_script(json: &str) -> String {
    format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = '{json}'\n"
    )
}

/// The bench's ports and files, wrk installed, the release binaries built.
fn prepare(sh: &Shell) -> Result<(Ports, &'static str)> {
    let ports = ports()?;
    ensure_wrk(sh)?;
    // Two builds: with the examples in the same one, their dev-dependencies' features
    // would be unified into the binary, which then differs from the one users build.
    cmd!(
        sh,
        "cargo build --release -p apikeyrouter-proxy --bin apikeyrouter"
    )
    .run()?;
    cmd!(
        sh,
        "cargo build --release -p apikeyrouter-proxy --example mock_upstream --example bare_forward"
    )
    .run()?;
    let dir = "target/bench-proxy";
    write_files(sh, dir, &ports.mock_at, &ports.proxy_at)?;
    Ok((ports, dir))
}

/// Starts `binary` serving on `at` with the bench's configuration in `dir`, on the
/// shared runtime or the default one, and waits until it is ready.
pub(crate) fn start_proxy(binary: &str, dir: &str, at: &str, shared: bool) -> Result<Guard> {
    let mut command = Command::new(binary);
    command
        .args([
            "serve",
            "--config",
            &format!("{dir}/proxy.toml"),
            "--listen",
            at,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if shared {
        command.env("APIKEYROUTER_SERVER__RUNTIME", "shared");
    }
    let mut child = command.spawn()?;
    let stdout = child.stdout.take();
    let proxy = Guard(child);
    if let Some(out) = stdout {
        // Wait for the "listening" line, then drain in the background.
        let mut lines = BufReader::new(out).lines();
        let _ = lines.next();
        std::thread::spawn(move || lines.for_each(drop));
    }
    wait_ready(&format!("http://{at}/ready"), &[])?;
    Ok(proxy)
}

pub(crate) fn start_mock(at: &str) -> Result<Guard> {
    Ok(Guard(
        Command::new("target/release/examples/mock_upstream")
            .arg(at)
            .stdout(Stdio::null())
            .spawn()?,
    ))
}

/// `cargo xtask bench proxy-instructions`: the user-space instructions and simulated
/// cache misses per request of the proxy (the plain release build, and `cargo xtask
/// dist`'s build when there is one) and of the bare forwarder (the floor) under
/// callgrind (valgrind, installed from Debian's packages when missing), each at four
/// connections after a warm-up. Unlike CPU time on a shared VM the counts repeat from
/// run to run, so they show what a change to the request path saves, and how far the
/// proxy is above the floor. The misses matter as much as the instructions: the plain
/// build runs 1.3 times the floor's instructions and misses the caches about twice as
/// often (docs/benchmarks.md).
pub fn instructions(sh: &Shell) -> Result<()> {
    let (
        Ports {
            mock_at,
            proxy_at,
            bare_at,
            ..
        },
        dir,
    ) = prepare(sh)?;
    if Command::new("callgrind_control")
        .arg("--version")
        .output()
        .is_err()
    {
        cmd!(sh, "apt-get install -y valgrind")
            .run()
            .context("installing valgrind (apt-get install -y valgrind)")?;
    }
    let _mock = start_mock(&mock_at)?;
    let config = format!("{dir}/proxy.toml");
    let mut rows = vec![(
        "proxy (plain release build)",
        count_events(
            sh,
            dir,
            "proxy",
            &[PLAIN_BINARY, "serve", "--config", &config],
            &proxy_at,
            &format!("http://{proxy_at}/ready"),
        )?,
    )];
    // The profile-guided build takes minutes, so it is counted only when built already.
    if Path::new(pgo::DIST_BINARY).exists() {
        let modified = |path: &str| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified(pgo::DIST_BINARY) < modified(PLAIN_BINARY) {
            println!(
                "note: {} is older than {PLAIN_BINARY}, so it may be of older code: `cargo xtask dist` rebuilds it",
                pgo::DIST_BINARY
            );
        }
        let dist = count_events(
            sh,
            dir,
            "proxy-dist",
            &[pgo::DIST_BINARY, "serve", "--config", &config],
            &proxy_at,
            &format!("http://{proxy_at}/ready"),
        )?;
        rows.push(("proxy, `cargo xtask dist` build", dist));
    }
    let direct_url = format!("http://{mock_at}/v1/chat/completions");
    let floor = count_events(
        sh,
        dir,
        "bare",
        &[
            "target/release/examples/bare_forward",
            &bare_at,
            &direct_url,
        ],
        &bare_at,
        &format!("http://{bare_at}/v1/chat/completions"),
    )?;
    println!("per request under callgrind (four connections; simulated 32 KB L1 caches):");
    println!("| | instructions | I1 misses | D1 read misses | D1 write misses |");
    println!("|---|---|---|---|---|");
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    for (name, e) in &rows {
        println!(
            "| {name} | {} | {} | {} | {} |",
            e.instructions, e.i1_misses, e.d1_read_misses, e.d1_write_misses
        );
    }
    println!(
        "| bare forwarder (floor) | {} | {} | {} | {} |",
        floor.instructions, floor.i1_misses, floor.d1_read_misses, floor.d1_write_misses
    );
    for (name, e) in &rows {
        println!(
            "| {name} / floor | {:.2} | {:.2} | {:.2} | {:.2} |",
            ratio(e.instructions, floor.instructions),
            ratio(e.i1_misses, floor.i1_misses),
            ratio(e.d1_read_misses, floor.d1_read_misses),
            ratio(e.d1_write_misses, floor.d1_write_misses)
        );
    }
    Ok(())
}

/// Callgrind's counts per request.
struct Events {
    instructions: u64,
    i1_misses: u64,
    d1_read_misses: u64,
    d1_write_misses: u64,
}

/// Runs `command` (a server listening on `at`) under callgrind with its cache
/// simulation, waits until `ready_url` answers, warms it up, and returns its counts
/// per request over an eight-second wrk run.
fn count_events(
    sh: &Shell,
    dir: &str,
    name: &str,
    command: &[&str],
    at: &str,
    ready_url: &str,
) -> Result<Events> {
    let out = format!("{dir}/callgrind-{name}.out");
    for old in [out.clone(), format!("{out}.1")] {
        let _ = std::fs::remove_file(old);
    }
    let server = Guard(
        Command::new("valgrind")
            .args(["--tool=callgrind", "--cache-sim=yes", "--instr-atstart=no"])
            .arg(format!("--callgrind-out-file={out}"))
            .args(command)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // The bare forwarder has no probe; any answer from its route will do.
    wait_ready(ready_url, if name == "bare" { &["-d", "{}"] } else { &[] })?;
    let pid = server.0.id().to_string();
    let lua = format!("{dir}/post.lua");
    let url = format!("http://{at}/v1/chat/completions");
    cmd!(sh, "wrk -t1 -c4 -d3s -s {lua} {url}")
        .quiet()
        .ignore_stdout()
        .run()?;
    let control = |args: &[&str]| {
        cmd!(sh, "callgrind_control {args...} {pid}")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run()
    };
    control(&["-i", "on"])?;
    let run = parse_wrk(&cmd!(sh, "wrk -t1 -c4 -d8s --latency -s {lua} {url}").read()?)?;
    control(&["-i", "off"])?;
    control(&["-d"])?;
    drop(server);
    let dump = std::fs::read_to_string(format!("{out}.1"))
        .with_context(|| format!("reading callgrind's dump of the {name}"))?;
    if run.requests == 0 {
        bail!("no request reached the {name} under callgrind");
    }
    let totals = callgrind_totals(&dump)
        .with_context(|| format!("callgrind's dump of the {name} has no event totals"))?;
    let per_request = |event: &str| -> Result<u64> {
        let total = totals
            .iter()
            .find(|(e, _)| e == event)
            .map(|(_, n)| *n)
            .with_context(|| format!("callgrind's dump of the {name} does not count {event}"))?;
        Ok(total / run.requests)
    };
    Ok(Events {
        instructions: per_request("Ir")?,
        i1_misses: per_request("I1mr")?,
        d1_read_misses: per_request("D1mr")?,
        d1_write_misses: per_request("D1mw")?,
    })
}

/// The `events:` names of a callgrind dump paired with its `totals:` counts.
fn callgrind_totals(dump: &str) -> Option<Vec<(String, u64)>> {
    let names = dump.lines().find_map(|l| l.strip_prefix("events: "))?;
    let counts = dump.lines().find_map(|l| l.strip_prefix("totals: "))?;
    let counts: Vec<u64> = counts
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let names: Vec<&str> = names.split_whitespace().collect();
    (names.len() == counts.len())
        .then(|| names.into_iter().map(str::to_owned).zip(counts).collect())
}

pub fn run(sh: &Shell, seconds: u32) -> Result<()> {
    let (
        Ports {
            mock_at,
            proxy_at,
            bare_at,
            shared_at,
            plain_at,
            ..
        },
        dir,
    ) = prepare(sh)?;
    // The binary to ship is measured; the plain release build beside it shows what
    // profile-guided optimisation gives.
    pgo::dist(sh)?;
    let mock = start_mock(&mock_at)?;
    let proxy = start_proxy(pgo::DIST_BINARY, dir, &proxy_at, false)?;
    let plain = start_proxy(PLAIN_BINARY, dir, &plain_at, false)?;
    // The same proxy on the shared runtime (`[server] runtime = "shared"`).
    let shared = start_proxy(pgo::DIST_BINARY, dir, &shared_at, true)?;
    let rss_idle = rss_mb(proxy.id())?;

    let secs = seconds.to_string();
    let lua = format!("{dir}/post.lua");
    let paced_lua = format!("{dir}/paced.lua");
    let wrk_with = |script: &str, connections: u32, threads: u32, url: &str| -> Result<Run> {
        let c = connections.to_string();
        let t = threads.to_string();
        let out = cmd!(sh, "wrk -t{t} -c{c} -d{secs}s --latency -s {script} {url}").read()?;
        parse_wrk(&out)
    };
    let wrk = |connections: u32, threads: u32, url: &str| wrk_with(&lua, connections, threads, url);
    let c = CONNECTIONS.to_string();
    let warm = |url: &str| {
        // Connections, pools and caches, before measuring.
        let _ = cmd!(sh, "wrk -t2 -c{c} -d2s -s {lua} {url}")
            .quiet()
            .ignore_stdout()
            .run();
    };
    let url = |at: &str| format!("http://{at}/v1/chat/completions");
    let bare = Guard(
        Command::new("target/release/examples/bare_forward")
            .args([bare_at.as_str(), url(&mock_at).as_str()])
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_ready(&url(&bare_at), &["-d", "{}"])?;
    // The paths measured (the table's row, the summary's subject, the server, its
    // URL), the mock directly first: every other is compared with it.
    let paths = [
        ("mock directly", "the mock", mock.id(), url(&mock_at)),
        ("through the proxy", "the proxy", proxy.id(), url(&proxy_at)),
        (
            "through the proxy, shared runtime",
            "the proxy (shared runtime)",
            shared.id(),
            url(&shared_at),
        ),
        (
            "through the proxy, plain release build",
            "the plain release build",
            plain.id(),
            url(&plain_at),
        ),
        (
            "through the bare forwarder (floor)",
            "the bare forwarder",
            bare.id(),
            url(&bare_at),
        ),
    ];
    for (_, _, _, url) in &paths[1..] {
        warm(url);
    }
    let mut closed = Vec::new();
    for (_, _, pid, url) in &paths {
        closed.push(measured((mock.id(), *pid), || wrk(CONNECTIONS, 2, url))?);
    }
    // After the proxy's own closed-loop run and those after it (it idles through them).
    let rss_loaded = rss_mb(proxy.id())?;
    let mut one = Vec::new();
    for (_, _, pid, url) in &paths[..4] {
        one.push(measured((mock.id(), *pid), || {
            wrk(LOW_CONNECTIONS, 1, url)
        })?);
    }
    // Each round starts one path later, so that no path is always measured the
    // longest after the mock; the results stay in path order.
    let mut rounds = Vec::new();
    for r in 0..PACED_ROUNDS {
        let mut round: Vec<Option<Measured>> = paths.iter().map(|_| None).collect();
        for i in (0..paths.len()).map(|k| (k + r) % paths.len()) {
            let (_, _, pid, url) = &paths[i];
            round[i] = Some(measured((mock.id(), *pid), || {
                wrk_with(&paced_lua, CONNECTIONS, 2, url)
            })?);
        }
        rounds.push(round.into_iter().flatten().collect::<Vec<_>>());
    }

    println!(
        "proxy load test: {seconds} s per run, {N_KEYS} keys, wrk; the proxy is {}, built by `cargo xtask dist`",
        pgo::DIST_BINARY
    );
    println!(
        "| path | connections | requests/s | p50 | p99 | CPU mock | CPU proxy (or forwarder) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let row = |i: usize, connections: &str, m: &Measured| {
        let path = paths[i].0;
        // The mock's own run has no proxy in it.
        let proxy_cpu = if i == 0 {
            "–".to_owned()
        } else {
            format!("{:.1} µs/req", m.proxy_cpu_us)
        };
        println!(
            "| {path} | {connections} | {:.0} | {:.0} µs | {:.0} µs | {:.1} µs/req | {proxy_cpu} |",
            m.run.rps, m.run.p50_us, m.run.p99_us, m.mock_cpu_us
        );
    };
    for (i, m) in closed.iter().enumerate() {
        row(i, "64", m);
    }
    for (i, m) in one.iter().enumerate() {
        row(i, "1", m);
    }
    for (r, round) in rounds.iter().enumerate() {
        for (i, m) in round.iter().enumerate() {
            row(i, &format!("64 paced, round {}", r + 1), m);
        }
    }
    // The floor has no run at one connection.
    for i in 1..one.len() {
        let who = paths[i].1;
        for (connections, direct, through) in [
            ("64 connections", &closed[0], &closed[i]),
            ("1 connection", &one[0], &one[i]),
        ] {
            println!(
                "added by {who} at {connections}: p50 {:.0} µs, p99 {:.0} µs",
                through.run.p50_us - direct.run.p50_us,
                through.run.p99_us - direct.run.p99_us,
            );
        }
    }
    for (i, (_, who, _, _)) in paths.iter().enumerate().skip(1) {
        let added = |pick: fn(&Run) -> f64| {
            median(
                rounds
                    .iter()
                    .map(|round| pick(&round[i].run) - pick(&round[0].run))
                    .collect(),
            )
        };
        let cpu = median(rounds.iter().map(|round| round[i].proxy_cpu_us).collect());
        println!(
            "added by {who} at 64 paced connections (median of {PACED_ROUNDS} rounds): p50 {:.0} µs, p99 {:.0} µs; CPU {cpu:.1} µs/req",
            added(|r| r.p50_us),
            added(|r| r.p99_us),
        );
    }
    println!(
        "proxy CPU per request: {:.1} µs at {CONNECTIONS} connections ({:.1} µs on the shared runtime, {:.1} µs as a plain release build); resident memory {:.1} MB idle, {:.1} MB after load",
        closed[1].proxy_cpu_us,
        closed[2].proxy_cpu_us,
        closed[3].proxy_cpu_us,
        rss_idle,
        rss_loaded
    );
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count); 0 when empty.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_middle_value() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![-5.0]), -5.0);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn callgrind_totals_pair_events_with_counts() {
        let dump = "version: 1\nevents: Ir Dr I1mr\nfl=(1) x\ntotals: 300 20 7\n";
        assert_eq!(
            callgrind_totals(dump),
            Some(vec![
                ("Ir".to_owned(), 300),
                ("Dr".to_owned(), 20),
                ("I1mr".to_owned(), 7)
            ])
        );
        assert_eq!(callgrind_totals("events: Ir Dr\ntotals: 300\n"), None);
        assert_eq!(callgrind_totals("events: Ir\n"), None);
    }

    #[test]
    fn wrk_output_is_parsed() {
        let out = "  Latency Distribution\n     50%  512.00us\n     75%    1.20ms\n     99%    3.50ms\n  1000 requests in 1.00s, 1.2MB read\nRequests/sec:  12345.67\n";
        let run = parse_wrk(out).unwrap();
        assert_eq!(
            (run.rps, run.p50_us, run.p99_us, run.requests),
            (12345.67, 512.0, 3500.0, 1000)
        );
    }

    #[test]
    fn wrk_output_with_failed_requests_is_refused() {
        let out = "  1000 requests in 1.00s, 1.2MB read\n  Non-2xx or 3xx responses: 12\nRequests/sec:  1000.00\n";
        let err = parse_wrk(out).unwrap_err().to_string();
        assert!(err.starts_with("12 of the requests failed"), "{err}");
    }
}
