//! The audit log of a running server: every custody event is recorded in an intact hash chain, with no key
//! material, and an edited line is detected.

mod common;

use common::*;
use sealgate::custody::writer::RenewRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_records_the_key_lifecycle_in_an_intact_chain() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-b", &["b.example.test"]);
    let audit_path = f.dir.path().join("audit.jsonl");
    let config = f
        .config(HELLO)
        .replace("[admin]", &format!("[audit]\npath = {:?}\n\n[admin]", audit_path.display().to_string()));
    let server = start_server(f.dir.path(), &config).await;
    let addr = server.tls_addrs[0];
    let _open = connect(addr, "a.example.test", f.client(&[])).await.unwrap();

    f.custody.renew("c-a", &RenewRequest::reissue()).unwrap();
    let renewed = f.leaf("c-a");
    assert!(
        eventually(APPLY_DEADLINE, || async {
            leaf_for(addr, "a.example.test", f.client(&[])).await == Some(renewed.clone())
        })
        .await
    );
    let grant = f.grant_of("c-a");
    let grant_file = std::fs::read_to_string(f.export.join("grants").join(format!("{grant}.toml"))).unwrap();
    f.custody.retire_grant(&grant).unwrap();
    assert!(eventually(APPLY_DEADLINE, || refused_with_alert(addr, "a.example.test", f.client(&[]))).await);
    server.shutdown(std::time::Duration::from_secs(2)).await;

    let report = sealgate::audit::verify(&audit_path).expect("the chain is intact");
    let text = std::fs::read_to_string(&audit_path).unwrap();
    let events: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(report.records as usize, events.len());
    let names: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    for expected in [
        "started",
        "grant_seen",
        "key_loaded",
        "association_served",
        "certificate_swapped",
        "key_zeroized",
        "grant_retired",
        "connections_closed",
        "stopped",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    let retired = events.iter().find(|e| e["event"] == "grant_retired").unwrap();
    assert_eq!(retired["grant_id"], grant.as_str());
    assert!(retired["latency_us"].as_u64().is_some(), "the retirement's latency is recorded: {retired}");
    let closed = events.iter().find(|e| e["event"] == "connections_closed").unwrap();
    assert!(closed["count"].as_u64().unwrap() >= 1, "{closed}");

    // No key material: not the grant key (in any encoding the export uses), nor anything the export seals.
    let grant_key_b64 = grant_file.lines().find_map(|l| l.strip_prefix("grant_key = ")).unwrap().trim_matches('"');
    assert!(!text.contains(grant_key_b64));

    // An edited line breaks the chain at the next line.
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let edited = lines[2].replacen("\"time\":\"2", "\"time\":\"1", 1);
    assert_ne!(edited, lines[2]);
    lines[2] = edited;
    std::fs::write(&audit_path, lines.join("\n") + "\n").unwrap();
    let error = sealgate::audit::verify(&audit_path).unwrap_err().to_string();
    assert!(error.contains(":4:") || error.contains(":3:"), "{error}");
}
