//! The benchmark harness cannot rot: `bench/run --quick --only sealgate` runs every sealgate scenario end to end
//! (debug binaries, small counts) and writes a results file with every section. The figures of a debug build
//! mean nothing; that the harness measures at all is what is checked.

use std::path::Path;
use std::process::Command;

#[test]
fn bench_run_quick_against_sealgate_writes_every_section() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let status = Command::new(root.join("bench/run"))
        .args(["--quick", "--only", "sealgate", "--profile", "dev", "--no-install"])
        .args(["--scale-count", "200", "--retirements", "5", "--note", "harness test (debug build)"])
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
        "### 7. 200 certificates in the export",
        "### 8. Hot swap under load",
        "### 9. Retirement",
        "## Fairness checks",
    ] {
        assert!(md.contains(section), "no {section:?} in:\n{md}");
    }
    assert!(md.contains("| sealgate | [\"Some(Full)\",\"Some(Full)\"] | 0 |"), "resumption not verified off:\n{md}");
    assert!(!md.contains("error:"), "a measurement failed:\n{md}");
    let svg = std::fs::read_to_string(out.path().join("latest.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");

    // Every scenario measured something, and nothing failed.
    let raw = std::fs::read_to_string(out.path().join("raw.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = raw.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let result = |scenario: &str| -> &serde_json::Value {
        &lines.iter().find(|l| l["scenario"] == scenario).unwrap_or_else(|| panic!("no {scenario} in {raw}"))["result"]
    };
    for scenario in ["handshake", "keepalive", "h2", "proxied", "latency"] {
        let r = result(scenario);
        assert!(r["rate"].as_f64().unwrap_or(0.0) > 0.0, "{scenario}: {r}");
        assert_eq!(r["failed"].as_f64().unwrap_or(0.0), 0.0, "{scenario}: {r}");
    }
    assert_eq!(result("handshake")["resumed"], 0);
    assert!(result("handshake")["server_cpu_us_per_op"].as_f64().unwrap() > 0.0);
    assert_eq!(result("bulk")["status"], 200);
    assert_eq!(result("idle")["still_open"], result("idle")["connections"]);
    assert!(result("scale")["ready_s"].as_f64().unwrap() > 0.0, "{}", result("scale"));
    assert!(result("scale")["swap_ms"].as_array().is_some_and(|s| !s.is_empty()), "{}", result("scale"));
    assert_eq!(result("swapload")["failed"], 0, "{}", result("swapload"));
    assert_eq!(result("retire")["retirements"], 5, "{}", result("retire"));
}
