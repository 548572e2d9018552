//! Named base weights, spelled with Hugging Face tensor names whatever file they came from, so
//! that the model code reads like the checkpoint (`model.layers.3.self_attn.q_proj.weight`).

use crate::cpu::store::Store;
use crate::linear::{BaseWeight, FrozenLinear};
use crate::Error;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// How base weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// Everything dequantized to dense floats: training and the accuracy reference.
    #[default]
    Dense,
    /// Projection matrices kept as GGUF blocks (norms, biases and the embedding lookup stay
    /// dense): fastest inference and smallest memory.
    Quantized,
}

impl std::fmt::Display for WeightMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Dense => "dense",
            Self::Quantized => "quantized",
        })
    }
}

impl std::str::FromStr for WeightMode {
    type Err = shared::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dense" | "f32" => Ok(Self::Dense),
            "quantized" | "q" => Ok(Self::Quantized),
            _ => {
                Err(shared::UnknownName { what: "weight mode", given: s.to_string(), known: "dense, quantized".into() })
            }
        }
    }
}

/// All base tensors of a model, by Hugging Face name.
pub struct WeightMap {
    tensors: HashMap<String, BaseWeight>,
    /// f32 tables kept in a memory map (a pack file's embedding), by name.
    mapped: HashMap<String, (Store<f32>, usize, usize)>,
    mode: WeightMode,
    dtype: DType,
    device: Device,
}

impl WeightMap {
    /// Wraps loaded tensors. Dense tensors are converted to `dtype`.
    pub fn new(tensors: HashMap<String, BaseWeight>, mode: WeightMode, dtype: DType, device: Device) -> Self {
        Self { tensors, mapped: HashMap::new(), mode, dtype, device }
    }

    /// Adds an f32 table `[out, inner]` that stays in its memory map (an embedding).
    pub(crate) fn insert_mapped(&mut self, name: &str, rows: Store<f32>, out: usize, inner: usize) {
        self.mapped.insert(name.to_string(), (rows, out, inner));
    }

    /// The embedding table `name`: the memory-mapped one when there is, else dense.
    pub(crate) fn embedding(&self, name: &str) -> Result<Embedding, Error> {
        match self.mapped.get(name) {
            Some((rows, vocab, hidden)) => Ok(Embedding::Mapped { rows: rows.clone(), vocab: *vocab, hidden: *hidden }),
            None => Ok(Embedding::Dense(self.dense(name)?)),
        }
    }

    /// Whether `name` is a packed weight (from a pack file).
    pub fn is_packed(&self, name: &str) -> bool {
        matches!(self.tensors.get(name), Some(BaseWeight::Packed(_)))
    }

    /// Dense compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the tensors.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.mapped.contains_key(name)
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// A view that prefixes names, like candle's `VarBuilder::pp`.
    pub fn pp(&self, prefix: impl ToString) -> Weights<'_> {
        Weights { map: self, prefix: prefix.to_string() }
    }

    fn get(&self, name: &str) -> Result<&BaseWeight, Error> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// The tensor as a dense tensor of the compute dtype (dequantized if needed).
    pub fn dense(&self, name: &str) -> Result<Tensor, Error> {
        Ok(self.get(name)?.to_dense(self.dtype)?)
    }

    /// The tensor as a linear weight, quantized or dense according to the mode.
    pub fn base_weight(&self, name: &str) -> Result<BaseWeight, Error> {
        let w = self.get(name)?;
        Ok(match (self.mode, w) {
            (WeightMode::Quantized, BaseWeight::Quantized(q)) => BaseWeight::Quantized(Arc::clone(q)),
            (_, BaseWeight::Packed(p)) => BaseWeight::Packed(p.clone()),
            (_, w) => BaseWeight::Dense(w.to_dense(self.dtype)?),
        })
    }
}

/// A prefixed view of a [`WeightMap`].
pub struct Weights<'a> {
    map: &'a WeightMap,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// Extends the prefix: `pp("self_attn")`.
    pub fn pp(&self, name: impl ToString) -> Weights<'a> {
        Weights { map: self.map, prefix: self.path(&name.to_string()) }
    }

    /// Full name of a child tensor.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// A dense tensor (norm weights, embeddings).
    pub fn dense(&self, name: &str) -> Result<Tensor, Error> {
        self.map.dense(&self.path(name))
    }

    /// A linear layer `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn linear(&self, bias: bool) -> Result<FrozenLinear, Error> {
        let weight = self.map.base_weight(&self.path("weight"))?;
        let bias = if bias { Some(self.dense("bias")?) } else { None };
        Ok(FrozenLinear::new(weight, bias)?)
    }
}

/// The token embedding table: a dense tensor, or f32 rows in a pack file's memory map.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    Dense(Tensor),
    Mapped { rows: Store<f32>, vocab: usize, hidden: usize },
}

impl Embedding {
    /// `(vocab, hidden)`.
    pub fn dims(&self) -> Result<(usize, usize), Error> {
        match self {
            Self::Dense(t) => Ok(t.dims2()?),
            Self::Mapped { vocab, hidden, .. } => Ok((*vocab, *hidden)),
        }
    }

    /// Rows of `ids` (`[n]`) as `[n, hidden]`, in `dtype` on `device`.
    pub fn lookup(&self, ids: &Tensor, dtype: DType, device: &Device) -> Result<Tensor, Error> {
        match self {
            Self::Dense(t) => Ok(t.embedding(ids)?),
            Self::Mapped { rows, vocab, hidden } => {
                let ids = ids.to_device(&Device::Cpu)?.to_vec1::<u32>()?;
                let mut out = Vec::with_capacity(ids.len() * hidden);
                for &id in &ids {
                    let id = id as usize;
                    if id >= *vocab {
                        return Err(Error::Invalid(format!("token id {id} outside a vocabulary of {vocab}")));
                    }
                    out.extend_from_slice(&rows[id * hidden..(id + 1) * hidden]);
                }
                Ok(Tensor::from_vec(out, (ids.len(), *hidden), device)?.to_dtype(dtype)?)
            }
        }
    }

    /// The whole table as a dense f32 tensor (export).
    pub fn to_dense(&self) -> Result<Tensor, Error> {
        match self {
            Self::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            Self::Mapped { rows, vocab, hidden } => {
                Ok(Tensor::from_vec(rows.to_vec(), (*vocab, *hidden), &Device::Cpu)?)
            }
        }
    }
}
