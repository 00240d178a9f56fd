//! `/metrics` as a Prometheus scraper reads it: the admin listener's HTTP answer, not the server's accessors.
//! The custody series follow the grants and the reads of the export; the connection gauge follows the clients.

mod common;

use common::*;
use http::StatusCode;

/// The value of `series` (name and labels, exactly as exposed) in a scrape, if it is there.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

const ACTIVE: &str = "sealgate_grants{state=\"active\"}";
const RETIRED: &str = "sealgate_grants{state=\"retired\"}";
const OPEN: &str = "sealgate_connections_open";
const FAILED_READS: &str = "sealgate_custody_reloads_total{result=\"failed\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_grants_reads_of_the_export_and_open_connections() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-b", &["b.example.test"]);
    let server = f.start(HELLO).await;
    let admin = server.admin_addr.unwrap();
    let scrape = || async {
        let (status, text) = admin_get(admin, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        text
    };
    // Until a value is the one expected, with the last scrape for the failure message.
    let expect = |series: &'static str, expected: f64| async move {
        let reached = eventually(APPLY_DEADLINE, || async { value(&scrape().await, series) == Some(expected) }).await;
        assert!(reached, "{series} is not {expected}:\n{}", scrape().await);
    };

    let first = scrape().await;
    assert_eq!((value(&first, ACTIVE), value(&first, RETIRED)), (Some(2.0), Some(0.0)), "{first}");
    assert_eq!(value(&first, FAILED_READS), None, "{first}");
    expect(OPEN, 0.0).await;

    // A client connection is counted while it is open (the admin's own connections are not client ones).
    let tls = connect(server.tls_addrs[0], "a.example.test", f.client(&[])).await.unwrap();
    let mut client = http1(tls).await;
    assert_eq!(text(client.send_request(get("a.example.test", "/")).await.unwrap()).await.0, StatusCode::OK);
    expect(OPEN, 1.0).await;
    drop(client);
    expect(OPEN, 0.0).await;

    // A grant retired: one active, one retired.
    f.custody.retire_grant(&f.grant_of("c-a")).unwrap();
    expect(RETIRED, 1.0).await;
    assert_eq!(value(&scrape().await, ACTIVE), Some(1.0));

    // associations.toml that does not parse: the read fails (and b goes on being served).
    std::fs::write(f.export.join("associations.toml"), "format = \"custody-associations/v1\"\n[[association]\n")
        .unwrap();
    let failed =
        eventually(APPLY_DEADLINE, || async { value(&scrape().await, FAILED_READS).is_some_and(|n| n >= 1.0) });
    assert!(failed.await, "{}", scrape().await);
    assert!(leaf_for(server.tls_addrs[0], "b.example.test", f.client(&[])).await.is_some());
    let last = scrape().await;
    assert_eq!((value(&last, ACTIVE), value(&last, RETIRED)), (Some(1.0), Some(1.0)), "{last}");
}
