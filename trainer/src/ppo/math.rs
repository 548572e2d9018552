//! The PPO arithmetic as small pure functions, each checked against hand-computed numbers:
//! per-token KL and rewards, GAE, whitening, the adaptive KL controller, the clipped policy and
//! value losses, and GRPO's group-normalised advantages. Semantics follow TRL's classic
//! `PPOTrainer` (and its `GRPOTrainer` for the group advantages).

use candle_core::{Result, Tensor};

/// Per-token rewards of one response: `-kl_coef * (logp - ref_logp)` on every token, plus the
/// sequence's score on the last. Also returns the per-token KL estimate `logp - ref_logp`.
pub fn token_rewards(score: f64, logp: &[f64], ref_logp: &[f64], kl_coef: f64) -> (Vec<f64>, Vec<f64>) {
    let kl: Vec<f64> = logp.iter().zip(ref_logp).map(|(a, b)| a - b).collect();
    let mut rewards: Vec<f64> = kl.iter().map(|k| -kl_coef * k).collect();
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    (rewards, kl)
}

/// Generalised advantage estimation over one response (the value after the last token is 0).
/// Returns `(advantages, returns)`, `returns = advantages + values`.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        last = delta + gamma * lambda * last;
        adv[t] = last;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// Whitens `xs` in place: `(x - mean) / sqrt(var + 1e-8)` with the unbiased variance; with
/// `shift_mean = false` the mean is added back.
pub fn whiten(xs: &mut [f64], shift_mean: bool) {
    let n = xs.len();
    if n < 2 {
        return;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let scale = 1.0 / (var + 1e-8).sqrt();
    for x in xs.iter_mut() {
        *x = (*x - mean) * scale + if shift_mean { 0.0 } else { mean };
    }
}

/// The KL coefficient's controller: fixed, or adaptive towards a target KL (Ziegler et al.).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KlController {
    Fixed { coef: f64 },
    Adaptive { coef: f64, target: f64, horizon: f64 },
}

impl KlController {
    pub fn coef(&self) -> f64 {
        match *self {
            KlController::Fixed { coef } | KlController::Adaptive { coef, .. } => coef,
        }
    }

    /// After a batch of `n_steps` sequences whose mean summed KL was `current`:
    /// `coef *= 1 + clip(current / target - 1, -0.2, 0.2) * n_steps / horizon`.
    pub fn update(&mut self, current: f64, n_steps: usize) {
        if let KlController::Adaptive { coef, target, horizon } = self {
            let error = (current / *target - 1.0).clamp(-0.2, 0.2);
            *coef *= 1.0 + error * n_steps as f64 / *horizon;
        }
    }
}

/// Clipped policy loss, mean over tokens: `max(-A r, -A clip(r, 1-eps, 1+eps))` with
/// `r = exp(logp - old_logp)`. Also returns the fraction of tokens where the clipped term won.
pub fn policy_loss(logp: &Tensor, old_logp: &Tensor, advantages: &Tensor, clip: f64) -> Result<(Tensor, f64)> {
    let ratio = (logp - old_logp)?.exp()?;
    let neg_adv = advantages.neg()?;
    let unclipped = (&neg_adv * &ratio)?;
    let clipped = (&neg_adv * ratio.clamp(1.0 - clip, 1.0 + clip)?)?;
    let clipfrac = clipped.gt(&unclipped)?.to_dtype(candle_core::DType::F32)?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok((unclipped.maximum(&clipped)?.mean_all()?, clipfrac))
}

/// Clipped value loss, `0.5 * mean(max((v - R)^2, (clip(v, old ± eps) - R)^2))`, and the
/// fraction of tokens where the clipped term won.
pub fn value_loss(values: &Tensor, old_values: &Tensor, returns: &Tensor, clip: f64) -> Result<(Tensor, f64)> {
    let clipped_v = values.maximum(&(old_values - clip)?)?.minimum(&(old_values + clip)?)?;
    let l1 = (values - returns)?.sqr()?;
    let l2 = (clipped_v - returns)?.sqr()?;
    let clipfrac = l2.gt(&l1)?.to_dtype(candle_core::DType::F32)?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(((l1.maximum(&l2)?.mean_all()? * 0.5)?, clipfrac))
}

/// GRPO's per-token KL to the reference, `exp(ref - logp) - (ref - logp) - 1` (non-negative,
/// unbiased), mean over tokens.
pub fn grpo_kl(logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let d = (ref_logp - logp)?;
    ((d.exp()? - d)? - 1.0)?.mean_all()
}

/// Group-normalised advantages: consecutive groups of `group` scores (the samples of one
/// prompt), each `(r - mean) / (std + 1e-4)` with the unbiased standard deviation.
pub fn group_advantages(scores: &[f64], group: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(scores.len());
    for g in scores.chunks(group.max(1)) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let std =
            if g.len() > 1 { (g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
        out.extend(g.iter().map(|x| (x - mean) / (std + 1e-4)));
    }
    out
}

/// Mean entropy of the rows of `logp` (log-probabilities over the last dimension).
pub fn mean_entropy(logp: &Tensor) -> Result<f64> {
    let h = (logp.exp()? * logp)?.sum(candle_core::D::Minus1)?.neg()?;
    Ok(h.mean_all()?.to_scalar::<f32>()? as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn token_rewards_put_the_score_on_the_last_token() {
        let (r, kl) = token_rewards(1.0, &[-0.5, -1.0, -0.2], &[-0.7, -1.0, -0.1], 0.2);
        close(&kl, &[0.2, 0.0, -0.1], 1e-12);
        close(&r, &[-0.04, 0.0, 1.02], 1e-12);
    }

    #[test]
    fn gae_matches_the_recursion_by_hand() {
        // rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lambda 0.95:
        // delta2 = 1 - 0.7 = 0.3;            A2 = 0.3
        // delta1 = 0 + 0.7 - 0.6 = 0.1;      A1 = 0.1 + 0.95 * 0.3 = 0.385
        // delta0 = 0 + 0.6 - 0.5 = 0.1;      A0 = 0.1 + 0.95 * 0.385 = 0.46575
        let (a, ret) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.7], 1.0, 0.95);
        close(&a, &[0.46575, 0.385, 0.3], 1e-12);
        close(&ret, &[0.96575, 0.985, 1.0], 1e-12);
        // rewards [1, 2], values [0, 1], gamma 0.9, lambda 1:
        // delta1 = 2 - 1 = 1; A1 = 1. delta0 = 1 + 0.9 * 1 - 0 = 1.9; A0 = 1.9 + 0.9 * 1 = 2.8
        let (a, _) = gae(&[1.0, 2.0], &[0.0, 1.0], 0.9, 1.0);
        close(&a, &[2.8, 1.0], 1e-12);
    }

    #[test]
    fn whitening_gives_zero_mean_unit_unbiased_variance() {
        // [1, 2, 3, 4]: mean 2.5, unbiased var 5/3.
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut x, true);
        let s = (5.0f64 / 3.0 + 1e-8).sqrt();
        close(&x, &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], 1e-12);
        let mut y = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut y, false);
        close(&y, &[2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s], 1e-12);
    }

    #[test]
    fn adaptive_kl_moves_towards_the_target_and_fixed_stays() {
        let mut c = KlController::Adaptive { coef: 0.2, target: 6.0, horizon: 10000.0 };
        // KL 3 against target 6: error -0.5 clipped to -0.2; 0.2 * (1 - 0.2 * 16 / 10000).
        c.update(3.0, 16);
        assert!((c.coef() - 0.2 * (1.0 - 0.2 * 16.0 / 10000.0)).abs() < 1e-15);
        // KL 6.6: error +0.1.
        let before = c.coef();
        c.update(6.6, 100);
        assert!((c.coef() - before * (1.0 + 0.1 * 100.0 / 10000.0)).abs() < 1e-15);
        let mut f = KlController::Fixed { coef: 0.05 };
        f.update(100.0, 16);
        assert_eq!(f.coef(), 0.05);
    }

    #[test]
    fn clipped_policy_loss_and_its_gradient_by_hand() {
        let dev = Device::Cpu;
        // Token 0: r = e^0.1 = 1.105, A = +1: clip at 1.2 inactive: loss -1.105, grad -r.
        // Token 1: r = e^0.3 = 1.35, A = +1: clipped to 1.2 wins (-1.2 > -1.35): loss -1.2, grad 0.
        // Token 2: r = e^-0.3 = 0.741, A = -2: -A r = 1.482, -A clip = 2*0.8 = 1.6 wins, grad 0.
        // Token 3: r = e^0.3, A = -1: -A r = 1.35 beats 1.2: loss 1.35, grad +r.
        let old = [0.0f32, 0.0, 0.0, 0.0];
        let new = [0.1f32, 0.3, -0.3, 0.3];
        let adv = [1.0f32, 1.0, -2.0, -1.0];
        let logp = Var::new(&new, &dev).unwrap();
        let (loss, clipfrac) =
            policy_loss(logp.as_tensor(), &Tensor::new(&old, &dev).unwrap(), &Tensor::new(&adv, &dev).unwrap(), 0.2)
                .unwrap();
        let r = |x: f64| x.exp();
        let want = (-r(0.1) - 1.2 + 1.6 + r(0.3)) / 4.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        assert_eq!(clipfrac, 0.5);
        let g = loss.backward().unwrap();
        let grad: Vec<f32> = g.get(logp.as_tensor()).unwrap().to_vec1().unwrap();
        close(&grad.iter().map(|&x| x as f64).collect::<Vec<_>>(), &[-r(0.1) / 4.0, 0.0, 0.0, r(0.3) / 4.0], 1e-6);
    }

    #[test]
    fn clipped_value_loss_by_hand() {
        let dev = Device::Cpu;
        // Token 0: v 1.0, old 0.5, R 2: clipped v 0.7 -> (0.7-2)^2 = 1.69 beats (1-2)^2 = 1.
        // Token 1: v 0.6, old 0.5, R 0: inside the clip: 0.36 both.
        // Token 2: v -1, old 0, R -1: clipped -0.2 -> 0.64 beats 0.
        let v = Var::new(&[1.0f32, 0.6, -1.0], &dev).unwrap();
        let (loss, frac) = value_loss(
            v.as_tensor(),
            &Tensor::new(&[0.5f32, 0.5, 0.0], &dev).unwrap(),
            &Tensor::new(&[2.0f32, 0.0, -1.0], &dev).unwrap(),
            0.2,
        )
        .unwrap();
        let want = 0.5 * (1.69 + 0.36 + 0.64) / 3.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        assert!((frac - 2.0 / 3.0).abs() < 1e-6);
        // Only token 1 (unclipped) passes a gradient: d/dv 0.5*(v-R)^2/3 = (0.6-0)/3.
        let g = loss.backward().unwrap().get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        close(&g.iter().map(|&x| x as f64).collect::<Vec<_>>(), &[0.0, 0.2, 0.0], 1e-6);
    }

    #[test]
    fn group_advantages_normalise_within_each_group() {
        // Group [1, -1, 1, 1]: mean 0.5, unbiased std 1; group [-3, -3]: std 0 -> all 0.
        let a = group_advantages(&[1.0, -1.0, 1.0, 1.0, -3.0, -3.0], 4);
        let s = 1.0 + 1e-4;
        close(&a, &[0.5 / s, -1.5 / s, 0.5 / s, 0.5 / s, 0.0, 0.0], 1e-12);
    }

    #[test]
    fn grpo_kl_is_zero_at_equality_and_matches_the_formula() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[-1.0f32, -2.0], &dev).unwrap();
        assert!(grpo_kl(&a, &a).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-7);
        let r = Tensor::new(&[-1.5f32, -1.0], &dev).unwrap();
        // d = ref - logp = [-0.5, 1.0]: e^-0.5 + 0.5 - 1 = 0.1065; e - 1 - 1 = 0.71828.
        let want = ((-0.5f64).exp() + 0.5 - 1.0 + 1f64.exp() - 2.0) / 2.0;
        assert!((grpo_kl(&a, &r).unwrap().to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn entropy_of_uniform_and_certain_rows() {
        let dev = Device::Cpu;
        let l4 = (0.25f32).ln();
        let logp = Tensor::new(&[[l4, l4, l4, l4], [0.0, -1e9, -1e9, -1e9]], &dev).unwrap();
        assert!((mean_entropy(&logp).unwrap() - (4f64.ln() / 2.0)).abs() < 1e-6);
    }
}
