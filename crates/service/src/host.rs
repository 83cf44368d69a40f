//! Facts about the host read from `/proc` and `/sys`: cgroup version, privileges, mounts,
//! per-container OOM kills.

use std::path::Path;

/// The cgroup layout of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    /// v1 controllers plus a v2 hierarchy at /sys/fs/cgroup/unified (crun refuses this).
    Hybrid,
    V2,
}

impl CgroupVersion {
    pub fn is_v2(self) -> bool {
        self == CgroupVersion::V2
    }
    pub fn describe(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::Hybrid => "v1 (hybrid, with a v2 hierarchy)",
            CgroupVersion::V2 => "v2 (unified)",
        }
    }
}

/// Reads the cgroup layout from `/proc/self/mounts`.
pub fn cgroup_version() -> CgroupVersion {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut unified = false;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (_, target, fstype) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if fstype == "cgroup2" {
            if target == "/sys/fs/cgroup" {
                return CgroupVersion::V2;
            }
            unified = true;
        }
    }
    if unified {
        CgroupVersion::Hybrid
    } else {
        CgroupVersion::V1
    }
}

/// Whether conductor runs with uid 0 (needed for loop-mounted volumes).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether `path` is a mount point (listed in `/proc/self/mountinfo`).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else { return false };
    let target = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(4) == Some(target.as_str())))
        .unwrap_or(false)
}

/// Mount points at or below `dir` (from `/proc/self/mountinfo`).
pub fn mounts_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(canon) = dir.canonicalize() else {
        return Vec::new();
    };
    let prefix = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter(|p| p.starts_with(&prefix))
                .map(|p| std::path::PathBuf::from(p.replace("\\040", " ")))
                .collect()
        })
        .unwrap_or_default()
}

/// Number of OOM kills in the memory cgroup of the process `pid` (a container's init), for
/// cgroups v1 (`memory.oom_control`) and v2 (`memory.events`).
pub fn oom_kills(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (file, key) = if controllers.split(',').any(|c| c == "memory") {
            (format!("/sys/fs/cgroup/memory{path}/memory.oom_control"), "oom_kill ")
        } else if controllers.is_empty() && cgroup_version().is_v2() {
            (format!("/sys/fs/cgroup{path}/memory.events"), "oom_kill ")
        } else {
            continue;
        };
        let text = std::fs::read_to_string(file).ok()?;
        return text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok());
    }
    None
}

/// Used and total bytes of the file system holding `path`.
pub fn disk_usage(path: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frag;
    let free = st.blocks_free() as u64 * frag;
    Some((total.saturating_sub(free), total))
}

/// What the host has: CPUs, memory (total and available, from `/proc/meminfo`) and the disk
/// of `data` (total and free).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub cpus: usize,
    pub memory_total: u64,
    pub memory_available: u64,
    pub disk_total: u64,
    pub disk_free: u64,
}

/// The host's [`Capacity`], with `data` the file system conductor keeps its data on.
pub fn capacity(data: &Path) -> Capacity {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    let (disk_used, disk_total) = disk_usage(data).unwrap_or((0, 0));
    let disk_free = disk_total.saturating_sub(disk_used);
    Capacity {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_total: kib("MemTotal:"),
        memory_available: kib("MemAvailable:"),
        disk_total,
        disk_free,
    }
}
