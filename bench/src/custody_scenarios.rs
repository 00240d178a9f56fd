//! The scenarios only sealgate has (nginx and HAProxy have no custody export): 10,000 certificates (cold start,
//! memory, SNI spread, hot swap), hot swap under load, and retirement. Each spawns sealgate itself, pinned like
//! the other servers, and drives `sealgate custody` the way an operator would.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::client::{self, Version, H1};
use crate::load::{self, Target, Timing, Window};
use crate::procfs::Server;

/// How to run sealgate.
#[derive(Debug, Clone)]
pub struct Sealgate {
    /// The binary.
    pub bin: PathBuf,
    /// Its configuration.
    pub config: PathBuf,
    /// Its TLS listener.
    pub addr: SocketAddr,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    /// `taskset -c` list for the server, if pinning.
    pub cpus: Option<String>,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// A file to write its pid into (for `bench/run`'s clean-up trap).
    pub pidfile: Option<PathBuf>,
}

/// A running sealgate, stopped on drop.
pub struct Running {
    child: Child,
    pidfile: Option<PathBuf>,
}

impl Running {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pidfile) = &self.pidfile {
            let _ = std::fs::remove_file(pidfile);
        }
    }
}

impl Sealgate {
    /// Starts sealgate and returns at once.
    pub fn spawn(&self) -> io::Result<Running> {
        let mut command = match &self.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        command.arg("run").arg("--config").arg(&self.config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = command.spawn()?;
        if let Some(pidfile) = &self.pidfile {
            std::fs::write(pidfile, child.id().to_string())?;
        }
        Ok(Running { child, pidfile: self.pidfile.clone() })
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = plain_get(self.admin, "/readyz").await {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(format!("sealgate not ready after {timeout:?} (see {})", self.log.display()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// `sealgate custody --state STATE ARGS...`, waited for. Inherits this process's CPU affinity.
    fn custody(&self, state: &Path, args: &[&str]) -> Result<(), String> {
        let output = Command::new(&self.bin)
            .arg("custody")
            .arg("--state")
            .arg(state)
            .args(args)
            .output()
            .map_err(|e| format!("sealgate custody: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!("sealgate custody {args:?}: {}", String::from_utf8_lossy(&output.stderr).trim()))
        }
    }
}

/// A plain-HTTP GET (the admin endpoint): status and body.
pub async fn plain_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await?;
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The leaf certificate a handshake for `sni` presents (an error when the handshake is refused).
async fn leaf_of(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, sni: &str) -> io::Result<Vec<u8>> {
    let mut tls = client::connect(addr, config, client::server_name(sni)).await?;
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let _ = tls.shutdown().await;
    Ok(leaf)
}

/// Renews `certificate` with the custody tool, then polls handshakes for `sni` until one presents a leaf other
/// than the one served before. Milliseconds from the renewal command's completion.
async fn renew_and_wait(
    sealgate: &Sealgate,
    state: &Path,
    certificate: &str,
    sni: &str,
    config: &Arc<rustls::ClientConfig>,
) -> Result<(f64, f64), String> {
    let old = leaf_of(sealgate.addr, config, sni).await.map_err(|e| format!("before renewal: {e}"))?;
    let (sg, st, id) = (sealgate.clone(), state.to_owned(), certificate.to_owned());
    let started = Instant::now();
    tokio::task::spawn_blocking(move || sg.custody(&st, &["renew", &id])).await.map_err(|e| e.to_string())??;
    let written = Instant::now();
    let renew_ms = (written - started).as_secs_f64() * 1e3;
    loop {
        match leaf_of(sealgate.addr, config, sni).await {
            Ok(leaf) if leaf != old => return Ok(((written.elapsed()).as_secs_f64() * 1e3, renew_ms)),
            Ok(_) => {}
            Err(error) => return Err(format!("handshake refused during a renewal: {error}")),
        }
        if written.elapsed() > Duration::from_secs(30) {
            return Err("the new certificate was not served within 30 s".into());
        }
    }
}

fn ms_percentiles(values: &[f64]) -> Value {
    if values.is_empty() {
        return json!(null);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    json!({"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0), "n": v.len()})
}

/// Scenario 7: cold start to ready, RSS, handshakes/s for one name vs all names, hot swap of one certificate.
#[allow(clippy::too_many_arguments)]
pub async fn scale(
    sealgate: &Sealgate,
    state: &Path,
    count: usize,
    swaps: usize,
    pairs: usize,
    concurrency: usize,
    timing: Timing,
) -> Value {
    let start = Instant::now();
    let running = match sealgate.spawn() {
        Ok(running) => running,
        Err(error) => return json!({"error": format!("spawn: {error}")}),
    };
    let ready = match sealgate.wait_ready(Duration::from_secs(300)).await {
        Ok(_) => start.elapsed().as_secs_f64(),
        Err(error) => return json!({"error": error}),
    };
    let server = Server(Some(running.pid()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = server.rss() as f64 / 1048576.0;
    let one = Target { addr: sealgate.addr, snis: vec!["n0.bench.test".into()], host: None, path: "/".into() };
    let mut names: Vec<String> = (0..count).map(|i| format!("n{i}.bench.test")).collect();
    // A fixed shuffle, so that consecutive handshakes do not walk the table in order.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..names.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        names.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let spread = Target { snis: names, ..one.clone() };
    let (mut hs_one, mut hs_spread, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..pairs {
        for (target, out) in [(&one, &mut hs_one), (&spread, &mut hs_spread)] {
            let r = load::handshakes(target.clone(), concurrency, timing, server).await;
            failed += r["failed"].as_u64().unwrap_or(0) + r["bad_status"].as_u64().unwrap_or(0);
            out.push(r);
        }
    }
    let config = client::config(Version::Tls13, &[b"http/1.1"], None);
    let (mut swap_ms, mut renew_ms, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..swaps {
        match renew_and_wait(sealgate, state, "c-swap0", "swap0.bench.test", &config).await {
            Ok((served, renew)) => {
                swap_ms.push(served);
                renew_ms.push(renew);
            }
            Err(error) => errors.push(error),
        }
    }
    let rss_after = server.rss() as f64 / 1048576.0;
    drop(running);
    json!({
        "certificates": count,
        "ready_s": ready,
        "rss_mib": rss,
        "rss_after_swaps_mib": rss_after,
        "handshakes_one": hs_one,
        "handshakes_spread": hs_spread,
        "handshake_failures": failed,
        "swap_ms": swap_ms,
        "swap": ms_percentiles(&swap_ms),
        "renew_command_ms": ms_percentiles(&renew_ms),
        "errors": errors,
    })
}

/// Scenario 8: renew `c-hot0` every `interval` while keep-alive and new-connection clients use its name.
pub async fn swap_under_load(
    sealgate: &Sealgate,
    state: &Path,
    duration: Duration,
    interval: Duration,
    keepalive_connections: usize,
    new_connection_tasks: usize,
) -> Value {
    let running = match sealgate.spawn() {
        Ok(running) => running,
        Err(error) => return json!({"error": format!("spawn: {error}")}),
    };
    if let Err(error) = sealgate.wait_ready(Duration::from_secs(60)).await {
        return json!({"error": error});
    }
    let sni = "hot0.bench.test";
    let addr = sealgate.addr;
    let window = Arc::new(Window::default());
    window.measuring.store(true, Ordering::SeqCst);
    let config = client::config(Version::Tls13, &[b"http/1.1"], None);
    let mut tasks = Vec::new();
    for _ in 0..keepalive_connections {
        let (window, config) = (window.clone(), config.clone());
        tasks.push(tokio::spawn(async move {
            let request = client::get_request("/", sni, false);
            'connect: while !window.stop.load(Ordering::Relaxed) {
                let mut tls = match client::connect(addr, &config, client::server_name(sni)).await {
                    Ok(tls) => tls,
                    Err(error) => {
                        window.fail_always(&format!("keep-alive connect: {error}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let mut h1 = H1::default();
                while !window.stop.load(Ordering::Relaxed) {
                    match h1.exchange(&mut tls, &request).await {
                        Ok(response) => window.done_always(response.status),
                        Err(error) => {
                            window.fail_always(&format!("keep-alive request: {error}"));
                            continue 'connect;
                        }
                    }
                }
            }
        }));
    }
    for _ in 0..new_connection_tasks {
        let (window, config) = (window.clone(), config.clone());
        tasks.push(tokio::spawn(async move {
            let request = client::get_request("/", sni, true);
            let mut h1 = H1::default();
            while !window.stop.load(Ordering::Relaxed) {
                let result = async {
                    let mut tls = client::connect(addr, &config, client::server_name(sni)).await?;
                    h1.clear();
                    let response = h1.exchange(&mut tls, &request).await?;
                    let _ = tls.shutdown().await;
                    io::Result::Ok(response.status)
                }
                .await;
                match result {
                    Ok(status) => window.done_always(status),
                    Err(error) => window.fail_always(&format!("new connection: {error}")),
                }
            }
        }));
    }
    let start = Instant::now();
    let (mut swap_ms, mut errors, mut renewals) = (Vec::new(), Vec::new(), 0);
    let mut probes = Vec::new();
    let mut next = start + interval;
    while start.elapsed() < duration {
        tokio::time::sleep_until(next).await;
        next = (next + interval).max(Instant::now());
        let old = match leaf_of(addr, &config, sni).await {
            Ok(leaf) => leaf,
            Err(error) => {
                errors.push(format!("probe before renewal: {error}"));
                continue;
            }
        };
        let (sg, st) = (sealgate.clone(), state.to_owned());
        match tokio::task::spawn_blocking(move || sg.custody(&st, &["renew", "c-hot0"])).await {
            Ok(Ok(())) => renewals += 1,
            Ok(Err(error)) => {
                errors.push(error);
                continue;
            }
            Err(error) => {
                errors.push(error.to_string());
                continue;
            }
        }
        let written = Instant::now();
        let config = config.clone();
        probes.push(tokio::spawn(async move {
            loop {
                match leaf_of(addr, &config, sni).await {
                    Ok(leaf) if leaf != old => return Ok(written.elapsed().as_secs_f64() * 1e3),
                    Ok(_) => {}
                    Err(error) => return Err(format!("probe after renewal: {error}")),
                }
                if written.elapsed() > Duration::from_secs(10) {
                    return Err("new certificate not served within 10 s".to_owned());
                }
            }
        }));
    }
    for probe in probes {
        match probe.await {
            Ok(Ok(ms)) => swap_ms.push(ms),
            Ok(Err(error)) => errors.push(error),
            Err(error) => errors.push(error.to_string()),
        }
    }
    window.stop.store(true, Ordering::SeqCst);
    let seconds = start.elapsed().as_secs_f64();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    drop(running);
    errors.extend(window.errors.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned());
    errors.truncate(10);
    json!({
        "seconds": seconds,
        "renewals": renewals,
        "requests_ok": window.ok.load(Ordering::SeqCst),
        "failed": window.failed.load(Ordering::SeqCst),
        "bad_status": window.bad_status.load(Ordering::SeqCst),
        "swap_ms": swap_ms,
        "swap": ms_percentiles(&swap_ms),
        "keepalive_connections": keepalive_connections,
        "new_connection_tasks": new_connection_tasks,
        "errors": errors,
    })
}

/// Scenario 9: retires the grants of `c-ret0..count` one by one with `sealgate custody retire-grant`; for each,
/// the time from the grant file's change (its rename into place, seen by inotify) to the first refused
/// handshake for its name.
pub async fn retirement(sealgate: &Sealgate, state: &Path, export: &Path, count: usize) -> Value {
    let running = match sealgate.spawn() {
        Ok(running) => running,
        Err(error) => return json!({"error": format!("spawn: {error}")}),
    };
    if let Err(error) = sealgate.wait_ready(Duration::from_secs(60)).await {
        return json!({"error": error});
    }
    let changes: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = changes.clone();
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let now = Instant::now();
        if let Ok(event) = event {
            for path in event.paths {
                if let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".toml")) {
                    seen.lock().unwrap_or_else(PoisonError::into_inner).entry(stem.to_owned()).or_insert(now);
                }
            }
        }
    }) {
        Ok(watcher) => watcher,
        Err(error) => return json!({"error": format!("watcher: {error}")}),
    };
    if let Err(error) = watcher.watch(&export.join("grants"), RecursiveMode::NonRecursive) {
        return json!({"error": format!("watch: {error}")});
    }
    let config = client::config(Version::Tls13, &[b"http/1.1"], None);
    let addr = sealgate.addr;
    let (mut latencies, mut from_command, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..count {
        let certificate = format!("c-ret{k}");
        let sni = format!("ret{k}.bench.test");
        let grant = match sealgate::custody::writer::grant_id_of(&certificate, export) {
            Ok(Some(grant)) => grant,
            other => {
                errors.push(format!("{certificate}: no grant ({other:?})"));
                continue;
            }
        };
        if let Err(error) = leaf_of(addr, &config, &sni).await {
            errors.push(format!("{sni} not served before its retirement: {error}"));
            continue;
        }
        changes.lock().unwrap_or_else(PoisonError::into_inner).remove(&grant);
        let prober = {
            let (config, sni) = (config.clone(), sni.clone());
            tokio::spawn(async move {
                let start = Instant::now();
                loop {
                    if leaf_of(addr, &config, &sni).await.is_err() {
                        return Some(Instant::now());
                    }
                    if start.elapsed() > Duration::from_secs(10) {
                        return None;
                    }
                }
            })
        };
        let (sg, st, g) = (sealgate.clone(), state.to_owned(), grant.clone());
        let command = tokio::task::spawn_blocking(move || sg.custody(&st, &["retire-grant", &g])).await;
        let done = Instant::now();
        if let Err(error) = command.map_err(|e| e.to_string()).and_then(|r| r) {
            errors.push(error);
            prober.abort();
            continue;
        }
        let refused = match prober.await {
            Ok(Some(at)) => at,
            _ => {
                errors.push(format!("{sni}: still served 10 s after its grant was retired"));
                continue;
            }
        };
        let changed = changes.lock().unwrap_or_else(PoisonError::into_inner).get(&grant).copied();
        match changed {
            Some(changed) => latencies.push(refused.saturating_duration_since(changed).as_secs_f64() * 1e3),
            None => errors.push(format!("{grant}: no file event seen")),
        }
        from_command.push(refused.saturating_duration_since(done).as_secs_f64() * 1e3);
    }
    let metrics = plain_get(sealgate.admin, "/metrics").await.map(|(_, body)| body).unwrap_or_default();
    let metric = |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok());
    let internal =
        match (metric("sealgate_grant_retirement_seconds_sum"), metric("sealgate_grant_retirement_seconds_count")) {
            (Some(sum), Some(n)) if n > 0.0 => json!(sum / n * 1e3),
            _ => json!(null),
        };
    drop(running);
    errors.truncate(10);
    json!({
        "retirements": latencies.len(),
        "latency_ms": latencies,
        "latency": ms_percentiles(&latencies),
        "from_command_completion": ms_percentiles(&from_command),
        "sealgate_metric_mean_ms": internal,
        "errors": errors,
    })
}
