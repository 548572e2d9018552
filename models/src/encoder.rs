//! BERT-family encoders as text classifiers: candle-transformers' BERT encoder, mean pooling
//! over the real tokens (L2-normalised, as sentence-transformers' all-MiniLM-L6-v2 pools), and a
//! linear head per task ([`ClassifierHead`]). The baseline the decoder classifiers are measured
//! against (docs/serving.md, "Encoder backend").
//!
//! Two kinds of weights: a Hugging Face BERT directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`; all-MiniLM-L6-v2 from the asset cache, tensor names with or without a
//! `bert.` prefix), or the standard BERT-base / BERT-large shapes with seeded random weights
//! ([`RANDOM_BERTS`]): no registry package carries real BERT-base/large weights, and latency
//! does not depend on weight values. Both tokenize with BERT's uncased WordPiece from a
//! `tokenizer.json` (MiniLM's: the same 30,522-token vocabulary as bert-base-uncased).

use crate::Error;
use candle_core::{DType, Device, IndexOp, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config as BertConfig, HiddenAct, PositionEmbeddingType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A standard BERT shape, served with seeded random weights (a latency baseline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomBert {
    /// `--model` name.
    pub name: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
}

/// The BERT shapes of the original paper (vocabulary 30,522, 512 positions).
pub const RANDOM_BERTS: [RandomBert; 2] = [
    RandomBert { name: "bert-large", layers: 24, hidden: 1024, heads: 16, intermediate: 4096 },
    RandomBert { name: "bert-base", layers: 12, hidden: 768, heads: 12, intermediate: 3072 },
];

/// Seed of the random BERT weights unless told otherwise.
pub const RANDOM_SEED: u64 = 0;

impl RandomBert {
    /// Looks a shape up by `--model` name.
    pub fn find(name: &str) -> Option<&'static RandomBert> {
        RANDOM_BERTS.iter().find(|b| b.name.eq_ignore_ascii_case(name))
    }

    /// candle's BERT config of this shape.
    pub fn config(&self) -> BertConfig {
        BertConfig {
            vocab_size: 30522,
            hidden_size: self.hidden,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            intermediate_size: self.intermediate,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: PositionEmbeddingType::Absolute,
            use_cache: false,
            classifier_dropout: None,
            model_type: Some("bert".into()),
        }
    }
}

/// Where an encoder's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncoderSource {
    /// A Hugging Face BERT directory.
    Dir(PathBuf),
    /// A standard shape with seeded random weights, tokenized with `tokenizer` (a
    /// `tokenizer.json`).
    Random { shape: RandomBert, seed: u64, tokenizer: PathBuf },
}

impl EncoderSource {
    /// What the weights are called, for people (`bert-large (random, seed 0)`, a directory).
    pub fn describe(&self) -> String {
        match self {
            EncoderSource::Dir(d) => d.display().to_string(),
            EncoderSource::Random { shape, seed, .. } => format!("{} (random, seed {seed})", shape.name),
        }
    }

    /// The weights' fingerprint, as heads record it: the sha256 of the safetensors files (as for
    /// decoders), or of the random shape and seed.
    pub fn weights_sha256(&self) -> std::io::Result<String> {
        match self {
            EncoderSource::Dir(d) => shared::adapter::weights_sha256(d),
            EncoderSource::Random { shape, seed, .. } => Ok(shared::adapter::text_sha256(&format!(
                "verdict random bert: {shape:?}, uniform std {INIT_STD}, seed {seed}"
            ))),
        }
    }
}

/// The encoder a `--model` argument names, if it names one: `bert-large` / `bert-base`
/// (random weights, MiniLM's tokenizer from the cache), `minilm` or a BERT directory.
/// `Ok(None)`: not an encoder (a decoder name or file).
pub fn resolve(arg: &str, cache: &Path) -> Result<Option<EncoderSource>, shared::assets::ResolveError> {
    if let Some(shape) = RandomBert::find(arg) {
        let minilm = shared::assets::find_model("minilm").expect("the MiniLM asset is listed");
        if !minilm.is_cached(cache) {
            return Err(shared::assets::ResolveError::TokenizerNotFetched {
                model: shape.name.to_string(),
                asset: minilm.name.to_string(),
            });
        }
        let tokenizer = minilm.model_path_in(cache).join("tokenizer.json");
        return Ok(Some(EncoderSource::Random { shape: *shape, seed: RANDOM_SEED, tokenizer }));
    }
    let path = shared::assets::resolve_model(arg, cache)?;
    Ok((path.is_dir() && is_bert_dir(&path)).then_some(EncoderSource::Dir(path)))
}

/// Whether `path` is a BERT directory (its `config.json` says `model_type: bert`).
pub fn is_bert_dir(path: &Path) -> bool {
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|c| c["model_type"].as_str() == Some("bert"))
}

/// One input ready for the encoder: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, with segment
/// ids (0 for the first text, 1 for the second).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedInput {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// A BERT encoder with its WordPiece tokenizer.
pub struct Encoder {
    bert: BertModel,
    config: BertConfig,
    tokenizer: Tokenizer,
    cls: u32,
    sep: u32,
    device: Device,
    /// How the weights were named when loaded, for people.
    pub name: String,
}

/// Standard deviation of the random weights (BERT's initializer range).
const INIT_STD: f64 = 0.02;

/// Seeded random weights for any tensor name: constant-initialised tensors (LayerNorm scales
/// and shifts) get their constant, every other tensor uniform values of standard deviation
/// [`INIT_STD`] from a generator seeded by the seed and the tensor's name, so the weights do
/// not depend on the order tensors are asked for.
struct SeededWeights {
    seed: u64,
}

impl SimpleBackend for SeededWeights {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Init::Const(v) = h {
            return Tensor::full(v as f32, s, dev)?.to_dtype(dtype);
        }
        // FNV-1a of the name, mixed with the seed.
        let name_hash =
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ name_hash);
        let a = (INIT_STD * 3f64.sqrt()) as f32;
        let values: Vec<f32> = (0..s.elem_count()).map(|_| rng.random_range(-a..a)).collect();
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

impl Encoder {
    /// Loads the encoder `source` names, in f32 on `device`.
    pub fn load(source: &EncoderSource, device: &Device) -> Result<Self, Error> {
        match source {
            EncoderSource::Dir(dir) => {
                let config_path = dir.join("config.json");
                let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
                let config: BertConfig = serde_json::from_str(&text)
                    .map_err(|e| Error::Format(format!("{}: {e}", config_path.display())))?;
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| Error::io(dir, e))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(Error::Format(format!("{}: no *.safetensors", dir.display())));
                }
                // SAFETY: the files are memory-mapped read-only and not modified while mapped.
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device)? };
                let bert = BertModel::load(vb, &config)?;
                Self::assemble(bert, config, &dir.join("tokenizer.json"), device, dir.display().to_string())
            }
            EncoderSource::Random { shape, seed, tokenizer } => {
                let config = shape.config();
                let vb = VarBuilder::from_backend(Box::new(SeededWeights { seed: *seed }), DType::F32, device.clone());
                let bert = BertModel::load(vb, &config)?;
                Self::assemble(bert, config, tokenizer, device, source.describe())
            }
        }
    }

    fn assemble(
        bert: BertModel,
        config: BertConfig,
        tokenizer: &Path,
        device: &Device,
        name: String,
    ) -> Result<Self, Error> {
        let mut tok =
            Tokenizer::from_file(tokenizer).map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer.display())))?;
        // MiniLM's file pads every input to 128 and cuts at 128: batches pad themselves here,
        // and the server's limits decide what is too long.
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let id = |t: &str| tok.token_to_id(t).ok_or_else(|| Error::Tokenizer(format!("no {t} token")));
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        if tok.get_vocab_size(true) > config.vocab_size {
            return Err(Error::Tokenizer(format!(
                "the tokenizer has {} tokens, the encoder {}",
                tok.get_vocab_size(true),
                config.vocab_size
            )));
        }
        Ok(Self { bert, config, tokenizer: tok, cls, sep, device: device.clone(), name })
    }

    /// The encoder's shape.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Width of the pooled embedding.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Most tokens in one input, `[CLS]` and `[SEP]`s included.
    pub fn max_len(&self) -> usize {
        self.config.max_position_embeddings
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// WordPiece ids of one text, without special tokens: the text is read as plain text,
    /// so `[SEP]` in it is characters, never the separator (`tokenizer::encode_text`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        crate::tokenizer::encode_text(&self.tokenizer, text)
    }

    /// Whether `id` is a special token (`[CLS]`, `[SEP]`, ...).
    pub fn is_special(&self, id: u32) -> bool {
        crate::tokenizer::is_added(&self.tokenizer, id)
    }

    /// Text of WordPiece ids (for truncation: the kept tokens as text).
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Special tokens each input adds: `[CLS]` and one `[SEP]` per text.
    pub fn special_tokens(texts: usize) -> usize {
        1 + texts
    }

    /// `[CLS] t1 [SEP] t2 [SEP] ...` with segment ids (text `i` is segment `min(i, 1)`).
    pub fn input(&self, texts: &[&[u32]]) -> EncodedInput {
        let mut ids = vec![self.cls];
        let mut type_ids = vec![0];
        for (i, t) in texts.iter().enumerate() {
            let segment = u32::from(i > 0);
            ids.extend_from_slice(t);
            ids.push(self.sep);
            type_ids.resize(ids.len(), segment);
        }
        EncodedInput { ids, type_ids }
    }

    /// Tokenizes texts into one input (WordPiece, then [`Encoder::input`]).
    pub fn encode_input(&self, texts: &[&str]) -> Result<EncodedInput, Error> {
        let ids = texts.iter().map(|t| self.encode(t)).collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        Ok(self.input(&refs))
    }

    /// Sentence embeddings `[n, hidden]` (f32): the last hidden states averaged over each
    /// input's tokens (padding excluded), L2-normalised. Inputs are padded on the right to the
    /// longest one; padded positions are masked out of attention.
    pub fn embed(&self, inputs: &[&EncodedInput]) -> Result<Tensor, Error> {
        let n = inputs.len();
        let len = inputs.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        if n == 0 || len == 0 {
            return Err(Error::Invalid("nothing to embed".into()));
        }
        if len > self.max_len() {
            return Err(Error::Invalid(format!("an input has {len} tokens, the encoder takes {}", self.max_len())));
        }
        let mut ids = vec![self.config.pad_token_id as u32; n * len];
        let mut types = vec![0u32; n * len];
        let mut mask = vec![0f32; n * len];
        for (r, input) in inputs.iter().enumerate() {
            let row = r * len;
            ids[row..row + input.ids.len()].copy_from_slice(&input.ids);
            types[row..row + input.type_ids.len()].copy_from_slice(&input.type_ids);
            mask[row..row + input.ids.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let types = Tensor::from_vec(types, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let hidden = self.bert.forward(&ids, &types, Some(&mask))?; // [n, len, hidden]
        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?; // [n, hidden]
        let counts = mask.sum_keepdim(1)?; // [n, 1]
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?)
    }
}

/// A linear classification head on sentence embeddings: `logits = W e + b`, one row of `W`
/// per label (class order). Saved as `head.safetensors` (`weight` `[labels, hidden]`, `bias`
/// `[labels]`, f32) next to the adapter manifest (`shared::adapter`).
#[derive(Debug, Clone)]
pub struct ClassifierHead {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl ClassifierHead {
    /// File name of the tensors inside a head directory.
    pub const FILE: &'static str = "head.safetensors";

    /// A head from `[labels, hidden]` weights and `[labels]` biases.
    pub fn new(weight: Tensor, bias: Tensor) -> Result<Self, Error> {
        let (labels, _) = weight.dims2()?;
        if bias.dims() != [labels] {
            return Err(Error::Format(format!(
                "head bias {:?} does not match weight {:?}",
                bias.dims(),
                weight.dims()
            )));
        }
        Ok(Self { weight: weight.to_dtype(DType::F32)?, bias: bias.to_dtype(DType::F32)? })
    }

    /// Seeded random weights (uniform, std 1/sqrt(hidden)) and zero biases: latency baselines.
    pub fn random(hidden: usize, labels: usize, seed: u64, device: &Device) -> Result<Self, Error> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = (3.0 / hidden as f64).sqrt() as f32;
        let w: Vec<f32> = (0..hidden * labels).map(|_| rng.random_range(-a..a)).collect();
        Self::new(Tensor::from_vec(w, (labels, hidden), device)?, Tensor::zeros(labels, DType::F32, device)?)
    }

    /// Number of labels.
    pub fn labels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Width of the embeddings it reads.
    pub fn hidden_size(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Reads `<dir>/head.safetensors`; refuses other shapes than `[labels, hidden]` and
    /// non-finite values.
    pub fn load(dir: &Path, hidden: usize, labels: usize, device: &Device) -> Result<Self, Error> {
        let path = dir.join(Self::FILE);
        let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, device)?;
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| Error::MissingTensor(format!("{name} ({})", path.display())))
        };
        let head = Self::new(take("weight")?, take("bias")?)?;
        if head.weight.dims() != [labels, hidden] {
            return Err(Error::Format(format!(
                "head weight {:?}, expected [{labels}, {hidden}] (labels, encoder width)",
                head.weight.dims()
            )));
        }
        for (name, t) in [("weight", &head.weight), ("bias", &head.bias)] {
            if !t.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite() {
                return Err(Error::Format(format!("head tensor {name} is not finite")));
            }
        }
        Ok(head)
    }

    /// Writes `<dir>/head.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(Self::FILE);
        let tensors =
            HashMap::from([("weight".to_string(), self.weight.clone()), ("bias".to_string(), self.bias.clone())]);
        candle_core::safetensors::save(&tensors, &path)?;
        Ok(())
    }

    /// Logits `[n, labels]` of embeddings `[n, hidden]`.
    pub fn logits(&self, embeddings: &Tensor) -> Result<Tensor, Error> {
        let w = self.weight.to_device(embeddings.device())?;
        let b = self.bias.to_device(embeddings.device())?;
        Ok(embeddings.to_dtype(DType::F32)?.matmul(&w.t()?)?.broadcast_add(&b)?)
    }

    /// Logits of each input, as f64 rows: the encoder's forward, pooling and this head.
    pub fn classify(&self, encoder: &Encoder, inputs: &[&EncodedInput]) -> Result<Vec<Vec<f64>>, Error> {
        let logits = self.logits(&encoder.embed(inputs)?)?;
        rows_f64(&logits)
    }
}

/// A `[n, k]` tensor as f64 rows.
pub fn rows_f64(t: &Tensor) -> Result<Vec<Vec<f64>>, Error> {
    let (n, _) = t.dims2()?;
    (0..n).map(|i| Ok(t.i(i)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: RandomBert = RandomBert { name: "tiny", layers: 2, hidden: 32, heads: 4, intermediate: 64 };

    fn tiny_hidden(seed: u64) -> Vec<f32> {
        let vb = VarBuilder::from_backend(Box::new(SeededWeights { seed }), DType::F32, Device::Cpu);
        let bert = BertModel::load(vb, &TINY.config()).unwrap();
        let ids = Tensor::new(&[[101u32, 2023, 3185, 102]], &Device::Cpu).unwrap();
        let types = ids.zeros_like().unwrap();
        bert.forward(&ids, &types, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn random_weights_depend_on_the_seed_only() {
        let a = tiny_hidden(7);
        assert_eq!(a, tiny_hidden(7));
        assert_ne!(a, tiny_hidden(8));
        assert!(a.iter().all(|x| x.is_finite()));
        let shape = EncoderSource::Random { shape: TINY, seed: 7, tokenizer: PathBuf::new() };
        let other = EncoderSource::Random { shape: TINY, seed: 8, tokenizer: PathBuf::new() };
        assert_ne!(shape.weights_sha256().unwrap(), other.weights_sha256().unwrap());
        assert_eq!(RandomBert::find("BERT-large").unwrap().layers, 24);
        assert_eq!(RandomBert::find("bert-base").unwrap().hidden, 768);
    }

    #[test]
    fn heads_round_trip_and_refuse_other_shapes() {
        let dir = std::env::temp_dir().join(format!("verdict-head-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let head = ClassifierHead::random(8, 3, 1, &Device::Cpu).unwrap();
        head.save(&dir).unwrap();
        let back = ClassifierHead::load(&dir, 8, 3, &Device::Cpu).unwrap();
        let x = Tensor::ones((2, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(rows_f64(&head.logits(&x).unwrap()).unwrap(), rows_f64(&back.logits(&x).unwrap()).unwrap());
        assert!(ClassifierHead::load(&dir, 8, 2, &Device::Cpu).is_err());
        assert!(ClassifierHead::load(&dir, 16, 3, &Device::Cpu).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
