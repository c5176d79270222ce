//! GPUs shared through HAMi (Project-HAMi): its device ids in the kubelet's allocations and
//! the pod annotation that says where HAMi placed each container and what it granted there.
//!
//! HAMi's NVIDIA device plugin registers each GPU `n` times under `nvidia.com/gpu`, as
//! `<GPU UUID>-<i>` (`rm/devices.go`, `GetPluginDevices`: `id := fmt.Sprintf("%v-%v", dev.ID, i)`),
//! but with its default `enablegetpreferredallocation: false` the kubelet picks those ids
//! itself: HAMi's `Allocate` hands the container the devices of the pod annotation, not of the
//! ids. So the id says only that a container holds a HAMi slice; where it is, and what it was
//! granted, is `hami.io/vgpu-devices-allocated`, which the scheduler writes
//! (`EncodePodSingleDevice`) as one entry per container, each followed by `;`, each device of
//! an entry `<uuid>,<type>,<memory MiB>,<cores percent>:` (`EncodeContainerDevices`:
//! `fmt.Fprintf(&builder, "%s,%s,%d,%d%s", val.UUID, val.Type, val.Usedmem, val.Usedcores, ...)`),
//! a container without a HAMi device having an empty entry (v2.4 and v2.5: none for those
//! ahead of the first container with a GPU). Up to v2.8 the entries are the
//! pod's containers in order (`Resourcereqs` over `pod.Spec.Containers`); from v2.9 the init
//! containers come first. The same format from v2.4 (`pkg/util`) to v2.10 (`pkg/device`),
//! except that v2.4 and v2.5 write a container without a GPU that follows one with a GPU as
//! an entry holding one empty device, `,,0,0:` (`calcScore` appends `util.ContainerDevice{}`
//! to it), which is no device.

use std::collections::BTreeMap;

/// The annotation with HAMi's placement of a pod's NVIDIA slices. (HAMi also writes
/// `hami.io/vgpu-devices-to-allocate` with the same value and empties it as the device plugin
/// allocates, so only this one still holds the placement once the pod runs.)
pub const ALLOCATED: &str = "hami.io/vgpu-devices-allocated";

/// What HAMi granted one container on one physical GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The physical GPU's UUID.
    pub uuid: String,
    /// Device memory granted, MiB (a `nvidia.com/gpumem-percentage` request is already
    /// resolved to MiB here). HAMi keeps it in an `int32`.
    pub memory_mib: u32,
    /// Share of the GPU's SMs granted, percent (0: HAMi reserves none and its limiter does
    /// not cap the container).
    pub cores_percent: u32,
}

impl Grant {
    /// Device memory granted, bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) * 1024 * 1024
    }

    /// Share of the GPU's SMs granted, 0..1.
    pub fn cores_ratio(&self) -> f64 {
        f64::from(self.cores_percent) / 100.0
    }
}

/// A pod's grants by container name, or why its annotation could not be read.
pub type PodGrants = Result<BTreeMap<String, Vec<Grant>>, String>;

/// Reads the annotation's entries for a pod with these init containers and containers (in
/// their spec order): the entry count says which HAMi wrote it — init containers and then
/// containers (v2.9 on), or only the containers (up to v2.8). v2.4 and v2.5 write no entry for
/// the containers ahead of the first one with a GPU, so fewer entries than containers are the
/// last containers'. More entries than that is an error.
pub fn grants(value: &str, init_containers: &[&str], containers: &[&str]) -> PodGrants {
    let entries = parse(value)?;
    let names: Vec<&str> = if entries.len() == init_containers.len() + containers.len() {
        init_containers.iter().chain(containers).copied().collect()
    } else if entries.len() <= containers.len() {
        containers[containers.len() - entries.len()..].to_vec()
    } else {
        return Err(format!(
            "{} container entries for {} init containers and {} containers",
            entries.len(),
            init_containers.len(),
            containers.len()
        ));
    };
    Ok(names.into_iter().zip(entries).filter(|(_, devices)| !devices.is_empty()).map(|(n, d)| (n.to_string(), d)).collect())
}

/// Splits the annotation into its per-container entries of devices.
pub fn parse(value: &str) -> Result<Vec<Vec<Grant>>, String> {
    let Some(body) = value.strip_suffix(';') else {
        return Err("does not end with `;`".into());
    };
    body.split(';').map(parse_container).collect()
}

fn parse_container(entry: &str) -> Result<Vec<Grant>, String> {
    // Every device ends with `:`, so the last piece is empty; HAMi's decoder skips pieces
    // without a comma the same way. v2.4 and v2.5 mark a container without a GPU with the
    // empty device `,,0,0`.
    entry.split(':').filter(|d| !d.is_empty() && *d != ",,0,0").map(parse_device).collect()
}

fn parse_device(text: &str) -> Result<Grant, String> {
    // Quoted in errors, which are logged: at most 120 characters of it.
    let device = match text.char_indices().nth(120) {
        Some((end, _)) => &text[..end],
        None => text,
    };
    let fields: Vec<&str> = text.split(',').collect();
    let [uuid, _kind, memory, cores, ..] = fields[..] else {
        return Err(format!("device `{device}` has fewer than 4 fields"));
    };
    if !uuid.starts_with("GPU-") {
        return Err(format!("device `{device}` does not name a GPU UUID"));
    }
    let memory_mib = memory.parse().map_err(|_| format!("device `{device}`: memory `{memory}` is not a number of MiB"))?;
    let cores_percent =
        cores.parse().ok().filter(|c| *c <= 100).ok_or_else(|| format!("device `{device}`: cores `{cores}` is not a percentage"))?;
    Ok(Grant { uuid: uuid.to_string(), memory_mib, cores_percent })
}

/// Whether a kubelet device id is one of HAMi's `<GPU UUID>-<i>`, given the UUIDs of the
/// node's GPUs: the GPU it was cut from. A GPU's own UUID can end in a group of digits, so the
/// suffix is cut only from an id that is not a GPU's UUID itself and only where what is left is
/// one.
pub fn replica_of(id: &str, is_gpu: impl Fn(&str) -> bool) -> Option<&str> {
    if !id.starts_with("GPU-") || is_gpu(id) {
        return None;
    }
    let (uuid, replica) = id.rsplit_once('-')?;
    (!replica.is_empty() && replica.bytes().all(|b| b.is_ascii_digit()) && is_gpu(uuid)).then_some(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
    // A UUID whose last group is all digits.
    const B: &str = "GPU-11111111-2222-3333-4444-555555555555";

    fn grant(uuid: &str, memory_mib: u32, cores_percent: u32) -> Grant {
        Grant { uuid: uuid.into(), memory_mib, cores_percent }
    }

    /// As HAMi v2.4–v2.10 encode it: `EncodePodSingleDevice` writes each container's
    /// `EncodeContainerDevices` (`"%s,%s,%d,%d%s", val.UUID, val.Type, val.Usedmem,
    /// val.Usedcores, ":"`) followed by `;`.
    #[test]
    fn entries_follow_hamis_encoding_with_empty_entries_kept_in_place() {
        let value = format!("{A},NVIDIA,8000,30:;;{A},NVIDIA,4000,0:{B},NVIDIA,81559,100:;");
        assert_eq!(parse(&value).unwrap(), vec![vec![grant(A, 8000, 30)], vec![], vec![grant(A, 4000, 0), grant(B, 81559, 100)]]);
        assert_eq!(grant(A, 8000, 30).memory_bytes(), 8000 * 1_048_576);
        assert!((grant(A, 8000, 30).cores_ratio() - 0.3).abs() < 1e-12);
    }

    #[test]
    fn init_containers_come_first_from_v2_9_and_are_absent_before() {
        // v2.9 on: `Resourcereqs` — "Process init containers first (indices 0 to
        // len(InitContainers)-1)"; the init container holds no slice here.
        let v29 = format!(";{A},NVIDIA,8000,30:;;");
        let grants_v29 = grants(&v29, &["fetch-weights"], &["main", "sidecar"]).unwrap();
        assert_eq!(grants_v29.into_iter().collect::<Vec<_>>(), vec![("main".to_string(), vec![grant(A, 8000, 30)])]);
        // Up to v2.8: `counts = make(PodDeviceRequests, len(pod.Spec.Containers))`.
        let v28 = format!("{A},NVIDIA,8000,30:;;");
        let grants_v28 = grants(&v28, &["fetch-weights"], &["main", "sidecar"]).unwrap();
        assert_eq!(grants_v28.keys().collect::<Vec<_>>(), ["main"]);
        // An init container with a slice (v2.9 on).
        let init = format!("{B},NVIDIA,1000,10:;{A},NVIDIA,8000,30:;");
        let both = grants(&init, &["warmup"], &["main"]).unwrap();
        assert_eq!(both["warmup"], vec![grant(B, 1000, 10)]);
        assert_eq!(both["main"], vec![grant(A, 8000, 30)]);
    }

    /// v2.4 and v2.5 (`calcScore`): a container without a GPU after one with a GPU gets
    /// `score.Devices[idx][ctrid] = append(score.Devices[idx][ctrid], util.ContainerDevice{})`,
    /// encoded `,,0,0:`.
    #[test]
    fn the_empty_device_of_v2_4_and_v2_5_is_no_device() {
        let value = format!("{A},NVIDIA,8000,30:;,,0,0:;");
        let by_container = grants(&value, &[], &["main", "sidecar"]).unwrap();
        assert_eq!(by_container.into_iter().collect::<Vec<_>>(), vec![("main".to_string(), vec![grant(A, 8000, 30)])]);
    }

    /// v2.4 and v2.5 (`calcScore`): for a container without a GPU ahead of the first with
    /// one, `for idx := range score.Devices` finds no device type yet and appends nothing.
    #[test]
    fn v2_4_and_v2_5_leave_out_the_containers_ahead_of_the_first_gpu() {
        let value = format!("{A},NVIDIA,8000,30:;{B},NVIDIA,4000,20:;");
        let by_container = grants(&value, &[], &["log-shipper", "main", "worker"]).unwrap();
        assert_eq!(by_container.keys().collect::<Vec<_>>(), ["main", "worker"]);
        assert_eq!(by_container["worker"], vec![grant(B, 4000, 20)]);
    }

    #[test]
    fn malformed_annotations_are_errors_not_panics() {
        for bad in [
            "".to_string(),
            format!("{A},NVIDIA,8000,30:"),
            format!("{A},NVIDIA,8000:;"),
            format!("{A},NVIDIA,lots,30:;"),
            format!("{A},NVIDIA,-1,30:;"),
            format!("{A},NVIDIA,8000,130:;"),
            format!("{A},NVIDIA,99999999999999999999,30:;"),
            "0,NVIDIA,8000,30:;".to_string(),
            "garbage;".to_string(),
            "\u{1F600},,,;".to_string(),
            ",,8000,30:;".to_string(),
        ] {
            assert!(grants(&bad, &[], &["main"]).is_err(), "{bad:?}");
        }
        let two = format!("{A},NVIDIA,8000,30:;;");
        assert!(grants(&two, &[], &["main"]).is_err(), "two entries, one container");
        let three = format!("{A},NVIDIA,8000,30:;;;");
        assert!(grants(&three, &["a", "b"], &["main", "side"]).is_err(), "neither layout");
    }

    #[test]
    fn a_replica_suffix_is_cut_only_where_a_gpu_is_left() {
        let gpus = [A, B];
        let is_gpu = |u: &str| gpus.contains(&u);
        assert_eq!(replica_of(&format!("{A}-0"), is_gpu), Some(A));
        assert_eq!(replica_of(&format!("{B}-12"), is_gpu), Some(B));
        assert_eq!(replica_of(B, is_gpu), None, "B ends in digits but is a GPU itself");
        assert_eq!(replica_of("GPU-11111111-2222-3333-4444", is_gpu), None, "B without its last group is no GPU");
        assert_eq!(replica_of(&format!("{A}::1"), is_gpu), None, "time-slicing's replicas are not HAMi's");
        assert_eq!(replica_of(&format!("{A}-x"), is_gpu), None);
        assert_eq!(replica_of("MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee-0", is_gpu), None);
    }
}
