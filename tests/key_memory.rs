//! Key hygiene, proven on a running process: after a grant is retired, the memory of the sealgate process holds
//! none of the private key (its scalar in big- and little-endian order: aws-lc keeps EC scalars little-endian),
//! the PKCS#8 DER, the grant key or the data key. As a positive control, the scalar is found while the grant is
//! live, so the scan can see what it looks for.
//!
//! Linux only: reads `/proc/<pid>/mem` of a child process (allowed to a parent, once the child is left dumpable:
//! by default sealgate makes itself non-dumpable, which closes exactly this door).

mod common;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use sealgate::custody::format::{Associations, Grant, SealedKey};
use sealgate::custody::seal;
use sealgate::custody::writer::{export_paths, AssociateRequest, Custody, IssueRequest};

/// The secrets the scan looks for.
struct Needles {
    scalar_be: Vec<u8>,
    scalar_le: Vec<u8>,
    pkcs8: Vec<u8>,
    grant_key: Vec<u8>,
    data_key: Vec<u8>,
}

impl Needles {
    /// Opens the association the way a holder would, to learn what must not stay in memory.
    fn of(export: &Path, certificate_id: &str) -> Self {
        let associations = Associations::parse(&std::fs::read(export.join("associations.toml")).unwrap()).unwrap();
        let entry = associations.entries.iter().find(|e| e.certificate_id == certificate_id).unwrap();
        let grant_path = export.join("grants").join(format!("{}.toml", entry.grant_id));
        let grant = Grant::parse(&std::fs::read(grant_path).unwrap(), &entry.grant_id).unwrap();
        let grant_key = grant.grant_key.unwrap();
        let aad = seal::data_key_aad(&entry.grant_id, certificate_id, &grant.key_id);
        let data_key = seal::unwrap_data_key(&grant_key, &entry.wrapped_data_key().unwrap(), &aad).unwrap();
        let paths = export_paths(export, certificate_id);
        let sealed = SealedKey::parse(&std::fs::read(paths.sealed_key).unwrap(), certificate_id).unwrap();
        let aad = seal::sealed_key_aad(certificate_id, &sealed.key_id);
        let pkcs8 = seal::open_private_key(&data_key, &sealed.nonce, &sealed.ciphertext, &aad).unwrap();
        let pkcs8 = pkcs8.expose().to_vec();
        // ECPrivateKey (RFC 5915) inside the PKCS#8: version 1, then the 32-byte private key octet string.
        let at = memchr::memmem::find(&pkcs8, &[0x02, 0x01, 0x01, 0x04, 0x20]).expect("a P-256 ECPrivateKey") + 5;
        let scalar_be = pkcs8[at..at + 32].to_vec();
        let scalar_le = scalar_be.iter().rev().copied().collect();
        Self {
            scalar_be,
            scalar_le,
            pkcs8,
            grant_key: grant_key.expose().to_vec(),
            data_key: data_key.expose().to_vec(),
        }
    }

    fn all(&self) -> [(&'static str, &[u8]); 5] {
        [
            ("private scalar (big-endian)", &self.scalar_be),
            ("private scalar (little-endian)", &self.scalar_le),
            ("PKCS#8 DER", &self.pkcs8),
            ("grant key", &self.grant_key),
            ("data key", &self.data_key),
        ]
    }
}

/// Every readable, writable mapping of `pid`: where heap, stacks and anonymous memory live.
fn scan(pid: u32, needles: &[(&'static str, &[u8])]) -> Vec<&'static str> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let finders: Vec<_> = needles.iter().map(|(name, n)| (*name, memchr::memmem::Finder::new(n))).collect();
    let mut found = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut region = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue; // e.g. a guard page
        }
        for (name, finder) in &finders {
            if finder.find(&region).is_some() && !found.contains(name) {
                found.push(*name);
            }
        }
    }
    found
}

struct Server {
    child: common::KillOnDrop,
    addr: std::net::SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, export: &Path) -> Server {
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[custody]\nexport = {:?}\ngrantee = \"holder\"\nrescan_interval = \"200ms\"\n\
             [process]\ndumpable = true\nlock_memory = false\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nrespond = {{ status = 200 }}\n",
            export.display().to_string()
        ),
    )
    .unwrap();
    let mut child = common::spawn_run(&config);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("sealgate exited").unwrap();
        if let Some(addr) = line.split("listening for TLS addr=").nth(1) {
            break addr.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr }
}

/// One TLS handshake, so that the key has signed; `Ok` when the server completed it.
fn handshake(addr: std::net::SocketAddr, ca_pem: &str) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "a.example.test".try_into().unwrap()).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[test]
fn a_retired_grant_leaves_no_key_material_in_process_memory() {
    let dir = tempfile::tempdir().unwrap();
    let custody = Custody::open(&dir.path().join("state")).unwrap();
    let export = dir.path().join("export");
    let mut request = IssueRequest::new(["a.example.test"]);
    request.certificate_id = Some("c-a".to_owned());
    custody.issue(&request).unwrap();
    let grant = custody.associate(&AssociateRequest::new("c-a", &export, "holder")).unwrap().grant_id;
    let needles = Needles::of(&export, "c-a");
    let ca_pem = custody.ca_certificate_pem().unwrap();

    let server = start(dir.path(), &export);
    for _ in 0..3 {
        handshake(server.addr, &ca_pem).expect("served while the grant is live");
    }
    let live = scan(server.child.id(), &needles.all());
    assert!(
        live.iter().any(|n| n.starts_with("private scalar")),
        "positive control: the scan must find the scalar while the grant is live (found {live:?})"
    );

    // The grant key, the data key and the DER are only needed while a read verifies the association: even while
    // the grant is live, none of them outlives the read.
    for transient in ["PKCS#8 DER", "grant key", "data key"] {
        assert!(!live.contains(&transient), "while live, process memory holds the {transient} (found {live:?})");
    }
    custody.retire_grant(&grant).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while handshake(server.addr, &ca_pem).is_ok() {
        assert!(Instant::now() < deadline, "the retirement was not applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    let retired = scan(server.child.id(), &needles.all());
    assert!(retired.is_empty(), "after retirement, process memory still holds: {retired:?} (live: {live:?})");
}
