//! What a process costs, from `/proc`: CPU time (utime + stime) and resident memory, summed over a process and
//! all its descendants (nginx's master and workers, for instance).

use std::fs;

/// Clock ticks per second of `/proc/PID/stat`: 100 on every Linux platform Rust supports.
const TICKS_PER_SECOND: f64 = 100.0;

/// The fields of `/proc/PID/stat` after the command name (which is in parentheses and may hold spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and every process descending from it.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(fields) = stat_fields(pid) {
                if let Some(ppid) = fields.get(1).and_then(|p| p.parse().ok()) {
                    parents.push((pid, ppid));
                }
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
        i += 1;
    }
    found
}

/// User + system CPU seconds of one process (all its threads, live and exited).
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_fields(pid)
        .and_then(|f| Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?))
        .map_or(0.0, |ticks| ticks as f64 / TICKS_PER_SECOND)
}

/// CPU seconds of this process's waited-for children (cutime + cstime).
pub fn children_cpu_seconds() -> f64 {
    let pid = std::process::id();
    stat_fields(pid)
        .and_then(|f| Some(f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?))
        .map_or(0.0, |ticks| ticks as f64 / TICKS_PER_SECOND)
}

/// Resident set size of one process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// The server under measurement: a process tree, sampled whole.
#[derive(Debug, Clone, Copy)]
pub struct Server(pub Option<u32>);

impl Server {
    /// CPU seconds of the whole tree.
    pub fn cpu(&self) -> f64 {
        self.0.map_or(0.0, |root| tree(root).into_iter().map(cpu_seconds).sum())
    }

    /// RSS of the whole tree, in bytes.
    pub fn rss(&self) -> u64 {
        self.0.map_or(0, |root| tree(root).into_iter().map(rss_bytes).sum())
    }
}

/// CPU seconds of this process.
pub fn self_cpu() -> f64 {
    cpu_seconds(std::process::id())
}
