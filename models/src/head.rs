//! A scalar head on the decoder's final hidden state: PPO's value head and the reward model's
//! score head. `Linear(hidden, 1)` in TRL's layout (`<prefix>.weight` `[1, hidden]`,
//! `<prefix>.bias` `[1]`), trained alongside a LoRA adapter and saved next to it.

use crate::Error;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// TRL's tensor-name prefix for the value head (`v_head.summary.weight`).
pub const VALUE_HEAD: &str = "v_head.summary";
/// The file a value head is saved to inside an adapter directory.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

/// `hidden -> scalar`, with trainable weights.
#[derive(Debug, Clone)]
pub struct ScalarHead {
    prefix: String,
    weight: Var,
    bias: Var,
}

impl ScalarHead {
    /// A fresh head: weights uniform in `±1/sqrt(hidden)` (PyTorch's `nn.Linear` default), bias 0.
    pub fn init(prefix: &str, hidden: usize, seed: u64, device: &Device) -> Result<Self, Error> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (hidden as f32).sqrt();
        let w: Vec<f32> = (0..hidden).map(|_| rng.random_range(-bound..bound)).collect();
        Ok(Self {
            prefix: prefix.to_string(),
            weight: Var::from_tensor(&Tensor::from_vec(w, (1, hidden), device)?)?,
            bias: Var::from_tensor(&Tensor::zeros(1, DType::F32, device)?)?,
        })
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

    /// Writes the head as safetensors.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let tensors: HashMap<String, Tensor> =
            self.vars().into_iter().map(|(k, v)| (k, v.as_tensor().detach())).collect();
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    /// Reads a head written by [`ScalarHead::save`]; refuses a size that does not fit `hidden`.
    pub fn load(prefix: &str, hidden: usize, path: &Path, device: &Device) -> Result<Self, Error> {
        let tensors = candle_core::safetensors::load(path, device)
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
        Ok(Self {
            prefix: prefix.to_string(),
            weight: get(format!("{prefix}.weight"), &[1, hidden])?,
            bias: get(format!("{prefix}.bias"), &[1])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_is_the_dot_product_plus_bias_and_saves_round_trip() {
        let dev = Device::Cpu;
        let head = ScalarHead::init(VALUE_HEAD, 3, 1, &dev).unwrap();
        head.weight.set(&Tensor::new(&[[0.5f32, -1.0, 2.0]], &dev).unwrap()).unwrap();
        head.bias.set(&Tensor::new(&[0.25f32], &dev).unwrap()).unwrap();
        let h = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 1.0]], &dev).unwrap();
        // 0.5 - 2 + 6 + 0.25 = 4.75; 2 + 0.25 = 2.25
        assert_eq!(head.forward(&h).unwrap().to_vec1::<f32>().unwrap(), vec![4.75, 2.25]);
        let dir = std::env::temp_dir().join(format!("verdict-head-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(VALUE_HEAD_FILE);
        head.save(&path).unwrap();
        let back = ScalarHead::load(VALUE_HEAD, 3, &path, &dev).unwrap();
        assert_eq!(back.forward(&h).unwrap().to_vec1::<f32>().unwrap(), vec![4.75, 2.25]);
        let wrong = ScalarHead::load(VALUE_HEAD, 4, &path, &dev).unwrap_err().to_string();
        assert!(wrong.contains("shape"), "{wrong}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
