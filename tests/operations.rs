//! Graceful operation: configuration reloads that drop no connection (in process, by SIGHUP and by a change of
//! the file), and SIGTERM draining in-flight requests within a deadline.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use sealgate::config::Config;

fn respond(body: &str) -> String {
    format!("[[route]]\nrespond = {{ status = 200, body = \"{body}\" }}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_routes_and_listeners_without_dropping_connections() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let path = f.dir.path().join("proxy.toml");
    let server = start_server(f.dir.path(), &f.config(&respond("one"))).await;
    let first = server.tls_addrs[0];
    let mut open = http1(connect(first, "a.example.test", f.client(&[])).await.unwrap()).await;
    assert_eq!(text(open.send_request(get("a.example.test", "/")).await.unwrap()).await.1, "one");

    // New routes, and a second listener.
    let two_listeners = f.config(&respond("two")).replace(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n",
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nbind = \"127.0.0.2:0\"\n",
    );
    let reloaded = server.reload(Config::parse(&two_listeners, &path).unwrap()).await.unwrap();
    assert_eq!(reloaded.opened.len(), 1);
    assert!(reloaded.closed.is_empty() && reloaded.need_restart.is_empty(), "{reloaded:?}");
    open.ready().await.unwrap();
    let (status, body) = text(open.send_request(get("a.example.test", "/")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "two"), "the open connection sees the new routes");
    let second = reloaded.opened[0];
    let mut on_second = http1(connect(second, "a.example.test", f.client(&[])).await.unwrap()).await;
    assert_eq!(text(on_second.send_request(get("a.example.test", "/")).await.unwrap()).await.1, "two");
    assert_eq!(server.listeners().await, [first, second], "the unchanged listener kept its socket");

    // The second listener removed: it stops accepting, its open connection goes on.
    let reloaded = server.reload(Config::parse(&f.config(&respond("three")), &path).unwrap()).await.unwrap();
    assert_eq!(reloaded.closed, [second]);
    assert!(eventually(APPLY_DEADLINE, || async { tokio::net::TcpStream::connect(second).await.is_err() }).await);
    on_second.ready().await.unwrap();
    assert_eq!(text(on_second.send_request(get("a.example.test", "/")).await.unwrap()).await.1, "three");

    // A configuration that cannot be applied changes nothing.
    let bad = f.config("[[route]]\nupstream = \"https://127.0.0.1:9\"\nca = \"/nonexistent/ca.pem\"\n");
    assert!(server.reload(Config::parse(&bad, &path).unwrap()).await.is_err());
    open.ready().await.unwrap();
    assert_eq!(text(open.send_request(get("a.example.test", "/")).await.unwrap()).await.1, "three");

    // A section that only applies at the next start is reported.
    let custody_changed = f.config(&respond("four")).replace("grantee = ", "rescan_interval = \"5s\"\ngrantee = ");
    let reloaded = server.reload(Config::parse(&custody_changed, &path).unwrap()).await.unwrap();
    assert_eq!(reloaded.need_restart, ["custody"]);
}

/// A `sealgate run` child process with its stderr followed.
struct Daemon {
    child: common::KillOnDrop,
    lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl Daemon {
    fn start(config: &std::path::Path) -> Self {
        let mut child = common::spawn_run(config);
        let lines = stderr_lines(&mut child);
        let mut daemon = Self { child, lines, port: 0 };
        let line = daemon.wait_for("listening for TLS");
        daemon.port = line.rsplit(':').next().unwrap().trim().parse().unwrap();
        daemon
    }

    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn signal(&self, name: &str) {
        assert!(Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sealgate did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status of a GET of `path` for `host`, on a new HTTP/1.1 connection to `addr`.
async fn status_of(
    addr: std::net::SocketAddr,
    host: &'static str,
    client: Arc<rustls::ClientConfig>,
    path: &'static str,
) -> StatusCode {
    let tls = connect(addr, host, client).await.unwrap();
    text(http1(tls).await.send_request(get(host, path)).await.unwrap()).await.0
}

fn write_config(path: &std::path::Path, text: &str) {
    // Replace by rename, as editors and configuration management do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_a_changed_file_reload_and_a_bad_file_is_refused() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let path = f.dir.path().join("proxy.toml");
    // The keep-alive pause of the connection kept open below is bounded by `header_read`: long, for slow runs.
    let config = |routes: String| f.config(&routes).replace("[admin]", "[timeouts]\nheader_read = \"60s\"\n\n[admin]");
    write_config(&path, &config(respond("one")));
    let mut daemon = Daemon::start(&path);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.port));
    let body = || async {
        let tls = connect(addr, "a.example.test", f.client(&[])).await.unwrap();
        text(http1(tls).await.send_request(get("a.example.test", "/")).await.unwrap()).await.1
    };
    assert_eq!(body().await, "one");
    // A connection kept open across every reload below: never dropped, it gets each new configuration.
    let kept = connect(addr, "a.example.test", f.client(&[])).await.unwrap();
    let mut kept = http1(kept).await;
    async fn kept_body(
        kept: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    ) -> String {
        kept.ready().await.expect("the open connection survives the reload");
        let response = kept.send_request(get("a.example.test", "/")).await;
        text(response.expect("the open connection survives the reload")).await.1
    }
    assert_eq!(kept_body(&mut kept).await, "one");

    // A change of the file on disk is applied by itself. The listener keeps its (ephemeral) port because its
    // configured address is unchanged.
    write_config(&path, &config(respond("two")));
    daemon.wait_for("configuration reloaded");
    assert_eq!(body().await, "two");
    assert_eq!(kept_body(&mut kept).await, "two");

    // A bad file is refused with its error; the running configuration stays.
    write_config(&path, &config(respond("three")).replace("[[route]]", "[[route]]\nbogus = 1"));
    let line = daemon.wait_for("new configuration refused");
    assert!(line.contains("proxy.toml") && line.contains("bogus"), "{line}");
    assert_eq!(body().await, "two");

    // SIGHUP reloads too (here, after the file was fixed without the watcher's help being needed).
    std::fs::write(&path, config(respond("four"))).unwrap();
    daemon.signal("HUP");
    assert!(eventually(APPLY_DEADLINE, || async { body().await == "four" }).await);
    assert_eq!(kept_body(&mut kept).await, "four");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    // An upstream that answers after a second.
    let upstream = Upstream::start_with(|_| {
        std::thread::sleep(Duration::from_secs(1));
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"slow but sure")))
    })
    .await;
    let path = f.dir.path().join("proxy.toml");
    let config = f.config(&format!("[[route]]\nupstream = \"{}\"\n", upstream.url()));
    let config = config.replace("[admin]", "[timeouts]\ndrain = \"10s\"\n\n[admin]");
    // Not an ephemeral port: once closed, it must not be given to another test's listener.
    write_config(&path, &with_listener_port(&config, reserved_port()));
    let mut daemon = Daemon::start(&path);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.port));

    let tls = connect(addr, "a.example.test", f.client(&[])).await.unwrap();
    let mut sender = http1(tls).await;
    let in_flight =
        tokio::spawn(async move { text(sender.send_request(get("a.example.test", "/")).await.unwrap()).await });
    assert!(wait_until(APPLY_DEADLINE, || !upstream.recorded.lock().unwrap().is_empty()).await);
    daemon.signal("TERM");
    daemon.wait_for("shutting down");
    assert!(
        eventually(APPLY_DEADLINE, || async { tokio::net::TcpStream::connect(addr).await.is_err() }).await,
        "no new connections while draining"
    );
    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow but sure"), "the in-flight request finished");
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_what_outlives_the_drain_deadline() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&reached);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let path = f.dir.path().join("proxy.toml");
    let config = f.config(&format!("[[route]]\nupstream = \"http://{silent_addr}\"\n"));
    write_config(&path, &config.replace("[admin]", "[timeouts]\ndrain = \"300ms\"\n\n[admin]"));
    let mut daemon = Daemon::start(&path);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.port));
    let tls = connect(addr, "a.example.test", f.client(&[])).await.unwrap();
    let mut sender = http1(tls).await;
    let in_flight = tokio::spawn(async move { sender.send_request(get("a.example.test", "/")).await });
    let upstream_reached = || reached.load(std::sync::atomic::Ordering::SeqCst) > 0;
    assert!(wait_until(APPLY_DEADLINE, upstream_reached).await, "the request is in flight");
    let signalled = Instant::now();
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
    assert!(signalled.elapsed() < Duration::from_secs(5), "the drain deadline bounds the exit");
    assert!(in_flight.await.unwrap().is_err(), "the request that outlived the deadline was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_rotated_logs_and_the_audit_files_verify_as_one_chain() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-b", &["b.example.test"]);
    let audit = f.dir.path().join("audit.jsonl");
    let rotated = f.dir.path().join("audit.jsonl.1");
    let access = f.dir.path().join("access.log");
    let access_rotated = f.dir.path().join("access.log.1");
    let path = f.dir.path().join("proxy.toml");
    let config = f
        .config(&respond("one"))
        .replace("[admin]", &format!("[audit]\npath = {audit:?}\n\n[access_log]\npath = {access:?}\n\n[admin]"));
    write_config(&path, &config);
    let mut daemon = Daemon::start(&path);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.port));
    let client = f.client(&[]);
    let request = |path: &'static str| status_of(addr, "b.example.test", Arc::clone(&client), path);
    assert_eq!(request("/before").await, StatusCode::OK);
    assert!(wait_until(APPLY_DEADLINE, || std::fs::read_to_string(&access).unwrap().contains("/before")).await);

    // logrotate's `create`: move the logs aside, leave empty files; then the signal. A configuration that is
    // refused meanwhile does not keep the logs from being reopened.
    std::fs::rename(&audit, &rotated).unwrap();
    std::fs::write(&audit, "").unwrap();
    std::fs::rename(&access, &access_rotated).unwrap();
    write_config(&path, &config.replace("[[route]]", "[[route]]\nbogus = 1"));
    daemon.wait_for("new configuration refused");
    daemon.signal("HUP");
    let line = daemon.wait_for("audit log reopened");
    assert!(line.contains("audit.jsonl") && line.contains("reopened"), "{line}");
    assert_eq!(request("/after").await, StatusCode::OK);
    assert!(
        wait_until(APPLY_DEADLINE, || std::fs::read_to_string(&access).is_ok_and(|t| t.contains("/after"))).await,
        "the access log goes on in a new file at its path"
    );
    let old_access = std::fs::read_to_string(&access_rotated).unwrap();
    assert!(old_access.contains("/before") && !old_access.contains("/after"), "{old_access}");

    // What happens next is recorded in the new file.
    let grant = f.grant_of("c-a");
    f.custody.retire_grant(&grant).unwrap();
    assert!(eventually(APPLY_DEADLINE, || refused_with_alert(addr, "a.example.test", f.client(&[]))).await);
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());

    let new = std::fs::read_to_string(&audit).unwrap();
    let first: serde_json::Value = serde_json::from_str(new.lines().next().unwrap()).unwrap();
    assert_eq!(first["event"], "log_continued", "{new}");
    assert!(new.contains(r#""event":"grant_retired""#) && new.contains(r#""event":"stopped""#), "{new}");
    assert!(!std::fs::read_to_string(&rotated).unwrap().contains("grant_retired"));

    let verify = |files: &[&std::path::Path]| {
        Command::new(env!("CARGO_BIN_EXE_sealgate")).args(["audit", "verify"]).args(files).output().unwrap()
    };
    let both = verify(&[&rotated, &audit]);
    let stdout = String::from_utf8_lossy(&both.stdout);
    assert!(both.status.success() && stdout.starts_with("ok: ") && !stdout.contains("continued"), "{stdout}");
    let alone = verify(&[&audit]);
    let stdout = String::from_utf8_lossy(&alone.stdout);
    assert!(alone.status.success() && stdout.contains("continued from seq"), "{stdout}");
    assert_eq!(verify(&[&audit, &rotated]).status.code(), Some(1), "the files in the wrong order are no chain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_has_a_request_duration_histogram_that_a_reload_keeps_to_its_own_route() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let path = f.dir.path().join("proxy.toml");
    let routes = |first: &str| {
        format!(
            "[[route]]\nhost = \"a.example.test\"\npath = \"{first}\"\nrespond = {{ status = 200 }}\n\
             [[route]]\nrespond = {{ status = 201 }}\n"
        )
    };
    let server = start_server(f.dir.path(), &f.config(&routes("/api"))).await;
    let admin = server.admin_addr.unwrap();
    let mut c = http1(connect(server.tls_addrs[0], "a.example.test", f.client(&[])).await.unwrap()).await;
    for path in ["/api/1", "/api/2", "/other"] {
        c.ready().await.unwrap();
        assert!(text(c.send_request(get("a.example.test", path)).await.unwrap()).await.0.is_success());
    }
    let series = |route: &str| format!("sealgate_route_request_duration_seconds_count{{{route}}} ");
    let api = r#"route="0",host="a.example.test",path="/api""#;
    let any = r#"route="1",host="*",path="/""#;
    let count = |text: &str, route: &str| {
        text.lines().find_map(|l| l.strip_prefix(&series(route))).map(|v| v.trim().parse::<f64>().unwrap())
    };
    // Counted when the response has ended: the last one may be a moment behind its answer.
    assert!(
        eventually(APPLY_DEADLINE, || async {
            let (_, text) = admin_get(admin, "/metrics").await;
            count(&text, api) == Some(2.0) && count(&text, any) == Some(1.0)
        })
        .await,
        "{}",
        admin_get(admin, "/metrics").await.1
    );
    let (_, text) = admin_get(admin, "/metrics").await;
    assert!(text.contains(&format!("sealgate_route_request_duration_seconds_bucket{{le=\"0.001\",{api}}}")), "{text}");

    // Route 0 now matches another path: its series is a new one, the old one is gone; route 1 keeps its count.
    server.reload(Config::parse(&f.config(&routes("/v2")), &path).unwrap()).await.unwrap();
    let (_, text) = admin_get(admin, "/metrics").await;
    assert_eq!(count(&text, api), None, "{text}");
    assert_eq!(count(&text, r#"route="0",host="a.example.test",path="/v2""#), Some(0.0), "{text}");
    assert_eq!(count(&text, any), Some(1.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_log_that_cannot_be_reopened_goes_on_in_the_file_it_had() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let access = f.dir.path().join("access.log");
    let rotated = f.dir.path().join("access.log.1");
    let routes = format!("[access_log]\npath = {access:?}\n\n{}", respond("one"));
    let server = f.start(&routes).await;
    let addr = server.tls_addrs[0];
    let client = f.client(&[]);
    let request = |path: &'static str| status_of(addr, "a.example.test", Arc::clone(&client), path);
    let logged = |file: &std::path::Path, path: &str| std::fs::read_to_string(file).is_ok_and(|t| t.contains(path));
    assert_eq!(request("/before").await, StatusCode::OK);
    assert!(wait_until(APPLY_DEADLINE, || logged(&access, "/before")).await);

    // Rotated away, and a directory where the new file should be: the reopen fails, no line is lost.
    std::fs::rename(&access, &rotated).unwrap();
    std::fs::create_dir(&access).unwrap();
    server.reopen_logs().await;
    assert_eq!(request("/during").await, StatusCode::OK);
    assert!(wait_until(APPLY_DEADLINE, || logged(&rotated, "/during")).await, "the old file took the line");

    // The path usable again: the next reopen takes it.
    std::fs::remove_dir(&access).unwrap();
    server.reopen_logs().await;
    assert_eq!(request("/after").await, StatusCode::OK);
    assert!(wait_until(APPLY_DEADLINE, || logged(&access, "/after")).await, "the new file took the line");
    assert!(!logged(&rotated, "/after"));
}
