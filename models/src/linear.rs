//! Frozen base projections (`y = x Wᵀ + b`): dense, GGUF-quantized, or packed for the CPU
//! kernels (a memory-mapped pack file).
//!
//! Base weights never train. candle's matmul backward always computes the gradient of both
//! operands, so a plain `x.matmul(w)` on the training path would allocate and compute a
//! full-size gradient for every frozen weight. [`FrozenMatmul`] is a custom op whose backward
//! returns only the input gradient; on the CPU both directions run on the packed f32 kernels
//! (`x Wᵀ` on `W`'s panels, `g W` on `Wᵀ`'s).

use crate::cpu::{CpuKernels, PackedWeight, Panels, Precision};
use candle_core::backend::BackendStorage;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Storage, Tensor};
use std::sync::{Arc, OnceLock};

/// A base weight matrix of shape `[out, in]`.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// Dense weights (f32 on CPU): the training path and the accuracy reference.
    Dense(Tensor),
    /// GGUF blocks kept as they are, multiplied by candle's quantized kernels (inference only).
    Quantized(Arc<QTensor>),
    /// Panels for the CPU kernels, usually borrowed from a memory-mapped pack file (inference
    /// only: no dense copy exists).
    Packed(PackedWeight),
}

impl BaseWeight {
    /// `(out, in)` of the matrix.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Quantized(q) => q.shape().dims2(),
            Self::Packed(p) => Ok(p.dims()),
        }
    }

    /// The weights as a dense tensor of `dtype` (dequantized or unpacked if needed).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_dtype(dtype),
            Self::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
            Self::Packed(p) => Tensor::from_vec(p.unpack(), p.dims(), &candle_core::Device::Cpu)?.to_dtype(dtype),
        }
    }
}

/// `q` on `device`: the same blocks, byte for byte (a no-op on the CPU).
pub fn qtensor_to_device(q: QTensor, device: &candle_core::Device) -> Result<QTensor> {
    if device.same_device(&q.device()) {
        return Ok(q);
    }
    candle_core::quantized::ggml_file::qtensor_from_ggml(q.dtype(), &q.data()?, q.shape().dims().to_vec(), device)
}

/// A frozen linear layer: base weight plus optional bias.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: BaseWeight,
    bias: Option<Tensor>,
    /// For quantized weights, candle's dispatcher (it may hold a dense copy for f16/f32 blocks).
    qmatmul: Option<Arc<QMatMul>>,
    /// The weight packed for the inference kernels, in the model's precision: given for a
    /// packed weight, made from a dense f32 one on first use (shared by clones; `None` inside:
    /// this weight cannot be packed).
    packed: Arc<OnceLock<Option<PackedWeight>>>,
    /// Training on the CPU: `W` in f32 panels (the inference pack when that is f32) and `Wᵀ`.
    train: Arc<OnceLock<Option<Arc<TrainPacks>>>>,
}

/// The f32 panels of a frozen weight for both directions of a training step.
#[derive(Debug)]
struct TrainPacks {
    forward: PackedWeight,
    transposed: PackedWeight,
}

impl FrozenLinear {
    /// Wraps a base weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: BaseWeight, bias: Option<Tensor>) -> Result<Self> {
        let qmatmul = match &weight {
            BaseWeight::Quantized(q) => Some(Arc::new(QMatMul::from_arc(q.clone())?)),
            _ => None,
        };
        let packed = match &weight {
            BaseWeight::Packed(p) => OnceLock::from(Some(p.clone())),
            _ => OnceLock::new(),
        };
        Ok(Self { weight, bias, qmatmul, packed: Arc::new(packed), train: Arc::default() })
    }

    /// The base weight.
    pub fn weight(&self) -> &BaseWeight {
        &self.weight
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight packed for `kernels` (packed now on first use), `None` where our kernels do
    /// not take it: not enabled, another device or dtype, or quantized blocks on f32 or bf16
    /// kernels. Quantized blocks on int8 kernels become one int8 matrix per weight (the panels
    /// of a `--weights quantized` pack file).
    fn packed(&self, kernels: &CpuKernels) -> Option<&PackedWeight> {
        if !kernels.enabled() {
            return None;
        }
        let panels = match &self.weight {
            BaseWeight::Packed(_) => return self.packed.get().and_then(Option::as_ref),
            BaseWeight::Dense(w) if w.device().is_cpu() && w.dtype() == DType::F32 => {
                Panels::for_weight(kernels.precision, false)?
            }
            BaseWeight::Quantized(q) if q.device().is_cpu() => Panels::for_weight(kernels.precision, true)?,
            _ => return None,
        };
        self.packed
            .get_or_init(|| {
                let (out, inner) = self.weight.dims().ok()?;
                let values = self.weight.to_dense(DType::F32).and_then(|v| v.flatten_all()?.to_vec1::<f32>()).ok()?;
                Some(PackedWeight::pack_kind(&values, out, inner, panels))
            })
            .as_ref()
    }

    /// Inference forward: fast kernels, no gradient bookkeeping needed.
    ///
    /// candle's quantized kernel computes one row at a time with no cache blocking: best for
    /// decoding a few tokens, about 10x slower than the dense GEMM for a prompt. Inputs of more
    /// than [`QUANTIZED_KERNEL_MAX_ROWS`] rows therefore dequantize the blocks on the fly and use
    /// the dense GEMM; the weights stay quantized in memory either way.
    pub fn forward_inference(&self, x: &Tensor, kernels: &CpuKernels) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        if let Some(y) = packed_product(x, self.packed(kernels), rows, kernels, &[])? {
            return self.add_bias(y);
        }
        let y = match (&self.weight, &self.qmatmul) {
            (BaseWeight::Quantized(q), Some(_)) if rows > QUANTIZED_KERNEL_MAX_ROWS => {
                matmul_wt(x, &q.dequantize(&q.device())?.to_dtype(x.dtype())?)?
            }
            (_, Some(q)) => q.forward(x)?,
            (BaseWeight::Dense(w), None) => matmul_wt(x, w)?,
            (BaseWeight::Packed(p), None) => {
                // Kernels off for a packed-only weight (another device, or `--cpu-isa none`).
                matmul_wt(x, &self.weight.to_dense(x.dtype())?.to_device(x.device())?).map_err(|e| {
                    candle_core::Error::Msg(format!("packed weight {:?} without our kernels: {e}", p.dims()))
                })?
            }
            (BaseWeight::Quantized(_), None) => unreachable!("quantized weights always get a QMatMul"),
        };
        self.add_bias(y)
    }

    /// [`FrozenLinear::forward_inference`] plus LoRA deltas in the same buffers: rows
    /// `start..end` (of the flattened `[rows, in]` input) get `x Aᵀ (s B)ᵀ` of their packed
    /// factors. No tensor op per adapter: the base product, the two rank-r products and the sum
    /// run on one output buffer. `None` where our kernels do not take this weight or input
    /// (quantized blocks, another device): the caller adds the deltas itself.
    pub fn forward_inference_lora(&self, x: &Tensor, runs: &[LoraRun], kernels: &CpuKernels) -> Result<Option<Tensor>> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        match packed_product(x, self.packed(kernels), rows, kernels, runs)? {
            Some(y) => Ok(Some(self.add_bias(y)?)),
            None => Ok(None),
        }
    }

    /// [`FrozenLinear::forward_inference`] for output columns `cols` only (`[.., in]` →
    /// `[.., cols.len()]`): the LM head at a few label tokens, without the full vocabulary.
    /// The same values as those columns of the full product.
    pub fn forward_inference_columns(&self, x: &Tensor, cols: &[u32], kernels: &CpuKernels) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        let idx: Vec<usize> = cols.iter().map(|&c| c as usize).collect();
        let (out, _) = self.weight.dims()?;
        if let Some(&bad) = idx.iter().find(|&&c| c >= out) {
            candle_core::bail!("linear: column {bad} outside {out} outputs")
        }
        let sub = self.packed(kernels).map(|p| p.select_outputs(&idx));
        let y = match packed_product(x, sub.as_ref(), rows, kernels, &[])? {
            Some(y) => y,
            None => {
                let dense = self.weight.to_dense(x.dtype())?.to_device(x.device())?;
                matmul_wt(x, &dense.index_select(&Tensor::new(cols, dense.device())?, 0)?)?
            }
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&b.index_select(&Tensor::new(cols, b.device())?, 0)?)?),
            None => Ok(y),
        }
    }

    /// Training forward: gradient flows to `x` only, never to the frozen weight. On the CPU
    /// with `kernels` enabled both directions run on f32 panels (packed on first use).
    pub fn forward_train(&self, x: &Tensor, kernels: &CpuKernels) -> Result<Tensor> {
        let BaseWeight::Dense(w) = &self.weight else {
            candle_core::bail!("training needs dense weights: load the model in dense mode for training")
        };
        let packs = if kernels.enabled() && w.device().is_cpu() && w.dtype() == DType::F32 {
            self.train
                .get_or_init(|| {
                    let (out, inner) = w.dims2().ok()?;
                    let values = w.flatten_all().and_then(|v| v.to_vec1::<f32>()).ok()?;
                    let forward = match self.packed.get().and_then(Option::as_ref) {
                        Some(p) if p.precision() == Precision::F32 => p.clone(),
                        _ => PackedWeight::pack(&values, out, inner),
                    };
                    let transposed = PackedWeight::pack_transposed(&values, out, inner);
                    Some(Arc::new(TrainPacks { forward, transposed }))
                })
                .clone()
        } else {
            None
        };
        let op = FrozenMatmul { weight: w.clone(), packs, kernels: kernels.clone() };
        let y = x.contiguous()?.apply_op1(op)?;
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Inputs with more rows than this take the dequantize-then-GEMM path in quantized mode.
/// Measured with `verdict-train bench --weights quantized --prompt-tokens N` on SmolLM2, 2
/// cores: the kernel costs about 36 ms per row, the dequantize-then-GEMM path about 165 ms
/// flat, so the crossover lies between 4 and 8 rows.
pub const QUANTIZED_KERNEL_MAX_ROWS: usize = 4;

/// Rows `start..end` of a flattened input and the LoRA factors they go through.
#[derive(Debug, Clone, Copy)]
pub struct LoraRun<'a> {
    pub start: usize,
    pub end: usize,
    pub lora: &'a crate::lora::PackedLora,
}

/// `x Wᵀ` on `packed` through our kernels when they apply (an f32 input on the CPU), with
/// each run's LoRA delta added to its rows of the output. `None`: use candle's GEMM.
fn packed_product(
    x: &Tensor,
    packed: Option<&PackedWeight>,
    rows: usize,
    kernels: &CpuKernels,
    runs: &[LoraRun],
) -> Result<Option<Tensor>> {
    let Some(packed) = packed else { return Ok(None) };
    if !kernels.enabled() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (out, inner) = packed.dims();
    let Some(tiling) = kernels.tiling(packed.precision(), out, inner, rows) else { return Ok(None) };
    if x.dim(candle_core::D::Minus1)? != inner {
        candle_core::bail!("linear: input has {} features, weight expects {inner}", x.dim(candle_core::D::Minus1)?)
    }
    let x = x.contiguous()?;
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(values)) = &*storage else { return Ok(None) };
        let x = &values[layout.start_offset()..][..rows * inner];
        let mut y = packed.matmul_t(x, rows, &tiling);
        for run in runs {
            if run.start > run.end
                || run.end > rows
                || run.lora.a.dims().1 != inner
                || run.lora.b_scaled.dims().0 != out
            {
                candle_core::bail!(
                    "linear: LoRA run {}..{} does not fit [{rows}, {inner}] -> {out}",
                    run.start,
                    run.end
                )
            }
            let n = run.end - run.start;
            run.lora.add_delta(
                &x[run.start * inner..run.end * inner],
                n,
                &mut y[run.start * out..run.end * out],
                kernels,
            );
        }
        y
    };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("a tensor with features has a last dimension") = out;
    Ok(Some(Tensor::from_vec(y, dims, x.device())?))
}

/// `x Wᵀ` through the f32 kernels with `w` packed for this call only (small matrices such as
/// LoRA factors, whose values may change between calls), else through [`matmul_wt`].
pub(crate) fn matmul_wt_packed_once(x: &Tensor, w: &Tensor, kernels: &CpuKernels) -> Result<Tensor> {
    if !kernels.enabled() || !w.device().is_cpu() || w.dtype() != DType::F32 {
        return matmul_wt(x, w);
    }
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
    let (out, inner) = w.dims2()?;
    let packed = PackedWeight::pack(&w.flatten_all()?.to_vec1::<f32>()?, out, inner);
    let f32_kernels = CpuKernels { precision: Precision::F32, ..kernels.clone() };
    match packed_product(x, Some(&packed), rows, &f32_kernels, &[])? {
        Some(y) => Ok(y),
        None => matmul_wt(x, w),
    }
}

/// `x Wᵀ` for `x` of any rank `[.., in]` and `w` `[out, in]`, as one 2-D matmul.
pub(crate) fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let (rows, inner) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
    let (out, _) = w.dims2()?;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(out);
    y.reshape(out_dims)
}

/// `x Wᵀ` with a frozen `W`: the backward pass yields `∂L/∂x = g W` and nothing for `W`.
struct FrozenMatmul {
    weight: Tensor,
    /// f32 panels of `W` and `Wᵀ` where our kernels run (else candle's matmul).
    packs: Option<Arc<TrainPacks>>,
    kernels: CpuKernels,
}

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(&self, x: &S, x_layout: &Layout, w: &S, w_layout: &Layout) -> Result<(S, Shape)> {
        let dims = x_layout.dims();
        let inner = dims[dims.len() - 1];
        let rows = x_layout.shape().elem_count() / inner.max(1);
        let (out, w_in) = w_layout.shape().dims2()?;
        if w_in != inner {
            candle_core::bail!("frozen matmul: input has {inner} features, weight expects {w_in}")
        }
        let Some((x_start, _)) = x_layout.contiguous_offsets() else {
            candle_core::bail!("frozen matmul: input must be contiguous")
        };
        let lhs = Layout::contiguous_with_offset((rows, inner), x_start);
        let rhs = w_layout.transpose(0, 1)?;
        let y = x.matmul(w, (1, rows, out, inner), &lhs, &rhs)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(out);
        Ok((y, Shape::from(out_dims)))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if let (Some(p), CpuStorage::F32(values)) = (&self.packs, x) {
            if let Some((start, end)) = layout.contiguous_offsets() {
                let dims = layout.dims();
                let inner = dims[dims.len() - 1];
                let rows = (end - start) / inner.max(1);
                let (out, _) = p.forward.dims();
                if let Some(t) = self.kernels.tiling(Precision::F32, out, inner, rows) {
                    let y = p.forward.matmul_t(&values[start..end], rows, &t);
                    let mut out_dims = dims[..dims.len() - 1].to_vec();
                    out_dims.push(out);
                    return Ok((CpuStorage::F32(y), Shape::from(out_dims)));
                }
            }
        }
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        match &*w_storage {
            Storage::Cpu(w) => self.fwd(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen matmul: weight and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, layout: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        match &*w_storage {
            Storage::Cuda(w) => self.fwd(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen matmul: weight and input on different devices"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let dims = grad_y.dims();
        let out = dims[dims.len() - 1];
        let rows = grad_y.elem_count() / out.max(1);
        let (_, inner) = self.weight.dims2()?;
        let mut in_dims = dims[..dims.len() - 1].to_vec();
        in_dims.push(inner);
        if let Some(p) = &self.packs {
            if grad_y.device().is_cpu() && grad_y.dtype() == DType::F32 {
                if let Some(t) = self.kernels.tiling(Precision::F32, inner, out, rows) {
                    let g = grad_y.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                    let gx = p.transposed.matmul_t(&g, rows, &t);
                    return Ok(Some(Tensor::from_vec(gx, in_dims, grad_y.device())?));
                }
            }
        }
        let grad_x = grad_y.reshape((rows, out))?.matmul(&self.weight)?;
        Ok(Some(grad_x.reshape(in_dims)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::PackedLora;
    use candle_core::Device;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `x Wᵀ + b` with `s x Aᵀ Bᵀ` added to rows `lo..hi`, in f64 loops.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        a: &[f32],
        bb: &[f32],
        s: f64,
        dims: [usize; 4],
        lo: usize,
        hi: usize,
    ) -> Vec<f64> {
        let [rows, out, inner, rank] = dims;
        let mut y = vec![0f64; rows * out];
        for r in 0..rows {
            let z: Vec<f64> = (0..rank)
                .map(|j| (0..inner).map(|k| x[r * inner + k] as f64 * a[j * inner + k] as f64).sum())
                .collect();
            for o in 0..out {
                let mut v: f64 = (0..inner).map(|k| x[r * inner + k] as f64 * w[o * inner + k] as f64).sum::<f64>();
                v += b[o] as f64;
                if (lo..hi).contains(&r) {
                    v += s * (0..rank).map(|j| z[j] * bb[o * rank + j] as f64).sum::<f64>();
                }
                y[r * out + o] = v;
            }
        }
        y
    }

    #[test]
    fn fused_lora_matches_plain_loops() {
        let kernels = CpuKernels::auto();
        if !kernels.enabled() {
            eprintln!("skipped: our kernels do not run on this CPU");
            return;
        }
        let (rows, out, inner, rank, s) = (9, 37, 70, 3, 0.75f32);
        let (x, w, bias) = (values(rows * inner, 1), values(out * inner, 2), values(out, 3));
        let (a, bb) = (values(rank * inner, 4), values(out * rank, 5));
        let dev = Device::Cpu;
        let linear = FrozenLinear::new(
            BaseWeight::Dense(Tensor::from_vec(w.clone(), (out, inner), &dev).unwrap()),
            Some(Tensor::from_vec(bias.clone(), out, &dev).unwrap()),
        )
        .unwrap();
        let scaled: Vec<f32> = bb.iter().map(|v| v * s).collect();
        let lora =
            PackedLora { a: PackedWeight::pack(&a, rank, inner), b_scaled: PackedWeight::pack(&scaled, out, rank) };
        let xt = Tensor::from_vec(x.clone(), (1, rows, inner), &dev).unwrap();
        let y = linear
            .forward_inference_lora(&xt, &[LoraRun { start: 2, end: 7, lora: &lora }], &kernels)
            .unwrap()
            .unwrap();
        assert_eq!(y.dims(), &[1, rows, out]);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = reference(&x, &w, &bias, &a, &bb, s as f64, [rows, out, inner, rank], 2, 7);
        let worst = y.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
        assert!(worst < 1e-4, "fused LoRA product off by {worst}");
        // Rows outside the run get no delta, and the delta is not negligible inside it.
        let plain = reference(&x, &w, &bias, &a, &bb, 0.0, [rows, out, inner, rank], 0, 0);
        assert!((0..out).all(|o| (y[o] as f64 - plain[o]).abs() < 1e-4));
        assert!((2 * out..7 * out).any(|i| (y[i] as f64 - plain[i]).abs() > 1e-2));
        // A run that does not fit the input is refused, not read out of bounds.
        assert!(linear.forward_inference_lora(&xt, &[LoraRun { start: 5, end: 10, lora: &lora }], &kernels).is_err());
    }
}
