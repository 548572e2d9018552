//! A scalar head on the decoder's final hidden state: PPO's value head and the reward model's
//! score head. `Linear(hidden, 1)` in TRL's layout (`<prefix>.weight` `[1, hidden]`,
//! `<prefix>.bias` `[1]`), trained alongside a LoRA adapter and saved next to it.

use crate::Error;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// Which head: its tensor names and its file inside an adapter directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// PPO's value head: TRL's names (`v_head.summary.weight`), `value_head.safetensors`.
    Value,
    /// A reward model's score head: `score.weight`, `score_head.safetensors`.
    Score,
}

impl HeadKind {
    /// Tensor-name prefix.
    pub fn prefix(self) -> &'static str {
        match self {
            HeadKind::Value => "v_head.summary",
            HeadKind::Score => "score",
        }
    }

    /// File name inside an adapter directory or checkpoint.
    pub fn file(self) -> &'static str {
        match self {
            HeadKind::Value => "value_head.safetensors",
            HeadKind::Score => "score_head.safetensors",
        }
    }
}

/// `hidden -> scalar`, with trainable weights.
#[derive(Debug, Clone)]
pub struct ScalarHead {
    kind: HeadKind,
    prefix: String,
    weight: Var,
    bias: Var,
    /// Mean and standard deviation of the head's outputs on reference data (a reward model's
    /// normalisation), saved with the head.
    pub norm: Option<(f64, f64)>,
}

impl ScalarHead {
    /// A fresh head: weights uniform in `±1/sqrt(hidden)` (PyTorch's `nn.Linear` default), bias 0.
    pub fn init(kind: HeadKind, hidden: usize, seed: u64, device: &Device) -> Result<Self, Error> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (hidden as f32).sqrt();
        let w: Vec<f32> = (0..hidden).map(|_| rng.random_range(-bound..bound)).collect();
        Self::with_weight(kind, w, device)
    }

    /// A head whose output starts at exactly 0 (weight and bias zero): a value head's first
    /// predictions then sit inside the reward's range whatever the scale of the hidden states
    /// (Qwen's final hidden states have norms in the hundreds, so a uniformly initialised head
    /// starts out predicting values of several units for rewards of ±1). Its weight's gradient,
    /// `(v - target) * hidden`, is not zero, so it learns from the first step.
    pub fn zeros(kind: HeadKind, hidden: usize, device: &Device) -> Result<Self, Error> {
        Self::with_weight(kind, vec![0.0; hidden], device)
    }

    /// A fresh head with these weights (one per hidden unit) and bias 0.
    fn with_weight(kind: HeadKind, w: Vec<f32>, device: &Device) -> Result<Self, Error> {
        let hidden = w.len();
        Ok(Self {
            kind,
            prefix: kind.prefix().to_string(),
            weight: Var::from_tensor(&Tensor::from_vec(w, (1, hidden), device)?)?,
            bias: Var::from_tensor(&Tensor::zeros(1, DType::F32, device)?)?,
            norm: None,
        })
    }

    pub fn kind(&self) -> HeadKind {
        self.kind
    }

    /// Hidden size the head reads.
    pub fn width(&self) -> usize {
        self.weight.as_tensor().dims()[1]
    }

    /// Copies another head's values into this one's variables (checkpoint restore).
    pub fn set_from(&self, other: &ScalarHead) -> Result<(), Error> {
        self.weight.set(other.weight.as_tensor())?;
        self.bias.set(other.bias.as_tensor())?;
        Ok(())
    }

    /// `[n, hidden] -> [n]` (or `[.., hidden] -> [..]`).
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor, Error> {
        let h = hidden.to_dtype(DType::F32)?;
        let w = self.weight.as_tensor().squeeze(0)?;
        Ok(h.broadcast_mul(&w)?
            .sum_keepdim(candle_core::D::Minus1)?
            .squeeze(candle_core::D::Minus1)?
            .broadcast_add(self.bias.as_tensor())?)
    }

    /// The trainable variables with their names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (format!("{}.weight", self.prefix), self.weight.clone()),
            (format!("{}.bias", self.prefix), self.bias.clone()),
        ]
    }

    /// Writes the head into `dir` under its kind's file name.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let mut tensors: HashMap<String, Tensor> =
            self.vars().into_iter().map(|(k, v)| (k, v.as_tensor().detach())).collect();
        if let Some((mean, std)) = self.norm {
            let t = Tensor::new(&[mean as f32, std as f32], self.weight.device())?;
            tensors.insert(format!("{}.normalisation", self.prefix), t);
        }
        candle_core::safetensors::save(&tensors, dir.join(self.kind.file()))?;
        Ok(())
    }

    /// Reads a head of `kind` from `dir`; refuses a size that does not fit `hidden`.
    pub fn load(kind: HeadKind, hidden: usize, dir: &Path, device: &Device) -> Result<Self, Error> {
        let path = dir.join(kind.file());
        let prefix = kind.prefix();
        let tensors = candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        let get = |name: String, shape: &[usize]| -> Result<Var, Error> {
            let t = tensors.get(&name).ok_or_else(|| Error::MissingTensor(format!("{name} in {}", path.display())))?;
            if t.dims() != shape {
                return Err(Error::Format(format!(
                    "{}: {name} has shape {:?}, this model needs {shape:?}",
                    path.display(),
                    t.dims()
                )));
            }
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
        };
        let norm = match tensors.get(&format!("{prefix}.normalisation")) {
            Some(t) => {
                let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                match v.as_slice() {
                    [m, s] if s.is_finite() && *s > 0.0 => Some((*m as f64, *s as f64)),
                    _ => return Err(Error::Format(format!("{}: bad normalisation {v:?}", path.display()))),
                }
            }
            None => None,
        };
        Ok(Self {
            kind,
            prefix: prefix.to_string(),
            weight: get(format!("{prefix}.weight"), &[1, hidden])?,
            bias: get(format!("{prefix}.bias"), &[1])?,
            norm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_is_the_dot_product_plus_bias_and_saves_round_trip() {
        let dev = Device::Cpu;
        let mut head = ScalarHead::init(HeadKind::Score, 3, 1, &dev).unwrap();
        head.weight.set(&Tensor::new(&[[0.5f32, -1.0, 2.0]], &dev).unwrap()).unwrap();
        head.bias.set(&Tensor::new(&[0.25f32], &dev).unwrap()).unwrap();
        let h = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 1.0]], &dev).unwrap();
        // 0.5 - 2 + 6 + 0.25 = 4.75; 2 + 0.25 = 2.25
        assert_eq!(head.forward(&h).unwrap().to_vec1::<f32>().unwrap(), vec![4.75, 2.25]);
        let dir = std::env::temp_dir().join(format!("verdict-head-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        head.norm = Some((0.5, 2.0));
        head.save(&dir).unwrap();
        assert!(dir.join("score_head.safetensors").is_file());
        let back = ScalarHead::load(HeadKind::Score, 3, &dir, &dev).unwrap();
        assert_eq!(back.forward(&h).unwrap().to_vec1::<f32>().unwrap(), vec![4.75, 2.25]);
        assert_eq!(back.norm, Some((0.5, 2.0)));
        let wrong = ScalarHead::load(HeadKind::Score, 4, &dir, &dev).unwrap_err().to_string();
        assert!(wrong.contains("shape"), "{wrong}");
        assert!(ScalarHead::load(HeadKind::Value, 3, &dir, &dev).is_err(), "no value head there");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_zero_head_answers_zero_and_still_learns() {
        let dev = Device::Cpu;
        let head = ScalarHead::zeros(HeadKind::Value, 3, &dev).unwrap();
        let h = Tensor::new(&[[300.0f32, -200.0, 100.0]], &dev).unwrap();
        let v = head.forward(&h).unwrap();
        assert_eq!(v.to_vec1::<f32>().unwrap(), vec![0.0]);
        // Loss (v - 1)^2: d/dw = 2 (v - 1) h = -2 h, d/db = -2.
        let grads = (v - 1.0).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gw: Vec<Vec<f32>> = grads.get(head.weight.as_tensor()).unwrap().to_vec2().unwrap();
        assert_eq!(gw, vec![vec![-600.0, 400.0, -200.0]]);
        assert_eq!(grads.get(head.bias.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![-2.0]);
    }
}
