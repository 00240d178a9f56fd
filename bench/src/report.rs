//! `results/latest.md` and `results/latest.svg` from the raw measurements of one run (`raw.jsonl`, one JSON object
//! per measurement: `scenario`, `server`, `round`, `tool`, `result`) and its conditions (`meta.json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SERVERS: [&str; 3] = ["sealgate", "nginx", "haproxy"];

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn pick(value: &Value, path: &str) -> Option<f64> {
    // Derived: the server's CPU time per request, which still compares the servers when the load generator,
    // not the server, set the rate (a faster machine than the generator's single core can load).
    if path == "server_cpu_us_per_request" {
        let requests = pick(value, "requests").filter(|&n| n > 0.0)?;
        return Some(pick(value, "server_cpu_s")? * 1e6 / requests);
    }
    let mut v = value;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    v.as_f64()
}

fn fmt(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) if v.abs() >= 100.0 && digits <= 1 => format!("{v:.0}"),
        Some(v) => format!("{v:.digits$}"),
        None => "—".to_owned(),
    }
}

/// A metric compared across servers.
struct Metric {
    scenario: &'static str,
    label: &'static str,
    path: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    digits: usize,
}

const METRICS: &[Metric] = &[
    Metric {
        scenario: "handshake",
        label: "1. full TLS 1.3 handshakes/s",
        path: "rate",
        unit: "/s",
        higher_is_better: true,
        digits: 0,
    },
    Metric {
        scenario: "handshake",
        label: "1. server CPU per handshake",
        path: "server_cpu_us_per_op",
        unit: "µs",
        higher_is_better: false,
        digits: 1,
    },
    Metric {
        scenario: "keepalive",
        label: "2. keep-alive HTTP/1.1 req/s (50 conns)",
        path: "rate",
        unit: "/s",
        higher_is_better: true,
        digits: 0,
    },
    Metric {
        scenario: "keepalive",
        label: "2. server CPU per keep-alive request",
        path: "server_cpu_us_per_request",
        unit: "µs",
        higher_is_better: false,
        digits: 2,
    },
    Metric {
        scenario: "latency",
        label: "2. p50 at constant rate",
        path: "latency.p50_ms",
        unit: "ms",
        higher_is_better: false,
        digits: 3,
    },
    Metric {
        scenario: "latency",
        label: "2. p99 at constant rate",
        path: "latency.p99_ms",
        unit: "ms",
        higher_is_better: false,
        digits: 3,
    },
    Metric {
        scenario: "h2",
        label: "3. HTTP/2 req/s (16 conns × 16 streams)",
        path: "rate",
        unit: "/s",
        higher_is_better: true,
        digits: 0,
    },
    Metric {
        scenario: "h2",
        label: "3. server CPU per HTTP/2 request",
        path: "server_cpu_us_per_request",
        unit: "µs",
        higher_is_better: false,
        digits: 2,
    },
    Metric {
        scenario: "proxied",
        label: "4. proxied keep-alive req/s",
        path: "rate",
        unit: "/s",
        higher_is_better: true,
        digits: 0,
    },
    Metric {
        scenario: "proxied",
        label: "4. server CPU per proxied request",
        path: "server_cpu_us_per_request",
        unit: "µs",
        higher_is_better: false,
        digits: 2,
    },
    Metric {
        scenario: "bulk",
        label: "5. server CPU per GiB downloaded",
        path: "server_cpu_s_per_gib",
        unit: "s",
        higher_is_better: false,
        digits: 3,
    },
    Metric {
        scenario: "idle",
        label: "6. memory per idle TLS connection",
        path: "bytes_per_connection",
        unit: "KiB",
        higher_is_better: false,
        digits: 1,
    },
];

/// A target: the metric, whom it compares with, and the bound on the ratio.
struct Target {
    /// The label of the metric in [`METRICS`].
    metric: &'static str,
    against: Against,
    bound: f64,
    text: &'static str,
}

#[derive(Clone, Copy, PartialEq)]
enum Against {
    Nginx,
    Haproxy,
    FasterOfBoth,
}

const TARGETS: &[Target] = &[
    Target {
        metric: "1. full TLS 1.3 handshakes/s",
        against: Against::Nginx,
        bound: 1.8,
        text: "handshakes/s ≥ 1.8× nginx",
    },
    Target {
        metric: "1. full TLS 1.3 handshakes/s",
        against: Against::Haproxy,
        bound: 1.5,
        text: "handshakes/s ≥ 1.5× HAProxy",
    },
    Target {
        metric: "1. server CPU per handshake",
        against: Against::Nginx,
        bound: 0.55,
        text: "CPU per handshake ≤ 0.55× nginx",
    },
    Target {
        metric: "2. keep-alive HTTP/1.1 req/s (50 conns)",
        against: Against::Nginx,
        bound: 1.1,
        text: "keep-alive req/s ≥ 1.1× nginx",
    },
    Target {
        metric: "2. p99 at constant rate",
        against: Against::Nginx,
        bound: 1.0,
        text: "p99 at the constant rate ≤ nginx's",
    },
    Target {
        metric: "3. HTTP/2 req/s (16 conns × 16 streams)",
        against: Against::FasterOfBoth,
        bound: 1.0,
        text: "h2 req/s ≥ 1.0× the faster of nginx and HAProxy",
    },
    Target {
        metric: "4. proxied keep-alive req/s",
        against: Against::Nginx,
        bound: 1.0,
        text: "proxied req/s ≥ 1.0× nginx",
    },
    Target {
        metric: "5. server CPU per GiB downloaded",
        against: Against::Nginx,
        bound: 0.9,
        text: "bulk CPU per GiB ≤ 0.9× nginx",
    },
    Target {
        metric: "6. memory per idle TLS connection",
        against: Against::Nginx,
        bound: 0.5,
        text: "idle connection memory ≤ 0.5× nginx",
    },
];

/// The metric with `label`.
fn metric_labelled(label: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.label == label)
}

struct Data {
    records: Vec<Value>,
}

impl Data {
    fn results(&self, scenario: &str, server: &str) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r["scenario"] == scenario && r["server"] == server)
            .map(|r| &r["result"])
            .collect()
    }

    fn values(&self, metric: &Metric, server: &str) -> Vec<f64> {
        let scale = if metric.unit == "KiB" { 1.0 / 1024.0 } else { 1.0 };
        self.results(metric.scenario, server).iter().filter_map(|r| pick(r, metric.path)).map(|v| v * scale).collect()
    }

    fn median(&self, metric: &Metric, server: &str) -> Option<f64> {
        median(&self.values(metric, server))
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

fn judge(value: Option<f64>, bound: f64, at_least: bool) -> &'static str {
    match value {
        None => "n/a",
        Some(v) if (at_least && v >= bound) || (!at_least && v <= bound) => "PASS",
        Some(_) => "FAIL",
    }
}

/// The median of `result.<path>` over the measurements of `scenario` for `server` in `raw` (`bench/run` bases the
/// constant rate of the latency runs on it).
pub fn median_of(raw: &Path, scenario: &str, server: &str, path: &str) -> Result<Option<f64>> {
    let mut values = Vec::new();
    for line in std::fs::read_to_string(raw)?.lines().filter(|l| !l.trim().is_empty()) {
        let record: Value = serde_json::from_str(line)?;
        if record["scenario"] == scenario && record["server"] == server {
            values.extend(pick(&record["result"], path));
        }
    }
    Ok(median(&values))
}

/// Writes `latest.md` and `latest.svg` into `out`.
pub fn write(raw: &Path, meta: &Path, out: &Path) -> Result<()> {
    let records: Vec<Value> = std::fs::read_to_string(raw)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(meta)?)?;
    let data = Data { records };
    let mut md = String::new();
    let servers: Vec<&str> =
        SERVERS.iter().copied().filter(|s| data.records.iter().any(|r| r["server"] == *s)).collect();

    writeln!(md, "# sealgate benchmark results\n")?;
    writeln!(
        md,
        "Generated by `bench/run {}` on {}. Medians over {} round(s); within a round, each scenario ran every server in turn, in an order rotated from round to round. \
         See `bench/README.md` for how each figure is measured and what is held equal.\n",
        meta["args"].as_str().unwrap_or(""),
        meta["date"].as_str().unwrap_or("?"),
        meta["rounds"].as_u64().unwrap_or(0)
    )?;

    writeln!(md, "## Conditions\n")?;
    writeln!(md, "| | |\n|---|---|")?;
    for (key, label) in [
        ("mode", "mode"),
        ("load_before", "load average before the run (1/5/15 min)"),
        ("load_after", "load average after the run"),
        ("cpu_steal", "CPU time stolen by the hypervisor (`/proc/stat` steal)"),
        ("cpu_model", "CPU"),
        ("cpus", "cores"),
        ("kernel", "kernel"),
        ("pinning", "pinning"),
        ("sealgate_rev", "sealgate"),
        ("rustc", "rustc"),
        ("nginx", "nginx"),
        ("nginx_openssl", "nginx's OpenSSL"),
        ("haproxy", "HAProxy"),
        ("haproxy_openssl", "HAProxy's OpenSSL"),
        ("wrk", "wrk"),
        ("h2load", "h2load"),
        ("profile", "cargo profile"),
        ("sealgate_locked", "sealgate's locked memory at start (VmLck; `[process] lock_memory`, default on)"),
    ] {
        if let Some(v) = meta.get(key).and_then(|v| v.as_str()) {
            writeln!(md, "| {label} | {} |", v.replace('|', "\\|"))?;
        }
    }
    if let Some(flags) = meta["cpu_flags"].as_str() {
        writeln!(md, "\n<details><summary>CPU flags</summary>\n\n```\n{flags}\n```\n</details>")?;
    }
    if let Some(note) = meta["note"].as_str() {
        writeln!(md, "\n**Load conditions:** {note}")?;
    }
    writeln!(md)?;

    // Targets.
    writeln!(md, "## Targets (issue 4)\n")?;
    writeln!(md, "| target | sealgate | compared with | ratio | result |\n|---|---|---|---|---|")?;
    let mut chart: Vec<Row> = Vec::new();
    for target in TARGETS {
        let Some(metric) = metric_labelled(target.metric) else { continue };
        let sg = data.median(metric, "sealgate");
        let (other, who) = match target.against {
            Against::Nginx => (data.median(metric, "nginx"), "nginx".to_owned()),
            Against::Haproxy => (data.median(metric, "haproxy"), "HAProxy".to_owned()),
            Against::FasterOfBoth => {
                let n = data.median(metric, "nginx");
                let h = data.median(metric, "haproxy");
                match (n, h) {
                    (Some(n), Some(h)) if h > n => (Some(h), "HAProxy (faster)".to_owned()),
                    (Some(n), _) => (Some(n), "nginx (faster)".to_owned()),
                    (None, Some(h)) => (Some(h), "HAProxy".to_owned()),
                    _ => (None, "—".to_owned()),
                }
            }
        };
        let r = ratio(sg, other);
        writeln!(
            md,
            "| {} | {} {} | {} {} | {} | {} |",
            target.text,
            fmt(sg, metric.digits),
            metric.unit,
            fmt(other, metric.digits),
            who,
            fmt(r, 2),
            judge(r, target.bound, metric.higher_is_better)
        )?;
    }
    // Sealgate-only targets.
    let scale = data.results("scale", "sealgate");
    let ready = median(&scale.iter().filter_map(|r| pick(r, "ready_s")).collect::<Vec<_>>());
    let rss = median(&scale.iter().filter_map(|r| pick(r, "rss_mib")).collect::<Vec<_>>());
    let collect_rates = |key: &str| -> Vec<f64> {
        scale
            .iter()
            .flat_map(|r| r[key].as_array().cloned().unwrap_or_default())
            .filter_map(|h| h["rate"].as_f64())
            .collect()
    };
    let (one, spread) = (median(&collect_rates("handshakes_one")), median(&collect_rates("handshakes_spread")));
    let swaps: Vec<f64> = scale
        .iter()
        .flat_map(|r| r["swap_ms"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .collect();
    let swap_p50 = median(&swaps);
    let swap_p99 = quantile(&swaps, 0.99);
    let count = scale.iter().filter_map(|r| r["certificates"].as_u64()).next();
    let load = data.results("swapload", "sealgate");
    let failed: Option<f64> = if load.is_empty() {
        None
    } else {
        Some(load.iter().map(|r| pick(r, "failed").unwrap_or(0.0) + pick(r, "bad_status").unwrap_or(0.0)).sum())
    };
    let load_swaps: Vec<f64> = load
        .iter()
        .flat_map(|r| r["swap_ms"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .collect();
    let retire = data.results("retire", "sealgate");
    let retirements: Vec<f64> = retire
        .iter()
        .flat_map(|r| r["latency_ms"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .collect();
    let retire_p99 = quantile(&retirements, 0.99);
    let certs = count.map_or("?".to_owned(), |c| c.to_string());
    for (text, value, unit, bound, at_least) in [
        (format!("{certs} certificates: ready ≤ 2 s"), ready, "s", 2.0, false),
        (format!("{certs} certificates: RSS ≤ 150 MiB"), rss, "MiB", 150.0, false),
        (
            format!("{certs} certificates: handshakes/s (SNI over all names) ≥ 0.95× one certificate"),
            ratio(spread, one),
            "×",
            0.95,
            true,
        ),
        (format!("{certs} certificates: one swap ≤ 50 ms (median)"), swap_p50, "ms", 50.0, false),
        ("hot swap under load: 0 failed requests".to_owned(), failed, "", 0.0, false),
        ("retirement p99 ≤ 50 ms".to_owned(), retire_p99, "ms", 50.0, false),
    ] {
        writeln!(md, "| {text} | {} {unit} | (sealgate only) | | {} |", fmt(value, 3), judge(value, bound, at_least))?;
    }
    writeln!(md)?;

    // Absolute figures.
    writeln!(md, "## Scenarios 1–6: absolute figures (medians)\n")?;
    write!(md, "| metric |")?;
    for s in &servers {
        write!(md, " {s} |")?;
    }
    writeln!(md, " sealgate/nginx | sealgate/HAProxy | better |")?;
    writeln!(md, "|---|{}---|---|---|", "---|".repeat(servers.len()))?;
    for metric in METRICS {
        write!(md, "| {} ({}) |", metric.label, metric.unit)?;
        for s in &servers {
            write!(md, " {} |", fmt(data.median(metric, s), metric.digits))?;
        }
        let sg = data.median(metric, "sealgate");
        let rn = ratio(sg, data.median(metric, "nginx"));
        let rh = ratio(sg, data.median(metric, "haproxy"));
        writeln!(
            md,
            " {} | {} | {} |",
            fmt(rn, 2),
            fmt(rh, 2),
            if metric.higher_is_better { "higher" } else { "lower" }
        )?;
        let targets = TARGETS.iter().filter(|t| t.metric == metric.label).map(|t| t.bound).collect();
        chart.push(Row {
            label: metric.label.to_owned(),
            bars: [rn, rh, None],
            targets,
            higher: metric.higher_is_better,
        });
    }
    writeln!(md)?;
    let rate = data.records.iter().find(|r| r["scenario"] == "latency").and_then(|r| pick(&r["result"], "target_rate"));
    let basis = meta["latency_rate_basis"].as_str().unwrap_or("nginx");
    writeln!(
        md,
        "Constant rate for the latency run: {} req/s (half of {basis}'s median keep-alive maximum).\n",
        fmt(rate, 0)
    )?;

    // Per-round detail.
    writeln!(md, "### Every measurement\n")?;
    writeln!(
        md,
        "| scenario | server | round | tool | figure | server core use | load generator core use | notes |\n|---|---|---|---|---|---|---|---|"
    )?;
    for r in &data.records {
        let scenario = r["scenario"].as_str().unwrap_or("");
        if ["scale", "swapload", "retire", "resumption"].contains(&scenario) {
            continue;
        }
        let result = &r["result"];
        let metric = METRICS.iter().find(|m| m.scenario == scenario);
        let figure = match scenario {
            "handshake" => format!(
                "{} /s, {} µs CPU each",
                fmt(pick(result, "rate"), 0),
                fmt(pick(result, "server_cpu_us_per_op"), 1)
            ),
            "latency" => format!(
                "p50 {} ms, p99 {} ms at {} req/s (achieved {})",
                fmt(pick(result, "latency.p50_ms"), 3),
                fmt(pick(result, "latency.p99_ms"), 3),
                fmt(pick(result, "target_rate"), 0),
                fmt(pick(result, "rate"), 0)
            ),
            "bulk" => format!(
                "{} s CPU/GiB, {} MiB/s",
                fmt(pick(result, "server_cpu_s_per_gib"), 3),
                fmt(pick(result, "mib_per_s"), 0)
            ),
            "idle" => format!(
                "{} KiB/conn ({} conns, {} still open)",
                fmt(pick(result, "bytes_per_connection").map(|b| b / 1024.0), 1),
                fmt(pick(result, "connections"), 0),
                fmt(pick(result, "still_open"), 0)
            ),
            _ => match metric {
                Some(m) => format!("{} {}", fmt(pick(result, m.path), m.digits), m.unit),
                None => String::new(),
            },
        };
        let failed = pick(result, "failed").unwrap_or(0.0) + pick(result, "bad_status").unwrap_or(0.0);
        let mut notes = Vec::new();
        if let (Some(open), Some(opened)) = (pick(result, "still_open"), pick(result, "connections")) {
            if open < opened {
                notes.push(format!("the server closed {} idle connections: not comparable", opened - open));
            }
        }
        if generator_bound(scenario, pick(result, "client_core_util")) {
            notes.push("load generator at its limit: the rate may be the generator's".to_owned());
        }
        if let Some(steal) = steal_note(result) {
            notes.push(steal);
        }
        if failed > 0.0 {
            notes.push(format!("{failed} failed"));
        }
        if let Some(resumed) = pick(result, "resumed").filter(|v| *v > 0.0) {
            notes.push(format!("{resumed} RESUMED"));
        }
        if let Some(error) = result["error"].as_str() {
            notes.push(format!("error: {error}"));
        }
        if let Some(errors) = result["errors"].as_array().filter(|e| !e.is_empty()) {
            notes.push(format!("first error: {}", errors[0].as_str().unwrap_or("")));
        }
        writeln!(
            md,
            "| {scenario} | {} | {} | {} | {figure} | {} | {} | {} |",
            r["server"].as_str().unwrap_or(""),
            r["round"],
            r["tool"].as_str().unwrap_or(""),
            fmt(pick(result, "server_core_util").map(|v| v * 100.0), 0) + "%",
            fmt(pick(result, "client_core_util").map(|v| v * 100.0), 0) + "%",
            notes.join("; ").replace('|', "\\|")
        )?;
    }
    writeln!(md)?;

    // Scenarios 7-9.
    writeln!(md, "## Scenarios 7–9: sealgate only\n")?;
    writeln!(
        md,
        "nginx and HAProxy read certificates from files named in their configuration and have no custody export, \
         grants or live following: these scenarios exist for sealgate alone, and are judged against the issue's \
         absolute targets.\n"
    )?;
    writeln!(md, "### 7. {certs} certificates in the export\n")?;
    writeln!(md, "| round | cold start to ready (s) | RSS (MiB) | handshakes/s, one name | handshakes/s, SNI over all names | swap p50 / p99 (ms) | renew command p50 (ms) |\n|---|---|---|---|---|---|---|")?;
    for (i, r) in scale.iter().enumerate() {
        let rates = |key: &str| {
            r[key]
                .as_array()
                .map(|a| a.iter().map(|h| fmt(h["rate"].as_f64(), 0)).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} / {} | {} |",
            i + 1,
            fmt(pick(r, "ready_s"), 3),
            fmt(pick(r, "rss_mib"), 1),
            rates("handshakes_one"),
            rates("handshakes_spread"),
            fmt(pick(r, "swap.p50_ms"), 1),
            fmt(pick(r, "swap.p99_ms"), 1),
            fmt(pick(r, "renew_command_ms.p50_ms"), 0),
        )?;
        if let Some(errors) = r["errors"].as_array().filter(|e| !e.is_empty()) {
            writeln!(
                md,
                "| | errors: {} | | | | | |",
                errors.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>().join("; ")
            )?;
        }
        if let Some(error) = r["error"].as_str() {
            writeln!(md, "| | error: {error} | | | | | |")?;
        }
    }
    writeln!(
        md,
        "\nMedians: ready {} s, RSS {} MiB, one name {} /s, all names {} /s (ratio {}), swap p50 {} ms / p99 {} ms over {} swaps.\n",
        fmt(ready, 3),
        fmt(rss, 1),
        fmt(one, 0),
        fmt(spread, 0),
        fmt(ratio(spread, one), 3),
        fmt(swap_p50, 1),
        fmt(swap_p99, 1),
        swaps.len()
    )?;
    writeln!(md, "### 8. Hot swap under load\n")?;
    writeln!(md, "| round | seconds | renewals | requests ok | failed | write→served p50 / p99 (ms) | first errors |\n|---|---|---|---|---|---|---|")?;
    for (i, r) in load.iter().enumerate() {
        let errors = r["errors"]
            .as_array()
            .map(|e| e.iter().take(3).filter_map(|e| e.as_str()).collect::<Vec<_>>().join("; "))
            .unwrap_or_default();
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} / {} | {} |",
            i + 1,
            fmt(pick(r, "seconds"), 1),
            fmt(pick(r, "renewals"), 0),
            fmt(pick(r, "requests_ok"), 0),
            fmt(Some(pick(r, "failed").unwrap_or(0.0) + pick(r, "bad_status").unwrap_or(0.0)), 0),
            fmt(pick(r, "swap.p50_ms"), 1),
            fmt(pick(r, "swap.p99_ms"), 1),
            r["error"].as_str().map(str::to_owned).unwrap_or(errors).replace('|', "\\|"),
        )?;
    }
    writeln!(
        md,
        "\nAll rounds: {} failed requests; write→served p50 {} ms, p99 {} ms over {} renewals.\n",
        fmt(failed, 0),
        fmt(median(&load_swaps), 1),
        fmt(quantile(&load_swaps, 0.99), 1),
        load_swaps.len()
    )?;
    writeln!(md, "### 9. Retirement\n")?;
    for r in &retire {
        writeln!(
            md,
            "- {} retirements: grant file change → first refused handshake p50 {} ms, p99 {} ms, max {} ms; from the \
             `retire-grant` command's completion p50 {} ms; sealgate's own `sealgate_grant_retirement_seconds` mean {} ms.",
            fmt(pick(r, "retirements"), 0),
            fmt(pick(r, "latency.p50_ms"), 2),
            fmt(pick(r, "latency.p99_ms"), 2),
            fmt(pick(r, "latency.max_ms"), 2),
            fmt(pick(r, "from_command_completion.p50_ms"), 2),
            fmt(pick(r, "sealgate_metric_mean_ms"), 3),
        )?;
        if let Some(errors) = r["errors"].as_array().filter(|e| !e.is_empty()) {
            writeln!(md, "  errors: {}", errors.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>().join("; "))?;
        }
        if let Some(error) = r["error"].as_str() {
            writeln!(md, "  error: {error}")?;
        }
    }
    writeln!(md)?;
    chart.push(Row {
        label: format!("7. {certs} certs: handshakes/s, all names / one"),
        bars: [None, None, ratio(spread, one)],
        targets: vec![0.95],
        higher: true,
    });

    // Fairness checks.
    writeln!(md, "## Fairness checks\n")?;
    writeln!(
        md,
        "Resumption probe (a client that keeps sessions connects twice; the second handshake must be full):\n"
    )?;
    writeln!(md, "| server | TLS 1.3 handshakes | TLS 1.3 tickets sent | TLS 1.2 handshakes | TLS 1.2 sessions sent | resumption off |\n|---|---|---|---|---|---|")?;
    let mut probed: BTreeMap<String, &Value> = BTreeMap::new();
    for r in data.records.iter().filter(|r| r["scenario"] == "resumption") {
        probed.entry(r["server"].as_str().unwrap_or("").to_owned()).or_insert(&r["result"]);
    }
    for (server, r) in &probed {
        let off = !r["tls13"]["resumed"].as_bool().unwrap_or(true) && !r["tls12"]["resumed"].as_bool().unwrap_or(true);
        writeln!(
            md,
            "| {server} | {} | {} | {} | {} | {} |",
            r["tls13"]["handshakes"],
            r["tls13"]["tls13_tickets_received"],
            r["tls12"]["handshakes"],
            r["tls12"]["tls12_sessions_received"],
            if off { "yes (verified)" } else { "**NO**" }
        )?;
    }
    let resumed: f64 = data
        .records
        .iter()
        .filter(|r| r["scenario"] == "handshake")
        .filter_map(|r| pick(&r["result"], "resumed"))
        .sum();
    writeln!(
        md,
        "\nHandshakes the load client saw resumed during the handshake runs: {resumed} (it never offers a session).\n"
    )?;
    if let Some(notes) = meta["notes"].as_array() {
        for note in notes.iter().filter_map(|n| n.as_str()) {
            writeln!(md, "- {note}")?;
        }
        writeln!(md)?;
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("latest.md"), md)?;
    std::fs::write(out.join("latest.svg"), svg(&chart, meta["date"].as_str().unwrap_or("")))?;
    Ok(())
}

fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * q).round() as usize])
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One row of the chart: ratios vs nginx, vs HAProxy, or of sealgate alone; the targets on them.
struct Row {
    label: String,
    bars: [Option<f64>; 3],
    targets: Vec<f64>,
    higher: bool,
}

/// A horizontal bar chart of the ratios, one row per metric, one bar per comparison; targets as red ticks.
fn svg(rows: &[Row], date: &str) -> String {
    let (label_w, chart_w, row_h, top) = (330.0, 520.0, 46.0, 70.0);
    let max = rows.iter().flat_map(|r| r.bars).flatten().fold(2.0_f64, f64::max).min(6.0);
    let x = |v: f64| label_w + v.min(max) / max * chart_w;
    let height = top + row_h * rows.len() as f64 + 50.0;
    let width = label_w + chart_w + 90.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">sealgate relative to nginx and HAProxy (medians, same run{})</text>\n\
         <text x=\"10\" y=\"42\" fill=\"#444\">ratio sealgate/other; 1.0 = equal. Rows say whether higher or lower is better.</text>\n\
         <rect x=\"{}\" y=\"50\" width=\"12\" height=\"10\" fill=\"#2b6cb0\"/><text x=\"{}\" y=\"59\">vs nginx</text>\n\
         <rect x=\"{}\" y=\"50\" width=\"12\" height=\"10\" fill=\"#dd6b20\"/><text x=\"{}\" y=\"59\">vs HAProxy</text>\n\
         <rect x=\"{}\" y=\"50\" width=\"12\" height=\"10\" fill=\"#718096\"/><text x=\"{}\" y=\"59\">sealgate only</text>\n\
         <rect x=\"{}\" y=\"50\" width=\"3\" height=\"10\" fill=\"#e53e3e\"/><text x=\"{}\" y=\"59\">target</text>\n",
        if date.is_empty() { String::new() } else { format!(", {}", escape(date)) },
        label_w,
        label_w + 16.0,
        label_w + 90.0,
        label_w + 106.0,
        label_w + 190.0,
        label_w + 206.0,
        label_w + 300.0,
        label_w + 308.0,
    );
    for (i, row) in rows.iter().enumerate() {
        let (label, [vs_nginx, vs_haproxy, alone]) = (&row.label, &row.bars);
        let y = top + row_h * i as f64;
        let better = if row.higher { "higher is better" } else { "lower is better" };
        for target in &row.targets {
            s += &format!(
                "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#e53e3e\" stroke-width=\"2\"/>\n",
                x(*target),
                y + 2.0,
                y + 40.0
            );
        }
        s += &format!(
            "<text x=\"10\" y=\"{}\">{}</text><text x=\"10\" y=\"{}\" fill=\"#666\" font-size=\"10\">{better}</text>\n",
            y + 16.0,
            escape(label),
            y + 30.0
        );
        for (j, (value, color)) in
            [(vs_nginx, "#2b6cb0"), (vs_haproxy, "#dd6b20"), (alone, "#718096")].iter().enumerate()
        {
            let Some(v) = value else { continue };
            let by = y + 4.0 + j as f64 * 12.0;
            s += &format!(
                "<rect x=\"{label_w}\" y=\"{by}\" width=\"{:.1}\" height=\"10\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"10\">{v:.2}</text>\n",
                x(*v) - label_w,
                x(*v) + 4.0,
                by + 9.0
            );
        }
    }
    let bottom = top + row_h * rows.len() as f64;
    s += &format!(
        "<line x1=\"{0}\" y1=\"{top}\" x2=\"{0}\" y2=\"{bottom}\" stroke=\"black\" stroke-dasharray=\"4,3\"/>\n",
        x(1.0)
    );
    let mut tick = 0.0;
    while tick <= max + 1e-9 {
        s += &format!(
            "<line x1=\"{0:.1}\" y1=\"{bottom}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#999\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\" font-size=\"10\">{tick:.1}</text>\n",
            x(tick),
            bottom + 5.0,
            bottom + 18.0
        );
        tick += 0.5;
    }
    s += "</svg>\n";
    s
}

/// The share of its core above which a load generator is taken to be the limit of a closed-loop rate.
const GENERATOR_LIMIT: f64 = 0.9;

/// Whether a closed-loop rate measurement (`scenario`) ran with its load generator `client_core_util` busy enough
/// to have set the rate itself: the server then waited on the generator, and the figure says less about it.
fn generator_bound(scenario: &str, client_core_util: Option<f64>) -> bool {
    matches!(scenario, "handshake" | "keepalive" | "h2" | "proxied")
        && client_core_util.is_some_and(|c| c >= GENERATOR_LIMIT)
}

/// Steal of at least this many milliseconds on a core during one measurement is noted: the hypervisor's
/// accounting counts in 10 ms ticks, and one tick is within its noise.
const STEAL_NOTE_MS: f64 = 20.0;

/// What the hypervisor took from the measurement's cores (`steal_ms`), when enough to note: time in which the
/// server, or the load generator, could not run (it shows in tail latency above all).
fn steal_note(result: &Value) -> Option<String> {
    let server = pick(result, "steal_ms.server_core").unwrap_or(0.0);
    let generator = pick(result, "steal_ms.generator_core").unwrap_or(0.0);
    (server.max(generator) >= STEAL_NOTE_MS).then(|| {
        let seconds = pick(result, "seconds").map_or(String::new(), |s| format!(" of {s:.0} s"));
        format!("hypervisor steal{seconds}: {server:.0} ms of the server's core, {generator:.0} ms of the generator's")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_names_a_metric() {
        for target in TARGETS {
            assert!(metric_labelled(target.metric).is_some(), "no metric labelled {:?}", target.metric);
        }
    }

    #[test]
    fn cpu_per_request_is_derived_from_the_cpu_time_and_the_count() {
        let result = serde_json::json!({"server_cpu_s": 2.0, "requests": 400_000.0});
        assert_eq!(pick(&result, "server_cpu_us_per_request"), Some(5.0));
        let none = serde_json::json!({"server_cpu_s": 2.0, "requests": 0.0});
        assert_eq!(pick(&none, "server_cpu_us_per_request"), None);
    }

    #[test]
    fn a_busy_generator_is_flagged_only_where_it_sets_a_rate() {
        assert!(generator_bound("keepalive", Some(0.95)));
        assert!(generator_bound("h2", Some(GENERATOR_LIMIT)));
        assert!(!generator_bound("keepalive", Some(0.85)));
        assert!(!generator_bound("keepalive", None));
        // A constant rate, CPU per GiB and memory are not the generator's to set.
        assert!(!generator_bound("latency", Some(0.99)));
        assert!(!generator_bound("bulk", Some(0.99)));
        assert!(!generator_bound("idle", Some(0.99)));
    }

    #[test]
    fn steal_is_noted_from_two_ticks_on() {
        use serde_json::json;
        let result = json!({"seconds": 8.0, "steal_ms": {"server_core": 40.0, "generator_core": 10.0}});
        assert_eq!(
            steal_note(&result).as_deref(),
            Some("hypervisor steal of 8 s: 40 ms of the server's core, 10 ms of the generator's")
        );
        assert_eq!(steal_note(&json!({"steal_ms": {"server_core": 10.0, "generator_core": null}})), None);
        assert_eq!(steal_note(&json!({"rate": 1.0})), None);
    }
}
