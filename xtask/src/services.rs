//! `cargo xtask services up|down`: the local servers the live-store tests need.
//!
//! - Redis on 127.0.0.1:6379, from Debian's `redis-server` package (installed with
//!   apt-get when missing), daemonized without persistence.
//! - A MongoDB wire-protocol server on 127.0.0.1:27017: `nx-27017` (SQLite-backed,
//!   from PyPI) in the virtual environment `target/mongo-venv`, data under
//!   `target/mongo-data`, run as a daemon.
//!
//! `up` is idempotent: a server that already answers is left alone, and `REDIS_URL`
//! or `MONGODB_URL` in the environment means "use that one", so nothing is started.
//! `down` stops the local servers (only the MongoDB one `up` started, by its pid file).
//! Depends on nothing in `crates/`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

const REDIS_ADDR: &str = "127.0.0.1:6379";
const MONGO_ADDR: &str = "127.0.0.1:27017";
const MONGO_VENV: &str = "target/mongo-venv";
const MONGO_DATA: &str = "target/mongo-data";
/// Pinned: the server, its storage engine, and the driver the Python probes use.
const MONGO_PACKAGES: &[&str] = &["nx-27017==0.8.1", "neosqlite==1.17.2", "pymongo==4.20.1"];

/// `cargo xtask services <up|down>`.
pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
    match args {
        [action] if action == "up" => up(sh),
        [action] if action == "down" => down(sh),
        _ => bail!("usage: cargo xtask services up|down"),
    }
}

/// Starts what is not running yet.
pub(crate) fn up(sh: &Shell) -> Result<()> {
    redis_up(sh).context("cannot start redis")?;
    mongo_up(sh).context("cannot start the mongodb-compatible server")?;
    Ok(())
}

/// Stops the local servers.
fn down(sh: &Shell) -> Result<()> {
    if redis_answers() {
        // Fails harmlessly when the server is already gone.
        let _ = cmd!(sh, "redis-cli -h 127.0.0.1 -p 6379 shutdown nosave")
            .quiet()
            .ignore_status()
            .ignore_stderr()
            .run();
        println!("services: redis stopped");
    } else {
        println!("services: redis is not running");
    }
    let nx = format!("{MONGO_VENV}/bin/nx-27017");
    let pid_file = format!("{MONGO_DATA}/nx.pid");
    if sh.path_exists(&nx) && sh.path_exists(&pid_file) {
        cmd!(sh, "{nx} --stop --pid-file {pid_file}").run()?;
    } else {
        println!("services: no mongodb-compatible server started by `services up`");
    }
    Ok(())
}

fn redis_up(sh: &Shell) -> Result<()> {
    if std::env::var_os("REDIS_URL").is_some() {
        println!("services: REDIS_URL is set; not starting a local redis");
        return Ok(());
    }
    if redis_answers() {
        println!("services: redis already answers on {REDIS_ADDR}");
        return Ok(());
    }
    if !on_path("redis-server") || !on_path("redis-cli") {
        println!("services: installing redis-server with apt-get");
        cmd!(sh, "apt-get update -qq")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .context("apt-get update failed (redis-server comes from Debian's packages)")?;
        cmd!(sh, "apt-get install -y -qq redis-server")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .context("apt-get install redis-server failed")?;
        // On a machine with an init system the package starts its own server.
        if wait_until(Duration::from_secs(3), redis_answers) {
            println!("services: redis answers on {REDIS_ADDR}");
            return Ok(());
        }
    }
    let status = Command::new("redis-server")
        .args([
            "--port",
            "6379",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
        ])
        .stdin(Stdio::null())
        .status()
        .context("cannot run redis-server")?;
    if !status.success() {
        bail!("redis-server exited with {status}");
    }
    if !wait_until(Duration::from_secs(10), redis_answers) {
        bail!("redis-server started but does not answer PING on {REDIS_ADDR} after 10 s");
    }
    println!("services: redis started on {REDIS_ADDR}");
    Ok(())
}

fn mongo_up(sh: &Shell) -> Result<()> {
    if std::env::var_os("MONGODB_URL").is_some() {
        println!("services: MONGODB_URL is set; not starting a local mongodb-compatible server");
        return Ok(());
    }
    if port_open(MONGO_ADDR) {
        println!("services: something already listens on {MONGO_ADDR}; using it");
        return Ok(());
    }
    mongo_venv(sh)?;
    // Absolute paths: the daemon changes its working directory to `/`.
    let data = sh.current_dir().join(MONGO_DATA);
    sh.create_dir(&data)?;
    let nx = sh.current_dir().join(MONGO_VENV).join("bin/nx-27017");
    let log_file = data.join("nx.log");
    let pid_file = data.join("nx.pid");
    // `-d` daemonizes: the server outlives this command, and `services down` stops it
    // through its pid file.
    cmd!(
        sh,
        "{nx} -d --data-dir {data} --host 127.0.0.1 -p 27017 --log-file {log_file} --pid-file {pid_file}"
    )
    .run()?;
    if !wait_until(Duration::from_secs(30), || port_open(MONGO_ADDR)) {
        let log = fs::read_to_string(&log_file).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        bail!(
            "nx-27017 does not accept connections on {MONGO_ADDR} after 30 s; last log lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    println!("services: mongodb-compatible server (nx-27017) started on {MONGO_ADDR}");
    Ok(())
}

/// Creates `target/mongo-venv` with the pinned packages, unless it already has them.
fn mongo_venv(sh: &Shell) -> Result<()> {
    let python = format!("{MONGO_VENV}/bin/python");
    let stamp = format!("{MONGO_VENV}/packages.installed");
    let wanted = MONGO_PACKAGES.join("\n");
    if sh.path_exists(format!("{MONGO_VENV}/bin/nx-27017"))
        && sh.read_file(&stamp).is_ok_and(|s| s == wanted)
    {
        return Ok(());
    }
    let system_python = ["python3", "python"]
        .into_iter()
        .find(|p| on_path(p))
        .context("no python3 on PATH: the mongodb-compatible server needs CPython 3.9 or later")?;
    if !sh.path_exists(&python) {
        cmd!(sh, "{system_python} -m venv {MONGO_VENV}").run()?;
    }
    let packages = MONGO_PACKAGES;
    cmd!(
        sh,
        "{python} -m pip install --quiet --disable-pip-version-check {packages...}"
    )
    .run()?;
    sh.write_file(&stamp, wanted)?;
    Ok(())
}

/// Whether `name` is an executable on PATH.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(name)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether Redis answers `PING` on 127.0.0.1:6379 (with `redis-cli` when installed,
/// else over a plain socket).
fn redis_answers() -> bool {
    if on_path("redis-cli") {
        return Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "ping"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "PONG");
    }
    raw_ping().unwrap_or(false)
}

fn raw_ping() -> Result<bool> {
    let addr: SocketAddr = REDIS_ADDR.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"PING\r\n")?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply)?;
    Ok(&reply == b"+PONG\r\n")
}

fn port_open(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok())
}

/// Polls `ready` every 200 ms until it holds or `limit` has passed.
fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        sleep(Duration::from_millis(200));
    }
}
