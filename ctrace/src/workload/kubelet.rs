//! Kubernetes pods by UID, from the kubelet's log directories: one
//! `/var/log/pods/NAMESPACE_NAME_UID` per pod on the node (kubelet's
//! `kuberuntime` BuildPodLogsDirectory). Namespaces and pod names are DNS
//! labels and subdomains, which have no `_`, so the three parts split
//! cleanly. No API server is asked.
use std::{collections::HashMap, path::Path};

pub const POD_LOGS: &str = "/var/log/pods";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
}

/// `NAMESPACE_NAME_UID` -> (UID, pod).
pub fn parse_pod_dir(dir: &str) -> Option<(String, Pod)> {
    let mut parts = dir.split('_');
    let (namespace, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || namespace.is_empty() || name.is_empty() || uid.len() != 36 {
        return None;
    }
    Some((uid.to_string(), Pod { namespace: namespace.to_string(), name: name.to_string() }))
}

/// The pods whose directories are under `root`, by UID (empty where there
/// is no kubelet).
pub fn pods(root: &Path) -> HashMap<String, Pod> {
    let Ok(entries) = std::fs::read_dir(root) else { return HashMap::new() };
    entries.flatten().filter_map(|e| parse_pod_dir(&e.file_name().to_string_lossy())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_directories() {
        let (uid, pod) = parse_pod_dir("shop_web-7d9f8c-x2k4p_1f2e3d4c-5b6a-4798-8a6b-5c4d3e2f1a0b").unwrap();
        assert_eq!(uid, "1f2e3d4c-5b6a-4798-8a6b-5c4d3e2f1a0b");
        assert_eq!(pod, Pod { namespace: "shop".into(), name: "web-7d9f8c-x2k4p".into() });
        assert_eq!(parse_pod_dir("kube-system_coredns-5d78c9869d-abcde"), None, "no UID");
        assert_eq!(parse_pod_dir("a_b_c_d"), None);
        assert_eq!(parse_pod_dir("_web_1f2e3d4c-5b6a-4798-8a6b-5c4d3e2f1a0b"), None);
    }
}
