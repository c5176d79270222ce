//! What processes use on a GPU that no container holding it accounts for: a process in no
//! container (`host`), a container the kubelet did not give this GPU (`unallocated`:
//! `NVIDIA_VISIBLE_DEVICES=all`, privileged pods, a mis-set runtime), or a container of a pod
//! no longer on the node (`pod_gone`: a leftover holding memory). Per physical GPU, the use of
//! its MIG instances folded in; every reason has a value, 0 while nothing is unattributed.

use std::collections::HashMap;

use super::reading::{GpuId, Reading};
use crate::identity::ContainerLabels;
use crate::kube::Lookup;

/// Why a process's use is unattributed, in the order of [`REASONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A process in no container.
    Host,
    /// A container the kubelet did not give this GPU.
    Unallocated,
    /// A container of a pod no longer on the node.
    PodGone,
}

/// The `reason` label of each [`Reason`].
pub const REASONS: [&str; 3] = ["host", "unallocated", "pod_gone"];

/// Unattributed use of one physical GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Unattributed {
    /// The physical GPU.
    pub gpu: GpuId,
    /// Device memory held, by [`REASONS`].
    pub memory_bytes: [f64; 3],
    /// SM share, by [`REASONS`] (0 under MIG, where the driver does not sample per process).
    pub sm_ratio: [f64; 3],
    /// The kubelet's allocations were read at least once; until then no use is called
    /// `unallocated` (that series is left out rather than guessed).
    pub allocations_known: bool,
}

/// Measures the unattributed use on every physical GPU that is up; `allocated` says whether
/// the kubelet gave a device (by UUID) to a container.
pub fn measure(reading: &Reading, lookup: &mut Lookup, allocated: impl Fn(&str, &ContainerLabels) -> bool) -> Vec<Unattributed> {
    let physical = |uuid: &str| -> Option<&str> {
        let id = &reading.gpus.iter().find(|g| g.id.uuid == uuid)?.id;
        Some(id.mig.as_ref().map_or(id.uuid.as_str(), |m| m.parent_uuid.as_str()))
    };
    let mut rows: HashMap<&str, Unattributed> = reading
        .gpus
        .iter()
        .filter(|g| g.up && g.id.mig.is_none())
        .map(|g| {
            (g.id.uuid.as_str(), Unattributed { gpu: g.id.clone(), memory_bytes: [0.0; 3], sm_ratio: [0.0; 3], allocations_known: true })
        })
        .collect();
    for p in &reading.processes {
        let reason = match &p.container {
            None => Reason::Host,
            Some(c) if lookup.pod_gone(c) => Reason::PodGone,
            Some(c) => match lookup.by_cgroup(c) {
                Some(who) if allocated(&p.uuid, &who) => continue,
                _ => Reason::Unallocated,
            },
        };
        let Some(row) = physical(&p.uuid).and_then(|uuid| rows.get_mut(uuid)) else { continue };
        let k = reason as usize;
        row.memory_bytes[k] += p.memory_bytes.unwrap_or(0) as f64;
        row.sm_ratio[k] = (row.sm_ratio[k] + p.sm_ratio.unwrap_or(0.0)).min(1.0);
    }
    let mut rows: Vec<Unattributed> = rows.into_values().collect();
    rows.sort_by_key(|r| r.gpu.index);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::reading::{GpuReading, MigId, ProcessUse};
    use crate::identity::cgroup::ContainerCgroup;
    use crate::kube::Names;

    const GPU: &str = "GPU-0";
    const A100: &str = "GPU-1";
    const MIG: &str = "MIG-1";

    fn process(pid: u32, uid: Option<&str>, uuid: &str, memory: u64, sm: Option<f64>) -> ProcessUse {
        ProcessUse {
            uuid: uuid.into(),
            pid,
            container: uid.map(|u| ContainerCgroup { pod_uid: u.into(), container_id: format!("{pid:064}") }),
            memory_bytes: Some(memory),
            sm_ratio: sm,
        }
    }

    fn reading(processes: Vec<ProcessUse>) -> Reading {
        let id = |index, uuid: &str, mig: Option<MigId>| GpuId { index, uuid: uuid.into(), model: "m".into(), mig, minor: None };
        let mig = MigId { profile: "1g.10gb".into(), gpu_instance: 1, parent_uuid: A100.into(), placement: None };
        Reading {
            gpus: vec![
                GpuReading::new(id(0, GPU, None), true),
                GpuReading::new(id(1, A100, None), true),
                GpuReading::new(id(1, MIG, Some(mig)), true),
            ],
            processes,
            ..Reading::default()
        }
    }

    #[test]
    fn host_processes_unallocated_containers_and_gone_pods_are_told_apart_and_mig_folds_into_its_gpu() {
        let dir = tempfile::tempdir().unwrap();
        for pod in ["ml_held-0_uid-held", "ml_other-0_uid-other", "ml_mig-0_uid-mig"] {
            std::fs::create_dir_all(dir.path().join("pods").join(pod)).unwrap();
        }
        let names = Names { pods_dir: dir.path().join("pods"), containers_dir: dir.path().join("containers"), pods: None };
        let reading = reading(vec![
            process(1, Some("uid-held"), GPU, 10, Some(0.5)),
            process(2, None, GPU, 3, Some(0.2)),
            process(3, Some("uid-other"), GPU, 4, Some(0.1)),
            process(4, Some("uid-deleted"), GPU, 5, Some(0.0)),
            process(5, Some("uid-mig"), MIG, 7, None),
            process(6, Some("uid-other"), MIG, 2, None),
        ]);
        let held =
            |uuid: &str, who: &ContainerLabels| (uuid, who.pod.as_str()) == (GPU, "held-0") || (uuid, who.pod.as_str()) == (MIG, "mig-0");
        let rows = measure(&reading, &mut names.lookup(), held);
        assert_eq!(rows.len(), 2, "one row per physical GPU: {rows:?}");
        assert_eq!((rows[0].gpu.uuid.as_str(), rows[0].memory_bytes, rows[0].sm_ratio), (GPU, [3.0, 4.0, 5.0], [0.2, 0.1, 0.0]));
        assert_eq!((rows[1].gpu.uuid.as_str(), rows[1].memory_bytes, rows[1].sm_ratio), (A100, [0.0, 2.0, 0.0], [0.0; 3]));
    }

    #[test]
    fn every_gpu_has_zeros_while_all_is_attributed_and_a_lost_gpu_has_none() {
        let names = Names { pods_dir: "/nonexistent".into(), containers_dir: "/nonexistent".into(), pods: None };
        let mut r = reading(Vec::new());
        r.gpus[1].up = false;
        let rows = measure(&r, &mut names.lookup(), |_, _| true);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].memory_bytes, rows[0].sm_ratio), ([0.0; 3], [0.0; 3]));
    }
}
