//! Frozen base projections (`y = x Wᵀ + b`) in dense or quantized form.
//!
//! Base weights never train. candle's matmul backward always computes the gradient of both
//! operands, so a plain `x.matmul(w)` on the training path would allocate and compute a
//! full-size gradient for every frozen weight. [`FrozenMatmul`] is a custom op whose backward
//! returns only the input gradient.

use crate::packed::PackedWeight;
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
}

impl BaseWeight {
    /// `(out, in)` of the matrix.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Quantized(q) => q.shape().dims2(),
        }
    }

    /// The weights as a dense tensor of `dtype` (dequantized if needed).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_dtype(dtype),
            Self::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
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
    /// Dense f32 weights on the CPU, packed for [`crate::packed`] on the first inference call
    /// that can use them (shared by clones; `None` inside: this weight cannot be packed).
    packed: Arc<OnceLock<Option<PackedWeight>>>,
}

impl FrozenLinear {
    /// Wraps a base weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: BaseWeight, bias: Option<Tensor>) -> Result<Self> {
        let qmatmul = match &weight {
            BaseWeight::Quantized(q) => Some(Arc::new(QMatMul::from_arc(q.clone())?)),
            BaseWeight::Dense(_) => None,
        };
        Ok(Self { weight, bias, qmatmul, packed: Arc::new(OnceLock::new()) })
    }

    /// The base weight.
    pub fn weight(&self) -> &BaseWeight {
        &self.weight
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Inference forward: fast kernels, no gradient bookkeeping needed.
    ///
    /// candle's quantized kernel computes one row at a time with no cache blocking: best for
    /// decoding a few tokens, about 10x slower than the dense GEMM for a prompt. Inputs of more
    /// than [`QUANTIZED_KERNEL_MAX_ROWS`] rows therefore dequantize the blocks on the fly and use
    /// the dense GEMM; the weights stay quantized in memory either way.
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        let y = match (&self.weight, &self.qmatmul) {
            (BaseWeight::Quantized(q), Some(_)) if rows > quantized_kernel_max_rows() => {
                matmul_wt(x, &q.dequantize(&q.device())?.to_dtype(x.dtype())?)?
            }
            (_, Some(q)) => q.forward(x)?,
            (BaseWeight::Dense(w), None) => match packed_product(x, w, rows, &self.packed, crate::packed::format())? {
                Some(y) => y,
                None => matmul_wt(x, w)?,
            },
            (BaseWeight::Quantized(_), None) => unreachable!("quantized weights always get a QMatMul"),
        };
        self.add_bias(y)
    }

    /// [`FrozenLinear::forward_inference`] plus LoRA deltas in the same buffers: rows
    /// `start..end` (of the flattened `[rows, in]` input) get `x Aᵀ (s B)ᵀ` of their packed
    /// factors. No tensor op per adapter: the base product, the two rank-r products and the sum
    /// run on one output buffer. `None` where the packed kernel does not take this weight or
    /// input (quantized or non-f32 weights, another device): the caller adds the deltas itself.
    pub fn forward_inference_lora(&self, x: &Tensor, runs: &[LoraRun]) -> Result<Option<Tensor>> {
        let BaseWeight::Dense(w) = &self.weight else { return Ok(None) };
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        match packed_product_with(x, w, rows, &self.packed, crate::packed::format(), runs)? {
            Some(y) => Ok(Some(self.add_bias(y)?)),
            None => Ok(None),
        }
    }

    /// Training forward: gradient flows to `x` only, never to the frozen weight.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let BaseWeight::Dense(w) = &self.weight else {
            candle_core::bail!("training needs dense weights: load the model in dense mode")
        };
        let y = x.contiguous()?.apply_op1(FrozenMatmul { weight: w.clone() })?;
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Default for [`quantized_kernel_max_rows`]. Measured with `verdict-train bench --weights
/// quantized --prompt-tokens N` on SmolLM2, 2 cores: the kernel costs about 36 ms per row, the
/// dequantize-then-GEMM path about 165 ms flat, so the crossover lies between 4 and 8 rows.
pub const QUANTIZED_KERNEL_MAX_ROWS: usize = 4;

/// Inputs with more rows than this take the dequantize-then-GEMM path in quantized mode;
/// `VERDICT_QUANTIZED_KERNEL_MAX_ROWS` overrides it (for benchmarking the crossover).
pub fn quantized_kernel_max_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("VERDICT_QUANTIZED_KERNEL_MAX_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(QUANTIZED_KERNEL_MAX_ROWS)
    })
}

/// Default for [`packed_max_rows`] with the AVX2 kernel. Measured with
/// `examples/packed_bench.rs` (docs/benchmarks.md): the packed kernel is 1.05-5.6x faster than
/// the general GEMM up to 128 rows on the projections (a request is a few dozen), and 0.92-1.78x
/// at 512, where the general GEMM's own packing pays.
pub const PACKED_MAX_ROWS: usize = 256;

/// Default for [`packed_max_rows`] with the AVX-512 kernel ([`crate::packed::avx512_f32`]):
/// 1.02-1.5x the general GEMM on Qwen's projections at 272 and 512 rows (docs/benchmarks.md),
/// so a padding-free batch of several requests stays on it.
pub const PACKED_MAX_ROWS_AVX512: usize = 512;

/// Inputs with more rows than this take the general GEMM; `VERDICT_PACKED_MAX_ROWS` overrides it.
pub fn packed_max_rows() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| {
        let default = if crate::packed::avx512_f32() { PACKED_MAX_ROWS_AVX512 } else { PACKED_MAX_ROWS };
        std::env::var("VERDICT_PACKED_MAX_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    })
}

/// Whether the packed kernel runs at all: a CPU with AVX2/FMA and `VERDICT_PACKED` not `0`
/// (`VERDICT_PACKED=0` gives the general GEMM everywhere, for comparison).
pub fn packed_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| crate::packed::supported() && std::env::var("VERDICT_PACKED").map_or(true, |v| v != "0"))
}

/// `x Wᵀ` through the packed kernel when it applies: f32 on a CPU with AVX2/FMA, at most
/// [`packed_max_rows`] rows in the f32 format (any number in bf16), `VERDICT_PACKED` not `0`;
/// `cache` holds `w` packed in `format` (filled on first use). `None`: use the general GEMM.
fn packed_product(
    x: &Tensor,
    w: &Tensor,
    rows: usize,
    cache: &OnceLock<Option<PackedWeight>>,
    format: crate::packed::Format,
) -> Result<Option<Tensor>> {
    packed_product_with(x, w, rows, cache, format, &[])
}

/// Rows `start..end` of a flattened input and the LoRA factors they go through.
#[derive(Debug, Clone, Copy)]
pub struct LoraRun<'a> {
    pub start: usize,
    pub end: usize,
    pub lora: &'a crate::lora::PackedLora,
}

/// [`packed_product`] with each run's LoRA delta added to its rows of the output.
fn packed_product_with(
    x: &Tensor,
    w: &Tensor,
    rows: usize,
    cache: &OnceLock<Option<PackedWeight>>,
    format: crate::packed::Format,
    runs: &[LoraRun],
) -> Result<Option<Tensor>> {
    // bf16 applies at every size, so an input's answer does not depend on its batch; f32 hands
    // large inputs to the general GEMM (the same products up to summation order).
    if (rows > packed_max_rows() && format == crate::packed::Format::F32)
        || !packed_enabled()
        || !x.device().is_cpu()
        || !w.device().is_cpu()
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
    {
        return Ok(None);
    }
    let packed = cache.get_or_init(|| {
        let (out, inner) = w.dims2().ok()?;
        let values = w.flatten_all().and_then(|v| v.to_vec1::<f32>()).ok()?;
        Some(PackedWeight::pack_as(&values, out, inner, format))
    });
    let Some(packed) = packed else { return Ok(None) };
    let (out, inner) = packed.dims();
    if x.dim(candle_core::D::Minus1)? != inner {
        candle_core::bail!("linear: input has {} features, weight expects {inner}", x.dim(candle_core::D::Minus1)?)
    }
    let x = x.contiguous()?;
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(values)) = &*storage else { return Ok(None) };
        let x = &values[layout.start_offset()..][..rows * inner];
        let mut y = packed.matmul_t(x, rows);
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
            run.lora.add_delta(&x[run.start * inner..run.end * inner], n, &mut y[run.start * out..run.end * out]);
        }
        y
    };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("a tensor with features has a last dimension") = out;
    Ok(Some(Tensor::from_vec(y, dims, x.device())?))
}

/// `x Wᵀ` through the packed kernel with `w` packed for this call only (small matrices such as
/// LoRA factors, whose values may change between calls), else through [`matmul_wt`].
pub(crate) fn matmul_wt_packed_once(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
    match packed_product(x, w, rows, &OnceLock::new(), crate::packed::Format::F32)? {
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
        let grad_x = grad_y.reshape((rows, out))?.matmul(&self.weight)?;
        let mut in_dims = dims[..dims.len() - 1].to_vec();
        in_dims.push(inner);
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
        if !packed_enabled() {
            eprintln!("skipped: the packed kernel does not run on this CPU");
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
        let y = linear.forward_inference_lora(&xt, &[LoraRun { start: 2, end: 7, lora: &lora }]).unwrap().unwrap();
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
        assert!(linear.forward_inference_lora(&xt, &[LoraRun { start: 5, end: 10, lora: &lora }]).is_err());
    }
}
