//! The kubelet's pod list: decoded leniently from its JSON and indexed by container id,
//! with the pod facts that become `k8s:` selectors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Deserializer};

/// `null` decodes as the default value (Kubernetes omits empty fields, but be lenient).
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize, Default)]
pub(crate) struct PodList {
    #[serde(default, deserialize_with = "null_default")]
    pub(super) items: Vec<Pod>,
}

#[derive(Deserialize, Default)]
pub(super) struct Pod {
    #[serde(default, deserialize_with = "null_default")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    spec: PodSpec,
    #[serde(default, deserialize_with = "null_default")]
    status: PodStatus,
}

#[derive(Deserialize, Default)]
struct ObjectMeta {
    #[serde(default, deserialize_with = "null_default")]
    uid: String,
    #[serde(default, deserialize_with = "null_default")]
    name: String,
    #[serde(default, deserialize_with = "null_default")]
    namespace: String,
    #[serde(default, deserialize_with = "null_default")]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default, deserialize_with = "null_default")]
    service_account_name: String,
    #[serde(default, deserialize_with = "null_default")]
    node_name: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, deserialize_with = "null_default")]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "null_default")]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "null_default")]
    ephemeral_container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "null_default")]
    qos_class: String,
}

#[derive(Deserialize, Default)]
struct ContainerStatus {
    #[serde(default, deserialize_with = "null_default")]
    name: String,
    #[serde(default, deserialize_with = "null_default")]
    image: String,
    #[serde(rename = "containerID", default, deserialize_with = "null_default")]
    container_id: String,
}

pub(super) struct PodInfo {
    pub(super) uid: String,
    pub(super) name: String,
    pub(super) namespace: String,
    pub(super) service_account: String,
    pub(super) node_name: String,
    pub(super) labels: BTreeMap<String, String>,
    /// `Guaranteed`, `Burstable` or `BestEffort`; empty if the kubelet did not say.
    pub(super) qos_class: String,
}

pub(super) struct ContainerEntry {
    pub(super) pod: Arc<PodInfo>,
    pub(super) name: String,
    pub(super) image: String,
}

/// Container id → container; `None` marks an id listed in more than one pod.
pub(crate) struct PodIndex {
    pub(super) containers: HashMap<String, Option<Arc<ContainerEntry>>>,
}

impl PodIndex {
    pub(crate) fn build(list: PodList) -> PodIndex {
        let mut containers: HashMap<String, Option<Arc<ContainerEntry>>> = HashMap::new();
        for pod in list.items {
            let info = Arc::new(PodInfo {
                uid: pod.metadata.uid.to_ascii_lowercase(),
                name: pod.metadata.name,
                namespace: pod.metadata.namespace,
                service_account: pod.spec.service_account_name,
                node_name: pod.spec.node_name,
                labels: pod.metadata.labels,
                qos_class: pod.status.qos_class,
            });
            let statuses = pod
                .status
                .container_statuses
                .into_iter()
                .chain(pod.status.init_container_statuses)
                .chain(pod.status.ephemeral_container_statuses);
            for status in statuses {
                // "containerd://<id>", "cri-o://<id>", "docker://<id>"; empty while waiting.
                let id = match status.container_id.split_once("://") {
                    Some((_, id)) => id,
                    None => status.container_id.as_str(),
                }
                .to_ascii_lowercase();
                if id.is_empty() {
                    continue;
                }
                let entry = Arc::new(ContainerEntry {
                    pod: info.clone(),
                    name: status.name,
                    image: status.image,
                });
                containers
                    .entry(id)
                    .and_modify(|slot| {
                        if slot.as_ref().is_some_and(|e| e.pod.uid != info.uid) {
                            *slot = None;
                        }
                    })
                    .or_insert(Some(entry));
            }
        }
        PodIndex { containers }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn pod_list_parses_real_document() {
        let index = PodIndex::build(serde_json::from_str(PODS_JSON).unwrap());
        assert_eq!(index.containers.len(), 7);
        let web = index.containers[WEB_CID].as_ref().unwrap();
        assert_eq!(
            (web.name.as_str(), web.pod.namespace.as_str()),
            ("web", "shop")
        );
        let init = index.containers[INIT_CID].as_ref().unwrap();
        assert_eq!(init.name, "init-migrate");
        let dbg = index.containers[DEBUG_CID].as_ref().unwrap();
        assert_eq!(dbg.name, "debugger-7xk2p");
        assert_eq!(dbg.image, "docker.io/library/busybox:1.36");
        // nulls and missing fields are tolerated
        let list: PodList = serde_json::from_str(
            r#"{"items":[{"metadata":{"uid":"x","labels":null},"spec":null,"status":{"containerStatuses":null}}]}"#,
        )
        .unwrap();
        assert!(PodIndex::build(list).containers.is_empty());
    }
}
