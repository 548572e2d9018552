//! Optimizers, learning-rate schedules and gradient clipping for LoRA training.
//!
//! Written here rather than taken from candle-nn so that every bit of optimizer state can be
//! saved in a checkpoint and restored, which exact resume needs. Semantics follow PyTorch's
//! `AdamW` and Hugging Face's `Adafactor` (with `relative_step=False, scale_parameter=False`, the
//! method's setting).

use anyhow::{bail, Result};
use candle_core::{Tensor, Var, D};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    AdamW,
    /// Factored second moments, no first moment: the method's choice (TRL's PPO, SFT).
    Adafactor,
}

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    /// AdamW betas.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self { kind: OptimizerKind::AdamW, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Adafactor constants (Hugging Face defaults).
const ADAFACTOR_EPS1: f64 = 1e-30;
const ADAFACTOR_CLIP: f64 = 1.0;
const ADAFACTOR_DECAY: f64 = -0.8;

/// Per-variable state, by variable name.
#[derive(Debug, Default)]
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// Named state tensors per variable (`exp_avg`, `exp_avg_sq`, `row`, `col`).
    pub state: BTreeMap<String, BTreeMap<String, Tensor>>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Self {
        Self { config, step: 0, state: BTreeMap::new() }
    }

    /// One update of every variable with its gradient at learning rate `lr`.
    pub fn step(&mut self, vars: &[(String, Var)], grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as f64;
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { bail!("no gradient for {name}") };
            let p = var.as_tensor();
            let state = self.state.entry(name.clone()).or_default();
            let c = &self.config;
            let new = match c.kind {
                OptimizerKind::AdamW => {
                    let m = match state.get("exp_avg") {
                        Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                        None => (g * (1.0 - c.beta1))?,
                    };
                    let v = match state.get("exp_avg_sq") {
                        Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                        None => (g.sqr()? * (1.0 - c.beta2))?,
                    };
                    let m_hat = (&m / (1.0 - c.beta1.powf(t)))?;
                    let v_hat = (&v / (1.0 - c.beta2.powf(t)))?;
                    let decayed = (p * (1.0 - lr * c.weight_decay))?;
                    let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                    state.insert("exp_avg".into(), m);
                    state.insert("exp_avg_sq".into(), v);
                    (decayed - (update * lr)?)?
                }
                OptimizerKind::Adafactor => {
                    let beta2t = 1.0 - t.powf(ADAFACTOR_DECAY);
                    let sq = (g.sqr()? + ADAFACTOR_EPS1)?;
                    let mut update = if g.rank() >= 2 {
                        let row_mean = sq.mean(D::Minus1)?;
                        let col_mean = sq.mean(D::Minus2)?;
                        let row = match state.get("row") {
                            Some(r) => ((r * beta2t)? + (row_mean * (1.0 - beta2t))?)?,
                            None => (row_mean * (1.0 - beta2t))?,
                        };
                        let col = match state.get("col") {
                            Some(cl) => ((cl * beta2t)? + (col_mean * (1.0 - beta2t))?)?,
                            None => (col_mean * (1.0 - beta2t))?,
                        };
                        // v ≈ row colᵀ / mean(row): update = g / sqrt(v).
                        let r_factor =
                            row.broadcast_div(&row.mean_keepdim(D::Minus1)?)?.sqrt()?.recip()?.unsqueeze(D::Minus1)?;
                        let c_factor = col.sqrt()?.recip()?.unsqueeze(D::Minus2)?;
                        state.insert("row".into(), row);
                        state.insert("col".into(), col);
                        r_factor.broadcast_mul(&c_factor)?.mul(g)?
                    } else {
                        let v = match state.get("exp_avg_sq") {
                            Some(v) => ((v * beta2t)? + (&sq * (1.0 - beta2t))?)?,
                            None => (&sq * (1.0 - beta2t))?,
                        };
                        let u = (v.sqrt()?.recip()? * g)?;
                        state.insert("exp_avg_sq".into(), v);
                        u
                    };
                    let rms =
                        update.to_dtype(candle_core::DType::F64)?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f64>()?;
                    update = (update / (rms / ADAFACTOR_CLIP).max(1.0))?;
                    let decayed = if c.weight_decay != 0.0 { (p * (1.0 - lr * c.weight_decay))? } else { p.clone() };
                    (decayed - (update * lr)?)?
                }
            };
            var.set(&new)?;
        }
        Ok(())
    }
}

/// Learning-rate schedule shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Learning rate at optimizer step `step` (1-based) of `total`: linear warm-up over `warmup`
/// steps to `peak`, then constant, linearly decaying or cosine-decaying to zero at `total`.
pub fn learning_rate(schedule: Schedule, peak: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Scales the gradients whose names `select` accepts, as one group, so that their L2 norm is at
/// most `max_norm` (when `max_norm > 0`); the others are left untouched. Returns the group's norm before clipping (0 for an empty group).
pub fn clip_grad_norm_of(
    grads: &mut BTreeMap<String, Tensor>,
    max_norm: f64,
    select: impl Fn(&str) -> bool,
) -> Result<f64> {
    let mut total = 0.0f64;
    for (_, g) in grads.iter().filter(|(k, _)| select(k)) {
        total += g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for (_, g) in grads.iter_mut().filter(|(k, _)| select(k)) {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f64], shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn values(v: &Var) -> Vec<f64> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn grads(name: &str, g: &[f64], shape: &[usize]) -> BTreeMap<String, Tensor> {
        BTreeMap::from([(name.to_string(), Tensor::from_vec(g.to_vec(), shape, &Device::Cpu).unwrap())])
    }

    #[test]
    fn adamw_matches_hand_computed_steps() {
        // lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01; p = 1, g = 0.5 then -0.25.
        let p = var(&[1.0], &[1]);
        let vars = vec![("p".to_string(), p.clone())];
        let mut opt = Optimizer::new(OptimizerConfig { weight_decay: 0.01, ..Default::default() });
        opt.step(&vars, &grads("p", &[0.5], &[1]), 0.1).unwrap();
        // m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25, update = 0.5 / (0.5 + 1e-8)
        // p = 1 * (1 - 0.1 * 0.01) - 0.1 * update = 0.999 - 0.09999999800
        let want1 = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8);
        assert!((values(&p)[0] - want1).abs() < 1e-12, "{} vs {want1}", values(&p)[0]);
        opt.step(&vars, &grads("p", &[-0.25], &[1]), 0.1).unwrap();
        // m = 0.9*0.05 - 0.025 = 0.02, v = 0.999*0.00025 + 0.001*0.0625 = 0.00031225
        // m̂ = 0.02 / 0.19 = 0.105263158, v̂ = 0.00031225 / 0.001999 = 0.156203102
        let (m_hat, v_hat) = (0.02 / (1.0 - 0.81), 0.00031225 / (1.0 - 0.999f64.powi(2)));
        let want2 = want1 * (1.0 - 0.001) - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((values(&p)[0] - want2).abs() < 1e-12, "{} vs {want2}", values(&p)[0]);
    }

    #[test]
    fn adafactor_vector_first_step_is_sign_times_lr() {
        // t = 1: beta2t = 1 - 1^-0.8 = 0, so v = g² + eps1 and update = g / |g| (RMS 1, no clip).
        let p = var(&[1.0, -2.0], &[2]);
        let vars = vec![("p".to_string(), p.clone())];
        let mut opt = Optimizer::new(OptimizerConfig { kind: OptimizerKind::Adafactor, ..Default::default() });
        opt.step(&vars, &grads("p", &[0.3, -4.0], &[2]), 0.01).unwrap();
        let got = values(&p);
        assert!((got[0] - 0.99).abs() < 1e-12 && (got[1] + 1.99).abs() < 1e-12, "{got:?}");
    }

    #[test]
    fn adafactor_factored_matches_hand_computation() {
        // g = [[1, 2], [3, 4]], t = 1 (beta2t = 0): row = mean over columns of g² = [2.5, 12.5],
        // col = mean over rows = [5, 10]; v ≈ row_i col_j / mean(row) = row_i col_j / 7.5.
        // update_ij = g_ij / sqrt(v_ij); then divided by max(1, RMS(update)).
        let g = [1.0, 2.0, 3.0, 4.0];
        let (row, col, mean_row): ([f64; 2], [f64; 2], f64) = ([2.5, 12.5], [5.0, 10.0], 7.5);
        let mut u = [0.0; 4];
        for i in 0..2 {
            for j in 0..2 {
                u[i * 2 + j] = g[i * 2 + j] / (row[i] * col[j] / mean_row).sqrt();
            }
        }
        let rms = (u.iter().map(|x| x * x).sum::<f64>() / 4.0).sqrt();
        let scale = rms.max(1.0);
        let p = var(&[0.0; 4], &[2, 2]);
        let vars = vec![("p".to_string(), p.clone())];
        let mut opt = Optimizer::new(OptimizerConfig { kind: OptimizerKind::Adafactor, ..Default::default() });
        opt.step(&vars, &grads("p", &g, &[2, 2]), 0.1).unwrap();
        for (got, ui) in values(&p).iter().zip(u) {
            assert!((got + 0.1 * ui / scale).abs() < 1e-9, "{got} vs {}", -0.1 * ui / scale);
        }
        assert!(opt.state["p"].contains_key("row") && opt.state["p"].contains_key("col"));
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        assert_eq!(learning_rate(Schedule::Constant, 1.0, 1, 4, 10), 0.25);
        assert_eq!(learning_rate(Schedule::Constant, 1.0, 4, 4, 10), 1.0);
        assert_eq!(learning_rate(Schedule::Constant, 1.0, 9, 4, 10), 1.0);
        // Linear: after warm-up, 1 - (step - 4) / 6.
        assert!((learning_rate(Schedule::Linear, 1.0, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Linear, 1.0, 10, 4, 10), 0.0);
        // Cosine: half-way is 0.5, the end is 0.
        assert!((learning_rate(Schedule::Cosine, 2.0, 7, 4, 10) - 1.0).abs() < 1e-12);
        assert!(learning_rate(Schedule::Cosine, 2.0, 10, 4, 10).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        // Global norm of [3, 4] and [12] is 13.
        let mut g = grads("a", &[3.0, 4.0], &[2]);
        g.extend(grads("b", &[12.0], &[1]));
        let norm = clip_grad_norm_of(&mut g, 1.3, |_| true).unwrap();
        assert!((norm - 13.0).abs() < 1e-12);
        let a: Vec<f64> = g["a"].to_vec1().unwrap();
        assert!((a[0] - 0.3).abs() < 1e-6 && (a[1] - 0.4).abs() < 1e-6);
        let untouched = clip_grad_norm_of(&mut g, 10.0, |_| true).unwrap();
        assert!((untouched - 1.3).abs() < 1e-5);
    }

    #[test]
    fn group_clipping_leaves_the_other_gradients_alone() {
        // Group "h.*" has norm 5 ([3, 4]); "a" (norm 12) is outside it.
        let mut g = grads("h.w", &[3.0, 4.0], &[2]);
        g.extend(grads("a", &[12.0], &[1]));
        let norm = clip_grad_norm_of(&mut g, 1.0, |k| k.starts_with("h.")).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let h: Vec<f64> = g["h.w"].to_vec1().unwrap();
        assert!((h[0] - 0.6).abs() < 1e-6 && (h[1] - 0.8).abs() < 1e-6);
        assert_eq!(g["a"].to_vec1::<f64>().unwrap(), vec![12.0]);
        // An empty group has norm 0 and changes nothing.
        assert_eq!(clip_grad_norm_of(&mut g, 1.0, |k| k.starts_with("z")).unwrap(), 0.0);
        assert_eq!(g["a"].to_vec1::<f64>().unwrap(), vec![12.0]);
    }
}
