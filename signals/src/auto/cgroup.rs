//! The CPU and memory limits of this process's own cgroup, v2 or v1.
//!
//! The cgroup is found from `/proc/self/cgroup` (which group, per hierarchy) and
//! `/proc/self/mountinfo` (where each hierarchy is mounted, and which part of it), the way
//! container runtimes lay them out: with or without a cgroup namespace, pure v2, pure v1, or
//! hybrid (v1 controllers next to an empty v2 tree; the v1 controller wins). Limits are the
//! smallest along the path from the group up to the mount, since a parent's limit binds its
//! children too. Every path is read under a root directory so tests can use fixture trees.
//!
//! No limit is the normal case (a process outside any container): the functions return `None`.

use std::path::{Path, PathBuf};

/// Where the limit files of this process's cgroup are.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cgroups {
    memory: Option<Group>,
    cpu: Option<Group>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// One hierarchy's directory for this process, and the mount it lies under (where walking
/// up stops).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    version: Version,
    dir: PathBuf,
    mount: PathBuf,
}

/// v1 reports "no limit" as the largest page-aligned i64 (9223372036854771712 with 4 KiB
/// pages); anything this large is no limit, whatever the page size.
const V1_UNLIMITED: u64 = 1 << 62;

impl Cgroups {
    /// Finds this process's cgroup under `root` (`/` in production).
    pub(crate) fn discover(root: &Path) -> Cgroups {
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
        let membership = parse_proc_cgroup(&read("proc/self/cgroup"));
        let mounts = parse_mountinfo(&read("proc/self/mountinfo"));
        let find = |controller: &str| -> Option<Group> {
            // v1: a hierarchy listing the controller, mounted with it among its options.
            let v1 = membership.iter().find(|m| m.controllers.iter().any(|c| c == controller)).and_then(|m| {
                let mount = mounts
                    .iter()
                    .find(|mt| mt.fstype == "cgroup" && mt.super_options.split(',').any(|o| o == controller))?;
                Some(resolve(root, Version::V1, mount, &m.path))
            });
            v1.or_else(|| {
                let m = membership.iter().find(|m| m.hierarchy == "0" && m.controllers.is_empty())?;
                match mounts.iter().find(|mt| mt.fstype == "cgroup2") {
                    Some(mount) => Some(resolve(root, Version::V2, mount, &m.path)),
                    // No mountinfo (a restricted /proc): v2's conventional place.
                    None => {
                        let top = root.join("sys/fs/cgroup");
                        top.join("cgroup.controllers").exists().then(|| Group {
                            version: Version::V2,
                            dir: existing_or(top.join(m.path.trim_start_matches('/')), &top),
                            mount: top,
                        })
                    }
                }
            })
        };
        Cgroups { memory: find("memory"), cpu: find("cpu") }
    }

    /// The memory limit in bytes, `None` when no cgroup on the path sets one.
    pub(crate) fn memory_limit(&self) -> Option<u64> {
        let group = self.memory.as_ref()?;
        let file = match group.version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        };
        group
            .ancestry()
            .filter_map(|dir| std::fs::read_to_string(dir.join(file)).ok())
            .filter_map(|text| parse_memory_limit(&text))
            .min()
    }

    /// The CPU limit in CPUs (quota / period; `1.5` = one and a half CPUs), `None` when no
    /// cgroup on the path sets one.
    pub(crate) fn cpu_limit(&self) -> Option<f64> {
        let group = self.cpu.as_ref()?;
        group
            .ancestry()
            .filter_map(|dir| match group.version {
                Version::V2 => parse_cpu_max(&std::fs::read_to_string(dir.join("cpu.max")).ok()?),
                Version::V1 => parse_cfs(
                    &std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).ok()?,
                    &std::fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?,
                ),
            })
            .min_by(f64::total_cmp)
    }

    /// Where the limits were read from, for logs and manifests.
    pub(crate) fn describe(&self) -> String {
        let one = |name: &str, g: &Option<Group>| match g {
            Some(g) => format!("{name}: cgroup {:?} {}", g.version, g.dir.display()),
            None => format!("{name}: no cgroup"),
        };
        format!("{}; {}", one("memory", &self.memory), one("cpu", &self.cpu))
    }
}

impl Group {
    /// The group's directory and each parent up to and including the mount point.
    fn ancestry(&self) -> impl Iterator<Item = &Path> {
        self.dir.ancestors().take_while(|d| d.starts_with(&self.mount))
    }
}

/// The group's directory: the mount point plus the group's path relative to the part of the
/// hierarchy that is mounted there. A path outside the mounted part (a cgroup namespace the
/// mount does not reflect), or one that does not exist, falls back to the mount point itself,
/// which is then the process's own group as seen from inside its container.
fn resolve(root: &Path, version: Version, mount: &Mount, path: &str) -> Group {
    let mount_dir = root.join(mount.mount_point.trim_start_matches('/'));
    let relative = Path::new(path).strip_prefix(&mount.root).ok().map(Path::to_owned);
    let dir = match relative {
        Some(rel) if !rel.as_os_str().is_empty() => existing_or(mount_dir.join(rel), &mount_dir),
        _ => mount_dir.clone(),
    };
    Group { version, dir, mount: mount_dir }
}

fn existing_or(dir: PathBuf, fallback: &Path) -> PathBuf {
    if dir.is_dir() { dir } else { fallback.to_owned() }
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controller,list:/path`.
#[derive(Debug, PartialEq, Eq)]
struct Membership {
    hierarchy: String,
    controllers: Vec<String>,
    path: String,
}

fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.to_owned();
            let controllers =
                parts.next()?.split(',').filter(|c| !c.is_empty()).map(|c| c.trim_start_matches("name=").to_owned());
            let path = parts.next()?.to_owned();
            Some(Membership { hierarchy, controllers: controllers.collect(), path })
        })
        .collect()
}

/// The fields of a `/proc/self/mountinfo` line that locate a cgroup hierarchy.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    root: String,
    mount_point: String,
    fstype: String,
    super_options: String,
}

/// `36 35 98:0 /root /mount/point rw,opts optional... - fstype source super,opts`
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut after = after.split(' ');
            let fstype = after.next()?.to_owned();
            let _source = after.next()?;
            let super_options = after.next().unwrap_or("").to_owned();
            Some(Mount { root: unescape(fields.get(3)?), mount_point: unescape(fields.get(4)?), fstype, super_options })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && let Ok(code) = u8::from_str_radix(std::str::from_utf8(digits).unwrap_or("x"), 8)
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// v2 `memory.max` (`max` or bytes) or v1 `memory.limit_in_bytes` (bytes; huge or -1 for none).
fn parse_memory_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    match text.parse::<i64>().ok()? {
        n if n < 0 => None,
        n if n as u64 >= V1_UNLIMITED => None,
        n => Some(n as u64),
    }
}

/// v2 `cpu.max`: `max 100000` (none) or `150000 100000` (1.5 CPUs).
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut words = text.split_whitespace();
    let quota = words.next()?;
    let period: f64 = words.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    (quota > 0.0).then(|| quota / period)
}

/// v1 `cpu.cfs_quota_us` (-1 for none) over `cpu.cfs_period_us`.
fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: i64 = period.trim().parse().ok()?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture tree: `files` are (path under the root, content).
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    const V2_MOUNTINFO: &str = "\
25 30 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:14 - proc proc rw
28 30 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn v2_limits_are_read_and_the_smallest_on_the_path_wins() {
        let root = tree(&[
            ("proc/self/cgroup", "0::/system.slice/svc.service\n"),
            ("proc/self/mountinfo", V2_MOUNTINFO),
            ("sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n"),
            ("sys/fs/cgroup/system.slice/memory.max", "1073741824\n"),
            ("sys/fs/cgroup/system.slice/cpu.max", "max 100000\n"),
            ("sys/fs/cgroup/system.slice/svc.service/memory.max", "2147483648\n"),
            ("sys/fs/cgroup/system.slice/svc.service/cpu.max", "150000 100000\n"),
        ]);
        let cg = Cgroups::discover(root.path());
        assert_eq!(cg.memory_limit(), Some(1 << 30), "the parent's 1 GiB binds the child's 2 GiB");
        assert_eq!(cg.cpu_limit(), Some(1.5));
    }

    #[test]
    fn v2_max_is_no_limit() {
        let root = tree(&[
            ("proc/self/cgroup", "0::/app\n"),
            ("proc/self/mountinfo", V2_MOUNTINFO),
            ("sys/fs/cgroup/app/memory.max", "max\n"),
            ("sys/fs/cgroup/app/cpu.max", "max 100000\n"),
        ]);
        let cg = Cgroups::discover(root.path());
        assert_eq!(cg.memory_limit(), None);
        assert_eq!(cg.cpu_limit(), None);
    }

    #[test]
    fn v2_in_a_cgroup_namespace_reads_the_mount_point_itself() {
        // Inside a container with its own cgroup namespace, the group is `/` and the mount's
        // root is `/`: the limits are in /sys/fs/cgroup itself.
        let root = tree(&[
            ("proc/self/cgroup", "0::/\n"),
            ("proc/self/mountinfo", V2_MOUNTINFO),
            ("sys/fs/cgroup/memory.max", "536870912\n"),
            ("sys/fs/cgroup/cpu.max", "50000 100000\n"),
        ]);
        let cg = Cgroups::discover(root.path());
        assert_eq!(cg.memory_limit(), Some(512 << 20));
        assert_eq!(cg.cpu_limit(), Some(0.5));
    }

    #[test]
    fn v2_without_mountinfo_uses_the_conventional_mount() {
        let root = tree(&[
            ("proc/self/cgroup", "0::/app\n"),
            ("sys/fs/cgroup/cgroup.controllers", "cpu memory\n"),
            ("sys/fs/cgroup/app/memory.max", "1000000\n"),
        ]);
        assert_eq!(Cgroups::discover(root.path()).memory_limit(), Some(1_000_000));
    }

    const V1_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_limits_with_a_mount_root_and_a_hybrid_v2_tree() {
        let root = tree(&[
            (
                "proc/self/cgroup",
                "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n",
            ),
            ("proc/self/mountinfo", V1_MOUNTINFO),
            // The memory hierarchy is mounted from /docker/abc: the group is the mount point.
            ("sys/fs/cgroup/memory/memory.limit_in_bytes", "268435456\n"),
            ("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n"),
            ("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n"),
            ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n"),
            ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
            // An empty v2 tree next to v1 must not hide the v1 limits.
            ("sys/fs/cgroup/unified/docker/abc/cgroup.procs", ""),
        ]);
        let cg = Cgroups::discover(root.path());
        assert_eq!(cg.memory_limit(), Some(256 << 20));
        assert_eq!(cg.cpu_limit(), Some(2.0));
    }

    #[test]
    fn v1_unlimited_values_are_no_limit() {
        let root = tree(&[
            ("proc/self/cgroup", "4:memory:/\n3:cpu:/\n"),
            ("proc/self/mountinfo", V1_MOUNTINFO.replace("/docker/abc", "/").as_str()),
            ("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
        ]);
        let cg = Cgroups::discover(root.path());
        assert_eq!(cg.memory_limit(), None);
        // The cpu hierarchy is mounted but has no quota files: no limit.
        assert_eq!(cg.cpu_limit(), None);
        assert_eq!(parse_memory_limit("-1"), None);
        assert_eq!(parse_cfs("-1", "100000"), None);
    }

    #[test]
    fn missing_files_mean_no_limit_not_an_error() {
        let empty = tree(&[]);
        let cg = Cgroups::discover(empty.path());
        assert_eq!(cg.memory_limit(), None);
        assert_eq!(cg.cpu_limit(), None);
        // Membership and mounts, but no limit files at all.
        let root = tree(&[("proc/self/cgroup", "0::/app\n"), ("proc/self/mountinfo", V2_MOUNTINFO)]);
        let cg = Cgroups::discover(root.path());
        assert_eq!(cg.memory_limit(), None);
        assert_eq!(cg.cpu_limit(), None);
        // Garbage in a limit file is no limit either.
        let root = tree(&[
            ("proc/self/cgroup", "0::/\n"),
            ("proc/self/mountinfo", V2_MOUNTINFO),
            ("sys/fs/cgroup/memory.max", "lots\n"),
            ("sys/fs/cgroup/cpu.max", "\n"),
        ]);
        let cg = Cgroups::discover(root.path());
        assert_eq!(cg.memory_limit(), None);
        assert_eq!(cg.cpu_limit(), None);
    }

    #[test]
    fn a_group_path_that_does_not_exist_falls_back_to_the_mount_point() {
        let root = tree(&[
            ("proc/self/cgroup", "0::/host/path/not/visible\n"),
            ("proc/self/mountinfo", V2_MOUNTINFO),
            ("sys/fs/cgroup/memory.max", "4096\n"),
        ]);
        assert_eq!(Cgroups::discover(root.path()).memory_limit(), Some(4096));
    }

    #[test]
    fn mount_points_with_escaped_spaces() {
        assert_eq!(unescape(r"/sys/fs/my\040cgroup"), "/sys/fs/my cgroup");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn this_machine_does_not_make_discovery_fail() {
        // Whatever the host is (v1, v2, none), discovery and reading must not panic.
        let cg = Cgroups::discover(Path::new("/"));
        let _ = (cg.memory_limit(), cg.cpu_limit(), cg.describe());
    }
}
