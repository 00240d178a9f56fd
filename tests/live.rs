//! Following the export while running: real files changing under a running server, the way custody systems
//! and Kubernetes change them. The backstop rescan is set to a minute so that only file events (or timers)
//! can explain a change being applied in time.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sealgate::custody::writer::{AssociateRequest, RenewRequest};
use time::OffsetDateTime;

const NO_RESCAN: &str = "rescan_interval = \"60s\"";

/// Reads of the export so far, successful or not.
fn reloads(server: &sealgate::server::RunningServer) -> u64 {
    let metrics = server.metrics.encode();
    metrics
        .lines()
        .filter(|l| l.starts_with("sealgate_custody_reloads_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_written_by_rename_is_served_at_once() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = start_server(f.dir.path(), &f.config_with(NO_RESCAN, HELLO)).await;
    let addr = server.tls_addrs[0];
    let old = f.leaf("c-a");
    assert_eq!(leaf_for(addr, "a.example.test", f.client(&[])).await, Some(old.clone()));

    f.custody.renew("c-a", &RenewRequest::reissue()).unwrap();
    let new = f.leaf("c-a");
    assert_ne!(old, new);
    let applied = eventually(APPLY_DEADLINE, || async {
        leaf_for(addr, "a.example.test", f.client(&[])).await == Some(new.clone())
    })
    .await;
    assert!(applied, "the renewed certificate is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_and_removed_associations_and_changed_names_apply() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = start_server(f.dir.path(), &f.config_with(NO_RESCAN, HELLO)).await;
    let addr = server.tls_addrs[0];

    f.serve("c-b", &["b.example.test"]);
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "b.example.test", "c-b")).await, "a new association");

    // Changed server names: disassociate and associate again with narrower names (a new grant).
    f.issue("c-c", &["c1.example.test", "c2.example.test"]);
    f.associate("c-c");
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "c2.example.test", "c-c")).await);
    f.custody.disassociate("c-c", &f.export).unwrap();
    let mut narrower = AssociateRequest::new("c-c", &f.export, GRANTEE);
    narrower.server_names = Some(vec!["c1.example.test".to_owned()]);
    f.custody.associate(&narrower).unwrap();
    assert!(
        eventually(APPLY_DEADLINE, || refused_with_alert(addr, "c2.example.test", f.client(&[]))).await,
        "a name dropped from server_names is no longer served"
    );
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "c1.example.test", "c-c")).await, "the new grant serves");

    // A removed association.
    f.custody.disassociate("c-b", &f.export).unwrap();
    assert!(eventually(APPLY_DEADLINE, || refused_with_alert(addr, "b.example.test", f.client(&[]))).await);
    assert!(leaf_is(addr, &f, "a.example.test", "c-a").await, "the others go on");
}

/// `server_names` changed in place, under the same grant (the custody system rewriting `associations.toml`):
/// a name dropped is refused at once, the names kept go on with the same grant, and connections open on them stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_names_changed_in_place_under_the_same_grant_apply() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.issue("c-d", &["d1.example.test", "d2.example.test"]);
    let mut both = AssociateRequest::new("c-d", &f.export, GRANTEE);
    both.server_names = Some(vec!["d1.example.test".to_owned(), "d2.example.test".to_owned()]);
    let grant = f.custody.associate(&both).unwrap().grant_id;
    let server = start_server(f.dir.path(), &f.config_with(NO_RESCAN, HELLO)).await;
    let addr = server.tls_addrs[0];
    assert!(leaf_is(addr, &f, "d1.example.test", "c-d").await && leaf_is(addr, &f, "d2.example.test", "c-d").await);
    let open = connect(addr, "d1.example.test", f.client(&[])).await.unwrap();
    let mut open = http1(open).await;

    let path = f.export.join("associations.toml");
    let listed = std::fs::read_to_string(&path).unwrap();
    let narrower = listed
        .replace("server_names = [\"d1.example.test\", \"d2.example.test\"]", "server_names = [\"d1.example.test\"]");
    assert_ne!(narrower, listed, "the association lists both names: {listed}");
    let staged = f.export.join(".associations.toml.tmp");
    std::fs::write(&staged, narrower).unwrap();
    std::fs::rename(&staged, &path).unwrap();

    assert!(
        eventually(APPLY_DEADLINE, || refused_with_alert(addr, "d2.example.test", f.client(&[]))).await,
        "a name dropped from server_names is no longer served"
    );
    assert!(leaf_is(addr, &f, "d1.example.test", "c-d").await, "the name kept is served");
    assert!(std::fs::read_to_string(&path).unwrap().contains(&grant));
    let admin = server.admin_addr.unwrap();
    assert_eq!(common::raw::metric(admin, "sealgate_grants{state=\"retired\"}").await, 0.0, "no grant ended");
    let response = open.send_request(get("d1.example.test", "/")).await.expect("the open connection goes on");
    assert_eq!(text(response).await.0, http::StatusCode::OK);
    open.ready().await.unwrap();
    let response = open.send_request(get("d2.example.test", "/")).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::MISDIRECTED_REQUEST, "the dropped name, over that connection");
}

async fn leaf_is(addr: std::net::SocketAddr, f: &Fixture, sni: &str, id: &str) -> bool {
    leaf_for(addr, sni, f.client(&[])).await == Some(f.leaf(id))
}

/// Kubernetes Secret volumes: the visible names are symlinks through `..data`, which is atomically re-pointed at a
/// new hidden directory. Nothing happens to the visible names themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_volume_update_is_followed() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let volume = f.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let publish = |generation: &str| {
        copy_tree(&f.export, &volume.join(generation));
        let tmp = volume.join("..data_tmp");
        std::os::unix::fs::symlink(generation, &tmp).unwrap();
        std::fs::rename(&tmp, volume.join("..data")).unwrap();
        for name in ["associations.toml", "grants", "certificates"] {
            let link = volume.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), link).unwrap();
            }
        }
    };
    publish("..2026_11_28_10_00_00.1");
    let config =
        config_text(&volume, GRANTEE, HELLO).replacen("\n\n[[listener]]", &format!("\n{NO_RESCAN}\n\n[[listener]]"), 1);
    let server = start_server(f.dir.path(), &config).await;
    let addr = server.tls_addrs[0];
    assert!(leaf_is(addr, &f, "a.example.test", "c-a").await);

    f.custody.renew("c-a", &RenewRequest::reissue()).unwrap();
    publish("..2026_11_28_10_05_00.2");
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "a.example.test", "c-a")).await, "the swap is followed");

    // And the retirement of the grant, published the same way.
    let grant = f.grant_of("c-a");
    f.custody.retire_grant(&grant).unwrap();
    publish("..2026_11_28_10_10_00.3");
    assert!(eventually(APPLY_DEADLINE, || handshake_fails(addr, "a.example.test", f.client(&[]))).await);
}

/// A custody system that rewrites files in place (truncate, then write) exposes half-written files: they are
/// retried, and the association keeps its last good certificate meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_written_files_keep_the_last_good_certificate_until_consistent() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let live = f.dir.path().join("live");
    copy_tree(&f.export, &live);
    let config =
        config_text(&live, GRANTEE, HELLO).replacen("\n\n[[listener]]", &format!("\n{NO_RESCAN}\n\n[[listener]]"), 1);
    let server = start_server(f.dir.path(), &config).await;
    let addr = server.tls_addrs[0];
    let old = f.leaf("c-a");

    // Renew on the custody side, then copy the new files into the live export in place, one at a time, the
    // certificate in two halves.
    f.custody.renew("c-a", &RenewRequest::reissue()).unwrap();
    let relative = ["certificates/c-a/private-key.sealed", "certificates/c-a/certificate.pem", "associations.toml"];
    for file in relative {
        let content = std::fs::read(f.export.join(file)).unwrap();
        let (first, rest) = content.split_at(content.len() / 2);
        let before = reloads(&server);
        {
            use std::io::Write;
            let mut out = std::fs::OpenOptions::new().write(true).truncate(true).open(live.join(file)).unwrap();
            out.write_all(first).unwrap();
            out.sync_all().unwrap();
            // Let the server read the half-written file before the rest arrives.
            assert!(wait_until(APPLY_DEADLINE, || reloads(&server) > before).await, "{file}: no re-read");
            assert_eq!(
                leaf_for(addr, "a.example.test", f.client(&[])).await,
                Some(old.clone()),
                "{file} half-written: the last good certificate is still served"
            );
            out.write_all(rest).unwrap();
        }
    }
    let new = f.leaf("c-a");
    assert!(
        eventually(APPLY_DEADLINE, || async {
            leaf_for(addr, "a.example.test", f.client(&[])).await == Some(new.clone())
        })
        .await
    );
}

/// Deleting the export directory deletes its grant files: every grant is gone, so service ends (FORMAT.md: a grant
/// whose file is gone is retired). The directory recreated with new associations is watched and served again; the
/// old grants never come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_and_recreated_export_directory_is_followed() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let live = f.dir.path().join("live");
    copy_tree(&f.export, &live);
    let config =
        config_text(&live, GRANTEE, HELLO).replacen("\n\n[[listener]]", &format!("\n{NO_RESCAN}\n\n[[listener]]"), 1);
    let server = start_server(f.dir.path(), &config).await;
    let addr = server.tls_addrs[0];
    assert!(leaf_is(addr, &f, "a.example.test", "c-a").await);

    std::fs::remove_dir_all(&live).unwrap();
    assert!(eventually(APPLY_DEADLINE, || handshake_fails(addr, "a.example.test", f.client(&[]))).await);

    // Recreated as it was: the old grant stays retired.
    // Counted before the copy: the copy's own events may be read before the count would be taken after it.
    let before = reloads(&server);
    copy_tree(&f.export, &live);
    assert!(wait_until(APPLY_DEADLINE, || reloads(&server) > before).await, "the recreated directory is read");
    assert!(handshake_fails(addr, "a.example.test", f.client(&[])).await, "a retired grant never comes back");

    // Re-associated (a new grant): served again, from the recreated and re-watched directory.
    f.custody.disassociate("c-a", &f.export).unwrap();
    f.associate("c-a");
    f.serve("c-b", &["b.example.test"]);
    copy_tree(&f.export, &live);
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "a.example.test", "c-a")).await, "re-associated");
    assert!(leaf_is(addr, &f, "b.example.test", "c-b").await);
}

/// A grant lapses at its `not_after` with no file event and no rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_lapses_at_not_after_with_no_file_event() {
    let f = Fixture::new();
    f.issue("c-a", &["a.example.test"]);
    // Whole seconds: the grant file carries RFC 3339 seconds.
    let not_after = (OffsetDateTime::now_utc() + time::Duration::seconds(2)).replace_nanosecond(0).unwrap();
    let mut request = AssociateRequest::new("c-a", &f.export, GRANTEE);
    request.grant_not_after = Some(not_after);
    f.custody.associate(&request).unwrap();
    let server = start_server(f.dir.path(), &f.config_with(NO_RESCAN, HELLO)).await;
    let addr = server.tls_addrs[0];
    let reads = reloads(&server);
    assert!(leaf_is(addr, &f, "a.example.test", "c-a").await, "served before not_after");

    assert!(eventually(APPLY_DEADLINE, || handshake_fails(addr, "a.example.test", f.client(&[]))).await);
    assert!(OffsetDateTime::now_utc() >= not_after, "not before not_after");
    assert!(reloads(&server) <= reads + 1, "ended by its timer, not by a re-read of the files");
    let metrics = server.metrics.encode();
    assert!(metrics.contains("sealgate_grant_retirement_seconds_count 1"), "{metrics}");
}

/// The periodic rescan backs the file events up. FORMAT.md lets any entry be a symbolic link: here the grant file
/// is a link to a file kept outside the export and its parent, which are all the watcher sees, so the grant
/// retired there raises no event. The server that rescans every 250 ms ends the grant within a few intervals; a
/// second server following the same export with the rescan a minute away shows that no file event told them.
/// The retirement, found with no event to time it from, is timed from the grant file's change (in `/metrics` and
/// in the audit log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_rescan_applies_a_change_no_file_event_reports() {
    const RESCAN: Duration = Duration::from_millis(250);
    let f = Fixture::new();
    let grant = f.serve("c-a", &["a.example.test"]);
    f.serve("c-keep", &["keep.example.test"]);
    // Subdirectories of the export's parent: the parent is watched, but not what is inside its subdirectories.
    let dir = |name: &str| {
        let dir = f.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let store = dir("store");
    let grant_file = f.export.join("grants").join(format!("{grant}.toml"));
    let stored = store.join(format!("{grant}.toml"));
    std::fs::rename(&grant_file, &stored).unwrap();
    std::os::unix::fs::symlink(&stored, &grant_file).unwrap();
    let audit = dir("logs").join("audit.jsonl");
    let config = f
        .config_with(&format!("rescan_interval = \"{}ms\"", RESCAN.as_millis()), HELLO)
        .replace("[admin]", &format!("[audit]\npath = {:?}\n\n[admin]", audit.display().to_string()));
    // Every directory made before the servers start: a new entry in the parent is an event.
    let (rescanning_dir, evented_dir) = (dir("rescanning"), dir("evented"));
    let rescanning = start_server(&rescanning_dir, &config).await;
    let evented = start_server(&evented_dir, &f.config_with(NO_RESCAN, HELLO)).await;
    for server in [&rescanning, &evented] {
        assert!(leaf_is(server.tls_addrs[0], &f, "a.example.test", "c-a").await);
        // The read at start, then the one a new watch asks for: a change made before it would be read by it.
        assert!(wait_until(APPLY_DEADLINE, || reloads(server) >= 2).await);
    }

    // Retired where the link points, written aside and renamed into place, as custody systems write.
    let active = std::fs::read_to_string(&stored).unwrap();
    let retired: String = active
        .lines()
        .filter(|line| !line.starts_with("grant_key"))
        .map(|line| if line == "state = \"active\"" { "state = \"retired\"\n".to_owned() } else { format!("{line}\n") })
        .collect();
    assert_ne!(retired, active);
    let changed = tokio::time::Instant::now();
    std::fs::write(store.join(".grant.tmp"), &retired).unwrap();
    std::fs::rename(store.join(".grant.tmp"), &stored).unwrap();

    let addr = rescanning.tls_addrs[0];
    assert!(eventually(APPLY_DEADLINE, || refused_with_alert(addr, "a.example.test", f.client(&[]))).await);
    let took = changed.elapsed();
    assert!(took < RESCAN * 5, "applied {took:?} after the change, with a rescan every {RESCAN:?}");
    assert!(
        leaf_is(evented.tls_addrs[0], &f, "a.example.test", "c-a").await,
        "a file event told the server: this no longer tests the rescan"
    );
    assert!(leaf_is(addr, &f, "keep.example.test", "c-keep").await);

    let (_, metrics) = admin_get(rescanning.admin_addr.unwrap(), "/metrics").await;
    assert!(metrics.contains("sealgate_grant_retirement_seconds_count 1"), "{metrics}");
    let retirement = || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|e| e["event"] == "grant_retired")
    };
    assert!(wait_until(APPLY_DEADLINE, || retirement().is_some()).await);
    // File stamps come from the kernel's coarse clock, up to a tick behind the time of the change.
    let latency_us = retirement().unwrap()["latency_us"].as_u64();
    let bound = took + Duration::from_millis(20);
    assert!(latency_us.is_some_and(|l| l <= bound.as_micros() as u64), "{latency_us:?}, applied after {took:?}");
}

/// Renewals every 100 ms under a concurrent client loop (new handshakes, HTTP/1.1 keep-alive, HTTP/2): not one
/// request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_every_100ms_under_load_fail_no_request() {
    let f = Arc::new(Fixture::new());
    f.serve("c-a", &["a.example.test"]);
    let server = start_server(f.dir.path(), &f.config_with(NO_RESCAN, HELLO)).await;
    let addr = server.tls_addrs[0];
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for kind in ["new-connections", "http1-keep-alive", "http2"] {
        let (f, stop, ok) = (Arc::clone(&f), Arc::clone(&stop), Arc::clone(&ok));
        clients.push(tokio::spawn(async move {
            let mut leaves = std::collections::HashSet::new();
            let mut h1 = None;
            let mut h2 = None;
            while !stop.load(Ordering::Relaxed) {
                let response = match kind {
                    "new-connections" => {
                        let tls = connect(addr, "a.example.test", f.client(&[])).await.map_err(|e| format!("{e}"))?;
                        leaves.insert(peer_leaf(&tls));
                        http1(tls).await.send_request(get("a.example.test", "/")).await
                    }
                    "http1-keep-alive" => {
                        if h1.is_none() {
                            let tls =
                                connect(addr, "a.example.test", f.client(&[])).await.map_err(|e| format!("{e}"))?;
                            h1 = Some(http1(tls).await);
                        }
                        let sender = h1.as_mut().unwrap();
                        sender.ready().await.map_err(|e| format!("{e}"))?;
                        sender.send_request(get("a.example.test", "/")).await
                    }
                    _ => {
                        if h2.is_none() {
                            let tls = connect(addr, "a.example.test", f.client(&[b"h2"]))
                                .await
                                .map_err(|e| format!("{e}"))?;
                            h2 = Some(http2(tls).await);
                        }
                        h2.as_mut().unwrap().send_request(get_h2("a.example.test", "/")).await
                    }
                };
                let (status, body) = text(response.map_err(|e| format!("{kind}: {e}"))?).await;
                if status != http::StatusCode::OK || body != "hello\n" {
                    return Err(format!("{kind}: {status} {body}"));
                }
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, String>(leaves.len())
        }));
    }
    for _ in 0..20 {
        f.custody.renew("c-a", &RenewRequest::reissue()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last renewal is served before the clients stop.
    let last = f.leaf("c-a");
    assert!(
        eventually(APPLY_DEADLINE, || async {
            leaf_for(addr, "a.example.test", f.client(&[])).await == Some(last.clone())
        })
        .await
    );
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for client in clients {
        results.push(client.await.unwrap());
    }
    let distinct = results.remove(0).expect("new connections: no failure");
    for result in results {
        result.expect("keep-alive connections: no failure");
    }
    assert!(distinct >= 3, "new connections saw the renewals ({distinct} distinct certificates)");
    assert!(ok.load(Ordering::Relaxed) > 50, "the clients were busy");
}

/// An export that does not exist yet reads as empty: the server starts not ready, and serves once it appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_starts_before_its_export_exists() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let later = f.dir.path().join("later");
    let config =
        config_text(&later, GRANTEE, HELLO).replacen("\n\n[[listener]]", &format!("\n{NO_RESCAN}\n\n[[listener]]"), 1);
    // Not an ephemeral port: while closed, it must not be given to another test's listener.
    let config = with_listener_port(&config, reserved_port());
    let server = start_server(f.dir.path(), &config).await;
    let admin = server.admin_addr.unwrap();
    assert_eq!(admin_get(admin, "/readyz").await.0, 503);
    assert!(tokio::net::TcpStream::connect(server.tls_addrs[0]).await.is_err(), "nothing to serve: not listening");

    copy_tree(&f.export, &later);
    let addr = server.tls_addrs[0];
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "a.example.test", "c-a")).await, "served once it exists");
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
}
