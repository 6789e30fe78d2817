//! Which container a process runs in, from its cgroup path alone.
//!
//! Runtimes name the cgroup they put a container in after its id, in shapes
//! that depend on the runtime, the cgroup driver (systemd or cgroupfs) and,
//! for Kubernetes, the pod's QoS class. The shapes recognised, and where each
//! comes from:
//!
//! | runtime | driver | path (last components) | source |
//! |---|---|---|---|
//! | Docker | systemd | `system.slice/docker-ID.scope` | moby, `daemon/cgroup` systemd driver |
//! | Docker | cgroupfs | `docker/ID` | moby's default `cgroup-parent` |
//! | containerd (CRI) | systemd | `kubepods-QOS-podUID.slice/cri-containerd-ID.scope` | containerd CRI plugin, `SystemdCgroup = true` |
//! | containerd (CRI), CRI-O | cgroupfs | `kubepods/QOS/podUID/ID` | kubelet's cgroupfs driver: the runtime is not in the path |
//! | containerd (plain: ctr, nerdctl) | cgroupfs | `NAMESPACE/ID` (`default/ID`) | containerd's default parent is its namespace |
//! | nerdctl | systemd | `system.slice/nerdctl-ID.scope` | nerdctl's systemd driver |
//! | CRI-O | systemd | `kubepods-QOS-podUID.slice/crio-ID.scope` | CRI-O's `conmon_cgroup`/systemd manager |
//! | Podman | systemd | `machine.slice/libpod-ID.scope`, in a pod `machine-libpod_pod_POD.slice/libpod-ID.scope`, rootless `user@UID.service/.../libpod-ID.scope` | podman's systemd cgroup manager |
//! | Podman | cgroupfs | `libpod_parent/libpod-ID` | podman's cgroupfs manager; seen on these machines (podman 4.3, runc, cgroup v1 hybrid) |
//! | systemd-nspawn | systemd | `machine.slice/systemd-nspawn@NAME.service`, `machine.slice/machine-NAME.scope` | systemd-machined (the name with `-` escaped as `\x2d`) |
//!
//! Kubernetes QoS: `kubepods-besteffort-`, `kubepods-burstable-` or none
//! (guaranteed); the pod UID has `_` for `-` under systemd. cgroup v2 has
//! one line `0::PATH` in `/proc/PID/cgroup`; v1 a line per hierarchy, any
//! of which names the container (the `name=systemd` one is taken first).
//! Runtime helpers (`libpod-conmon-ID`, `crio-conmon-ID`) are not the
//! container, and are not taken for it.

/// The container runtime that made a cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
    Nspawn,
    /// A Kubernetes container under the cgroupfs driver: containerd or CRI-O.
    Cri,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
            Runtime::Nspawn => "nspawn",
            Runtime::Cri => "cri",
        }
    }
}

/// A container as its cgroup path names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupContainer {
    pub runtime: Runtime,
    /// The runtime's container id (64 hex digits), or the machine's name
    /// for systemd-nspawn.
    pub id: String,
    /// Kubernetes pod UID, with dashes.
    pub pod_uid: Option<String>,
}

/// The container of a process from its `/proc/PID/cgroup` text, if any.
pub fn container_of(proc_cgroup: &str) -> Option<CgroupContainer> {
    let paths: Vec<&str> = proc_cgroup.lines().filter_map(|l| l.splitn(3, ':').nth(2)).collect();
    // v1's name=systemd hierarchy first: it is the one runtimes always set.
    let systemd = proc_cgroup.lines().find(|l| l.contains(":name=systemd:")).and_then(|l| l.splitn(3, ':').nth(2));
    systemd.into_iter().chain(paths).find_map(container_of_path)
}

/// The container a cgroup path belongs to, if it is one of the shapes
/// above.
pub fn container_of_path(path: &str) -> Option<CgroupContainer> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let pod_uid = parts.iter().find_map(|p| pod_uid(p));
    // The innermost component that names a container.
    for (i, part) in parts.iter().enumerate().rev() {
        let parent = i.checked_sub(1).map(|j| parts[j]);
        let found = |runtime, id: &str| Some(CgroupContainer { runtime, id: id.to_string(), pod_uid: pod_uid.clone() });
        if let Some(id) = scoped(part, "docker-") {
            return found(Runtime::Docker, id);
        }
        if let Some(id) = scoped(part, "cri-containerd-") {
            return found(Runtime::Containerd, id);
        }
        if let Some(id) = scoped(part, "nerdctl-") {
            return found(Runtime::Containerd, id);
        }
        if let Some(id) = scoped(part, "crio-") {
            return found(Runtime::CriO, id);
        }
        if let Some(id) = scoped(part, "libpod-") {
            return found(Runtime::Podman, id);
        }
        if let Some(name) = part.strip_prefix("systemd-nspawn@").and_then(|p| p.strip_suffix(".service")) {
            return found(Runtime::Nspawn, &unescape_systemd(name));
        }
        if let Some(name) = part.strip_prefix("machine-").and_then(|p| p.strip_suffix(".scope")) {
            if parent == Some("machine.slice") && !name.starts_with("libpod") {
                return found(Runtime::Nspawn, &unescape_systemd(name));
            }
        }
        if is_container_id(part) {
            match parent {
                Some("docker") => return found(Runtime::Docker, part),
                _ if pod_uid.is_some() => return found(Runtime::Cri, part),
                // containerd's namespace as the parent (`default/ID`, `k8s.io/ID`).
                Some(_) if i == 1 => return found(Runtime::Containerd, part),
                _ => {}
            }
        }
    }
    None
}

/// `PREFIXID.scope` or `PREFIXID` with a container id, but not a runtime
/// helper (`PREFIXconmon-ID`).
fn scoped<'a>(part: &'a str, prefix: &str) -> Option<&'a str> {
    let id = part.strip_prefix(prefix)?;
    let id = id.strip_suffix(".scope").unwrap_or(id);
    is_container_id(id).then_some(id)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The pod UID of `pod<UID>` (cgroupfs) or `kubepods[-QOS]-pod<UID_>.slice`
/// (systemd), with dashes.
fn pod_uid(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    let uid = match part.rfind("-pod") {
        Some(at) if part.starts_with("kubepods") => &part[at + 4..],
        _ => part.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    let shape = uid.len() == 36
        && uid
            .bytes()
            .enumerate()
            .all(|(i, b)| if [8, 13, 18, 23].contains(&i) { b == b'-' } else { b.is_ascii_hexdigit() });
    shape.then_some(uid)
}

/// systemd's unit-name escaping (`\x2d` for `-`), undone.
fn unescape_systemd(name: &str) -> String {
    let mut out = String::new();
    let mut rest = name;
    while let Some(at) = rest.find("\\x") {
        out.push_str(&rest[..at]);
        match rest.get(at + 2..at + 4).and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[at + 4..];
            }
            None => {
                out.push_str("\\x");
                rest = &rest[at + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "2c4d9f1e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";
    const UID: &str = "1f2e3d4c-5b6a-4798-8a6b-5c4d3e2f1a0b";

    fn c(runtime: Runtime, id: &str, pod: bool) -> Option<CgroupContainer> {
        Some(CgroupContainer { runtime, id: id.to_string(), pod_uid: pod.then(|| UID.to_string()) })
    }

    #[test]
    fn runtimes_and_drivers() {
        let uid_ = UID.replace('-', "_");
        let cases = [
            (format!("/system.slice/docker-{ID}.scope"), c(Runtime::Docker, ID, false)),
            (format!("/docker/{ID}"), c(Runtime::Docker, ID, false)),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                c(Runtime::Containerd, ID, true),
            ),
            (format!("/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"), c(Runtime::Containerd, ID, true)),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope"),
                c(Runtime::CriO, ID, true),
            ),
            (format!("/kubepods/burstable/pod{UID}/{ID}"), c(Runtime::Cri, ID, true)),
            (format!("/kubepods/pod{UID}/{ID}"), c(Runtime::Cri, ID, true)),
            (format!("/default/{ID}"), c(Runtime::Containerd, ID, false)),
            (format!("/system.slice/nerdctl-{ID}.scope"), c(Runtime::Containerd, ID, false)),
            (format!("/machine.slice/libpod-{ID}.scope"), c(Runtime::Podman, ID, false)),
            (format!("/machine.slice/machine-libpod_pod_{ID}.slice/libpod-{ID}.scope"), c(Runtime::Podman, ID, false)),
            (
                format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"),
                c(Runtime::Podman, ID, false),
            ),
            (format!("/libpod_parent/libpod-{ID}"), c(Runtime::Podman, ID, false)),
            ("/machine.slice/systemd-nspawn@web.service/payload".to_string(), c(Runtime::Nspawn, "web", false)),
            ("/machine.slice/machine-build\\x2dbox.scope".to_string(), c(Runtime::Nspawn, "build-box", false)),
        ];
        for (path, expected) in cases {
            assert_eq!(container_of_path(&path), expected, "{path}");
        }
    }

    #[test]
    fn what_is_not_a_container() {
        for path in [
            "/".to_string(),
            "/user.slice/user-1000.slice/session-3.scope".to_string(),
            "/system.slice/sshd.service".to_string(),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/kubepods.slice/kubepods-besteffort.slice/crio-conmon-{ID}.scope"),
            "/docker/not-an-id".to_string(),
            format!("/a/b/{ID}"),
            format!("/system.slice/docker-{}.scope", &ID[..12]),
        ] {
            assert_eq!(container_of_path(&path), None, "{path}");
        }
    }

    #[test]
    fn reads_proc_cgroup_v1_and_v2() {
        // cgroup v1 hybrid, as podman 4.3 with runc leaves it on these machines.
        let v1 = format!(
            "12:pids:/libpod_parent/libpod-{ID}\n11:memory:/libpod_parent/libpod-{ID}\n1:name=systemd:/libpod_parent/libpod-{ID}\n0::/\n"
        );
        assert_eq!(container_of(&v1), c(Runtime::Podman, ID, false));
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(container_of(&v2), c(Runtime::Docker, ID, false));
        assert_eq!(container_of("0::/init.scope\n"), None);
        assert_eq!(container_of("12:pids:/user.slice\n1:name=systemd:/user.slice/session-1.scope\n0::/\n"), None);
        assert_eq!(container_of(""), None);
    }
}
