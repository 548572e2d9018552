//! PEFT's `LoraConfig` as `adapter_config.json` holds it (PEFT 0.21), read strictly.
//!
//! Every field PEFT writes is either honoured or, when it holds anything but its default,
//! refused with its name; a field PEFT does not write is refused too. Nothing is silently
//! ignored: an adapter that loads here computes what it computes under PEFT.
//!
//! Honoured: `r`, `lora_alpha`, `use_rslora`, `lora_dropout` (training only), `target_modules`
//! (a list of names or name suffixes, `"all-linear"`, or a string regex full-matched against
//! module names such as `model.layers.0.self_attn.q_proj`), `layers_to_transform` (an integer
//! or a list; with a list of `target_modules` only, as in PEFT), `rank_pattern` and
//! `alpha_pattern` (the first key, in file order, whose regex matches the end of a module name
//! at a `.` boundary wins: PEFT's `get_pattern_key`), `bias` (`"none"` only).
//!
//! Accepted as bookkeeping: `peft_type` (must be `LORA`), `task_type`,
//! `base_model_name_or_path`, `revision`, `inference_mode`, `auto_mapping`, `peft_version`,
//! `init_lora_weights` (how the factors started: irrelevant once they are trained),
//! `megatron_core` and `qalora_group_size` (read only with `megatron_config` / `use_qalora`,
//! which are refused).

use crate::config::{DecoderConfig, Projection};
use serde::Deserialize;
use serde_json::Value;

/// Fields refused unless they hold their default, with what they would change.
const REFUSED: &[(&str, &str)] = &[
    ("fan_in_fan_out", "weights stored transposed (Conv1D, GPT-2 style)"),
    ("exclude_modules", "modules excluded from the targets"),
    ("modules_to_save", "fully trained copies of base modules (a classification head, embeddings)"),
    ("layers_pattern", "a custom name for the layer list"),
    ("megatron_config", "Megatron-LM parallel layers"),
    ("trainable_token_indices", "trained embedding rows"),
    ("loftq_config", "LoftQ-quantized base weights"),
    ("eva_config", "EVA initialisation data"),
    ("corda_config", "CorDA initialisation data"),
    ("lora_ga_config", "LoRA-GA initialisation data"),
    ("use_dora", "DoRA (a learnt magnitude vector per module)"),
    ("velora_config", "VeLoRA"),
    ("alora_invocation_tokens", "activated LoRA (the adapter switches on at invocation tokens)"),
    ("use_qalora", "QA-LoRA (pooled inputs to A)"),
    ("monteclora_config", "MonteCLoRA"),
    ("layer_replication", "replicated base layers"),
    ("lora_bias", "a bias on lora_B"),
    ("target_parameters", "LoRA on raw parameters (MoE experts)"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("arrow_config", "Arrow routing between adapters"),
    ("kasa_config", "KaSA"),
    ("ensure_weight_tying", "tied modules_to_save / trainable tokens"),
];

/// Fields read below (honoured or bookkeeping).
const READ: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "init_lora_weights",
    "megatron_core",
    "qalora_group_size",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "bias",
];

/// `target_modules`: names (a module whose name is one, or ends with `.` and one, is a target)
/// or one regex that must match a whole module name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// `layers_to_transform`: one layer index or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum LayerIndexes {
    One(usize),
    Many(Vec<usize>),
}

/// A JSON object read in file order (PEFT takes the first matching pattern key).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Patterns<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patterns<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Patterns<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of pattern: value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Patterns(Vec::new()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, T>()? {
                    out.push(entry);
                }
                Ok(Patterns(out))
            }
        }
        d.deserialize_any(Visit(std::marker::PhantomData))
    }
}

fn eight() -> usize {
    8
}
fn eight_f() -> f64 {
    8.0
}
fn none_bias() -> String {
    "none".into()
}

/// The fields of PEFT's `LoraConfig` that Verdict honours or records.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PeftLoraConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model: a Hugging Face Hub id or a local path.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default = "eight")]
    pub r: usize,
    #[serde(default = "eight_f")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndexes>,
    #[serde(default)]
    pub rank_pattern: Patterns<usize>,
    #[serde(default)]
    pub alpha_pattern: Patterns<f64>,
    #[serde(default = "none_bias")]
    pub bias: String,
}

/// One module an adapter adapts, with its rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftModule {
    pub layer: usize,
    pub proj: Projection,
    pub rank: usize,
    pub alpha: f64,
}

/// The module name PEFT matches targets and patterns against (`model.layers.0.self_attn.q_proj`).
pub fn module_key(layer: usize, proj: Projection) -> String {
    format!("model.layers.{layer}.{}", proj.module_path())
}

/// Whether a JSON value is "nothing" (a refused field's default): null, false, "", [] or {}.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

fn compile(field: &str, pattern: &str, anchored: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(anchored).map_err(|e| {
        format!("{field}: the regex {pattern:?} is not one Verdict can run (no look-around or back-references): {e}")
    })
}

/// Why an `adapter_config.json` is refused: the field, and what about it Verdict cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PeftConfigError(pub String);

impl PeftLoraConfig {
    /// Parses `adapter_config.json`. Errors name the field and why it is refused.
    pub fn parse(text: &str) -> Result<Self, PeftConfigError> {
        Self::parse_fields(text).map_err(PeftConfigError)
    }

    fn parse_fields(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(map) = &v else { return Err("not a JSON object".into()) };
        for (key, value) in map {
            if let Some((_, what)) = REFUSED.iter().find(|(k, _)| k == key) {
                if !is_empty(value) {
                    return Err(format!("{key}: {value} is not supported ({what}); Verdict loads plain LoRA only"));
                }
            } else if !READ.contains(&key.as_str()) {
                return Err(format!(
                    "unknown field {key:?}: not a field of PEFT 0.21's LoraConfig, and Verdict refuses what it \
                     cannot honour"
                ));
            }
        }
        let one = |key: &str| -> Result<(), String> {
            let mut single = serde_json::Map::new();
            if let Some(x) = map.get(key) {
                single.insert(key.to_string(), x.clone());
            }
            serde_json::from_value::<PeftLoraConfig>(Value::Object(single)).map(|_| ()).map_err(|e| {
                let value = map.get(key).map(Value::to_string).unwrap_or_default();
                format!("{key}: {value} is not valid: {e}")
            })
        };
        let config: PeftLoraConfig = match serde_json::from_value(v.clone()) {
            Ok(c) => c,
            Err(e) => {
                // Name the field that does not parse.
                for key in READ {
                    one(key)?;
                }
                return Err(e.to_string());
            }
        };
        if let Some(t) = &config.peft_type {
            if t != "LORA" {
                return Err(format!("peft_type: {t:?} is not supported: Verdict loads LORA adapters only"));
            }
        }
        if config.bias != "none" {
            return Err(format!("bias: {:?} is not supported (trained bias terms): only \"none\"", config.bias));
        }
        if config.r == 0 {
            return Err("r: 0: the rank must be at least 1".into());
        }
        if !config.lora_alpha.is_finite() {
            return Err(format!("lora_alpha: {} is not a number", config.lora_alpha));
        }
        if !(0.0..1.0).contains(&config.lora_dropout) {
            return Err(format!("lora_dropout: {} is outside [0, 1)", config.lora_dropout));
        }
        if let Some((k, _)) = config.rank_pattern.0.iter().find(|(_, r)| *r == 0) {
            return Err(format!("rank_pattern: {k:?}: the rank must be at least 1"));
        }
        if let Some((k, a)) = config.alpha_pattern.0.iter().find(|(_, a)| !a.is_finite()) {
            return Err(format!("alpha_pattern: {k:?}: {a} is not a number"));
        }
        match (&config.target_modules, &config.layers_to_transform) {
            (None, _) => {
                return Err("target_modules: null (PEFT would pick modules by architecture): name them".into());
            }
            (Some(TargetModules::Regex(_)), Some(_)) => {
                return Err(
                    "layers_to_transform: cannot be used with a string target_modules (PEFT refuses it too)".into()
                );
            }
            _ => {}
        }
        Ok(config)
    }

    /// The modules this adapter adapts in `model`, each with its rank and alpha, in layer and
    /// projection order. Refuses targets, layers or pattern keys that name nothing Verdict
    /// adapts in this model.
    pub fn resolve(&self, model: &DecoderConfig) -> Result<Vec<PeftModule>, PeftConfigError> {
        self.resolve_modules(model).map_err(PeftConfigError)
    }

    fn resolve_modules(&self, model: &DecoderConfig) -> Result<Vec<PeftModule>, String> {
        let n = model.num_layers;
        let all: Vec<(usize, Projection, String)> =
            (0..n).flat_map(|l| Projection::ALL.into_iter().map(move |p| (l, p, module_key(l, p)))).collect();
        // Linear / embedding modules of these models that Verdict does not adapt.
        let others = ["model.embed_tokens", "lm_head"];
        let adaptable = format!(
            "Verdict adapts {} in model.layers.0..{}",
            Projection::ALL.map(|p| p.module_name()).join(", "),
            n.saturating_sub(1)
        );
        let targeted: Vec<bool> = match self.target_modules.as_ref().expect("checked by parse") {
            TargetModules::Regex(s) if s == "all-linear" => vec![true; all.len()],
            TargetModules::Regex(s) => {
                let re = compile("target_modules", s, &format!("^(?:{s})$"))?;
                if let Some(o) = others.iter().find(|o| re.is_match(o)) {
                    return Err(format!("target_modules: {s:?} matches {o}, which Verdict does not adapt"));
                }
                let hits: Vec<bool> = all.iter().map(|(_, _, k)| re.is_match(k)).collect();
                if !hits.contains(&true) {
                    return Err(format!("target_modules: {s:?} matches no module of this model ({adaptable})"));
                }
                hits
            }
            TargetModules::List(names) => {
                let hit = |k: &str, t: &str| k == t || k.ends_with(&format!(".{t}"));
                for t in names {
                    if !all.iter().any(|(_, _, k)| hit(k, t)) {
                        return Err(format!("target_modules: {t:?} names no module of this model that {adaptable}"));
                    }
                }
                let layers: Option<Vec<usize>> = match &self.layers_to_transform {
                    None => None,
                    Some(LayerIndexes::One(i)) => Some(vec![*i]),
                    Some(LayerIndexes::Many(v)) if v.is_empty() => None,
                    Some(LayerIndexes::Many(v)) => Some(v.clone()),
                };
                if let Some(bad) = layers.as_ref().and_then(|l| l.iter().find(|&&i| i >= n)) {
                    return Err(format!("layers_to_transform: layer {bad} does not exist (the model has {n})"));
                }
                all.iter()
                    .map(|(l, _, k)| names.iter().any(|t| hit(k, t)) && layers.as_ref().is_none_or(|ls| ls.contains(l)))
                    .collect()
            }
        };
        let patterns = |field: &str, keys: Vec<&String>| -> Result<Vec<regex::Regex>, String> {
            keys.into_iter().map(|k| compile(field, k, &format!(r"^(?:(?:.*\.)?(?:{k}))$"))).collect()
        };
        let rank_res = patterns("rank_pattern", self.rank_pattern.0.iter().map(|(k, _)| k).collect())?;
        let alpha_res = patterns("alpha_pattern", self.alpha_pattern.0.iter().map(|(k, _)| k).collect())?;
        let mut used_rank = vec![false; rank_res.len()];
        let mut used_alpha = vec![false; alpha_res.len()];
        let mut out = Vec::new();
        for ((layer, proj, key), _) in all.iter().zip(&targeted).filter(|(_, &t)| t) {
            let rank = match rank_res.iter().position(|re| re.is_match(key)) {
                Some(i) => {
                    used_rank[i] = true;
                    self.rank_pattern.0[i].1
                }
                None => self.r,
            };
            let alpha = match alpha_res.iter().position(|re| re.is_match(key)) {
                Some(i) => {
                    used_alpha[i] = true;
                    self.alpha_pattern.0[i].1
                }
                None => self.lora_alpha,
            };
            out.push(PeftModule { layer: *layer, proj: *proj, rank, alpha });
        }
        if out.is_empty() {
            return Err("target_modules and layers_to_transform together adapt no module of this model".into());
        }
        for (field, keys, used) in [
            ("rank_pattern", self.rank_pattern.0.iter().map(|(k, _)| k).collect::<Vec<_>>(), used_rank),
            ("alpha_pattern", self.alpha_pattern.0.iter().map(|(k, _)| k).collect(), used_alpha),
        ] {
            if let Some(i) = used.iter().position(|u| !u) {
                return Err(format!("{field}: key {:?} applies to no adapted module", keys[i]));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::tiny_config;
    use crate::Arch;

    fn cfg() -> DecoderConfig {
        let mut c = tiny_config(Arch::Llama, 32);
        c.num_layers = 3;
        c
    }

    #[test]
    fn peft_defaults_as_peft_writes_them_load() {
        let text = r#"{"alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
            "auto_mapping": null, "base_model_name_or_path": "x/y", "bias": "none", "corda_config": null,
            "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false,
            "inference_mode": true, "init_lora_weights": false, "kasa_config": null, "layer_replication": null,
            "layers_pattern": null, "layers_to_transform": [0, 2], "loftq_config": {}, "lora_alpha": 16,
            "lora_bias": false, "lora_dropout": 0.0, "lora_ga_config": null, "megatron_config": null,
            "megatron_core": "megatron.core", "modules_to_save": null, "monteclora_config": null,
            "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 8, "rank_pattern": {},
            "revision": null, "target_modules": ["v_proj", "q_proj"], "target_parameters": null,
            "task_type": "CAUSAL_LM", "trainable_token_indices": null, "use_bdlora": null, "use_dora": false,
            "use_qalora": false, "use_rslora": true, "velora_config": null}"#;
        let c = PeftLoraConfig::parse(text).unwrap();
        let m = c.resolve(&cfg()).unwrap();
        let got: Vec<(usize, Projection)> = m.iter().map(|m| (m.layer, m.proj)).collect();
        use Projection::{Q, V};
        assert_eq!(got, vec![(0, Q), (0, V), (2, Q), (2, V)]);
        assert!(m.iter().all(|m| m.rank == 8 && m.alpha == 16.0));
        // An integer layers_to_transform is one layer.
        let one = text.replace("[0, 2]", "1");
        let m = PeftLoraConfig::parse(&one).unwrap().resolve(&cfg()).unwrap();
        assert!(m.iter().all(|m| m.layer == 1) && m.len() == 2);
    }

    #[test]
    fn regex_targets_and_patterns_match_as_peft_matches() {
        let text = r#"{"r": 4, "lora_alpha": 8, "target_modules": "model\\.layers\\.(0|2)\\.self_attn\\.(q|v)_proj|.*1\\.mlp\\.down_proj",
            "rank_pattern": {"v_proj": 2, "layers.2.self_attn.q_proj": 6, "q_proj": 3},
            "alpha_pattern": {"down_proj": 5}}"#;
        let c = PeftLoraConfig::parse(text).unwrap();
        let m = c.resolve(&cfg()).unwrap();
        use Projection::{Down, Q, V};
        let got: Vec<(usize, Projection, usize, f64)> = m.iter().map(|m| (m.layer, m.proj, m.rank, m.alpha)).collect();
        assert_eq!(
            got,
            vec![(0, Q, 3, 8.0), (0, V, 2, 8.0), (1, Down, 4, 5.0), (2, Q, 6, 8.0), (2, V, 2, 8.0)],
            "the first matching key wins, in file order"
        );
        // A suffix key matches at a `.` boundary only: "proj" is not a suffix of "q_proj".
        let bad = text.replace(r#""down_proj": 5"#, r#""proj": 5"#);
        let e = PeftLoraConfig::parse(&bad).unwrap().resolve(&cfg()).unwrap_err();
        assert!(e.0.contains("alpha_pattern") && e.0.contains("\"proj\""), "{e}");
    }

    #[test]
    fn refusals_name_the_field() {
        let base = r#""r": 4, "target_modules": ["q_proj"]"#;
        let parse = |extra: &str| PeftLoraConfig::parse(&format!("{{{base}{extra}}}"));
        let resolve = |extra: &str| parse(extra).and_then(|c| c.resolve(&cfg()));
        assert!(resolve("").is_ok());
        for (extra, field) in [
            (r#", "use_dora": true"#, "use_dora"),
            (r#", "lora_bias": true"#, "lora_bias"),
            (r#", "fan_in_fan_out": true"#, "fan_in_fan_out"),
            (r#", "modules_to_save": ["score"]"#, "modules_to_save"),
            (r#", "layers_pattern": "h""#, "layers_pattern"),
            (r#", "loftq_config": {"loftq_bits": 4}"#, "loftq_config"),
            (r#", "exclude_modules": ["k_proj"]"#, "exclude_modules"),
            (r#", "target_parameters": ["experts.gate_up_proj"]"#, "target_parameters"),
            (r#", "use_qalora": true"#, "use_qalora"),
            (r#", "trainable_token_indices": [1, 2]"#, "trainable_token_indices"),
            (r#", "bias": "all""#, "bias"),
            (r#", "peft_type": "IA3""#, "peft_type"),
            (r#", "lora_alpha": "x""#, "lora_alpha"),
            (r#", "frobnicate": 1"#, "frobnicate"),
            (r#", "layers_to_transform": [3]"#, "layers_to_transform"),
            (r#", "rank_pattern": {"k_proj": 2}"#, "rank_pattern"),
            (r#", "rank_pattern": {"q_proj": 0}"#, "rank_pattern"),
            (r#", "alpha_pattern": {"(?=q)": 2}"#, "alpha_pattern"),
        ] {
            let e = resolve(extra).unwrap_err();
            assert!(e.0.contains(field), "{extra}: {e}");
        }
        let e = PeftLoraConfig::parse(r#"{"r": 4, "target_modules": ["c_attn"]}"#).unwrap().resolve(&cfg());
        assert!(e.unwrap_err().0.contains("\"c_attn\""));
        let e = PeftLoraConfig::parse(r#"{"r": 4, "target_modules": ".*(q_proj|lm_head)"}"#).unwrap().resolve(&cfg());
        assert!(e.unwrap_err().0.contains("lm_head"));
        let e = PeftLoraConfig::parse(r#"{"r": 4, "target_modules": "q_proj", "layers_to_transform": 0}"#);
        assert!(e.unwrap_err().0.contains("layers_to_transform"));
        assert!(PeftLoraConfig::parse(r#"{"r": 4}"#).unwrap_err().0.contains("target_modules"));
        // Empty values of refused fields are their defaults.
        assert!(resolve(r#", "modules_to_save": [], "loftq_config": {}, "use_dora": false"#).is_ok());
    }
}
