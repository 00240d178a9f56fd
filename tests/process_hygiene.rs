//! Process hygiene of `sealgate run`: no core dumps, not dumpable, memory locked where permitted, and a
//! world-writable configuration or export refused.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_sealgate");

fn config(dir: &Path, export: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[custody]\nexport = {:?}\ngrantee = \"sealgate-demo\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n{extra}",
            export.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn example_export() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-example/export")
}

#[test]
fn keys_never_reach_a_core_dump_a_debugger_or_swap() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &example_export(), "");
    let mut child = common::spawn_run(&config);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    loop {
        let line = lines.next().expect("sealgate exited").unwrap();
        let done = line.contains("listening for TLS");
        log.push(line);
        if done {
            break;
        }
    }
    let pid = child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!((fields[4], fields[5]), ("0", "0"), "core dumps are off: {core}");

    let root = rustix::process::geteuid().is_root();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"));
    if !root {
        assert!(mem.is_err(), "a same-user process must not read the memory of a non-dumpable sealgate");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let memlock_unlimited = rustix::process::getrlimit(rustix::process::Resource::Memlock).current.is_none();
    let hygiene = log.iter().find(|l| l.contains("process hygiene")).cloned().unwrap_or_default();
    if root || memlock_unlimited {
        assert!(locked > 0, "memory is locked when permitted: {status}");
        assert!(hygiene.contains("memory_locked: true"), "{hygiene}");
    } else {
        assert!(log.iter().any(|l| l.contains("cannot lock memory")), "a warning says keys could reach swap: {log:?}");
    }
    assert!(hygiene.contains("not_dumpable: true") && hygiene.contains("no_core_dumps: true"), "{hygiene}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_world_writable_configuration_or_export_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = config(dir.path(), &example_export(), "");
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new(BINARY).args(["run", "--config"]).arg(&config_path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("world-writable") && stderr.contains("proxy.toml"), "{stderr}");

    let export = dir.path().join("export");
    std::fs::create_dir_all(&export).unwrap();
    for entry in ["associations.toml", "grants", "certificates"] {
        let from = example_export().join(entry);
        let status = Command::new("cp").arg("-r").arg(&from).arg(&export).status().unwrap();
        assert!(status.success());
    }
    std::fs::set_permissions(&export, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config_path = config(dir.path(), &export, "");
    let out = Command::new(BINARY).args(["run", "--config"]).arg(&config_path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("world-writable") && stderr.contains("export"), "{stderr}");
}
