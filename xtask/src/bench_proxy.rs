//! `cargo xtask bench proxy`: load test of the proxy against an instant mock upstream,
//! measured directly against the mock and through the proxy in the same run.
//!
//! Uses `wrk` (installed from Debian's packages when missing) at fixed concurrency,
//! 1,000 keys configured, and reports RPS, p50/p99 latency, the latency the proxy adds
//! and its resident memory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

const MOCK: &str = "127.0.0.1:19100";
const PROXY: &str = "127.0.0.1:19101";
const CONNECTIONS: u32 = 64;
const N_KEYS: usize = 1_000;

/// Kills a child process when dropped.
struct Guard(Child);

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
        }
    }
    if run.rps == 0.0 {
        bail!("wrk output had no results:\n{out}");
    }
    Ok(run)
}

fn wait_ready(url: &str) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if Command::new("curl")
            .args(["-sf", url])
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

pub fn run(sh: &Shell, seconds: u32) -> Result<()> {
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
    cmd!(
        sh,
        "cargo build --release -p apikeyrouter-proxy --bin apikeyrouter --example mock_upstream"
    )
    .run()?;
    let dir = "target/bench-proxy";
    sh.create_dir(dir)?;
    let mut config = format!(
        "listen = \"{PROXY}\"\n[routing]\nobjective = \"fairness\"\n[[providers]]\nid = \"mock\"\nkind = \"openai-compatible\"\nbase_url = \"http://{MOCK}/v1\"\nmodels = [\"gpt-4o-mini\"]\n"
    );
    for i in 0..N_KEYS {
        config.push_str(&format!(
            "[[keys]]\nprovider = \"mock\"\nmaterial = \"sk-bench-{i:08}\"\n"
        ));
    }
    sh.write_file(format!("{dir}/proxy.toml"), config)?;
    sh.write_file(
        format!("{dir}/post.lua"),
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = '{\"model\":\"gpt-4o-mini\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France?\"}]}'\n",
    )?;

    let _mock = Guard(
        Command::new("target/release/examples/mock_upstream")
            .arg(MOCK)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let mut proxy_child = Command::new("target/release/apikeyrouter")
        .args(["serve", "--config", &format!("{dir}/proxy.toml")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = proxy_child.stdout.take();
    let proxy = Guard(proxy_child);
    if let Some(out) = stdout {
        // Wait for the "listening" line, then drain in the background.
        let mut lines = BufReader::new(out).lines();
        let _ = lines.next();
        std::thread::spawn(move || lines.for_each(drop));
    }
    wait_ready(&format!("http://{PROXY}/ready"))?;
    let rss_idle = rss_mb(proxy.0.id())?;

    let secs = seconds.to_string();
    let c = CONNECTIONS.to_string();
    let lua = format!("{dir}/post.lua");
    let wrk = |url: String| -> Result<Run> {
        let out = cmd!(sh, "wrk -t2 -c{c} -d{secs}s --latency -s {lua} {url}").read()?;
        parse_wrk(&out)
    };
    // Warm both paths (connections, pools, caches) before measuring.
    let _ = cmd!(
        sh,
        "wrk -t2 -c{c} -d2s -s {lua} http://{PROXY}/v1/chat/completions"
    )
    .quiet()
    .ignore_stdout()
    .run();
    let direct = wrk(format!("http://{MOCK}/v1/chat/completions"))?;
    let through = wrk(format!("http://{PROXY}/v1/chat/completions"))?;
    let rss_loaded = rss_mb(proxy.0.id())?;

    println!(
        "proxy load test: {CONNECTIONS} connections, {seconds} s each, {N_KEYS} keys, wrk -t2"
    );
    println!("| path | requests/s | p50 | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| mock directly | {:.0} | {:.0} µs | {:.0} µs |",
        direct.rps, direct.p50_us, direct.p99_us
    );
    println!(
        "| through the proxy | {:.0} | {:.0} µs | {:.0} µs |",
        through.rps, through.p50_us, through.p99_us
    );
    println!(
        "added by the proxy: p50 {:.0} µs, p99 {:.0} µs; resident memory {:.1} MB idle, {:.1} MB after load",
        through.p50_us - direct.p50_us,
        through.p99_us - direct.p99_us,
        rss_idle,
        rss_loaded
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "  Latency Distribution\n     50%  512.00us\n     75%    1.20ms\n     99%    3.50ms\n  1000 requests in 1.00s\nRequests/sec:  12345.67\n";
        let run = parse_wrk(out).unwrap();
        assert_eq!((run.rps, run.p50_us, run.p99_us), (12345.67, 512.0, 3500.0));
    }
}
