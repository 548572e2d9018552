//! Which model a command loads and how (`--model`, `--weights`, `--device`, `--dtype`, the CPU
//! kernels), its loading, and its weights' fingerprint.

use crate::Failure;
use anyhow::{Context, Result};
use clap::Args;
use models::cpu::Purpose;
use models::{DTypeSpec, DeviceSpec, LoadedModel, WeightMode};
use shared::assets;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Which model to load and how.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A model name (`smollm2`, `qwen0.5b`, `qwen1.5b`), a .gguf file or a Hugging Face directory.
    #[arg(long, env = "VERDICT_MODEL", default_value = "smollm2")]
    pub model: String,
    /// `dense` (f32, the reference) or `quantized` (inference only: one int8 matrix per
    /// weight on the integer kernels where the CPU has VNNI, else the GGUF blocks).
    #[arg(long, env = "VERDICT_WEIGHTS", default_value = "dense")]
    pub weights: WeightMode,
    /// `cpu`, `cuda` or `cuda:N` (a binary built with the `cuda` feature; see docs/gpu.md).
    #[arg(long, env = "VERDICT_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Precision of the base weights and activations: `auto` (f32 on CPU, bf16 on a GPU),
    /// `f32`, `bf16`, `f16`. LoRA factors, heads and losses stay f32.
    #[arg(long, env = "VERDICT_DTYPE", default_value = "auto")]
    pub dtype: DTypeSpec,
    #[command(flatten)]
    pub kernels: models::cpu::KernelArgs,
    /// The weights' sha256, computed once per run and shared by the clones of these arguments
    /// (a run hashes its base once: the manifests, the adapter checks and the reward model's).
    #[arg(skip)]
    pub(crate) fingerprint: Arc<OnceLock<String>>,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            model: "smollm2".into(),
            weights: WeightMode::Dense,
            device: DeviceSpec::Cpu,
            dtype: DTypeSpec::Auto,
            kernels: Default::default(),
            fingerprint: Default::default(),
        }
    }
}

impl ModelArgs {
    /// Loads the model for training (dense weights only).
    pub fn load_for_training(&self, cache: &Path) -> Result<LoadedModel> {
        if self.weights != WeightMode::Dense {
            return Err(Failure::Usage("training needs dense weights (--weights dense)".into()).into());
        }
        self.load_for(cache, Purpose::Train)
    }

    /// The sha256 fingerprint of the model's weights file (recorded in adapter manifests).
    pub fn weights_sha256(&self, cache: &Path) -> Result<String> {
        if let Some(sha) = self.fingerprint.get() {
            return Ok(sha.clone());
        }
        let path = assets::resolve_model(&self.model, cache)?;
        let sha = shared::adapter::weights_sha256(&path).with_context(|| format!("hashing {}", path.display()))?;
        Ok(self.fingerprint.get_or_init(|| sha).clone())
    }

    /// Loads the model for evaluation or generation.
    pub fn load(&self, cache: &Path) -> Result<LoadedModel> {
        self.load_for(cache, Purpose::Evaluate)
    }

    /// Loads the model and resolves its CPU kernels for `purpose` (plan measured or cached).
    pub fn load_for(&self, cache: &Path, purpose: Purpose) -> Result<LoadedModel> {
        let path = assets::resolve_model(&self.model, cache)?;
        let t = Instant::now();
        let device = self.device.open()?;
        let dtype = self.dtype.resolve(&device);
        let loaded = models::load_for(&path, self.weights, dtype, &device, &self.kernels, purpose, cache, &mut |l| {
            eprintln!("{l}")
        })
        .with_context(|| format!("loading {}", path.display()))?;
        eprintln!(
            "loaded {} ({:?}, {:?} weights, {dtype:?} on {}) in {:.1}s; task prompts: {}",
            path.display(),
            loaded.model.config().arch,
            self.weights,
            self.device,
            t.elapsed().as_secs_f64(),
            loaded.prompt_layout()
        );
        Ok(loaded)
    }
}
