//! `sealgate run` as users run it: the binary, the demo export in `certs-example/`, curl trusting
//! `certs-example/ca.pem`, SIGTERM to stop.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_sealgate");

/// The repository's proxy.toml with ephemeral ports and an absolute export path.
fn demo_config(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("proxy.toml")).unwrap();
    let export = root.join("certs-example/export");
    let text = text
        .replace("\"certs-example/export\"", &format!("{:?}", export.display().to_string()))
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0");
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_demo_serves_localhost_to_curl_and_stops_on_sigterm() {
    serve_once_and_stop("");
}

/// One worker thread is Tokio's current-thread runtime, where the main task, the listeners, the connections and
/// the signal handlers all share the one thread: the same run must work there.
#[test]
fn one_worker_thread_serves_and_stops_on_sigterm() {
    serve_once_and_stop("\n[runtime]\nworker_threads = 1\n");
}

/// Runs the demo with `extra` appended to its configuration, fetches `/` with curl, stops it with SIGTERM.
fn serve_once_and_stop(extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(extra);
    std::fs::write(&config, text).unwrap();
    let mut child = common::spawn_run(&config);
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        let line = lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("no listen line");
        if line.contains("listening for TLS") {
            let addr = line.split("addr=").nth(1).unwrap().trim();
            break addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        }
    };

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(root.join("certs-example/ca.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from sealgate\n");

    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "sealgate did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn an_invalid_config_names_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[custody]\nexport = \"e\"\ngrantee = \"g\"\n[[listener]]\nbind = \"nowhere\"\n").unwrap();
    let out = Command::new(BINARY).args(["run", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:5:", config.display())) && stderr.contains("listener[0].bind"), "{stderr}");
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["check", "--help"],
        &["custody", "--help"],
        &["custody", "issue", "--help"],
        &["custody", "import", "--help"],
        &["custody", "associate", "--help"],
        &["custody", "disassociate", "--help"],
        &["custody", "retire-grant", "--help"],
        &["custody", "renew", "--help"],
    ] {
        let out = Command::new(BINARY).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"), "{args:?}");
    }
}
