//! Differentiable ops of the training path on the CPU: RMS norm, rotary embedding, SwiGLU and
//! attention as single candle custom ops with hand-written backward passes.
//!
//! Built from candle's elementary ops, each of these is five to twenty tensors allocated and
//! walked per call, forward and backward: on SmolLM2 they took about two thirds of an SFT
//! step. Here each is one pass (attention: its products on the f32 tiles), and the backward is
//! the derivative written out (attention recomputes its probabilities instead of keeping them).
//! Only the input gradients exist: norm weights and rotary tables are constants.

use super::attention::KeyMask;
use super::packed::{PackedWeight, Precision};
use super::CpuKernels;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The f32 values of a contiguous CPU storage.
fn values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("training ops take f32") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("training ops take contiguous inputs") };
    Ok(&v[a..b])
}

fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// `y = x / rms(x) · w` over the last dimension.
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "verdict-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(s, l)?;
        let n = self.weight.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / n as f32 + self.eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(&self.weight) {
                *y = x * inv * w;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = (w·g − x · Σ(w·g·x) / (n · ms)) / rms, with ms the mean square plus eps.
        let (x, g) = (vec_of(arg)?, vec_of(grad)?);
        let n = self.weight.len();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n).zip(x.par_chunks(n).zip(g.par_chunks(n))).for_each(|(dx, (x, g))| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / n as f32 + self.eps;
            let inv = 1.0 / ms.sqrt();
            let dot: f32 = x.iter().zip(g).zip(&self.weight).map(|((x, g), w)| x * g * w).sum();
            let k = dot / (n as f32 * ms);
            for (((d, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(&self.weight) {
                *d = (w * g - x * k) * inv;
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Half-rotation rotary embedding of `x` `[b, h, t, d]` with per-row tables `[b, t, d/2]`:
/// `y₁ = x₁ cos − x₂ sin`, `y₂ = x₂ cos + x₁ sin` (the two halves of each head).
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    fn apply(&self, x: &[f32], dims: &[usize], inverse: bool) -> Result<Vec<f32>> {
        let [b, h, t, d] = dims else { candle_core::bail!("rope takes [batch, heads, tokens, head_dim]") };
        let (b, h, t, half) = (*b, *h, *t, d / 2);
        if self.cos.len() != b * t * half {
            candle_core::bail!("rope tables do not fit [{b}, {t}, {half}]");
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).enumerate().for_each(|(bh, (y, x))| {
            let r = bh / h;
            for i in 0..t {
                let (c, s) = (&self.cos[(r * t + i) * half..][..half], &self.sin[(r * t + i) * half..][..half]);
                let (x, y) = (&x[i * 2 * half..][..2 * half], &mut y[i * 2 * half..][..2 * half]);
                for j in 0..half {
                    let (x1, x2, s) = (x[j], x[half + j], sign * s[j]);
                    y[j] = x1 * c[j] - x2 * s;
                    y[half + j] = x2 * c[j] + x1 * s;
                }
            }
        });
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "verdict-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.apply(values(s, l)?, l.dims(), false)?), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // A (scaled) rotation: its gradient is the transposed map, the angle negated.
        let dx = self.apply(&vec_of(grad)?, arg.dims(), true)?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `silu(gate) · up`.
pub struct Swiglu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "verdict-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (values(s1, l1)?, values(s2, l2)?);
        if g.len() != u.len() {
            candle_core::bail!("swiglu: gate and up differ in size");
        }
        let y: Vec<f32> = g.par_iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect();
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, dy) = (vec_of(gate)?, vec_of(up)?, vec_of(grad)?);
        let (dg, du): (Vec<f32>, Vec<f32>) = g
            .par_iter()
            .zip(&u)
            .zip(&dy)
            .map(|((&g, &u), &dy)| {
                let s = sigmoid(g);
                (dy * u * s * (1.0 + g * (1.0 - s)), dy * g * s)
            })
            .unzip();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// `softmax(q kᵀ / √d + mask) v` for `q` `[b, heads, t, d]`, `k`, `v` `[b, kv_heads, keys, d]`,
/// giving `[b, t, heads · d]`; the query heads sharing a KV head form one product.
pub struct Attention {
    pub mask: KeyMask,
    pub heads: usize,
    pub kv_heads: usize,
    pub kernels: CpuKernels,
}

/// `a [rows, inner] · b [inner, n]` (both row-major) on the f32 tiles.
fn matmul(a: &[f32], rows: usize, inner: usize, b: &[f32], n: usize, k: &CpuKernels) -> Vec<f32> {
    let w = PackedWeight::pack_transposed(b, inner, n);
    let t = k.tiling(Precision::F32, n, inner, rows).expect("f32 kernels run where the training ops do");
    w.matmul_t(a, rows, &t)
}

/// `a [rows, inner] · bᵀ` for `b [n, inner]` row-major.
fn matmul_t(a: &[f32], rows: usize, inner: usize, b: &[f32], n: usize, k: &CpuKernels) -> Vec<f32> {
    let w = PackedWeight::pack(b, n, inner);
    let t = k.tiling(Precision::F32, n, inner, rows).expect("f32 kernels run where the training ops do");
    w.matmul_t(a, rows, &t)
}

/// `aᵀ [inner, rows]ᵀ…`: `aᵀ · b` for `a [m, p]`, `b [m, n]`: `[p, n]`.
fn t_matmul(a: &[f32], m: usize, p: usize, b: &[f32], n: usize, k: &CpuKernels) -> Vec<f32> {
    let mut at = vec![0f32; p * m];
    for i in 0..m {
        for j in 0..p {
            at[j * m + i] = a[i * p + j];
        }
    }
    matmul(&at, p, m, b, n, k)
}

/// One (row, KV head) group's `dQ`, `dK`, `dV`, with the group's index.
type GroupGrads = (usize, Vec<f32>, Vec<f32>, Vec<f32>);

impl Attention {
    fn dims(&self, q: &Layout, k: &Layout) -> Result<(usize, usize, usize, usize)> {
        let [b, h, t, d] = q.dims() else { candle_core::bail!("attention: q is not [b, h, t, d]") };
        let [_, kvh, keys, _] = k.dims() else { candle_core::bail!("attention: k is not [b, kv, keys, d]") };
        if *h != self.heads
            || *kvh != self.kv_heads
            || (self.mask.rows, self.mask.queries, self.mask.keys) != (*b, *t, *keys)
        {
            candle_core::bail!("attention: shapes do not fit the mask");
        }
        Ok((*b, *t, *keys, *d))
    }

    /// Each (row, KV head) group's queries stacked as rows `(query, head)`: `[rep · t, d]`.
    fn group_q(&self, q: &[f32], r: usize, g: usize, t: usize, d: usize) -> Vec<f32> {
        let rep = self.heads / self.kv_heads;
        let mut out = vec![0f32; rep * t * d];
        for i in 0..t {
            for hh in 0..rep {
                let head = g * rep + hh;
                out[(i * rep + hh) * d..][..d].copy_from_slice(&q[((r * self.heads + head) * t + i) * d..][..d]);
            }
        }
        out
    }

    /// The masked, normalised probabilities `[rep · t, keys]` of one group.
    fn probs(&self, qg: &[f32], kg: &[f32], r: usize, t: usize, keys: usize, d: usize) -> Vec<f32> {
        let rep = self.heads / self.kv_heads;
        let mut s = matmul_t(qg, rep * t, d, kg, keys, &self.kernels);
        let scale = 1.0 / (d as f32).sqrt();
        for i in 0..t {
            let allowed = &self.mask.allowed[(r * t + i) * keys..][..keys];
            for hh in 0..rep {
                let row = &mut s[(i * rep + hh) * keys..][..keys];
                let max = row
                    .iter()
                    .zip(allowed)
                    .filter(|(_, &a)| a)
                    .map(|(v, _)| v * scale)
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (v, &a) in row.iter_mut().zip(allowed) {
                    *v = if a { (*v * scale - max).exp() } else { 0.0 };
                    sum += *v;
                }
                if sum > 0.0 {
                    row.iter_mut().for_each(|v| *v /= sum);
                }
            }
        }
        s
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "verdict-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, keys, d) = self.dims(l1, l2)?;
        let (q, k, v) = (values(s1, l1)?, values(s2, l2)?, values(s3, l3)?);
        let rep = self.heads / self.kv_heads;
        let parts: Vec<(usize, Vec<f32>)> = (0..b * self.kv_heads)
            .into_par_iter()
            .map(|item| {
                let (r, g) = (item / self.kv_heads, item % self.kv_heads);
                let kg = &k[(r * self.kv_heads + g) * keys * d..][..keys * d];
                let vg = &v[(r * self.kv_heads + g) * keys * d..][..keys * d];
                let p = self.probs(&self.group_q(q, r, g, t, d), kg, r, t, keys, d);
                (item, matmul(&p, rep * t, keys, vg, d, &self.kernels))
            })
            .collect();
        let mut y = vec![0f32; b * t * self.heads * d];
        for (item, o) in parts {
            let (r, g) = (item / self.kv_heads, item % self.kv_heads);
            for i in 0..t {
                for hh in 0..rep {
                    let head = g * rep + hh;
                    y[((r * t + i) * self.heads + head) * d..][..d].copy_from_slice(&o[(i * rep + hh) * d..][..d]);
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, t, self.heads * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, keys, d) = self.dims(q.layout(), k.layout())?;
        let (qv, kv, vv, dy) = (vec_of(q)?, vec_of(k)?, vec_of(v)?, vec_of(grad)?);
        let rep = self.heads / self.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let parts: Vec<GroupGrads> = (0..b * self.kv_heads)
            .into_par_iter()
            .map(|item| {
                let (r, g) = (item / self.kv_heads, item % self.kv_heads);
                let kg = &kv[(r * self.kv_heads + g) * keys * d..][..keys * d];
                let vg = &vv[(r * self.kv_heads + g) * keys * d..][..keys * d];
                let qg = self.group_q(&qv, r, g, t, d);
                let p = self.probs(&qg, kg, r, t, keys, d);
                // dY of the group, rows (query, head).
                let mut dyg = vec![0f32; rep * t * d];
                for i in 0..t {
                    for hh in 0..rep {
                        let head = g * rep + hh;
                        dyg[(i * rep + hh) * d..][..d]
                            .copy_from_slice(&dy[((r * t + i) * self.heads + head) * d..][..d]);
                    }
                }
                let rows = rep * t;
                // dV = Pᵀ dY; dP = dY Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) / √d.
                let dv = t_matmul(&p, rows, keys, &dyg, d, &self.kernels);
                let mut ds = matmul_t(&dyg, rows, d, vg, keys, &self.kernels);
                for (dsr, pr) in ds.chunks_mut(keys).zip(p.chunks(keys)) {
                    let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (x, &pp) in dsr.iter_mut().zip(pr) {
                        *x = pp * (*x - dot) * scale;
                    }
                }
                // dQ = dS K; dK = dSᵀ Q.
                let dq = matmul(&ds, rows, keys, kg, d, &self.kernels);
                let dk = t_matmul(&ds, rows, keys, &qg, d, &self.kernels);
                (item, dq, dk, dv)
            })
            .collect();
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        for (item, gq, gk, gv) in parts {
            let (r, g) = (item / self.kv_heads, item % self.kv_heads);
            for i in 0..t {
                for hh in 0..rep {
                    let head = g * rep + hh;
                    dq[((r * self.heads + head) * t + i) * d..][..d].copy_from_slice(&gq[(i * rep + hh) * d..][..d]);
                }
            }
            dk[(r * self.kv_heads + g) * keys * d..][..keys * d].copy_from_slice(&gk);
            dv[(r * self.kv_heads + g) * keys * d..][..keys * d].copy_from_slice(&gv);
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Value and gradient (of a random linear function of the output) of `ours` against
    /// `reference`, both differentiable functions of the same variables.
    fn check(name: &str, vars: &[Var], ours: &dyn Fn() -> Tensor, reference: &dyn Fn() -> Tensor) {
        let (a, b) = (ours(), reference());
        let w = randn(a.dims(), 99);
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{name}: values differ by {diff}");
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            let scale = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5 * scale.max(1.0), "{name}: gradient of input {i} differs by {d} (scale {scale})");
        }
    }

    #[test]
    fn fused_training_ops_give_candles_values_and_gradients() {
        let kernels = CpuKernels::auto();
        if !kernels.enabled() {
            return;
        }
        // RMS norm.
        let x = Var::from_tensor(&randn(&[3, 5, 24], 1)).unwrap();
        let w = randn(&[24], 2);
        let wv = vec_of(&w).unwrap();
        check(
            "rms norm",
            std::slice::from_ref(&x),
            &|| x.as_tensor().apply_op1(RmsNorm { weight: wv.clone(), eps: 1e-5 }).unwrap(),
            &|| candle_nn::ops::rms_norm_slow(x.as_tensor(), &w, 1e-5).unwrap(),
        );
        // Rotary embedding with per-row positions.
        let (b, h, t, d) = (2, 3, 7, 16);
        let xq = Var::from_tensor(&randn(&[b, h, t, d], 3)).unwrap();
        let ang = randn(&[b, t, d / 2], 4);
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let (cv, sv) = (vec_of(&cos).unwrap(), vec_of(&sin).unwrap());
        check(
            "rope",
            std::slice::from_ref(&xq),
            &|| xq.as_tensor().apply_op1(Rope { cos: cv.clone(), sin: sv.clone() }).unwrap(),
            &|| {
                let x = xq.as_tensor();
                let c = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap().unsqueeze(1).unwrap();
                let s = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap().unsqueeze(1).unwrap();
                let half = d / 2;
                let rot = Tensor::cat(
                    &[&x.narrow(D::Minus1, half, half).unwrap().neg().unwrap(), &x.narrow(D::Minus1, 0, half).unwrap()],
                    D::Minus1,
                )
                .unwrap();
                (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
            },
        );
        // SwiGLU.
        let (g, u) = (
            Var::from_tensor(&(randn(&[4, 33], 5) * 4.0).unwrap()).unwrap(),
            Var::from_tensor(&randn(&[4, 33], 6)).unwrap(),
        );
        check("swiglu", &[g.clone(), u.clone()], &|| g.as_tensor().apply_op2(u.as_tensor(), Swiglu).unwrap(), &|| {
            (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap()
        });
        // Attention: 6 heads on 2 KV heads, 4 cached keys, causal with padding.
        let (b, heads, kvh, t, past, d) = (2, 6, 2, 9, 4, 16);
        let keys = past + t;
        let q = Var::from_tensor(&randn(&[b, heads, t, d], 7)).unwrap();
        let k = Var::from_tensor(&randn(&[b, kvh, keys, d], 8)).unwrap();
        let v = Var::from_tensor(&randn(&[b, kvh, keys, d], 9)).unwrap();
        let mut allowed = vec![false; b * t * keys];
        for r in 0..b {
            for i in 0..t {
                for j in 0..keys {
                    let real_key = !(r == 1 && (j == 1 || j >= past + 7));
                    let ok = (j < past || j - past <= i) && real_key || j == past + i;
                    allowed[(r * t + i) * keys + j] = ok;
                }
            }
        }
        let mask = KeyMask { rows: b, queries: t, keys, allowed: allowed.clone() };
        let additive: Vec<f32> = allowed.iter().map(|&a| if a { 0.0 } else { -1e9 }).collect();
        let additive = Tensor::from_vec(additive, (b, 1, 1, t, keys), &Device::Cpu).unwrap();
        check(
            "attention",
            &[q.clone(), k.clone(), v.clone()],
            &|| {
                let op = Attention { mask: mask.clone(), heads, kv_heads: kvh, kernels: kernels.clone() };
                q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), op).unwrap()
            },
            &|| {
                let rep = heads / kvh;
                let qq = q.as_tensor().reshape((b, kvh, rep * t, d)).unwrap();
                let s = (qq.matmul(&k.as_tensor().t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
                let s = s.reshape((b, kvh, rep, t, keys)).unwrap().broadcast_add(&additive).unwrap();
                let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap().reshape((b, kvh, rep * t, keys)).unwrap();
                p.matmul(v.as_tensor())
                    .unwrap()
                    .reshape((b, heads, t, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, t, heads * d))
                    .unwrap()
            },
        );
    }
}
