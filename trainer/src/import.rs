//! `verdict-train import-adapter`: a LoRA adapter trained elsewhere with Hugging Face PEFT
//! becomes a serving version of a task, under the rules trained adapters follow.
//!
//! The PEFT directory's `adapter_config.json` is read strictly (`models::peft`: every field
//! honoured or refused by name) and its tensors loaded against `--model`. The base is checked:
//! a `base_model_name_or_path` that is a local model directory must hold `--model`'s exact
//! weights (sha256); a Hub id must be the catalogue's for `--model` or be confirmed with
//! `--base`. A `verdict_manifest.json` already in the directory must fit the model, task and
//! template. Then the adapter files, unchanged, and a new manifest (method `peft-import`) are
//! staged and handed to `promote`'s path: evaluated against the incumbent, published and
//! audited as `promote` does. Any refusal before that leaves the registry untouched.

use crate::promote::{self, Promotion, Staged};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use models::peft::PeftLoraConfig;
use models::LoraAdapter;
use shared::adapter::{Manifest, MANIFEST_FILE, MANIFEST_VERSION};
use std::path::{Path, PathBuf};

/// The PEFT files an import takes (and the only ones it publishes).
const PEFT_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

#[derive(Args, Clone)]
pub struct ImportArgs {
    /// The PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`), as
    /// PEFT's `save_pretrained` writes it.
    #[arg(long)]
    pub from: PathBuf,
    /// The Hugging Face Hub id of `--model`, confirming that it is the model the adapter's
    /// `base_model_name_or_path` names (needed when that is not a local directory Verdict can
    /// fingerprint, nor the catalogue's id for `--model`); recorded in the manifest.
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub rules: Promotion,
}

/// How the adapter's base was tied to `--model`.
#[derive(Debug, PartialEq)]
enum BaseCheck {
    /// A local directory with the same weights (sha256).
    Fingerprint,
    /// A Hub id: the catalogue's for `--model`, or confirmed with `--base`.
    HubId(String),
}

/// Ties the adapter's `base_model_name_or_path` to `--model` (whose weights hash to `sha`).
fn check_base(named: Option<&str>, model: &str, sha: &str, confirmed: Option<&str>) -> Result<BaseCheck> {
    let catalogue = shared::assets::hub_id_of(model);
    let named = named.map(str::trim).filter(|n| !n.is_empty());
    if let (Some(c), Some(n)) = (confirmed, named) {
        if c != n {
            bail!("--base {c:?} is not the adapter's base: adapter_config.json's base_model_name_or_path is {n:?}");
        }
    }
    let Some(named) = named else {
        return match confirmed {
            Some(c) => Ok(BaseCheck::HubId(c.to_string())),
            None => Err(crate::Failure::Usage(
                "adapter_config.json: base_model_name_or_path is empty: Verdict cannot tell which model the \
                 adapter was trained on; if it was --model, say which with --base <Hub id>"
                    .into(),
            )
            .into()),
        };
    };
    let local = Path::new(named);
    if local.exists() {
        let theirs = shared::adapter::weights_sha256(local).with_context(|| format!("hashing {named}"))?;
        if theirs != sha {
            bail!(
                "adapter_config.json: base_model_name_or_path {named:?} is a local model whose weights \
                 (sha256 {}) are not --model {model}'s ({}): the adapter was trained on another base",
                &theirs[..12],
                &sha[..12.min(sha.len())]
            );
        }
        return Ok(BaseCheck::Fingerprint);
    }
    if let Some(c) = catalogue {
        if c != named {
            bail!(
                "adapter_config.json: base_model_name_or_path is {named:?}, but --model {model} is {c}: \
                 the adapter was trained on another base"
            );
        }
        return Ok(BaseCheck::HubId(c.to_string()));
    }
    match confirmed {
        Some(_) => Ok(BaseCheck::HubId(named.to_string())),
        None => Err(crate::Failure::Usage(format!(
            "adapter_config.json: base_model_name_or_path names {named:?}, which is no local directory whose \
             weights Verdict can compare with --model {model}: if --model is that model, confirm with --base {named}"
        ))
        .into()),
    }
}

/// `verdict-train import-adapter`.
pub fn run(args: &ImportArgs, cache: &Path) -> Result<()> {
    let from = &args.from;
    let rules = &args.rules;
    let task = promote::task_of(rules)?;
    for f in PEFT_FILES {
        if !from.join(f).is_file() {
            let hint = if f == PEFT_FILES[1] && from.join("adapter_model.bin").is_file() {
                " (a pickled adapter_model.bin: save with safetensors, PEFT's default)"
            } else {
                ""
            };
            bail!("{}: no {f}{hint}", from.display());
        }
    }
    let cfg_path = from.join(PEFT_FILES[0]);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let refuse = |e: &dyn std::fmt::Display| -> anyhow::Error {
        crate::Failure::Rejected(format!("refusing {}: {e:#}; the registry is unchanged", from.display())).into()
    };
    let peft = PeftLoraConfig::parse(&text).map_err(|e| refuse(&format!("adapter_config.json: {e}")))?;
    let sha = rules.model.weights_sha256(cache)?;
    let base = check_base(peft.base_model_name_or_path.as_deref(), &rules.model.model, &sha, args.base.as_deref())
        .map_err(|e| match e.downcast::<crate::Failure>() {
            Ok(f) => f.into(),
            Err(e) => refuse(&format!("{e:#}")),
        })?;
    if from.join(MANIFEST_FILE).is_file() {
        crate::eval::check_manifest(from, &sha, std::slice::from_ref(&task)).map_err(|e| refuse(&format!("{e:#}")))?;
    }
    let loaded = rules.model.load(cache)?;
    let adapter = LoraAdapter::load_peft_dir(from, loaded.model.config(), DType::F32, loaded.model.device())
        .map_err(|e| refuse(&e))?;
    let pairs = adapter.named_tensors().len() / 2;
    eprintln!(
        "{}: {pairs} LoRA pairs on {:?} (r {}, alpha {}, rsLoRA {}), base {}",
        from.display(),
        adapter.config().targets.iter().map(|p| p.module_name()).collect::<Vec<_>>(),
        peft.r,
        peft.lora_alpha,
        peft.use_rslora,
        match &base {
            BaseCheck::Fingerprint => format!("sha256 {} (the same weights)", &sha[..12]),
            BaseCheck::HubId(id) => format!("{id} (by name)"),
        }
    );

    let staged = Staged::new("import")?;
    for f in PEFT_FILES {
        std::fs::copy(from.join(f), staged.0.join(f)).with_context(|| format!("copying {}", from.join(f).display()))?;
    }
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        base_sha256: sha,
        base_model: rules.model.model.clone(),
        base_hub_id: match base {
            BaseCheck::HubId(id) => Some(id),
            BaseCheck::Fingerprint => shared::assets::hub_id_of(&rules.model.model).map(str::to_string),
        },
        task: task.name.clone(),
        template_version: task.template_version,
        template_hash: task.template_hash(),
        label_words: task.label_words(),
        method: "peft-import".into(),
        command: promote::command_line(std::env::args()),
        steps: 0,
        dev_metrics: None,
    };
    manifest.write(&staged.0).with_context(|| format!("writing the manifest in {}", staged.0.display()))?;
    promote::publish_candidate(&staged.0, from, rules, cache, Some(&loaded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_is_a_fingerprint_the_catalogue_id_or_confirmed() {
        let sha = "ab".repeat(32);
        let hub = |r: Result<BaseCheck>| r.map_err(|e| e.to_string());
        // A Hub id the catalogue knows for --model needs no confirmation; another is refused.
        assert_eq!(
            hub(check_base(Some("HuggingFaceTB/SmolLM2-135M-Instruct"), "smollm2", &sha, None)),
            Ok(BaseCheck::HubId("HuggingFaceTB/SmolLM2-135M-Instruct".into()))
        );
        let e = hub(check_base(Some("Qwen/Qwen2.5-Coder-0.5B-Instruct"), "smollm2", &sha, None)).unwrap_err();
        assert!(e.contains("another base"), "{e}");
        // An unknown id needs --base, the same id.
        let e = hub(check_base(Some("org/tiny"), "/m", &sha, None)).unwrap_err();
        assert!(e.contains("--base org/tiny"), "{e}");
        assert_eq!(
            hub(check_base(Some("org/tiny"), "/m", &sha, Some("org/tiny"))),
            Ok(BaseCheck::HubId("org/tiny".into()))
        );
        let e = hub(check_base(Some("org/tiny"), "/m", &sha, Some("org/other"))).unwrap_err();
        assert!(e.contains("not the adapter's base"), "{e}");
        // No name at all: --base says which.
        assert!(hub(check_base(None, "/m", &sha, None)).unwrap_err().contains("--base"));
        assert_eq!(hub(check_base(Some(" "), "/m", &sha, Some("org/x"))), Ok(BaseCheck::HubId("org/x".into())));
    }
}
