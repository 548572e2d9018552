//! The Verdict adapter format: a PEFT adapter directory (`adapter_config.json`,
//! `adapter_model.safetensors`) plus `verdict_manifest.json`, which ties the adapter to the
//! exact base weights and task template it was trained with.

use crate::task::Task;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the manifest inside an adapter directory.
pub const MANIFEST_FILE: &str = "verdict_manifest.json";
/// `method` of an encoder head's manifest (the same manifest, next to `head.safetensors`).
pub const HEAD_METHOD: &str = "encoder-head";
/// Bumped when the manifest's meaning changes.
pub const MANIFEST_VERSION: u32 = 1;

/// Why a manifest was not read, or refused for the weights and task at hand.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "adapter was trained with template v{trained_version} ({trained_hash}) of {task}, the current one is \
         v{current_version} ({current_hash})"
    )]
    Template { trained_version: u32, trained_hash: String, task: String, current_version: u32, current_hash: String },
    #[error("manifest version {0} is not {MANIFEST_VERSION}")]
    Version(u32),
    /// `what` is `adapter` or `head`; `weights` and `these` name the weights in the message.
    #[error(
        "{what} was trained on {weights} {} ({base_model}), {these} weights are {}",
        short(trained),
        short(actual)
    )]
    Weights {
        what: &'static str,
        weights: &'static str,
        these: &'static str,
        trained: String,
        base_model: String,
        actual: String,
    },
    #[error("{what} is for task {trained}, not {task}")]
    Task { what: &'static str, trained: String, task: String },
    #[error("a {method} adapter, not an encoder head (method {HEAD_METHOD})")]
    NotAHead { method: String },
    #[error("task {task} is a score task; heads classify")]
    ScoreTask { task: String },
    #[error("head labels {head:?}, task {task} has {labels:?}")]
    HeadLabels { head: Vec<String>, task: String, labels: Vec<String> },
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

/// What an adapter was trained on and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    /// sha256 of the base model's weights file (the GGUF file, or the safetensors files in
    /// name order for a Hugging Face directory).
    pub base_sha256: String,
    /// The base model as the user named it, for people.
    pub base_model: String,
    /// The base model's Hugging Face Hub id, where known: the catalogue's for a fetched model,
    /// or an imported PEFT adapter's `base_model_name_or_path` confirmed with `--base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_hub_id: Option<String>,
    pub task: String,
    pub template_version: u32,
    pub template_hash: String,
    pub label_words: Vec<String>,
    /// `sft`, `ppo`, ...
    pub method: String,
    /// The full command line that produced the adapter.
    pub command: String,
    pub steps: u64,
    /// Dev metrics at the saved step, as the evaluator reported them.
    pub dev_metrics: Option<serde_json::Value>,
}

impl Manifest {
    /// Refuses an adapter made for other base weights or another task template, with the reason.
    pub fn check(&self, base_sha256: &str, task: &Task) -> Result<(), ManifestError> {
        self.check_version_weights_task(("adapter", "base weights", "this model's"), base_sha256, task)?;
        if self.template_version != task.template_version || self.template_hash != task.template_hash() {
            return Err(ManifestError::Template {
                trained_version: self.template_version,
                trained_hash: self.template_hash.clone(),
                task: task.name.clone(),
                current_version: task.template_version,
                current_hash: task.template_hash(),
            });
        }
        Ok(())
    }

    /// The checks adapters and heads share: manifest version, the weights it was trained on,
    /// the task; the tuple names what it is, what its weights are called and whose these are.
    fn check_version_weights_task(
        &self,
        (what, weights, these): (&'static str, &'static str, &'static str),
        sha256: &str,
        task: &Task,
    ) -> Result<(), ManifestError> {
        if self.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version(self.manifest_version));
        }
        if self.base_sha256 != sha256 {
            return Err(ManifestError::Weights {
                what,
                weights,
                these,
                trained: self.base_sha256.clone(),
                base_model: self.base_model.clone(),
                actual: sha256.to_string(),
            });
        }
        if self.task != task.name {
            return Err(ManifestError::Task { what, trained: self.task.clone(), task: task.name.clone() });
        }
        Ok(())
    }

    /// Refuses an encoder head (`models::encoder::ClassifierHead`) made for other encoder
    /// weights, another task or other label words. Heads read no prompt, so the template is
    /// not checked; the label words (their order is the head's rows) are.
    pub fn check_head(&self, encoder_sha256: &str, task: &Task) -> Result<(), ManifestError> {
        if self.manifest_version == MANIFEST_VERSION && self.method != HEAD_METHOD {
            return Err(ManifestError::NotAHead { method: self.method.clone() });
        }
        self.check_version_weights_task(("head", "encoder weights", "this encoder's"), encoder_sha256, task)?;
        if task.is_score() {
            return Err(ManifestError::ScoreTask { task: task.name.clone() });
        }
        if self.label_words != task.label_words() {
            return Err(ManifestError::HeadLabels {
                head: self.label_words.clone(),
                task: task.name.clone(),
                labels: task.label_words(),
            });
        }
        Ok(())
    }

    /// Reads `<dir>/verdict_manifest.json`.
    pub fn read(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        serde_json::from_str(&text).map_err(|source| ManifestError::Parse { path, source })
    }

    /// Writes `<dir>/verdict_manifest.json` (through a temporary file).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let p = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!(".{MANIFEST_FILE}.partial"));
        std::fs::write(&tmp, serde_json::to_string_pretty(self).expect("manifest serialises"))?;
        std::fs::rename(tmp, p)
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// sha256 (hex) of a text: the fingerprint of weights that exist only as a recipe (seeded
/// random encoder weights, `models::encoder`).
pub fn text_sha256(text: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// sha256 (hex) of a model's weights: the file itself, or a Hugging Face directory's
/// `*.safetensors` files in name order.
pub fn weights_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(&f)?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskRegistry;

    fn manifest(task: &Task) -> Manifest {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            base_sha256: "ab".repeat(32),
            base_model: "smollm2".into(),
            base_hub_id: None,
            task: task.name.clone(),
            template_version: task.template_version,
            template_hash: task.template_hash(),
            label_words: task.label_words(),
            method: "sft".into(),
            command: "verdict-train sft".into(),
            steps: 10,
            dev_metrics: None,
        }
    }

    #[test]
    fn manifest_refuses_other_bases_tasks_and_templates() {
        let reg = TaskRegistry::builtin();
        let mr = reg.get("mr").unwrap();
        let m = manifest(mr);
        assert!(m.check(&"ab".repeat(32), mr).is_ok());
        assert!(m.check(&"cd".repeat(32), mr).unwrap_err().to_string().contains("base weights"));
        assert!(m.check(&"ab".repeat(32), reg.get("sst2").unwrap()).unwrap_err().to_string().contains("for task mr"));
        let mut reworded = mr.clone();
        reworded.instruction = reworded.instruction.replace("sentiment", "mood");
        assert!(m.check(&"ab".repeat(32), &reworded).unwrap_err().to_string().contains("template"));
        let dir = std::env::temp_dir().join(format!("verdict-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        m.write(&dir).unwrap();
        assert_eq!(Manifest::read(&dir).unwrap(), m);
        std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
        // sha256("abc")
        assert_eq!(weights_sha256(&dir).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn head_check_looks_at_method_encoder_task_and_labels_not_the_template() {
        let reg = TaskRegistry::builtin();
        let mr = reg.get("mr").unwrap();
        let mut m = manifest(mr);
        assert!(m.check_head(&"ab".repeat(32), mr).unwrap_err().to_string().contains("not an encoder head"));
        m.method = HEAD_METHOD.into();
        assert!(m.check_head(&"ab".repeat(32), mr).is_ok());
        let mut reworded = mr.clone();
        reworded.instruction = reworded.instruction.replace("sentiment", "mood");
        assert!(m.check_head(&"ab".repeat(32), &reworded).is_ok());
        assert!(m.check_head(&"cd".repeat(32), mr).unwrap_err().to_string().contains("encoder weights"));
        assert!(m
            .check_head(&"ab".repeat(32), reg.get("sst2").unwrap())
            .unwrap_err()
            .to_string()
            .contains("for task mr"));
        m.label_words.reverse();
        assert!(m.check_head(&"ab".repeat(32), mr).unwrap_err().to_string().contains("labels"));
        assert!(matches!(m.check_head(&"ab".repeat(32), mr), Err(ManifestError::HeadLabels { .. })));
        let e = m.check(&"cd".repeat(32), mr).unwrap_err();
        assert!(
            matches!(&e, ManifestError::Weights { what: "adapter", actual, .. } if *actual == "cd".repeat(32)),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "adapter was trained on base weights abababababab (smollm2), this model's weights are cdcdcdcdcdcd"
        );
        let missing = std::env::temp_dir().join(format!("verdict-no-manifest-{}", std::process::id()));
        assert!(matches!(Manifest::read(&missing), Err(ManifestError::Read { .. })));
        assert_eq!(text_sha256("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
