//! Load generators. Each runs a warm-up, then a measured window during which it counts completed requests and
//! samples the server's CPU time (and its own), and returns one JSON object.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::HandshakeKind;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::client::{self, Version, H1};
use crate::procfs::{self, Server};

/// Shared state of one measurement.
#[derive(Debug, Default)]
pub struct Window {
    pub(crate) measuring: AtomicBool,
    pub(crate) stop: AtomicBool,
    pub(crate) ok: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) bad_status: AtomicU64,
    resumed: AtomicU64,
    pub(crate) errors: Mutex<Vec<String>>,
}

impl Window {
    fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn fail(&self, error: &dyn std::fmt::Display) {
        if self.measuring() {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
            if errors.len() < 5 {
                errors.push(error.to_string());
            }
        }
    }

    /// Counts a failure whether or not the window is measuring.
    pub(crate) fn fail_always(&self, error: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if errors.len() < 5 {
            errors.push(error.to_owned());
        }
    }

    /// Counts a response whether or not the window is measuring.
    pub(crate) fn done_always(&self, status: u16) {
        if status == 200 {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.bad_status.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn done(&self, status: u16) {
        if self.measuring() {
            if status == 200 {
                self.ok.fetch_add(1, Ordering::Relaxed);
            } else {
                self.bad_status.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Timing of a measured window.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Warm-up before the window.
    pub warmup: Duration,
    /// The window.
    pub duration: Duration,
}

/// Waits out the warm-up, measures for the window, then tells every task to stop. Returns the window's JSON.
async fn measure(window: &Window, server: Server, timing: Timing) -> Value {
    tokio::time::sleep(timing.warmup).await;
    let (client0, server0, start) = (procfs::self_cpu(), server.cpu(), Instant::now());
    let steal = procfs::StealWindow::open(&server);
    window.measuring.store(true, Ordering::SeqCst);
    tokio::time::sleep(timing.duration).await;
    window.measuring.store(false, Ordering::SeqCst);
    let seconds = start.elapsed().as_secs_f64();
    let (client1, server1, steal_ms) = (procfs::self_cpu(), server.cpu(), steal.json());
    window.stop.store(true, Ordering::SeqCst);
    let ok = window.ok.load(Ordering::SeqCst);
    let server_cpu = server1 - server0;
    json!({
        "seconds": seconds,
        "ok": ok,
        "failed": window.failed.load(Ordering::SeqCst),
        "bad_status": window.bad_status.load(Ordering::SeqCst),
        "resumed": window.resumed.load(Ordering::SeqCst),
        "rate": ok as f64 / seconds,
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_op": if ok > 0 { server_cpu * 1e6 / ok as f64 } else { 0.0 },
        "server_core_util": server_cpu / seconds,
        "client_core_util": (client1 - client0) / seconds,
        "steal_ms": steal_ms,
        "errors": window.errors.lock().unwrap_or_else(PoisonError::into_inner).clone(),
    })
}

/// Where and what to request.
#[derive(Debug, Clone)]
pub struct Target {
    /// Server address.
    pub addr: SocketAddr,
    /// SNI names, used round robin (one name: always that one).
    pub snis: Vec<String>,
    /// `Host` header; the connection's SNI name when `None`.
    pub host: Option<String>,
    /// Request path.
    pub path: String,
}

impl Target {
    fn host_for<'a>(&'a self, sni: &'a str) -> &'a str {
        self.host.as_deref().unwrap_or(sni)
    }
}

/// Scenario 1: a new connection, a full TLS 1.3 handshake and one request per iteration; `concurrency` in flight.
pub async fn handshakes(target: Target, concurrency: usize, timing: Timing, server: Server) -> Value {
    let window = Arc::new(Window::default());
    let config = client::config(Version::Tls13, &[b"http/1.1"], None);
    let target = Arc::new(target);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (window, config, target, next) = (window.clone(), config.clone(), target.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let names: Vec<_> = target.snis.iter().map(|n| client::server_name(n)).collect();
            let requests: Vec<_> =
                target.snis.iter().map(|n| client::get_request(&target.path, target.host_for(n), true)).collect();
            let mut h1 = H1::default();
            while !window.stopped() {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % names.len();
                match one_connection(target.addr, &config, &names[i], &requests[i], &mut h1).await {
                    Ok((status, kind)) => {
                        if kind != Some(HandshakeKind::Full) && window.measuring() {
                            window.resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        window.done(status);
                    }
                    Err(error) => window.fail(&error),
                }
            }
        }));
    }
    let mut result = measure(&window, server, timing).await;
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    result["concurrency"] = json!(concurrency);
    result["names"] = json!(target.snis.len());
    result
}

async fn one_connection(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &rustls_pki_types::ServerName<'static>,
    request: &[u8],
    h1: &mut H1,
) -> io::Result<(u16, Option<HandshakeKind>)> {
    let mut tls = client::connect(addr, config, name.clone()).await?;
    let kind = tls.get_ref().1.handshake_kind();
    h1.clear();
    let response = h1.exchange(&mut tls, request).await?;
    let _ = tls.shutdown().await;
    Ok((response.status, kind))
}

/// Latencies in microseconds -> p50, p90, p99, p99.9, max (milliseconds).
fn percentiles(mut latencies: Vec<u32>) -> Value {
    if latencies.is_empty() {
        return json!(null);
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    json!({"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": at(1.0), "samples": latencies.len()})
}

/// Scenarios 2 and 4 (when wrk is not used) and the constant-rate latency run: `connections` keep-alive
/// HTTP/1.1 connections over TLS. Closed loop (as fast as responses come) unless `rate` (requests/s in all) is
/// given: then each connection sends on a fixed schedule and latency is counted from the scheduled instant when
/// the connection was behind (coordinated omission corrected, as wrk2 does), from the send otherwise.
pub async fn keepalive(target: Target, connections: usize, rate: Option<f64>, timing: Timing, server: Server) -> Value {
    let window = Arc::new(Window::default());
    let config = client::config(Version::Tls13, &[b"http/1.1"], None);
    let target = Arc::new(target);
    let start = Instant::now();
    let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
    let mut tasks = Vec::new();
    for i in 0..connections {
        let (window, config, target) = (window.clone(), config.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let sni = &target.snis[i % target.snis.len()];
            let name = client::server_name(sni);
            let request = client::get_request(&target.path, target.host_for(sni), false);
            let mut latencies = Vec::new();
            let mut next = interval.map(|iv| start + iv.mul_f64(i as f64 / connections as f64));
            'connect: while !window.stopped() {
                let mut tls = match client::connect(target.addr, &config, name.clone()).await {
                    Ok(tls) => tls,
                    Err(error) => {
                        window.fail(&error);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let mut h1 = H1::default();
                while !window.stopped() {
                    let sent = match next {
                        Some(at) if Instant::now() < at => {
                            tokio::time::sleep_until(at).await;
                            Instant::now()
                        }
                        Some(at) => at,
                        None => Instant::now(),
                    };
                    if let (Some(at), Some(iv)) = (next.as_mut(), interval) {
                        *at += iv;
                    }
                    match h1.exchange(&mut tls, &request).await {
                        Ok(response) => {
                            if window.measuring() {
                                latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            }
                            window.done(response.status);
                        }
                        Err(error) => {
                            window.fail(&error);
                            continue 'connect;
                        }
                    }
                }
            }
            latencies
        }));
    }
    let mut result = measure(&window, server, timing).await;
    let mut all = Vec::new();
    for task in tasks {
        if let Ok(Ok(latencies)) = tokio::time::timeout(Duration::from_secs(5), task).await {
            all.extend(latencies);
        }
    }
    result["latency"] = percentiles(all);
    result["connections"] = json!(connections);
    result["target_rate"] = json!(rate);
    result
}

/// Scenario 3 (when h2load is not used): `connections` HTTP/2 connections with `streams` concurrent requests
/// each.
pub async fn h2(target: Target, connections: usize, streams: usize, timing: Timing, server: Server) -> Value {
    let window = Arc::new(Window::default());
    let config = client::config(Version::Tls13, &[b"h2"], None);
    let sni = target.snis[0].clone();
    let uri: http::Uri = match format!("https://{}{}", target.host_for(&sni), target.path).parse() {
        Ok(uri) => uri,
        Err(error) => return json!({"error": format!("host or path: {error}")}),
    };
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let tls = match client::connect(target.addr, &config, client::server_name(&sni)).await {
            Ok(tls) => tls,
            Err(error) => return json!({"error": format!("connect: {error}")}),
        };
        let (sender, connection) =
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await {
                Ok(pair) => pair,
                Err(error) => return json!({"error": format!("h2 handshake: {error}")}),
            };
        tokio::spawn(connection);
        for _ in 0..streams {
            let (window, mut sender, uri) = (window.clone(), sender.clone(), uri.clone());
            tasks.push(tokio::spawn(async move {
                while !window.stopped() {
                    let request = http::Request::get(uri.clone())
                        .body(Empty::<Bytes>::new())
                        .expect("a GET with a parsed URI and no headers is always a valid request");
                    let result = async {
                        let response = sender.send_request(request).await?;
                        let status = response.status().as_u16();
                        response.into_body().collect().await?;
                        Ok::<_, hyper::Error>(status)
                    }
                    .await;
                    match result {
                        Ok(status) => window.done(status),
                        Err(error) => {
                            window.fail(&error);
                            return;
                        }
                    }
                }
            }));
        }
    }
    let mut result = measure(&window, server, timing).await;
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    result["connections"] = json!(connections);
    result["streams"] = json!(streams);
    result
}

/// Scenario 5: one keep-alive connection downloads `path` (the upstream's large body) through the proxy; server
/// CPU seconds per GiB.
pub async fn download(target: Target, server: Server) -> Value {
    let config = client::config(Version::Tls13, &[b"http/1.1"], None);
    let sni = target.snis[0].clone();
    let request = client::get_request(&target.path, target.host_for(&sni), false);
    let result = async {
        let mut tls = client::connect(target.addr, &config, client::server_name(&sni)).await?;
        let mut h1 = H1::default();
        let (client0, server0, start) = (procfs::self_cpu(), server.cpu(), Instant::now());
        let response = h1.exchange(&mut tls, &request).await?;
        let seconds = start.elapsed().as_secs_f64();
        let (client1, server1) = (procfs::self_cpu(), server.cpu());
        io::Result::Ok((response, seconds, server1 - server0, client1 - client0))
    }
    .await;
    match result {
        Ok((response, seconds, server_cpu, client_cpu)) => {
            let gib = response.body as f64 / (1u64 << 30) as f64;
            json!({
                "status": response.status,
                "bytes": response.body,
                "seconds": seconds,
                "mib_per_s": response.body as f64 / (1 << 20) as f64 / seconds,
                "server_cpu_s": server_cpu,
                "server_cpu_s_per_gib": if gib > 0.0 { server_cpu / gib } else { 0.0 },
                "server_core_util": server_cpu / seconds,
                "client_core_util": client_cpu / seconds,
            })
        }
        Err(error) => json!({"error": error.to_string()}),
    }
}

/// Scenario 6: opens `count` TLS connections (`parallel` at a time), each making one keep-alive request, holds
/// them idle and reports the server's RSS growth per connection.
pub async fn idle(target: Target, count: usize, parallel: usize, settle: Duration, server: Server) -> Value {
    let config = client::config(Version::Tls13, &[b"http/1.1"], None);
    let sni = target.snis[0].clone();
    let request = Arc::new(client::get_request(&target.path, target.host_for(&sni), false));
    let name = client::server_name(&sni);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = server.rss();
    let start = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = semaphore.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (config, name, request, addr) = (config.clone(), name.clone(), request.clone(), target.addr);
        tasks.push(tokio::spawn(async move {
            let result = async {
                let mut tls = client::connect(addr, &config, name).await?;
                let response = H1::default().exchange(&mut tls, &request).await?;
                io::Result::Ok((tls, response.status))
            }
            .await;
            drop(permit);
            result
        }));
    }
    let mut open = Vec::with_capacity(count);
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok((tls, 200))) => open.push(tls),
            Ok(Ok((_, status))) => errors.push(format!("status {status}")),
            Ok(Err(error)) => errors.push(error.to_string()),
            Err(error) => errors.push(error.to_string()),
        }
    }
    let opened_in = start.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let rss1 = server.rss();
    // Still open? A read that would block means yes; EOF or an error means the server closed it.
    let mut still_open = 0;
    let mut byte = [0u8; 1];
    for tls in &mut open {
        if tokio::time::timeout(Duration::ZERO, tls.read(&mut byte)).await.is_err() {
            still_open += 1;
        }
    }
    let failed = errors.len();
    errors.truncate(5);
    let growth = rss1 as f64 - rss0 as f64;
    json!({
        "connections": open.len(),
        "still_open": still_open,
        "failed": failed,
        "errors": errors,
        "opened_in_s": opened_in,
        "rss_before_mib": rss0 as f64 / 1048576.0,
        "rss_after_mib": rss1 as f64 / 1048576.0,
        "bytes_per_connection": if open.is_empty() { 0.0 } else { growth / open.len() as f64 },
    })
}

/// Whether a server resumes: two handshakes in a row with a client that keeps sessions, in TLS 1.3 and in TLS
/// 1.2. The load clients never offer a session; this shows the servers would not accept one either.
pub async fn probe_resumption(target: Target) -> Value {
    let sni = target.snis[0].clone();
    let mut out = json!({});
    for (label, version) in [("tls13", Version::Tls13), ("tls12", Version::Tls12)] {
        let store = Arc::new(client::CountingStore::default());
        let config = client::config(version, &[b"http/1.1"], Some(store.clone()));
        let request = client::get_request(&target.path, target.host_for(&sni), false);
        let mut kinds = Vec::new();
        let mut error = None;
        for _ in 0..2 {
            let result = async {
                let mut tls = client::connect(target.addr, &config, client::server_name(&sni)).await?;
                let kind = tls.get_ref().1.handshake_kind();
                // A request and its response: TLS 1.3 tickets arrive after the handshake.
                H1::default().exchange(&mut tls, &request).await?;
                let _ = tls.shutdown().await;
                io::Result::Ok(kind)
            }
            .await;
            match result {
                Ok(kind) => kinds.push(format!("{kind:?}")),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        out[label] = json!({
            "handshakes": kinds,
            "resumed": kinds.iter().any(|k| k.contains("Resumed")),
            "tls13_tickets_received": store.tls13_tickets.load(Ordering::SeqCst),
            "tls12_sessions_received": store.tls12_sessions.load(Ordering::SeqCst),
            "error": error,
        });
    }
    out
}

/// Waits until a TLS handshake and a request succeed (servers that have no readiness endpoint).
pub async fn wait_tls(target: Target, timeout: Duration) -> Result<(), String> {
    let config = client::config(Version::Tls13, &[b"http/1.1"], None);
    let sni = target.snis[0].clone();
    let request = client::get_request(&target.path, target.host_for(&sni), true);
    let deadline = Instant::now() + timeout;
    let mut h1 = H1::default();
    loop {
        match one_connection(target.addr, &config, &client::server_name(&sni), &request, &mut h1).await {
            Ok((200, _)) => return Ok(()),
            Ok((status, _)) if Instant::now() > deadline => return Err(format!("status {status}")),
            Err(error) if Instant::now() > deadline => return Err(error.to_string()),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
