//! Who uses which GPU: joins an NVML [`Reading`] with the kubelet's allocations and the pod
//! metadata into the rows `/metrics` exports. A container appears on a GPU when the kubelet
//! allocated the GPU (or a time-sliced replica or MIG instance of it) to it, when its
//! processes run there, or both; two containers sharing a GPU each get their own processes'
//! utilization and memory. A container holding HAMi slices is on the GPUs HAMi's annotation
//! places it on, with what HAMi granted it there ([`hami`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::allocation::{Allocation, DeviceRef, Source};
use super::export::{ContainerRow, GpuRow, GpuView, Labels};
use super::reading::{GpuGauge, GpuId, Reading};
use super::unattributed;
use crate::identity::ContainerLabels;
use crate::kube::hami;
use crate::kube::Names;

/// Use of one GPU by one container, summed over its processes.
#[derive(Default)]
struct Use {
    allocated: bool,
    utilization: Option<f64>,
    memory_bytes: Option<u64>,
    /// Its processes on the GPU.
    processes: usize,
    /// HAMi's grant there: memory bytes and the share of the SMs.
    granted: Option<(u64, f64)>,
}

/// Builds the exported view of one reading.
pub fn compose(reading: &Reading, allocations: &[Allocation], names: &Names) -> GpuView {
    // Read before any lookup: the store may finish its first list while this one composes.
    let pods_synced = names.pods.as_ref().is_some_and(|p| p.is_synced());
    let by_uuid: HashMap<&str, &GpuId> = reading.gpus.iter().map(|g| (g.id.uuid.as_str(), &g.id)).collect();
    let find =
        |device: &DeviceRef| -> Option<&GpuId> {
            match device {
                DeviceRef::Uuid(uuid) => by_uuid.get(uuid.as_str()).copied(),
                DeviceRef::MigOfGpu { parent_uuid, gpu_instance } => reading
                    .gpus
                    .iter()
                    .map(|g| &g.id)
                    .find(|id| id.mig.as_ref().is_some_and(|m| &m.parent_uuid == parent_uuid && m.gpu_instance == *gpu_instance)),
                DeviceRef::Index(index) => reading.gpus.iter().map(|g| &g.id).find(|id| id.index == *index && id.mig.is_none()),
                DeviceRef::Minor(minor) => reading.gpus.iter().map(|g| &g.id).find(|id| id.minor == Some(*minor) && id.mig.is_none()),
                DeviceRef::MigPlacement { parent_minor, profile_id, start } => reading.gpus.iter().map(|g| &g.id).find(|id| {
                    id.minor == Some(*parent_minor) && id.mig.as_ref().is_some_and(|m| m.placement == Some((*profile_id, *start)))
                }),
            }
        };

    let mut lookup = names.lookup();
    let mut uses: BTreeMap<(String, ContainerLabels), Use> = BTreeMap::new();
    let is_gpu = |uuid: &str| by_uuid.get(uuid).is_some_and(|id| id.mig.is_none());
    let mig_parents: HashSet<&str> = reading.gpus.iter().filter_map(|g| g.id.mig.as_ref()).map(|m| m.parent_uuid.as_str()).collect();
    // Containers holding HAMi slices, placed once each however many ids the kubelet lists.
    let mut hami_holders: HashSet<(&str, &str, &str)> = HashSet::new();
    for a in allocations {
        if a.source == Source::DevicePlugin && hami::replica_of(&a.device_id, is_gpu).is_some() {
            hami_holders.insert((&a.namespace, &a.pod, &a.container));
            continue;
        }
        let Some(gpu) = a.device().as_ref().and_then(find) else {
            tracing::debug!(device = %a.device_id, "allocated device not found among the GPUs NVML reports");
            continue;
        };
        let labels = lookup.by_name(&a.namespace, &a.pod, &a.container);
        uses.entry((gpu.uuid.clone(), labels)).or_default().allocated = true;
    }
    // The kubelet may have picked a HAMi id of another GPU than the one HAMi placed the
    // container on: only the pod's annotation places it. Without a readable one (the store
    // warned), its processes still attribute it.
    // HAMi gave these containers a slice: their processes are their allocation wherever they
    // run (a placement unread, a dynamic MIG instance), never use without one.
    let hami_pods: HashSet<(String, String, String)> =
        hami_holders.iter().map(|(namespace, pod, container)| (namespace.to_string(), pod.to_string(), container.to_string())).collect();
    for (namespace, pod, container) in hami_holders {
        let grants = lookup.pod(namespace, pod).and_then(|meta| match &meta.hami {
            Some(Ok(grants)) => grants.get(container).cloned(),
            _ => None,
        });
        let Some(grants) = grants else {
            tracing::debug!(namespace, pod, container, "HAMi slice without a readable placement; attributed by its processes");
            continue;
        };
        let labels = lookup.by_name(namespace, pod, container);
        // HAMi's dynamic MIG names the parent GPU (v2.10) or `<uuid>[<template>-<slot>]`
        // (v2.6-v2.9): the container runs on a MIG instance its processes attribute it to;
        // placing it on the whole GPU would show a busy slice as an idle holder there.
        for grant in grants.iter().filter(|g| is_gpu(&g.uuid) && !mig_parents.contains(g.uuid.as_str())) {
            let entry = uses.entry((grant.uuid.clone(), labels.clone())).or_default();
            entry.allocated = true;
            let (bytes, cores) = entry.granted.unwrap_or_default();
            entry.granted = Some((bytes.saturating_add(grant.memory_bytes()), (cores + grant.cores_ratio()).min(1.0)));
        }
    }
    // Devices with a process no pod container was found for (outside Kubernetes, or gone).
    let mut unresolved: HashSet<&str> = HashSet::new();
    for p in &reading.processes {
        let Some(labels) = p.container.as_ref().and_then(|c| lookup.by_cgroup(c)) else {
            unresolved.insert(p.uuid.as_str());
            continue;
        };
        let entry = uses.entry((p.uuid.clone(), labels)).or_default();
        entry.processes += 1;
        if let Some(sm) = p.sm_ratio {
            entry.utilization = Some((entry.utilization.unwrap_or(0.0) + sm).min(1.0));
        }
        if let Some(bytes) = p.memory_bytes {
            entry.memory_bytes = Some(entry.memory_bytes.unwrap_or(0) + bytes);
        }
    }

    // The driver has no per-process samples under MIG, but GPM measures the instance itself:
    // an instance is a container's when that container is the only one on it and every
    // process on it is that container's (none outside Kubernetes, none unresolved).
    for gpu in reading.gpus.iter().filter(|g| g.id.mig.is_some() && !unresolved.contains(g.id.uuid.as_str())) {
        let Some(busy) = gpu.get(GpuGauge::Utilization) else { continue };
        let mut on_it = uses.iter_mut().filter(|((uuid, _), _)| *uuid == gpu.id.uuid).map(|(_, u)| u);
        let (Some(only), None) = (on_it.next(), on_it.next()) else { continue };
        if only.processes > 0 || busy == 0.0 {
            only.utilization = only.utilization.or(Some(busy));
        }
    }

    // A process whose container the pod store does not name yet (just started) counts as its
    // pod's when the pod holds the GPU.
    let held: HashSet<(&str, &ContainerLabels)> =
        uses.iter().filter(|(_, u)| u.allocated).map(|((uuid, who), _)| (uuid.as_str(), who)).collect();
    let held_pods: HashSet<(&str, &str, &str)> = held.iter().map(|(uuid, who)| (*uuid, who.namespace.as_str(), who.pod.as_str())).collect();
    let unattributed = unattributed::measure(reading, &mut lookup, |uuid, who| {
        held.contains(&(uuid, who))
            || (who.container.is_empty() && held_pods.contains(&(uuid, who.namespace.as_str(), who.pod.as_str())))
            || hami_pods.iter().any(|(namespace, pod, container)| {
                (namespace.as_str(), pod.as_str()) == (who.namespace.as_str(), who.pod.as_str())
                    && (who.container.is_empty() || *container == who.container)
            })
    });
    drop((held, held_pods));

    let containers = uses
        .into_iter()
        .filter_map(|((uuid, who), u)| {
            let gpu = by_uuid.get(uuid.as_str())?;
            // An allocated container with no process on the GPU is idle, where the driver
            // samples per process at all.
            let sampled = reading.sampled.contains(&uuid);
            let idle = |v: Option<f64>| if v.is_none() && u.allocated && sampled { Some(0.0) } else { v };
            Some(ContainerRow {
                labels: container_labels(gpu, who),
                allocated: u.allocated,
                utilization: idle(u.utilization),
                memory_bytes: idle(u.memory_bytes.map(|b| b as f64)),
                granted_memory_bytes: u.granted.map(|(bytes, _)| bytes as f64),
                granted_cores_ratio: u.granted.map(|(_, cores)| cores),
            })
        })
        .collect();

    GpuView {
        driver_version: reading.driver_version.clone(),
        gpus: reading.gpus.iter().map(|g| GpuRow { labels: gpu_labels(&g.id), reading: g.clone() }).collect(),
        containers,
        unattributed,
        nvml_errors: reading.errors.clone(),
        pod_resources_errors: 0,
        pods_synced,
    }
}

/// `gpu, uuid, model`, plus `mig_profile, gpu_instance` for a MIG instance.
pub fn gpu_labels(id: &GpuId) -> Labels {
    let mut labels = vec![("gpu", id.index.to_string()), ("uuid", id.uuid.clone()), ("model", id.model.clone())];
    if let Some(mig) = &id.mig {
        labels.push(("mig_profile", mig.profile.clone()));
        labels.push(("gpu_instance", mig.gpu_instance.to_string()));
    }
    labels
}

fn container_labels(gpu: &GpuId, who: ContainerLabels) -> Labels {
    vec![
        ("gpu", gpu.index.to_string()),
        ("uuid", gpu.uuid.clone()),
        ("namespace", who.namespace),
        ("pod", who.pod),
        ("container", who.container),
        ("app", who.app),
        ("user", who.user),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::reading::{GpuReading, MigId, ProcessUse};
    use crate::identity::cgroup::ContainerCgroup;

    const GPU: &str = "GPU-11111111-2222-3333-4444-555555555555";
    const MIG: &str = "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

    fn names(dir: &std::path::Path) -> Names {
        Names { pods_dir: dir.join("pods"), containers_dir: dir.join("containers"), pods: None }
    }

    fn cgroup(uid: &str, id_digit: char) -> Option<ContainerCgroup> {
        Some(ContainerCgroup { pod_uid: uid.into(), container_id: id_digit.to_string().repeat(64) })
    }

    fn reading() -> Reading {
        let gpu = GpuId { index: 0, uuid: GPU.into(), model: "NVIDIA H100".into(), mig: None, minor: Some(0) };
        let mig = GpuId {
            index: 1,
            uuid: MIG.into(),
            model: "NVIDIA A100".into(),
            mig: Some(MigId { profile: "1g.10gb".into(), gpu_instance: 3, parent_uuid: "GPU-parent".into(), placement: Some((19, 6)) }),
            minor: Some(1),
        };
        let process = |pid, uid: &str, digit, uuid: &str, sm| ProcessUse {
            uuid: uuid.into(),
            pid,
            container: cgroup(uid, digit),
            memory_bytes: Some(1 << 30),
            sm_ratio: sm,
        };
        let parent = GpuId { index: 1, uuid: "GPU-parent".into(), model: "NVIDIA A100".into(), mig: None, minor: Some(1) };
        Reading {
            driver_version: "550.1".into(),
            gpus: vec![GpuReading::new(gpu, true), GpuReading::new(parent, true), GpuReading::new(mig, true)],
            processes: vec![
                process(10, "uid-a", 'a', GPU, Some(0.3)),
                process(11, "uid-a", 'a', GPU, Some(0.1)),
                process(20, "uid-b", 'b', GPU, Some(0.5)),
                process(30, "uid-c", 'c', MIG, None),
                process(40, "uid-unknown", 'd', GPU, Some(0.9)),
            ],
            errors: Vec::new(),
            sampled: vec![GPU.into()],
        }
    }

    pub(super) fn allocation(pod: &str, device: &str) -> Allocation {
        Allocation {
            namespace: "ml".into(),
            pod: pod.into(),
            container: "main".into(),
            device_id: device.into(),
            source: Source::DevicePlugin,
        }
    }

    fn claim(pod: &str, device: &str) -> Allocation {
        Allocation { source: Source::Dra, ..allocation(pod, device) }
    }

    #[test]
    fn dra_devices_are_found_by_minor_number_and_mig_placement() {
        let view = compose(
            &reading(),
            &[claim("x-0", "gpu-0"), claim("y-0", "gpu-1-mig-1g10gb-19-6"), claim("z-0", "gpu-1"), claim("w-0", "gpu-1-mig-1g10gb-19-0")],
            &names(std::path::Path::new("/nonexistent")),
        );
        assert!(row(&view, "x-0", GPU).allocated);
        assert!(row(&view, "y-0", MIG).allocated, "minor 1, profile 19 at slice 6");
        assert!(row(&view, "z-0", "GPU-parent").allocated, "gpu-1: the whole GPU of minor 1, not its MIG instance");
        assert_eq!(view.containers.len(), 3, "slice 0 holds no instance: {view:#?}");
    }

    #[test]
    fn a_mig_instance_used_by_one_container_lends_it_its_gpm_utilization() {
        let mut r = reading();
        r.gpus[2].set(GpuGauge::Utilization, Some(0.64));
        let no_names = names(std::path::Path::new("/nonexistent"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pods/ml_c-0_uid-c/main")).unwrap();
        std::fs::create_dir_all(dir.path().join("containers")).unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join(format!("containers/c-0_ml_main-{}.log", "c".repeat(64)))).unwrap();
        let view = compose(&r, &[allocation("c-0", MIG)], &names(dir.path()));
        assert_eq!(row(&view, "c-0", MIG).utilization, Some(0.64), "its process is the instance's only one");
        r.processes.push(ProcessUse { uuid: MIG.into(), pid: 99, container: None, memory_bytes: None, sm_ratio: None });
        let view = compose(&r, &[allocation("c-0", MIG)], &names(dir.path()));
        assert_eq!(row(&view, "c-0", MIG).utilization, None, "a process outside Kubernetes shares the instance");
        r.processes.pop();
        let view = compose(&r, &[allocation("c-0", MIG), claim("d-0", "gpu-1-mig-1g10gb-19-6")], &no_names);
        assert_eq!(row(&view, "c-0", MIG).utilization, None, "two containers on one instance: not split");
        assert_eq!(row(&view, "d-0", MIG).utilization, None);
    }

    fn row<'a>(view: &'a GpuView, pod: &str, uuid: &str) -> &'a ContainerRow {
        let has = |r: &&ContainerRow, k: &str, v: &str| r.labels.iter().any(|(lk, lv)| *lk == k && lv == v);
        view.containers.iter().find(|r| has(r, "pod", pod) && has(r, "uuid", uuid)).unwrap_or_else(|| panic!("{pod} on {uuid}: {view:#?}"))
    }

    #[test]
    fn time_sliced_replicas_and_mig_instances_are_attributed_per_container() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("containers")).unwrap();
        for (pod, uid, digit) in [("a-0", "uid-a", 'a'), ("b-0", "uid-b", 'b'), ("c-0", "uid-c", 'c'), ("idle-0", "uid-i", 'e')] {
            std::fs::create_dir_all(dir.path().join(format!("pods/ml_{pod}_{uid}/main"))).unwrap();
            let link = dir.path().join(format!("containers/{pod}_ml_main-{}.log", digit.to_string().repeat(64)));
            std::os::unix::fs::symlink("/dev/null", link).unwrap();
        }
        let allocations = [
            allocation("a-0", &format!("{GPU}::0")),
            allocation("b-0", &format!("{GPU}::1")),
            allocation("c-0", MIG),
            allocation("idle-0", &format!("{GPU}::2")),
            allocation("ghost-0", "GPU-not-on-this-node"),
        ];
        let view = compose(&reading(), &allocations, &names(dir.path()));

        let a = row(&view, "a-0", GPU);
        assert!(a.allocated);
        assert!((a.utilization.unwrap() - 0.4).abs() < 1e-9, "two processes summed: {a:?}");
        assert_eq!(a.memory_bytes, Some(2.0 * (1u64 << 30) as f64));
        assert_eq!(row(&view, "b-0", GPU).utilization, Some(0.5));
        let c = row(&view, "c-0", MIG);
        assert_eq!((c.allocated, c.utilization, c.memory_bytes), (true, None, Some((1u64 << 30) as f64)), "MIG: memory, no SM samples");
        let idle = row(&view, "idle-0", GPU);
        assert_eq!((idle.allocated, idle.utilization, idle.memory_bytes), (true, Some(0.0), Some(0.0)), "allocated but idle");
        assert_eq!(view.containers.len(), 4, "the unknown pod's process and the foreign device are left out: {view:#?}");
        let labels: Vec<_> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            labels,
            [
                "gpu=0".to_string(),
                format!("uuid={GPU}"),
                "namespace=ml".into(),
                "pod=a-0".into(),
                "container=main".into(),
                "app=a".into(),
                "user=".into()
            ]
        );
    }

    #[test]
    fn mig_instances_carry_profile_and_instance_labels() {
        let view = compose(&reading(), &[], &names(std::path::Path::new("/nonexistent")));
        let keys: Vec<_> = view.gpus[2].labels.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["gpu", "uuid", "model", "mig_profile", "gpu_instance"]);
        assert_eq!(view.gpus[2].labels[4].1, "3");
        assert_eq!(view.gpus[0].labels.len(), 3);
    }
}

#[cfg(test)]
mod hami_tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::gpu::reading::{GpuReading, MigId, ProcessUse};
    use crate::identity::cgroup::ContainerCgroup;
    use crate::kube::meta::{ContainerMeta, PodMeta};
    use crate::kube::store::PodStore;

    use super::tests::allocation;

    const WHOLE: &str = "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
    /// Ends in an all-digit group, as NVML's UUIDs may.
    const SHARED: &str = "GPU-11111111-2222-3333-4444-555555555555";
    const OTHER: &str = "GPU-99999999-8888-7777-6666-abcdefabcdef";

    fn gpu(index: u32, uuid: &str) -> GpuReading {
        GpuReading::new(GpuId { index, uuid: uuid.into(), model: "NVIDIA A100".into(), mig: None, minor: Some(index) }, true)
    }

    fn process(pid: u32, uid: &str, uuid: &str, sm: f64, gib: u64) -> ProcessUse {
        ProcessUse {
            uuid: uuid.into(),
            pid,
            container: Some(ContainerCgroup { pod_uid: uid.into(), container_id: uid.repeat(64 / uid.len()) }),
            memory_bytes: Some(gib << 30),
            sm_ratio: Some(sm),
        }
    }

    fn pod(name: &str, uid: &str, annotation: Option<String>) -> PodMeta {
        let mut annotations = BTreeMap::new();
        let containers = vec![ContainerMeta {
            name: "main".into(),
            image: String::new(),
            id: Some(uid.repeat(64 / uid.len())),
            last_id: None,
            runtime: Some("containerd".into()),
            restart_count: 0,
            started: None,
            exit: None,
            last_exit: None,
        }];
        if let Some(a) = &annotation {
            annotations.insert(hami::ALLOCATED.to_string(), a.clone());
        }
        PodMeta {
            namespace: "ml".into(),
            name: name.into(),
            uid: uid.into(),
            ip: None,
            labels: BTreeMap::new(),
            annotations,
            workload: None,
            containers,
            app: String::new(),
            user: String::new(),
            hami: annotation.map(|a| hami::grants(&a, &[], &["main"])),
            evicted: false,
        }
    }

    fn row<'a>(view: &'a GpuView, pod: &str, uuid: &str) -> Option<&'a ContainerRow> {
        let has = |r: &&ContainerRow, k: &str, v: &str| r.labels.iter().any(|(lk, lv)| *lk == k && lv == v);
        view.containers.iter().find(|r| has(r, "pod", pod) && has(r, "uuid", uuid))
    }

    /// Two HAMi slices of one GPU, one of them listed by the kubelet under another GPU's id
    /// (HAMi's default lets the kubelet pick), a whole GPU beside them, and a pod whose
    /// annotation is broken.
    #[test]
    fn hami_slices_are_placed_by_the_annotation_with_their_grants() {
        let store = PodStore::new(Vec::new(), Vec::new(), Default::default());
        // As HAMi writes it: `<uuid>,NVIDIA,<MiB>,<cores>:` then `;` per container.
        store.apply(pod("slice-a", "aa", Some(format!("{SHARED},NVIDIA,8000,30:;"))));
        store.apply(pod("slice-b", "bb", Some(format!("{SHARED},NVIDIA,16000,50:;"))));
        store.apply(pod("whole", "cc", None));
        store.apply(pod("broken", "dd", Some(format!("{SHARED},NVIDIA,16000:;"))));
        let names = Names { pods_dir: "/nonexistent".into(), containers_dir: "/nonexistent".into(), pods: Some(Arc::new(store)) };
        let reading = Reading {
            driver_version: "550.1".into(),
            gpus: vec![gpu(0, WHOLE), gpu(1, SHARED), gpu(2, OTHER)],
            processes: vec![process(10, "aa", SHARED, 0.2, 6), process(20, "cc", WHOLE, 0.9, 40), process(30, "dd", OTHER, 0.1, 1)],
            errors: Vec::new(),
            sampled: vec![WHOLE.into(), SHARED.into(), OTHER.into()],
        };
        let allocations = [
            allocation("slice-a", &format!("{SHARED}-0")),
            allocation("slice-b", &format!("{OTHER}-3")),
            allocation("whole", WHOLE),
            allocation("broken", &format!("{OTHER}-0")),
        ];
        let view = compose(&reading, &allocations, &names);

        let a = row(&view, "slice-a", SHARED).expect("slice-a on its GPU");
        assert_eq!((a.allocated, a.utilization, a.memory_bytes), (true, Some(0.2), Some((6u64 << 30) as f64)));
        assert_eq!((a.granted_memory_bytes, a.granted_cores_ratio), (Some(8000.0 * 1_048_576.0), Some(0.3)));
        let b = row(&view, "slice-b", SHARED).expect("slice-b where HAMi placed it, not where the kubelet's id points");
        assert_eq!((b.allocated, b.utilization, b.memory_bytes), (true, Some(0.0), Some(0.0)), "granted, idle");
        assert_eq!((b.granted_memory_bytes, b.granted_cores_ratio), (Some(16000.0 * 1_048_576.0), Some(0.5)));
        assert!(row(&view, "slice-b", OTHER).is_none(), "{view:#?}");
        let whole = row(&view, "whole", WHOLE).unwrap();
        assert_eq!(
            (whole.allocated, whole.utilization, whole.granted_memory_bytes, whole.granted_cores_ratio),
            (true, Some(0.9), None, None)
        );
        let broken = row(&view, "broken", OTHER).expect("attributed by its process");
        assert_eq!((broken.allocated, broken.utilization, broken.granted_memory_bytes), (false, Some(0.1), None));
        assert_eq!(view.containers.len(), 4, "{view:#?}");
        for u in &view.unattributed {
            assert_eq!(u.memory_bytes, [0.0; 3], "a HAMi holder's use, its placement read or not, is not unallocated: {u:?}");
        }
    }

    /// HAMi's dynamic MIG (v2.10) names the parent GPU in the annotation; the container runs
    /// on a MIG instance of it.
    #[test]
    fn a_hami_grant_on_a_gpu_in_mig_mode_is_not_placed_on_the_whole_gpu() {
        let store = PodStore::new(Vec::new(), Vec::new(), Default::default());
        store.apply(pod("mig-slice", "ee", Some(format!("{SHARED},NVIDIA,9856,14:;"))));
        let names = Names { pods_dir: "/nonexistent".into(), containers_dir: "/nonexistent".into(), pods: Some(Arc::new(store)) };
        let instance = "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
        let mig = GpuId {
            index: 1,
            uuid: instance.into(),
            model: "NVIDIA A100".into(),
            mig: Some(MigId { profile: "1g.10gb".into(), gpu_instance: 9, parent_uuid: SHARED.into(), placement: None }),
            minor: Some(1),
        };
        let reading = Reading {
            driver_version: "550.1".into(),
            gpus: vec![gpu(1, SHARED), GpuReading::new(mig, true)],
            processes: vec![process(10, "ee", instance, 0.6, 5)],
            errors: Vec::new(),
            sampled: vec![SHARED.into(), instance.into()],
        };
        let view = compose(&reading, &[allocation("mig-slice", &format!("{SHARED}-0"))], &names);
        assert!(row(&view, "mig-slice", SHARED).is_none(), "not an idle holder of the whole GPU: {view:#?}");
        assert_eq!(row(&view, "mig-slice", instance).expect("on its instance").utilization, Some(0.6));
        assert_eq!(view.unattributed[0].memory_bytes, [0.0; 3], "its own instance's use is not unallocated: {:?}", view.unattributed);
    }

    #[test]
    fn a_view_says_whether_the_pod_store_had_its_first_list_when_composed() {
        let store = Arc::new(PodStore::new(Vec::new(), Vec::new(), Default::default()));
        store.apply(pod("whole", "cc", None));
        let names = Names { pods_dir: "/nonexistent".into(), containers_dir: "/nonexistent".into(), pods: Some(store.clone()) };
        let reading = Reading { gpus: vec![gpu(0, WHOLE)], sampled: vec![WHOLE.into()], ..Reading::default() };
        assert!(!compose(&reading, &[], &names).pods_synced, "a watch event before the first list");
        store.relist(vec![pod("whole", "cc", None)]);
        assert!(compose(&reading, &[], &names).pods_synced);
        let without = Names { pods: None, ..names };
        assert!(!compose(&reading, &[], &without).pods_synced, "no pod metadata at all");
    }

    #[test]
    fn without_pod_metadata_a_hami_slice_is_attributed_by_its_processes_only() {
        let names = Names { pods_dir: "/nonexistent".into(), containers_dir: "/nonexistent".into(), pods: None };
        let reading = Reading {
            driver_version: "550.1".into(),
            gpus: vec![gpu(1, SHARED)],
            processes: Vec::new(),
            errors: Vec::new(),
            sampled: vec![SHARED.into()],
        };
        let view = compose(&reading, &[allocation("slice-a", &format!("{SHARED}-0"))], &names);
        assert!(view.containers.is_empty(), "the kubelet's id alone places nothing: {view:#?}");
        let view = compose(&reading, &[allocation("plain", SHARED)], &names);
        assert!(row(&view, "plain", SHARED).unwrap().allocated, "a UUID ending in digits is a GPU, not a replica");
    }
}
