//! The benchmark harness cannot rot: `bench/run --quick --only sealgate` runs every sealgate scenario end to end
//! (debug binaries, 1 s windows, small counts) and must write a results file with a figure for every scenario.
//! The figures of a debug build mean nothing; that the harness measures at all is what is checked. The report's
//! comparison with nginx and HAProxy is checked on the same measurements relabelled and scaled, so that this test
//! needs nothing beyond cargo (no nginx, HAProxy, wrk or h2load; sgbench stands in for wrk and h2load).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// Builds `sgbench` next to the `sealgate` binary under test and returns their directory. The build selects this
/// test target with both packages, so that cargo resolves the dependencies' features as `cargo test` did and
/// compiles `sgbench` alone (not a second copy of every dependency).
fn build_binaries(root: &Path) -> PathBuf {
    let sealgate = Path::new(env!("CARGO_BIN_EXE_sealgate"));
    let bin_dir = sealgate.parent().expect("a binary lives in a directory").to_owned();
    let profile = bin_dir.file_name().and_then(|n| n.to_str()).expect("the profile directory has a UTF-8 name");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(root).args(["build", "--message-format=json-render-diagnostics"]);
    build.args(["-p", "sealgate", "-p", "sealgate-bench", "--bins", "--test", "bench_harness"]);
    if profile != "debug" {
        build.args(["--profile", profile]);
    }
    let output = build.stderr(Stdio::inherit()).output().expect("cargo runs");
    assert!(output.status.success(), "building sgbench failed: {}", output.status);
    let sgbench = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "sgbench")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reports the sgbench executable");
    assert_eq!(sgbench.parent(), Some(bin_dir.as_path()), "sgbench and sealgate are built into different directories");
    bin_dir
}

/// The cells of the markdown table row that starts with `start`.
fn row<'a>(md: &'a str, start: &str) -> Vec<&'a str> {
    let line = md.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("no row {start:?} in:\n{md}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

/// The text of the section under `heading`, up to the next heading of any level.
fn section<'a>(md: &'a str, heading: &str) -> &'a str {
    let start = md.find(&format!("\n{heading}\n")).unwrap_or_else(|| panic!("no {heading:?} in:\n{md}")) + 1;
    let body = &md[start + heading.len()..];
    &md[start..start + heading.len() + body.find("\n#").unwrap_or(body.len())]
}

/// The data rows of the first table in `text`.
fn table_rows(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with('|')).skip(2).collect()
}

fn number(cell: &str) -> f64 {
    cell.parse().unwrap_or_else(|_| panic!("{cell:?} is not a number"))
}

/// Every number in `value` multiplied by `factor`.
fn scaled(value: &Value, factor: f64) -> Value {
    match value {
        Value::Number(n) => n.as_f64().map_or(Value::Null, |n| serde_json::json!(n * factor)),
        Value::Array(a) => Value::Array(a.iter().map(|v| scaled(v, factor)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), scaled(v, factor))).collect()),
        other => other.clone(),
    }
}

/// The scenario 1–6 rows of the results table, and the unit each is labelled with.
const METRIC_ROWS: [&str; 9] = [
    "| 1. full TLS 1.3 handshakes/s (/s) |",
    "| 1. server CPU per handshake (µs) |",
    "| 2. keep-alive HTTP/1.1 req/s (50 conns) (/s) |",
    "| 2. p50 at constant rate (ms) |",
    "| 2. p99 at constant rate (ms) |",
    "| 3. HTTP/2 req/s (16 conns × 16 streams) (/s) |",
    "| 4. proxied keep-alive req/s (/s) |",
    "| 5. server CPU per GiB downloaded (s) |",
    "| 6. memory per idle TLS connection (KiB) |",
];

/// The rows derived from two figures of a measurement (the server's CPU time over the requests).
const DERIVED_ROWS: [&str; 3] = [
    "| 2. server CPU per keep-alive request (µs) |",
    "| 3. server CPU per HTTP/2 request (µs) |",
    "| 4. server CPU per proxied request (µs) |",
];

#[test]
fn bench_run_quick_against_sealgate_writes_every_scenario() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = build_binaries(root);
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let status = Command::new(root.join("bench/run"))
        .args(["--quick", "--only", "sealgate", "--profile", "dev", "--no-install", "--bin-dir"])
        .arg(&bin_dir)
        .args(["--duration", "1", "--idle-count", "200", "--bulk-mib", "32"])
        .args(["--scale-count", "100", "--swaps", "3", "--retirements", "5", "--note", "harness test (debug build)"])
        .arg("--out")
        .arg(out.path())
        .arg("--work")
        .arg(work.path())
        .status()
        .unwrap();
    assert!(status.success(), "bench/run failed: {status}");

    let md = std::fs::read_to_string(out.path().join("latest.md")).unwrap();
    for section in [
        "# sealgate benchmark results",
        "## Conditions",
        "## Targets (issue 4)",
        "## Scenarios 1–6: absolute figures (medians)",
        "### Every measurement",
        "## Scenarios 7–9: sealgate only",
        "### 7. 100 certificates in the export",
        "### 8. Hot swap under load",
        "### 9. Retirement",
        "## Fairness checks",
    ] {
        assert!(md.contains(section), "no {section:?} in:\n{md}");
    }
    assert!(!md.contains("error:") && !md.contains("errors:"), "a measurement failed:\n{md}");
    // Scenarios 1-6: a figure for sealgate in every row (no other server ran: no ratios).
    assert_eq!(row(&md, "| metric |"), ["metric", "sealgate", "sealgate/nginx", "sealgate/HAProxy", "better"]);
    for start in METRIC_ROWS.iter().chain(&DERIVED_ROWS) {
        let cells = row(&md, start);
        assert!(number(cells[1]) > 0.0, "{start} {cells:?} in:\n{md}");
        assert_eq!(cells[2..4], ["—", "—"], "{start} {cells:?}");
    }
    for scenario in ["handshake", "keepalive", "h2", "proxied", "bulk", "idle", "latency"] {
        let cells = row(&md, &format!("| {scenario} | sealgate | 1 |"));
        assert!(!cells[4].starts_with('—'), "{scenario}: no figure in {cells:?}");
    }
    // Scenarios 7-9.
    let scale = section(&md, "### 7. 100 certificates in the export");
    let scale = row(scale, "| 1 | ");
    assert!(number(scale[1]) > 0.0 && number(scale[2]) > 0.0, "scenario 7: {scale:?}");
    let swapload = section(&md, "### 8. Hot swap under load");
    assert_eq!(row(swapload, "| 1 | ")[4], "0", "scenario 8 failed requests:\n{swapload}");
    assert!(swapload.contains("\nAll rounds: 0 failed requests;"), "scenario 8:\n{swapload}");
    let retire = section(&md, "### 9. Retirement");
    assert!(retire.contains("\n- 5 retirements: grant file change → first refused handshake p50 "), "{retire}");
    // The targets: the sealgate-only ones judged, the comparisons not (nothing to compare with).
    let targets = table_rows(section(&md, "## Targets (issue 4)"));
    assert_eq!(targets.len(), 9 + 6, "{targets:#?}");
    for target in &targets[..9] {
        assert!(target.ends_with("| n/a |"), "{target}");
    }
    for target in &targets[9..] {
        assert!(target.ends_with("| PASS |") || target.ends_with("| FAIL |"), "target not judged: {target}");
    }
    // Resumption off, and verified off.
    let probe = row(&md, "| sealgate | [");
    assert_eq!(
        probe[1..],
        ["[\"Some(Full)\",\"Some(Full)\"]", "0", "[\"Some(Full)\",\"Some(Full)\"]", "0", "yes (verified)"]
    );
    let svg = std::fs::read_to_string(out.path().join("latest.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");

    // The raw measurements: every scenario measured something, and nothing failed.
    let raw = std::fs::read_to_string(out.path().join("raw.jsonl")).unwrap();
    let lines: Vec<Value> = raw.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let result = |scenario: &str| -> &Value {
        &lines.iter().find(|l| l["scenario"] == scenario).unwrap_or_else(|| panic!("no {scenario} in {raw}"))["result"]
    };
    for scenario in ["handshake", "keepalive", "h2", "proxied", "latency"] {
        let r = result(scenario);
        assert!(r["rate"].as_f64().unwrap_or(0.0) > 0.0, "{scenario}: {r}");
        assert_eq!(r["failed"].as_f64().unwrap_or(0.0), 0.0, "{scenario}: {r}");
        assert_eq!(r["bad_status"].as_f64().unwrap_or(0.0), 0.0, "{scenario}: {r}");
    }
    assert_eq!(result("handshake")["resumed"], 0);
    assert!(result("handshake")["server_cpu_us_per_op"].as_f64().unwrap() > 0.0);
    assert_eq!(result("bulk")["status"], 200);
    assert_eq!(result("bulk")["bytes"], 32 << 20);
    assert_eq!(result("idle")["connections"], 200, "{}", result("idle"));
    assert_eq!(result("idle")["still_open"], 200, "{}", result("idle"));
    assert!(result("scale")["ready_s"].as_f64().unwrap() > 0.0, "{}", result("scale"));
    assert_eq!(result("scale")["swap_ms"].as_array().map(Vec::len), Some(3), "{}", result("scale"));
    assert_eq!(result("swapload")["failed"], 0, "{}", result("swapload"));
    assert!(result("swapload")["renewals"].as_u64().unwrap() > 0, "{}", result("swapload"));
    assert_eq!(result("retire")["retirements"], 5, "{}", result("retire"));

    // The comparison: the same measurements as nginx's at twice and HAProxy's at four times every figure give
    // ratios of 0.50 and 0.25 in every row, a judged target for each, and a bar for each in the chart.
    let mut compared = String::new();
    for line in &lines {
        compared += &format!("{line}\n");
        for (server, factor) in [("nginx", 2.0), ("haproxy", 4.0)] {
            if ["resumption", "handshake", "keepalive", "latency", "h2", "proxied", "bulk", "idle"]
                .contains(&line["scenario"].as_str().unwrap_or(""))
            {
                let mut other = line.clone();
                other["server"] = server.into();
                other["result"] = scaled(&line["result"], factor);
                compared += &format!("{other}\n");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("raw.jsonl"), compared).unwrap();
    let report = Command::new(bin_dir.join("sgbench"))
        .arg("report")
        .arg("--raw")
        .arg(dir.path().join("raw.jsonl"))
        .arg("--meta")
        .arg(out.path().join("meta.json"))
        .arg("--out")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(report.success());
    let md = std::fs::read_to_string(dir.path().join("latest.md")).unwrap();
    assert_eq!(
        row(&md, "| metric |"),
        ["metric", "sealgate", "nginx", "haproxy", "sealgate/nginx", "sealgate/HAProxy", "better"]
    );
    for start in METRIC_ROWS {
        let cells = row(&md, start);
        let sealgate = number(cells[1]);
        assert!(number(cells[2]) > sealgate && number(cells[3]) > number(cells[2]), "{start} {cells:?}");
        assert_eq!(cells[4..6], ["0.50", "0.25"], "{start} {cells:?}");
    }
    // Derived from two figures scaled alike, CPU per request comes out equal.
    for start in DERIVED_ROWS {
        assert_eq!(row(&md, start)[4..6], ["1.00", "1.00"], "{start}");
    }
    let targets = table_rows(section(&md, "## Targets (issue 4)"));
    assert_eq!(targets.len(), 9 + 6, "{targets:#?}");
    for target in &targets {
        assert!(target.ends_with("| PASS |") || target.ends_with("| FAIL |"), "target not judged: {target}");
    }
    let svg = std::fs::read_to_string(dir.path().join("latest.svg")).unwrap();
    let bars = METRIC_ROWS.len() + DERIVED_ROWS.len();
    assert_eq!(svg.matches("fill=\"#2b6cb0\"/><text").count(), bars + 1, "bars vs nginx (and the legend):\n{svg}");
    assert_eq!(svg.matches("fill=\"#dd6b20\"/><text").count(), bars + 1, "bars vs HAProxy (and the legend):\n{svg}");
}
