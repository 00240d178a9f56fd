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

/// The hypervisor's steal (`steal` in `/proc/stat`) over a measurement window, on the server's core and on the
/// load generator's (this process's, which the tools it runs inherit), for each side pinned to one core.
#[derive(Debug, Clone, Copy)]
pub struct StealWindow {
    server_cpu: Option<usize>,
    generator_cpu: Option<usize>,
    /// Steal on each, in seconds, when the window opened.
    opened: [Option<f64>; 2],
}

impl StealWindow {
    /// Opens the window now.
    pub fn open(server: &Server) -> Self {
        let server_cpu =
            server.0.and_then(|pid| rustix::process::Pid::from_raw(pid as i32)).and_then(|pid| only_cpu(Some(pid)));
        let mut window = Self { server_cpu, generator_cpu: only_cpu(None), opened: [None; 2] };
        window.opened = window.steal_now();
        window
    }

    /// Milliseconds stolen on each core since the window opened, as the results record them (`steal_ms`).
    pub fn json(&self) -> serde_json::Value {
        let [server, generator] = self.steal_now();
        let ms = |now: Option<f64>, then: Option<f64>| now.zip(then).map(|(now, then)| ((now - then) * 1e3).round());
        serde_json::json!({
            "server_core": ms(server, self.opened[0]),
            "generator_core": ms(generator, self.opened[1]),
        })
    }

    fn steal_now(&self) -> [Option<f64>; 2] {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        [self.server_cpu, self.generator_cpu].map(|cpu| cpu.and_then(|cpu| cpu_steal_seconds(&stat, cpu)))
    }
}

/// The one CPU process `pid` (this one when `None`) may run on; `None` when it may run on several.
fn only_cpu(pid: Option<rustix::process::Pid>) -> Option<usize> {
    let cpus = rustix::thread::sched_getaffinity(pid).ok()?;
    if cpus.count() != 1 {
        return None;
    }
    (0..rustix::thread::CpuSet::MAX_CPU).find(|&cpu| cpus.is_set(cpu))
}

/// `steal` of CPU `cpu` in the text of `/proc/stat`, in seconds.
fn cpu_steal_seconds(stat: &str, cpu: usize) -> Option<f64> {
    let label = format!("cpu{cpu}");
    let line = stat.lines().find(|line| line.split_whitespace().next() == Some(label.as_str()))?;
    // cpuN user nice system idle iowait irq softirq steal ...
    let ticks: f64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(ticks / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_read_from_the_cpu_line() {
        let stat = "cpu  10 0 5 100 0 0 0 7 0 0\ncpu0 5 0 2 50 0 0 0 3 0 0\ncpu1 5 0 3 50 0 0 0 4 0 0\nintr 1\n";
        assert_eq!(cpu_steal_seconds(stat, 0), Some(0.03));
        assert_eq!(cpu_steal_seconds(stat, 1), Some(0.04));
        assert_eq!(cpu_steal_seconds(stat, 2), None);
    }
}
