//! What survives an agent restart: the running totals of every container holding a GPU, the
//! reports written but not yet acknowledged by every sink, and the containers already
//! reported. One JSON file in `state_dir`, written atomically.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::report::{Report, Who};

const FILE_NAME: &str = "gpu-runs.json";
const VERSION: u32 = 1;
/// Containers remembered as reported: far more than a node ends between two restarts of a
/// container's pod; the oldest go first.
pub const MAX_REPORTED: usize = 4096;
/// Runs tracked at once: a node's GPU containers are far fewer; beyond it (a leak), the run
/// seen longest ago is dropped.
pub const MAX_RUNNING: usize = 2048;
/// Reports waiting for the sinks (a sink down for long); beyond it the oldest is dropped.
pub const MAX_PENDING: usize = 4096;

/// A container's totals while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Whose run.
    pub who: Who,
    /// `state.running.startedAt`, Unix seconds.
    pub started: Option<f64>,
    /// The last poll that saw it hold a GPU, Unix seconds.
    pub last_seen: f64,
    /// Its GPU share at that poll.
    pub last_share: f64,
    /// GPU-seconds up to `last_seen`.
    pub gpu_seconds: f64,
    /// Largest share held at once.
    pub gpus: f64,
    /// SM utilization × seconds, and the seconds it was read.
    pub utilization: Mean,
    /// GPM SM activity × seconds.
    pub sm_active: Mean,
    /// GPM tensor activity × seconds.
    pub tensor_active: Mean,
    /// Most device memory held at once.
    pub memory_peak: Option<f64>,
    /// Its share of its GPUs' energy so far.
    pub energy_joules: Option<f64>,
    /// Each physical GPU's energy counter at `last_seen`.
    pub energy_at: BTreeMap<String, f64>,
    /// XIDs on its GPUs so far.
    pub xids: u64,
    /// Each physical GPU's XID count at `last_seen` (counted since the agent started).
    pub xids_at: BTreeMap<String, u64>,
    /// Seconds its GPUs were throttled.
    pub throttled_seconds: f64,
    /// The last value of its pod's log-derived gauges.
    pub log_metrics: Vec<(String, f64)>,
    /// What its polls added, by second, for the last [`RECENT_SECONDS`] seconds with polls
    /// (not kept across a restart): those after its end, seen before its status arrived, are
    /// taken back.
    #[serde(skip)]
    pub recent: VecDeque<PollAdded>,
}

/// What a second's polls added to a run's means, throttled seconds and energy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PollAdded {
    /// The second of the polls (Unix seconds, whole: a container's end is known to the second).
    pub at: f64,
    pub utilization: Mean,
    pub sm_active: Mean,
    pub tensor_active: Mean,
    pub throttled_seconds: f64,
    pub energy_joules: f64,
}

impl PollAdded {
    /// Adds what `other` added, in the same second.
    pub fn merge(&mut self, other: &PollAdded) {
        self.utilization.add_all(&other.utilization);
        self.sm_active.add_all(&other.sm_active);
        self.tensor_active.add_all(&other.tensor_active);
        self.throttled_seconds += other.throttled_seconds;
        self.energy_joules += other.energy_joules;
    }
}

impl Run {
    /// Adds what a second's polls added to its means, throttled seconds and energy (energy
    /// only once a GPU of it reported some).
    pub fn add(&mut self, added: &PollAdded) {
        self.utilization.add_all(&added.utilization);
        self.sm_active.add_all(&added.sm_active);
        self.tensor_active.add_all(&added.tensor_active);
        self.throttled_seconds += added.throttled_seconds;
        if let Some(energy) = &mut self.energy_joules {
            *energy += added.energy_joules;
        }
    }

    /// Takes back what [`Run::add`] added (no total below nothing).
    pub fn take_back(&mut self, added: &PollAdded) {
        self.utilization.take_back(&added.utilization);
        self.sm_active.take_back(&added.sm_active);
        self.tensor_active.take_back(&added.tensor_active);
        self.throttled_seconds = (self.throttled_seconds - added.throttled_seconds).max(0.0);
        if let Some(energy) = &mut self.energy_joules {
            *energy = (*energy - added.energy_joules).max(0.0);
        }
    }
}

/// Seconds with polls remembered per run: a kubelet reports an exit within seconds, an API
/// that is slow or briefly down within a minute.
pub const RECENT_SECONDS: usize = 64;

/// A time-weighted mean in the making.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Mean {
    /// Σ value × seconds.
    pub weighted: f64,
    /// Σ seconds.
    pub seconds: f64,
}

impl Mean {
    /// Adds `value` held for `seconds`.
    pub fn add(&mut self, value: f64, seconds: f64) {
        self.weighted += value * seconds;
        self.seconds += seconds;
    }

    /// Adds what `other` added.
    pub fn add_all(&mut self, other: &Mean) {
        self.weighted += other.weighted;
        self.seconds += other.seconds;
    }

    /// Takes back what `other` added (what is left of nearly nothing is nothing: rounding
    /// must not leave a mean of residues).
    pub fn take_back(&mut self, other: &Mean) {
        self.weighted = (self.weighted - other.weighted).max(0.0);
        self.seconds -= other.seconds;
        if self.seconds < 1e-6 {
            *self = Mean::default();
        }
    }

    /// The mean, when anything was added.
    pub fn get(&self) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.weighted / self.seconds)
    }
}

/// The whole state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Runs by container id.
    pub running: BTreeMap<String, Run>,
    /// Ended runs whose report the sinks have not all acknowledged; sent again after a restart.
    pub pending: Vec<Report>,
    /// Container ids reported, oldest first.
    pub reported: VecDeque<String>,
    /// The ids of `pending` and `reported`, for [`State::is_done`].
    #[serde(skip)]
    done: HashSet<String>,
}

impl State {
    /// Whether the container's run was reported or is being reported.
    pub fn is_done(&self, container_id: &str) -> bool {
        self.done.contains(container_id)
    }

    /// Rebuilds the index of [`State::is_done`] after `pending` or `reported` changed.
    pub fn reindex(&mut self) {
        self.done.clear();
        self.done.extend(self.pending.iter().map(|r| r.who.container_id.clone()));
        self.done.extend(self.reported.iter().cloned());
    }

    /// Remembers a reported container, forgetting the oldest beyond [`MAX_REPORTED`].
    pub fn remember(&mut self, container_id: String) {
        if self.reported.len() >= MAX_REPORTED {
            if let Some(old) = self.reported.pop_front() {
                self.done.remove(&old);
            }
        }
        self.done.insert(container_id.clone());
        self.reported.push_back(container_id);
    }
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    #[serde(flatten)]
    state: State,
}

/// The state file in `state_dir`.
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The file in `dir`.
    pub fn new(dir: &Path) -> StateFile {
        StateFile { path: dir.join(FILE_NAME) }
    }

    /// Reads the state; a file that does not parse is moved aside and the runs start over.
    pub fn load(&self) -> State {
        match std::fs::read(&self.path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(on_disk) if on_disk.version == VERSION => {
                    let mut state = on_disk.state;
                    state.reindex();
                    state
                }
                Ok(on_disk) => {
                    tracing::warn!(file = %self.path.display(), version = on_disk.version, "unknown GPU run state version; runs start over");
                    State::default()
                }
                Err(e) => {
                    let aside = self.path.with_extension("json.corrupt");
                    tracing::error!(file = %self.path.display(), error = %e, moved_to = %aside.display(), "GPU run state does not parse; runs start over");
                    let _ = std::fs::rename(&self.path, aside);
                    State::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "GPU run state cannot be read; runs start over");
                State::default()
            }
        }
    }

    /// Writes the state atomically: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, state: &State) -> std::io::Result<()> {
        use std::io::Write;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let bytes = serde_json::to_vec(&OnDisk { version: VERSION, state: state.clone() }).expect("state serializes");
        let temp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_survives_a_round_trip_and_a_torn_file_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        assert_eq!(file.load(), State::default(), "no file yet");
        let mut state = State { pending: vec![super::super::report::tests::report()], ..State::default() };
        state.reindex();
        for i in 0..MAX_REPORTED + 3 {
            state.remember(format!("c{i}"));
        }
        assert_eq!(state.reported.len(), MAX_REPORTED, "bounded");
        assert!(!state.is_done("c0") && state.is_done("c5") && state.is_done(&"a".repeat(64)));
        file.save(&state).unwrap();
        assert_eq!(file.load(), state);
        std::fs::write(dir.path().join(FILE_NAME), b"{\"version\":1,").unwrap();
        assert_eq!(file.load(), State::default());
        assert!(dir.path().join("gpu-runs.json.corrupt").exists());
    }
}
