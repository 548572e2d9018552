//! The adapters in memory (LoRA adapters of a decoder, or classification heads of an
//! encoder): every loaded version of every task, and the version each task serves. Requests take an `Arc` of a version when they start, so a swap never changes the
//! adapter under a request in flight; the old version is freed when its last request ends.
//!
//! Every version is checked before it can serve, with the evaluator's own check
//! ([`Manifest::check`]; heads: [`Manifest::check_head`]): its manifest must name the loaded
//! base weights and the task's current template (heads: its label words), and its tensors
//! must load and be finite. A refused version leaves the serving one in place.

use crate::backend::{Backend, WeightsError};
use crate::contract::AdapterVersion;
use crate::metrics::Metrics;
use serde::Serialize;
use shared::adapter::{Manifest, MANIFEST_FILE};
use shared::registry::{Registry, RegistryError};
use shared::task::TaskRegistry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use utoipa::ToSchema;

/// Why an adapter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("unknown task {0:?}")]
    UnknownTask(String),
    #[error("refusing adapter {task}/{version}: {reason}")]
    Refused { task: String, version: String, reason: String },
    #[error("adapter {task}/{version} serves the task now: promote another version or roll back first")]
    IsCurrent { task: String, version: String },
    #[error(
        "adapter {task}/{version} is not loaded (loading is an admin call: POST /v1/admin/adapters/{task}/{version}/load)"
    )]
    NotLoaded { task: String, version: String },
}

#[derive(Default)]
struct TaskSlot {
    current: Option<Arc<AdapterVersion>>,
    loaded: BTreeMap<String, Arc<AdapterVersion>>,
    /// The last version refused, and why (not retried by the watcher until CURRENT changes).
    refused: Option<(String, String)>,
}

/// What `GET /v1/adapters` shows of one loaded version.
#[derive(Serialize, ToSchema)]
pub struct VersionInfo {
    pub version: String,
    pub current: bool,
    pub method: String,
    pub steps: u64,
    pub base_model: String,
    pub template_version: u32,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    #[schema(value_type = Option<Object>)]
    pub dev_metrics: Option<serde_json::Value>,
}

/// What `GET /v1/adapters` shows of one task.
#[derive(Serialize, ToSchema)]
pub struct TaskAdapters {
    pub task: String,
    /// The version answering requests that name no version.
    pub current: Option<String>,
    /// Versions in memory.
    pub loaded: Vec<VersionInfo>,
    /// Complete versions in the registry directory.
    pub on_disk: Vec<String>,
    /// The last version refused and why.
    pub refused: Option<RefusedInfo>,
}

/// A refused adapter version.
#[derive(Serialize, ToSchema)]
pub struct RefusedInfo {
    pub version: String,
    pub reason: String,
}

/// Every task's adapters, and the registry they come from.
pub struct AdapterTable {
    registry: Registry,
    tasks: Arc<TaskRegistry>,
    backend: Backend,
    base_sha256: String,
    merged: bool,
    /// Most versions loaded in all (0: no limit); serving versions count and are never evicted.
    max_loaded: usize,
    slots: RwLock<BTreeMap<String, TaskSlot>>,
    /// Serialises changes (admin calls, the registry watcher): they never interleave.
    writer: Mutex<()>,
    next_id: AtomicU64,
    /// Ticks at each load and each request naming a version (orders `last_used`).
    clock: AtomicU64,
    metrics: Arc<Metrics>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl AdapterTable {
    /// An empty table over `registry`, for adapters of the model whose weights hash to
    /// `base_sha256`. `merged`: also fold each version into a copy of the base.
    /// `max_loaded`: most versions in memory (0: no limit).
    pub fn new(
        registry: Registry,
        tasks: Arc<TaskRegistry>,
        backend: Backend,
        base_sha256: String,
        merged: bool,
        max_loaded: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            registry,
            tasks,
            backend,
            base_sha256,
            merged,
            max_loaded,
            slots: RwLock::new(BTreeMap::new()),
            writer: Mutex::new(()),
            next_id: AtomicU64::new(1),
            clock: AtomicU64::new(1),
            metrics,
        }
    }

    /// Marks `v` used now.
    fn touch(&self, v: &AdapterVersion) {
        v.last_used.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    fn read_slots(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, TaskSlot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_slots(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, TaskSlot>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The version serving `task` now, if any (marked used: once replaced, it is evicted
    /// after versions used less recently).
    pub fn current(&self, task: &str) -> Option<Arc<AdapterVersion>> {
        let v = self.read_slots().get(task).and_then(|s| s.current.clone());
        if let Some(v) = &v {
            self.touch(v);
        }
        v
    }

    /// The sha256 of the base weights every adapter must be trained on.
    pub fn base_sha256(&self) -> &str {
        &self.base_sha256
    }

    /// Tasks that have a serving version.
    pub fn tasks_with_current(&self) -> Vec<String> {
        self.read_slots().iter().filter(|(_, s)| s.current.is_some()).map(|(t, _)| t.clone()).collect()
    }

    /// A loaded version, for a request that names one. Requests never load: loading reads
    /// and checks files (with `--merged`, copies the weights) and stays an admin call, so
    /// clients cannot fill memory; `--max-loaded-versions` bounds what admins load.
    pub fn get(&self, task: &str, version: &str) -> Result<Arc<AdapterVersion>, AdapterError> {
        let dir = self.registry.version_dir(task, version)?;
        if let Some(v) = self.read_slots().get(task).and_then(|s| s.loaded.get(version).cloned()) {
            self.touch(&v);
            return Ok(v);
        }
        if !dir.is_dir() {
            return Err(RegistryError::NoSuchVersion { task: task.to_string(), version: version.to_string() }.into());
        }
        Err(AdapterError::NotLoaded { task: task.to_string(), version: version.to_string() })
    }

    /// Loads (and checks) a version without making it current.
    pub fn load(&self, task: &str, version: &str) -> Result<Arc<AdapterVersion>, AdapterError> {
        let _w = self.lock_writer();
        self.load_locked(task, version)
    }

    /// Loads a version if needed, then makes it the task's serving version, in memory and in
    /// the registry's CURRENT.
    pub fn promote(&self, task: &str, version: &str) -> Result<Arc<AdapterVersion>, AdapterError> {
        let _w = self.lock_writer();
        let v = self.load_locked(task, version)?;
        self.registry.promote(task, version)?;
        self.set_current(task, v.clone());
        Ok(v)
    }

    /// Goes back to the version promoted before the current one (checked before the switch).
    pub fn rollback(&self, task: &str) -> Result<Arc<AdapterVersion>, AdapterError> {
        let _w = self.lock_writer();
        let (prev, _) = self.registry.previous(task)?;
        let v = self.load_locked(task, &prev)?;
        self.registry.rollback(task)?;
        self.set_current(task, v.clone());
        Ok(v)
    }

    /// Frees a loaded version that is not serving; requests still using it finish on it.
    pub fn unload(&self, task: &str, version: &str) -> Result<(), AdapterError> {
        let _w = self.lock_writer();
        self.registry.version_dir(task, version)?;
        let mut slots = self.write_slots();
        let slot = slots
            .get_mut(task)
            .ok_or_else(|| AdapterError::NotLoaded { task: task.to_string(), version: version.to_string() })?;
        if slot.current.as_ref().is_some_and(|c| c.version == version) {
            return Err(AdapterError::IsCurrent { task: task.to_string(), version: version.to_string() });
        }
        slot.loaded
            .remove(version)
            .map(|_| ())
            .ok_or_else(|| AdapterError::NotLoaded { task: task.to_string(), version: version.to_string() })
    }

    /// Brings memory in line with the registry: a task whose CURRENT names another version
    /// than the one serving gets that version, if it passes the checks. Returns what changed
    /// or was refused, for the log.
    pub fn sync(&self) -> Vec<String> {
        let _w = self.lock_writer();
        let mut events = Vec::new();
        let tasks = match self.registry.tasks() {
            Ok(t) => t,
            Err(e) => return vec![format!("cannot read the registry: {e}")],
        };
        for task in tasks {
            if self.tasks.get(&task).is_err() {
                continue;
            }
            let wanted = match self.registry.current(&task) {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    events.push(format!("{task}: {e}"));
                    continue;
                }
            };
            let (serving, refused) = {
                let slots = self.read_slots();
                let slot = slots.get(&task);
                (
                    slot.and_then(|s| s.current.as_ref().map(|c| c.version.clone())),
                    slot.and_then(|s| s.refused.as_ref().map(|r| r.0.clone())),
                )
            };
            if serving.as_deref() == Some(wanted.as_str()) || refused.as_deref() == Some(wanted.as_str()) {
                continue;
            }
            match self.load_locked(&task, &wanted) {
                Ok(v) => {
                    self.set_current(&task, v);
                    events.push(format!("{task}: now serving {wanted} (was {})", serving.as_deref().unwrap_or("none")));
                }
                Err(e) => events.push(format!("{task}: {e}; still serving {}", serving.as_deref().unwrap_or("none"))),
            }
        }
        events
    }

    fn set_current(&self, task: &str, v: Arc<AdapterVersion>) {
        let id = v.id;
        {
            let mut slots = self.write_slots();
            let slot = slots.entry(task.to_string()).or_default();
            if slot.current.as_ref().is_none_or(|c| c.id != v.id) {
                self.metrics.swap(task);
            }
            slot.refused = None;
            slot.current = Some(v);
        }
        // The version it replaced may now be evicted.
        self.evict_locked(id);
    }

    /// Frees the least recently used versions that serve no task while more than
    /// `max_loaded` are loaded; `keep` (the version just loaded or promoted) stays. Requests
    /// holding an evicted version finish on it (the caller holds the writer lock).
    fn evict_locked(&self, keep: u64) {
        if self.max_loaded == 0 {
            return;
        }
        let mut slots = self.write_slots();
        while slots.values().map(|s| s.loaded.len()).sum::<usize>() > self.max_loaded {
            let victim = slots
                .iter()
                .flat_map(|(task, s)| {
                    let current = s.current.as_ref().map(|c| c.id);
                    s.loaded
                        .values()
                        .filter(move |v| Some(v.id) != current && v.id != keep)
                        .map(move |v| (v.last_used.load(Ordering::Relaxed), task.clone(), v.version.clone()))
                })
                .min();
            let Some((_, task, version)) = victim else { break };
            if let Some(slot) = slots.get_mut(&task) {
                slot.loaded.remove(&version);
            }
            self.metrics.eviction(&task);
            tracing::info!(
                "adapters: {task}: evicted {version} (least recently used; --max-loaded-versions {})",
                self.max_loaded
            );
        }
    }

    /// Loads and checks a version (the caller holds the writer lock).
    fn load_locked(&self, task: &str, version: &str) -> Result<Arc<AdapterVersion>, AdapterError> {
        let dir = self.registry.version_dir(task, version)?;
        let spec = self.tasks.get(task).map_err(|_| AdapterError::UnknownTask(task.to_string()))?;
        if let Some(v) = self.read_slots().get(task).and_then(|s| s.loaded.get(version).cloned()) {
            self.touch(&v);
            return Ok(v);
        }
        if !dir.is_dir() {
            return Err(RegistryError::NoSuchVersion { task: task.to_string(), version: version.to_string() }.into());
        }
        let checked = (|| -> Result<AdapterVersion, WeightsError> {
            if !dir.join(MANIFEST_FILE).is_file() {
                return Err(WeightsError::NoManifest);
            }
            let manifest = Manifest::read(&dir)?;
            let weights = self.backend.load_weights(&dir, &manifest, &self.base_sha256, spec, self.merged)?;
            Ok(AdapterVersion {
                version: version.to_string(),
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                weights,
                manifest,
                loaded_at: now_secs(),
                last_used: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
            })
        })();
        match checked {
            Ok(v) => {
                let v = Arc::new(v);
                self.write_slots().entry(task.to_string()).or_default().loaded.insert(version.to_string(), v.clone());
                self.evict_locked(v.id);
                Ok(v)
            }
            Err(why) => {
                let reason = why.to_string();
                self.metrics.refusal(task);
                self.write_slots().entry(task.to_string()).or_default().refused =
                    Some((version.to_string(), reason.clone()));
                Err(AdapterError::Refused { task: task.to_string(), version: version.to_string(), reason })
            }
        }
    }

    /// Every task with adapters in memory or on disk.
    pub fn snapshot(&self) -> Vec<TaskAdapters> {
        let mut names: Vec<String> = self.registry.tasks().unwrap_or_default();
        let slots = self.read_slots();
        names.extend(slots.keys().cloned());
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|task| {
                let slot = slots.get(&task);
                let current = slot.and_then(|s| s.current.as_ref().map(|c| c.version.clone()));
                let loaded = slot
                    .map(|s| {
                        s.loaded
                            .values()
                            .map(|v| VersionInfo {
                                version: v.version.clone(),
                                current: current.as_deref() == Some(v.version.as_str()),
                                method: v.manifest.method.clone(),
                                steps: v.manifest.steps,
                                base_model: v.manifest.base_model.clone(),
                                template_version: v.manifest.template_version,
                                loaded_at: v.loaded_at,
                                dev_metrics: v.manifest.dev_metrics.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                TaskAdapters {
                    on_disk: self.registry.versions(&task).unwrap_or_default(),
                    refused: slot
                        .and_then(|s| s.refused.as_ref())
                        .map(|(version, reason)| RefusedInfo { version: version.clone(), reason: reason.clone() }),
                    task,
                    current,
                    loaded,
                }
            })
            .collect()
    }
}
