//! `sealgate check` as a user runs it: the built binary, a `proxy.toml`, the shared vectors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/custody-vectors")
}

/// Writes a `proxy.toml` for the vectors' export as `grantee` and runs `sealgate check` on it.
fn check(dir: &TempDir, grantee: &str) -> Output {
    check_with(dir, grantee, "")
}

/// [`check`] with `extra` appended to the configuration.
fn check_with(dir: &TempDir, grantee: &str, extra: &str) -> Output {
    let export = toml::Value::String(vectors().join("export").display().to_string());
    let grantee = toml::Value::String(grantee.to_owned());
    let config =
        format!("[custody]\nexport = {export}\ngrantee = {grantee}\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n{extra}");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    run(&path)
}

fn run(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sealgate")).arg("check").arg("--config").arg(config).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn the_vectors_report_every_expected_outcome_on_its_row() {
    let dir = TempDir::new().unwrap();
    let output = check(&dir, "sealgate-vectors");
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{report}{}", String::from_utf8_lossy(&output.stderr));

    let expected: toml::Table = std::fs::read_to_string(vectors().join("expected.toml")).unwrap().parse().unwrap();
    let associations = expected["association"].as_array().unwrap();
    for association in associations {
        let id = association["certificate_id"].as_str().unwrap();
        let outcome = association["outcome"].as_str().unwrap();
        let row = report
            .lines()
            .find(|line| line.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{report}"));
        assert!(row.trim_end().ends_with(outcome), "{id}: expected {outcome:?} in\n{row}");
        if let Some(names) = association.get("server_names").and_then(|v| v.as_array()) {
            let names: Vec<&str> = names.iter().map(|n| n.as_str().unwrap()).collect();
            assert!(row.split_whitespace().any(|cell| cell == names.join(",")), "{id}: {row}");
        }
    }
    let served = associations.iter().filter(|a| a["outcome"].as_str() == Some("served")).count();
    let summary = format!("{served} served, {} refused", associations.len() - served);
    assert_eq!(report.lines().last(), Some(summary.as_str()), "{report}");
}

#[test]
fn a_grantee_that_holds_nothing_exits_1() {
    let dir = TempDir::new().unwrap();
    let output = check(&dir, "nobody");
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stdout(&output).contains("0 served, 6 refused"), "{}", stdout(&output));
}

#[test]
fn an_invalid_configuration_exits_2_naming_the_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("broken-proxy.toml");
    std::fs::write(&path, "[custody]\nexport = \"export\"\n").unwrap();
    let output = run(&path);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(output.stdout.is_empty());

    let missing = dir.path().join("absent.toml");
    let output = run(&missing);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("absent.toml"));
}

#[test]
fn an_absent_export_holds_nothing_and_exits_1_saying_so() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[custody]\nexport = \"no-export\"\ngrantee = \"g\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let output = run(&config);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-export does not exist"), "{stderr}");
    assert!(stdout(&output).contains("0 served, 0 refused"), "{}", stdout(&output));
}

#[test]
fn an_unparseable_export_exits_2_naming_the_file() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[custody]\nexport = \"export\"\ngrantee = \"g\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n")
        .unwrap();
    std::fs::create_dir(dir.path().join("export")).unwrap();
    std::fs::write(dir.path().join("export/associations.toml"), "format = 1\n").unwrap();
    let output = run(&config);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("export/associations.toml"), "{stderr}");
}

#[test]
fn routes_for_names_no_served_certificate_covers_are_warned_of() {
    let dir = TempDir::new().unwrap();
    let export = toml::Value::String(vectors().join("export").display().to_string());
    // The vectors serve localhost and *.example.test (rsa.example.test too).
    let config = format!(
        "[custody]\nexport = {export}\ngrantee = \"sealgate-vectors\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n\
         [[route]]\nhost = \"app.example.test\"\nrespond = {{ status = 200 }}\n\
         [[route]]\nhost = \"*.example.test\"\nrespond = {{ status = 200 }}\n\
         [[route]]\nhost = \"app.exmaple.test\"\nrespond = {{ status = 200 }}\n\
         [[route]]\nrespond = {{ status = 200 }}\n"
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let output = run(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "a warning is not a failure: {stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("route[2] (host app.exmaple.test)"), "{stderr}");
}

/// A self-signed CA certificate, PEM.
fn ca_pem() -> String {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem()
}

#[test]
fn a_client_ca_that_cannot_be_used_exits_2_naming_it() {
    let dir = TempDir::new().unwrap();
    let client_auth = "[tls.client_auth]\nca = \"clients.pem\"\n";
    let output = check_with(&dir, "sealgate-vectors", client_auth);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read the client CA file") && stderr.contains("clients.pem"), "{stderr}");
    assert!(output.stdout.is_empty());

    // A usable CA: the report as without one.
    std::fs::write(dir.path().join("clients.pem"), ca_pem()).unwrap();
    let output = check_with(&dir, "sealgate-vectors", client_auth);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn an_upstream_ca_that_cannot_be_read_exits_2_naming_the_route_and_file() {
    let dir = TempDir::new().unwrap();
    let route = "[[route]]\nupstream = \"https://app.internal\"\nca = \"missing-ca.pem\"\n";
    let output = check_with(&dir, "sealgate-vectors", route);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("route[0]") && stderr.contains("missing-ca.pem"), "{stderr}");
}

#[test]
fn world_writable_ca_files_are_refused_naming_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let ca = ca_pem();
    for name in ["clients.pem", "upstream-ca.pem"] {
        let path = dir.path().join(name);
        std::fs::write(&path, &ca).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let extra = "[tls.client_auth]\nca = \"clients.pem\"\n\n\
                 [[route]]\nupstream = \"https://app.internal\"\nca = \"upstream-ca.pem\"\n";
    let output = check_with(&dir, "sealgate-vectors", extra);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));

    for name in ["clients.pem", "upstream-ca.pem"] {
        let path = dir.path().join(name);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let output = check_with(&dir, "sealgate-vectors", extra);
        assert_eq!(output.status.code(), Some(2), "{name}: {}", stdout(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(name) && stderr.contains("world-writable"), "{stderr}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}
