//! Container names from the runtimes' own state files, where one tells:
//! no API socket is asked and nothing is linked in for it.
//!
//! - Podman (and Buildah, CRI-O: containers/storage):
//!   `/var/lib/containers/storage/overlay-containers/containers.json`, an
//!   array of `{"id": ..., "names": [...]}`.
//! - Docker: `/var/lib/docker/containers/ID/config.v2.json`, `"Name": "/web"`.
//!
//! containerd keeps names in a bolt database and Kubernetes names the pod,
//! not the container: those stay ids (the pod is named by [`super::kubelet`]).
use std::{collections::HashMap, path::Path};

use super::Runtime;

pub const PODMAN_CONTAINERS: &str = "/var/lib/containers/storage/overlay-containers/containers.json";
pub const DOCKER_CONTAINERS: &str = "/var/lib/docker/containers";

#[derive(Default)]
pub struct Names {
    storage: HashMap<String, String>,
    unreadable: Option<String>,
}

impl Names {
    pub fn load() -> Self {
        let mut names = Names::default();
        match std::fs::read_to_string(PODMAN_CONTAINERS) {
            Ok(text) => names.storage = parse_storage(&text),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                names.unreadable =
                    Some(format!("cannot read {PODMAN_CONTAINERS} ({e}): podman containers shown by id"));
            }
            Err(_) => {}
        }
        names
    }

    /// The container's name, if its runtime's state says it.
    pub fn name(&self, runtime: Runtime, id: &str) -> Option<String> {
        match runtime {
            Runtime::Podman | Runtime::CriO => self.storage.get(id).cloned(),
            Runtime::Docker => docker_name(Path::new(DOCKER_CONTAINERS), id),
            Runtime::Nspawn => Some(id.to_string()),
            Runtime::Containerd | Runtime::Cri => None,
        }
    }

    pub fn unreadable(&self) -> Option<String> {
        self.unreadable.clone()
    }
}

/// containers/storage's containers.json: id -> first name.
pub fn parse_storage(text: &str) -> HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
        #[serde(default)]
        names: Vec<String>,
    }
    let entries: Vec<Entry> = serde_json::from_str(text).unwrap_or_default();
    entries.into_iter().filter_map(|e| Some((e.id, e.names.into_iter().next()?))).collect()
}

/// Docker's `"Name": "/web"` in the container's config.v2.json.
pub fn docker_name(root: &Path, id: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(rename = "Name")]
        name: String,
    }
    let text = std::fs::read_to_string(root.join(id).join("config.v2.json")).ok()?;
    let config: Config = serde_json::from_str(&text).ok()?;
    Some(config.name.trim_start_matches('/').to_string()).filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_storage_names() {
        // The shape podman 4.3 writes on these machines (fields trimmed).
        let text =
            r#"[{"id":"b4077c32","names":["wl-probe"],"image":"3821","metadata":"{}"},{"id":"c0ffee","names":[]}]"#;
        let names = parse_storage(text);
        assert_eq!(names.get("b4077c32").map(String::as_str), Some("wl-probe"));
        assert!(!names.contains_key("c0ffee"), "no name: shown by id");
        assert!(parse_storage("not json").is_empty());
    }

    #[test]
    fn docker_config_names() {
        let root = std::env::temp_dir().join(format!("ctrace-docker-names-{}", std::process::id()));
        std::fs::create_dir_all(root.join("abc")).unwrap();
        std::fs::write(root.join("abc/config.v2.json"), r#"{"ID":"abc","Name":"/web","State":{}}"#).unwrap();
        assert_eq!(docker_name(&root, "abc").as_deref(), Some("web"));
        assert_eq!(docker_name(&root, "missing"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
