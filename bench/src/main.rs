//! `sgbench`: the tools behind `bench/run` (see bench/README.md). Every measuring subcommand prints one JSON line:
//! the `--tag`s given, `tool`, and `result`.

mod client;
mod custody_scenarios;
mod export;
mod load;
mod procfs;
mod report;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};

use crate::custody_scenarios::Sealgate;
use crate::load::{Target, Timing};
use crate::procfs::Server;

#[derive(Debug, Parser)]
#[command(name = "sgbench", about = "Benchmark tools for sealgate (driven by bench/run)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args, Clone)]
struct Common {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// SNI name (repeatable: used round robin).
    #[arg(long, default_value = "bench.test", value_parser = client::parse_sni)]
    sni: Vec<String>,
    /// `Host` header (default: the SNI name).
    #[arg(long)]
    host: Option<String>,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// The server's root process: its CPU time and RSS are sampled with its descendants'.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Warm-up seconds before the measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// `key=value` added to the output line (scenario, server, round).
    #[arg(long)]
    tag: Vec<String>,
}

impl Common {
    fn target(&self) -> Target {
        Target { addr: self.addr, snis: self.sni.clone(), host: self.host.clone(), path: self.path.clone() }
    }
    fn timing(&self) -> Timing {
        Timing { warmup: Duration::from_secs_f64(self.warmup), duration: Duration::from_secs_f64(self.duration) }
    }
    fn server(&self) -> Server {
        Server(self.server_pid)
    }
}

#[derive(Debug, Args, Clone)]
struct SealgateArgs {
    /// The sealgate binary.
    #[arg(long)]
    sealgate: PathBuf,
    /// Its configuration.
    #[arg(long)]
    config: PathBuf,
    /// Its admin endpoint (for /readyz).
    #[arg(long)]
    admin: SocketAddr,
    /// The custody state directory the export was written from.
    #[arg(long)]
    state: PathBuf,
    /// `taskset -c` CPU list for sealgate (none: not pinned).
    #[arg(long)]
    cpus: Option<String>,
    /// Where sealgate's stderr goes.
    #[arg(long)]
    log: PathBuf,
    /// A file to hold sealgate's pid while it runs.
    #[arg(long)]
    pidfile: Option<PathBuf>,
}

impl SealgateArgs {
    fn sealgate(&self, addr: SocketAddr) -> Sealgate {
        Sealgate {
            bin: self.sealgate.clone(),
            config: self.config.clone(),
            addr,
            admin: self.admin,
            cpus: self.cpus.clone(),
            log: self.log.clone(),
            pidfile: self.pidfile.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The HTTP/1.1 upstream (runs until killed).
    Upstream {
        #[arg(long)]
        addr: SocketAddr,
        /// Size of the `/big` body.
        #[arg(long, default_value_t = 1 << 30)]
        big_bytes: u64,
    },
    /// The benchmark certificate: ca.pem, leaf.pem, leaf.key, haproxy.pem.
    GenCert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "bench.test")]
        name: String,
    },
    /// Writes (or keeps, when already written) the export with many certificates.
    ExportScale {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        export: PathBuf,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        swaps: usize,
        #[arg(long)]
        grantee: String,
        #[arg(long)]
        marker: PathBuf,
    },
    /// A fresh custody state and export with `count` certificates c-PREFIX<k>, each under its own grant.
    ExportManaged {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        export: PathBuf,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        grantee: String,
    },
    /// Prints N free loopback TCP ports.
    FreePorts { n: usize },
    /// Waits until a TLS handshake and a request succeed.
    WaitTls {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Scenario 1: full handshakes, a new connection per request.
    Handshake {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
    },
    /// Keep-alive HTTP/1.1: closed loop, or at a constant `--rate`.
    Keepalive {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 50)]
        connections: usize,
        #[arg(long)]
        rate: Option<f64>,
    },
    /// HTTP/2: connections × concurrent streams.
    H2 {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 16)]
        streams: usize,
    },
    /// Scenario 5: one large download.
    Download {
        #[command(flatten)]
        common: Common,
    },
    /// Scenario 6: RSS growth per idle TLS connection.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        parallel: usize,
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
    /// Whether the server resumes sessions (TLS 1.3 and 1.2).
    Probe {
        #[command(flatten)]
        common: Common,
    },
    /// Runs wrk or h2load, sampling the server's CPU time around it, and parses its output.
    Exec {
        #[command(flatten)]
        common: Common,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Scenario 7: many certificates (sealgate only).
    Scale {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sealgate: SealgateArgs,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 10)]
        swaps: usize,
        #[arg(long, default_value_t = 1)]
        pairs: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
    },
    /// Scenario 8: hot swap under load (sealgate only).
    Swapload {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sealgate: SealgateArgs,
        #[arg(long, default_value_t = 100.0)]
        interval_ms: f64,
        #[arg(long, default_value_t = 16)]
        keepalive: usize,
        #[arg(long, default_value_t = 8)]
        new_connections: usize,
    },
    /// Scenario 9: retirement latency (sealgate only).
    Retire {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sealgate: SealgateArgs,
        #[arg(long)]
        export: PathBuf,
        #[arg(long, default_value_t = 50)]
        count: usize,
    },
    /// Prints the median of `result.FIELD` over a scenario's measurements for one server (nothing if none).
    Median {
        #[arg(long)]
        raw: PathBuf,
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        server: String,
        #[arg(long, default_value = "rate")]
        field: String,
    },
    /// Writes latest.md and latest.svg from raw.jsonl and meta.json.
    Report {
        #[arg(long)]
        raw: PathBuf,
        #[arg(long)]
        meta: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn emit(tags: &[String], tool: &str, result: Value) {
    let mut line = Map::new();
    for tag in tags {
        if let Some((k, v)) = tag.split_once('=') {
            let value = v.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::from(v));
            line.insert(k.to_owned(), value);
        }
    }
    line.insert("tool".into(), tool.into());
    line.insert("result".into(), result);
    println!("{}", Value::Object(line));
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sgbench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Upstream { addr, big_bytes } => runtime()?.block_on(upstream::serve(addr, big_bytes))?,
        Command::GenCert { dir, name } => export::gen_cert(&dir, &name)?,
        Command::ExportScale { state, export, count, swaps, grantee, marker } => {
            let start = std::time::Instant::now();
            let written = export::scale(&state, &export, count, swaps, &grantee, &marker)?;
            if written {
                eprintln!("wrote {count} certificates in {:.1} s", start.elapsed().as_secs_f64());
            }
        }
        Command::ExportManaged { state, export, prefix, count, grantee } => {
            export::managed(&state, &export, &prefix, count, &grantee)?
        }
        Command::FreePorts { n } => {
            let listeners: Vec<_> =
                (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
            for l in &listeners {
                println!("{}", l.local_addr()?.port());
            }
        }
        Command::WaitTls { common, timeout } => {
            runtime()?.block_on(load::wait_tls(common.target(), Duration::from_secs_f64(timeout)))?
        }
        Command::Handshake { common, concurrency } => {
            let result =
                runtime()?.block_on(load::handshakes(common.target(), concurrency, common.timing(), common.server()));
            emit(&common.tag, "sgbench", result);
        }
        Command::Keepalive { common, connections, rate } => {
            let result = runtime()?.block_on(load::keepalive(
                common.target(),
                connections,
                rate,
                common.timing(),
                common.server(),
            ));
            emit(&common.tag, "sgbench", result);
        }
        Command::H2 { common, connections, streams } => {
            let result =
                runtime()?.block_on(load::h2(common.target(), connections, streams, common.timing(), common.server()));
            emit(&common.tag, "sgbench", result);
        }
        Command::Download { common } => {
            let result = runtime()?.block_on(load::download(common.target(), common.server()));
            emit(&common.tag, "sgbench", result);
        }
        Command::Idle { common, count, parallel, settle } => {
            let result = runtime()?.block_on(load::idle(
                common.target(),
                count,
                parallel,
                Duration::from_secs_f64(settle),
                common.server(),
            ));
            emit(&common.tag, "sgbench", result);
        }
        Command::Probe { common } => {
            let result = runtime()?.block_on(load::probe_resumption(common.target()));
            emit(&common.tag, "sgbench", result);
        }
        Command::Exec { common, command } => {
            let (tool, result) = exec(&command, common.server())?;
            emit(&common.tag, &tool, result);
        }
        Command::Scale { common, sealgate, count, swaps, pairs, concurrency } => {
            let result = runtime()?.block_on(custody_scenarios::scale(
                &sealgate.sealgate(common.addr),
                &sealgate.state,
                count,
                swaps,
                pairs,
                concurrency,
                common.timing(),
            ));
            emit(&common.tag, "sgbench", result);
        }
        Command::Swapload { common, sealgate, interval_ms, keepalive, new_connections } => {
            let result = runtime()?.block_on(custody_scenarios::swap_under_load(
                &sealgate.sealgate(common.addr),
                &sealgate.state,
                Duration::from_secs_f64(common.duration),
                Duration::from_secs_f64(interval_ms / 1e3),
                keepalive,
                new_connections,
            ));
            emit(&common.tag, "sgbench", result);
        }
        Command::Retire { common, sealgate, export, count } => {
            let result = runtime()?.block_on(custody_scenarios::retirement(
                &sealgate.sealgate(common.addr),
                &sealgate.state,
                &export,
                count,
            ));
            emit(&common.tag, "sgbench", result);
        }
        Command::Median { raw, scenario, server, field } => {
            if let Some(median) = report::median_of(&raw, &scenario, &server, &field)? {
                println!("{median}");
            }
        }
        Command::Report { raw, meta, out } => report::write(&raw, &meta, &out)?,
    }
    Ok(())
}

/// Seconds from wrk's `1.23ms`-style figures.
fn seconds(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        _ => return None,
    })
}

/// Runs wrk or h2load and turns its output into the same shape as ours.
fn exec(command: &[String], server: Server) -> Result<(String, Value), Box<dyn std::error::Error>> {
    let tool = std::path::Path::new(&command[0]).file_name().and_then(|n| n.to_str()).unwrap_or("?").to_owned();
    let (server0, children0, start) = (server.cpu(), procfs::children_cpu_seconds(), std::time::Instant::now());
    let steal = procfs::StealWindow::open(&server);
    let output = std::process::Command::new(&command[0]).args(&command[1..]).output()?;
    let wall = start.elapsed().as_secs_f64();
    let (server1, children1, steal_ms) = (server.cpu(), procfs::children_cpu_seconds(), steal.json());
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut result = json!({
        "command": command.join(" "),
        "exit": output.status.code(),
        "server_cpu_s": server1 - server0,
        "server_core_util": (server1 - server0) / wall,
        "client_core_util": (children1 - children0) / wall,
        "steal_ms": steal_ms,
    });
    let field = |line: &str, prefix: &str| line.trim().strip_prefix(prefix).map(|r| r.trim().to_owned());
    match tool.as_str() {
        "wrk" => {
            let mut failed = 0.0;
            for line in text.lines() {
                if let Some(v) = line.trim().split_once(" requests in ").map(|(n, _)| n.to_owned()) {
                    result["requests"] = json!(v.parse::<f64>().ok());
                } else if let Some(v) = field(line, "Requests/sec:") {
                    result["rate"] = json!(v.parse::<f64>().ok());
                } else if let Some(v) = field(line, "Non-2xx or 3xx responses:") {
                    result["bad_status"] = json!(v.parse::<f64>().unwrap_or(0.0));
                } else if let Some(v) = field(line, "Socket errors:") {
                    failed +=
                        v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<f64>().ok()).sum::<f64>();
                } else if let Some(v) = field(line, "Latency") {
                    if let Some(avg) = v.split_whitespace().next().and_then(seconds) {
                        result["latency_avg_ms"] = json!(avg * 1e3);
                    }
                } else if let Some(v) = field(line, "99%") {
                    result["latency"]["p99_ms"] = json!(seconds(&v).map(|s| s * 1e3));
                } else if let Some(v) = field(line, "50%") {
                    result["latency"]["p50_ms"] = json!(seconds(&v).map(|s| s * 1e3));
                }
            }
            result["failed"] = json!(failed);
        }
        "h2load" => {
            for line in text.lines() {
                if let Some(v) = field(line, "finished in") {
                    // "5.00s, 12345.67 req/s, 1.2MB/s"
                    if let Some(rate) = v.split(',').nth(1).and_then(|p| p.split_whitespace().next()) {
                        result["rate"] = json!(rate.parse::<f64>().ok());
                    }
                } else if let Some(v) = field(line, "requests:") {
                    let count = |what: &str| {
                        v.split(',').find_map(|p| {
                            let mut words = p.split_whitespace();
                            let n = words.next()?.parse::<f64>().ok()?;
                            (words.next()? == what).then_some(n)
                        })
                    };
                    result["failed"] = json!(count("failed").unwrap_or(0.0) + count("errored").unwrap_or(0.0));
                    result["succeeded"] = json!(count("succeeded"));
                    result["requests"] = json!(count("done"));
                } else if let Some(v) = field(line, "status codes:") {
                    let non2xx: f64 = v
                        .split(',')
                        .filter_map(|p| {
                            let mut words = p.split_whitespace();
                            let n = words.next()?.parse::<f64>().ok()?;
                            (words.next()? != "2xx").then_some(n)
                        })
                        .sum();
                    result["bad_status"] = json!(non2xx);
                }
            }
        }
        _ => {}
    }
    // Both tools count every response in their rate: keep the successful ones only.
    if let (Some(rate), Some(total)) = (result["rate"].as_f64(), result["requests"].as_f64()) {
        let bad = result["bad_status"].as_f64().unwrap_or(0.0)
            + if tool == "h2load" { result["failed"].as_f64().unwrap_or(0.0) } else { 0.0 };
        if total > 0.0 && bad > 0.0 {
            result["rate_all_responses"] = json!(rate);
            result["rate"] = json!(rate * (total - bad).max(0.0) / total);
        }
    }
    if result["rate"].is_null() {
        result["error"] = json!(format!(
            "no rate in {tool}'s output: {} {}",
            text.lines().last().unwrap_or(""),
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
        ));
    }
    Ok((tool, result))
}
