//! Frozen weights packed once for the CPU kernels, and the loop nests that multiply them.
//!
//! A general GEMM repacks its right-hand matrix on every call; at the few dozen rows of a
//! classification request that copy costs as much as the arithmetic. Frozen weights never
//! change, so [`PackedWeight`] lays them out once in the order the micro-kernels read them:
//! panels of [`NR`] = 16 output columns, each `k`-major (`panel[k][j] = W[p·16 + j, k]`, zero
//! beyond the last column), in one of three precisions:
//!
//! - [`Precision::F32`]: f32 values; products exact up to summation order.
//! - [`Precision::Bf16`]: pairs of bf16 `(W[j, 2i], W[j, 2i+1])` per 32-bit lane; inputs rounded to
//!   bf16 once per call; f32 sums.
//! - [`Precision::Int8`]: quads of i8 per lane, one scale per output column (`max |w| / 127`) and
//!   the column's sum; inputs quantized per row to u8 with a scale and zero point in two passes
//!   (the row, then its rounding error); i32 sums.
//!
//! Low-precision panels are padded to whole AMX tiles in `k` (16 lanes of pairs or quads), so
//! the same bytes serve the AVX-512 kernels and AMX. A product is driven as blocks of rows ×
//! groups of panels split over rayon's threads, each thread writing its own columns; the tile
//! shape and blocking ([`Tiling`]) come from the caller's plan ([`super::plan`]).

use super::amx::TILE_ROWS;
use super::caps::Caps;
use super::layout::Prefetch;
use super::lowp::{Dequant, LowpKind};
use super::store::Store;
use super::KernelError;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use super::layout::NR;

/// How products of frozen weights are computed on the CPU (`--cpu-matmul`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 weights and inputs.
    #[default]
    F32,
    /// bf16 weights, f32 sums; the inputs rounded to bf16 (`vdpbf16ps`, AMX) or kept in f32
    /// (the widening kernels, [`super::widen`]), whichever the plan measured faster.
    Bf16,
    /// int8 weights per output channel, inputs as two u8 passes per row, i32 sums.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, KernelError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "int8" => Ok(Self::Int8),
            other => Err(KernelError::UnknownPrecision { name: other.to_string(), or_auto: false }),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        })
    }
}

impl Precision {
    /// Whether `caps` runs this precision, or why not.
    pub fn check(self, caps: &Caps) -> Result<(), KernelError> {
        let ok = match self {
            Self::F32 => caps.avx2,
            Self::Bf16 => caps.avx2 || caps.amx,
            Self::Int8 => caps.avx512_vnni || caps.avx_vnni || caps.amx,
        };
        if ok {
            Ok(())
        } else {
            Err(KernelError::Unsupported {
                precision: self,
                needs: match self {
                    Self::F32 => "AVX2 and FMA",
                    Self::Bf16 => "AVX2 and FMA, or AMX",
                    Self::Int8 => "AVX512-VNNI, AVX-VNNI or AMX",
                },
                has: caps.describe(),
            })
        }
    }

    /// The kernels that run this precision on `caps`, fastest family first.
    pub fn kernels(self, caps: &Caps) -> Vec<Kernel> {
        let mut v = Vec::new();
        match self {
            Self::F32 => {
                if caps.avx512 {
                    v.push(Kernel::F32Avx512);
                }
                if caps.avx2 {
                    v.push(Kernel::F32Avx2);
                }
            }
            Self::Bf16 => {
                if caps.amx {
                    v.push(Kernel::Bf16Amx);
                }
                if caps.avx512_bf16 {
                    v.push(Kernel::Bf16Avx512);
                }
                if caps.avx512 {
                    v.push(Kernel::Bf16Widen512);
                }
                if caps.avx2 {
                    v.push(Kernel::Bf16Widen256);
                }
            }
            Self::Int8 => {
                if caps.amx {
                    v.push(Kernel::Int8Amx);
                }
                if caps.avx512_vnni {
                    v.push(Kernel::Int8Avx512);
                }
                if caps.avx_vnni {
                    v.push(Kernel::Int8Avx256);
                }
            }
        }
        v
    }
}

/// A kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kernel {
    /// AVX2 + FMA, 8-lane f32.
    F32Avx2,
    /// AVX-512 F, 16-lane f32.
    F32Avx512,
    /// AVX512-BF16 `vdpbf16ps`.
    Bf16Avx512,
    /// AMX `tdpbf16ps`.
    Bf16Amx,
    /// bf16 weights widened to f32 in registers, f32 inputs and FMAs (AVX-512 F;
    /// [`super::widen`]).
    Bf16Widen512,
    /// The same on AVX2 + FMA.
    Bf16Widen256,
    /// AVX-VNNI `vpdpbusd` on 256-bit registers.
    Int8Avx256,
    /// AVX512-VNNI `vpdpbusd`.
    Int8Avx512,
    /// AMX `tdpbusd`.
    Int8Amx,
}

impl Kernel {
    /// The precision of the panels this kernel reads.
    pub fn precision(self) -> Precision {
        match self {
            Self::F32Avx2 | Self::F32Avx512 => Precision::F32,
            Self::Bf16Avx512 | Self::Bf16Amx | Self::Bf16Widen512 | Self::Bf16Widen256 => Precision::Bf16,
            Self::Int8Avx256 | Self::Int8Avx512 | Self::Int8Amx => Precision::Int8,
        }
    }

    /// Whether `caps` runs it.
    pub fn runs_on(self, caps: &Caps) -> bool {
        match self {
            Self::F32Avx2 | Self::Bf16Widen256 => caps.avx2,
            Self::F32Avx512 | Self::Bf16Widen512 => caps.avx512,
            Self::Bf16Avx512 => caps.avx512_bf16,
            Self::Int8Avx512 => caps.avx512_vnni,
            Self::Int8Avx256 => caps.avx_vnni,
            Self::Bf16Amx | Self::Int8Amx => caps.amx,
        }
    }

    /// Whether the kernel is AMX (tile shapes are fixed; `rows`/`panels` of a [`Tiling`] unused).
    pub fn is_amx(self) -> bool {
        matches!(self, Self::Bf16Amx | Self::Int8Amx)
    }

    /// Whether the kernel takes an inner block (`kc`): it sums in f32 and adds block after block
    /// to `y` (the int8 epilogue and AMX's whole-`k` loop do not).
    pub fn blocks_inner(self) -> bool {
        matches!(self, Self::F32Avx2 | Self::F32Avx512 | Self::Bf16Avx512 | Self::Bf16Widen512 | Self::Bf16Widen256)
    }

    /// Whether the kernel widens bf16 weights to f32 (and takes its inputs unrounded).
    pub fn widens(self) -> bool {
        matches!(self, Self::Bf16Widen512 | Self::Bf16Widen256)
    }

    /// Whether `rows × panels` fits this kernel's registers.
    pub fn fits(self, rows: usize, panels: usize) -> bool {
        match self {
            Self::F32Avx2 => super::f32::fits(false, rows, panels),
            Self::F32Avx512 => super::f32::fits(true, rows, panels),
            Self::Bf16Avx512 => super::lowp::fits(LowpKind::Bf16Avx512, rows, panels),
            Self::Int8Avx512 => super::lowp::fits(LowpKind::Int8Avx512, rows, panels),
            Self::Int8Avx256 => super::lowp::fits(LowpKind::Int8Avx256, rows, panels),
            Self::Bf16Widen512 => super::widen::fits(true, rows, panels),
            Self::Bf16Widen256 => super::widen::fits(false, rows, panels),
            Self::Bf16Amx | Self::Int8Amx => true,
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32Avx2 => "f32-avx2",
            Self::F32Avx512 => "f32-avx512",
            Self::Bf16Avx512 => "bf16-avx512",
            Self::Bf16Amx => "bf16-amx",
            Self::Bf16Widen512 => "bf16-widen512",
            Self::Bf16Widen256 => "bf16-widen256",
            Self::Int8Avx256 => "int8-avxvnni",
            Self::Int8Avx512 => "int8-avx512vnni",
            Self::Int8Amx => "int8-amx",
        })
    }
}

/// One product's kernel, tile shape and blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tiling {
    pub kernel: Kernel,
    /// Rows per tile (vector kernels).
    pub rows: u8,
    /// Panels of 16 columns per tile (vector kernels).
    pub panels: u8,
    /// Inner-dimension block in units (values, pairs, quads); 0: all of it. Kernels that sum
    /// in f32 only ([`Kernel::blocks_inner`]).
    pub kc: u16,
    /// Rows per block of the outer loop; 0: all rows at once (vector kernels), as many as keep
    /// about a MiB of input rows in cache (AMX, whose blocks are whole 32-row pairs of tiles).
    pub mc: u16,
}

impl std::fmt::Display for Tiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kernel.is_amx() {
            write!(f, "{}", self.kernel)?;
            if self.mc > 0 {
                write!(f, " mc{}", self.mc)?;
            }
            Ok(())
        } else {
            write!(f, "{} {}x{}", self.kernel, self.rows, self.panels as usize * NR)?;
            if self.kc > 0 {
                write!(f, " kc{}", self.kc)?;
            }
            if self.mc > 0 {
                write!(f, " mc{}", self.mc)?;
            }
            Ok(())
        }
    }
}

impl Tiling {
    /// A reasonable tiling of `kernel` before any measurement.
    pub fn default_for(kernel: Kernel) -> Self {
        let (rows, panels) = match kernel {
            Kernel::F32Avx2 | Kernel::Bf16Widen256 => (6, 1),
            Kernel::F32Avx512 | Kernel::Bf16Avx512 | Kernel::Bf16Widen512 | Kernel::Int8Avx512 => (12, 2),
            Kernel::Int8Avx256 => (6, 1),
            Kernel::Bf16Amx | Kernel::Int8Amx => (16, 2),
        };
        Self { kernel, rows, panels, kc: 0, mc: 0 }
    }

    /// Whether this tiling can run on `caps` over panels of `precision`.
    pub fn valid(&self, precision: Precision, caps: &Caps) -> bool {
        self.kernel.precision() == precision
            && self.kernel.runs_on(caps)
            && self.kernel.fits(self.rows as usize, self.panels as usize)
            && (self.kc == 0 || self.kernel.blocks_inner())
    }
}

/// What a weight is packed as: a precision and, for int8, whether its rounding error is packed
/// beside it as a second int8 matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Panels {
    pub precision: Precision,
    /// Int8 only. With it a weight reads back within 1/64,000 of its row's peak and costs two
    /// bytes; without it (the `--weights quantized` panels, one byte) within 1/254.
    pub residual: bool,
}

impl Panels {
    /// Panels of `precision` as dense weights get them (int8 with its residual).
    pub fn of(precision: Precision) -> Self {
        Self { precision, residual: precision == Precision::Int8 }
    }

    /// One int8 matrix per weight, no residual: the panels of `--weights quantized`.
    pub const INT8_ALONE: Self = Self { precision: Precision::Int8, residual: false };

    /// The panels kernels of `precision` take a weight as: dense values in that precision (int8
    /// with its residual); quantized blocks as one int8 matrix on int8 kernels, and not at all
    /// on f32 or bf16 kernels (`None`: they stay blocks, on candle's kernels).
    pub fn for_weight(precision: Precision, quantized: bool) -> Option<Self> {
        match (quantized, precision) {
            (false, p) => Some(Self::of(p)),
            (true, Precision::Int8) => Some(Self::INT8_ALONE),
            (true, _) => None,
        }
    }

    /// The panels a weight already packed as `p` has.
    pub fn of_weight(p: &PackedWeight) -> Self {
        Self { precision: p.precision, residual: p.residual.is_some() }
    }
}

impl std::fmt::Display for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.precision, self.residual) {
            (Precision::Int8, false) => f.write_str("int8 (one matrix per weight)"),
            (p, _) => p.fmt(f),
        }
    }
}

/// A weight matrix `W [out, inner]` packed for `y = x Wᵀ`.
#[derive(Clone)]
pub struct PackedWeight {
    out: usize,
    inner: usize,
    precision: Precision,
    /// `n_panels · units · 16` lanes: f32 bits, bf16 pairs or i8 quads.
    data: Store<u32>,
    /// Int8: per output column (padded to whole panels), the scale and the sum of its weights.
    scale: Store<f32>,
    colsum: Store<i32>,
    /// Int8: the weight's rounding error, packed as a second int8 weight with its own scales,
    /// so that `W ≈ s₁ q₁ + s₂ q₂` within `s₂ / 2` (about 1/64,000 of a column's peak). One
    /// int8 matrix flips classifier answers where bf16 does not (docs/results.md, "Residual
    /// weights"); the residual's product is taken on the input's first pass only.
    residual: Option<Box<PackedWeight>>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight [{}, {}] {}", self.out, self.inner, self.precision)
    }
}

/// Lanes of `k` per panel row for `inner` values: values (f32), pairs or quads, padded to whole
/// AMX tiles (16 rows) for the low precisions.
pub fn units(precision: Precision, inner: usize) -> usize {
    match precision {
        Precision::F32 => inner,
        Precision::Bf16 => inner.div_ceil(2).div_ceil(TILE_ROWS) * TILE_ROWS,
        Precision::Int8 => inner.div_ceil(4).div_ceil(TILE_ROWS) * TILE_ROWS,
    }
}

/// `a` and `b` rounded to bf16 (nearest, ties to even), `a` in the low half.
pub(crate) fn bf16_pair(a: f32, b: f32) -> u32 {
    u32::from(half::bf16::from_f32(a).to_bits()) | (u32::from(half::bf16::from_f32(b).to_bits()) << 16)
}

/// The int8 code of `v` at `scale` (round to nearest, ties away, clamped to ±127).
fn quantize_i8(v: f32, inv_scale: f32) -> i8 {
    (v * inv_scale).round().clamp(-127.0, 127.0) as i8
}

impl PackedWeight {
    /// Packs `w`, row-major `[out, inner]`, as f32 panels.
    pub fn pack(w: &[f32], out: usize, inner: usize) -> Self {
        Self::pack_as(w, out, inner, Precision::F32)
    }

    /// Packs `w`, row-major `[out, inner]`, in `precision` (int8 with its residual).
    pub fn pack_as(w: &[f32], out: usize, inner: usize, precision: Precision) -> Self {
        Self::pack_kind(w, out, inner, Panels::of(precision))
    }

    /// Packs `w`, row-major `[out, inner]`, as `kind` says.
    pub fn pack_kind(w: &[f32], out: usize, inner: usize, kind: Panels) -> Self {
        assert_eq!(w.len(), out * inner, "weight of {} values is not [{out}, {inner}]", w.len());
        let mut packed = Self::pack_with(out, inner, kind.precision, |o, k| w[o * inner + k]);
        if kind.residual && kind.precision == Precision::Int8 {
            // The error of each value as packed, read back from the panels (no dequantized copy).
            let error = |o: usize, k: usize| w[o * inner + k] - packed.value(o, k);
            packed.residual = Some(Box::new(Self::pack_with(out, inner, Precision::Int8, error)));
        }
        packed
    }

    /// Packs `Wᵀ` of `w` (row-major `[out, inner]`) as f32 panels: the weight of `g W` (the input
    /// gradient of `x Wᵀ`), `[inner, out]`.
    pub fn pack_transposed(w: &[f32], out: usize, inner: usize) -> Self {
        assert_eq!(w.len(), out * inner, "weight of {} values is not [{out}, {inner}]", w.len());
        Self::pack_with(inner, out, Precision::F32, |o, k| w[k * inner + o])
    }

    /// Packs the `[out, inner]` matrix whose entry `(o, k)` is `at(o, k)`.
    fn pack_with(out: usize, inner: usize, precision: Precision, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let n_panels = out.div_ceil(NR);
        let u = units(precision, inner);
        let mut data = vec![0u32; n_panels * u * NR];
        let mut scale = vec![0f32; n_panels * NR];
        let mut colsum = vec![0i32; n_panels * NR];
        data.par_chunks_mut(u * NR).zip(scale.par_chunks_mut(NR)).zip(colsum.par_chunks_mut(NR)).enumerate().for_each(
            |(p, ((panel, scale), colsum))| {
                for j in 0..NR.min(out - p * NR) {
                    let o = p * NR + j;
                    match precision {
                        Precision::F32 => {
                            for k in 0..inner {
                                panel[k * NR + j] = at(o, k).to_bits();
                            }
                        }
                        Precision::Bf16 => {
                            for i in 0..inner.div_ceil(2) {
                                let b = if 2 * i + 1 < inner { at(o, 2 * i + 1) } else { 0.0 };
                                panel[i * NR + j] = bf16_pair(at(o, 2 * i), b);
                            }
                        }
                        Precision::Int8 => {
                            let max = (0..inner).map(|k| at(o, k).abs()).fold(0f32, f32::max);
                            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
                            let inv = 1.0 / s;
                            let mut sum = 0i32;
                            for i in 0..inner.div_ceil(4) {
                                let mut lane = 0u32;
                                for b in 0..4 {
                                    let k = 4 * i + b;
                                    if k < inner {
                                        let q = quantize_i8(at(o, k), inv);
                                        sum += i32::from(q);
                                        lane |= u32::from(q as u8) << (8 * b);
                                    }
                                }
                                panel[i * NR + j] = lane;
                            }
                            scale[j] = s;
                            colsum[j] = sum;
                        }
                    }
                }
            },
        );
        let (scale, colsum) = match precision {
            Precision::Int8 => (Store::owned(scale), Store::owned(colsum)),
            _ => (Store::owned(Vec::new()), Store::owned(Vec::new())),
        };
        Self { out, inner, precision, data: Store::owned(data), scale, colsum, residual: None }
    }

    /// Reassembles a packed weight from its stored parts (a cache file): `None` if the parts do
    /// not have the lengths `[out, inner]` in `precision` needs, or a residual that is not an
    /// int8 weight of the same shape.
    pub(crate) fn from_parts(
        out: usize,
        inner: usize,
        precision: Precision,
        data: Store<u32>,
        scale: Store<f32>,
        colsum: Store<i32>,
        residual: Option<PackedWeight>,
    ) -> Option<Self> {
        let n_panels = out.div_ceil(NR);
        let lanes = n_panels * units(precision, inner) * NR;
        let int8 = precision == Precision::Int8;
        let cols = if int8 { n_panels * NR } else { 0 };
        let residual_fits = match &residual {
            Some(r) => int8 && r.residual.is_none() && r.dims() == (out, inner) && r.precision == precision,
            None => true,
        };
        (data.len() == lanes && scale.len() == cols && colsum.len() == cols && residual_fits).then(|| Self {
            out,
            inner,
            precision,
            data,
            scale,
            colsum,
            residual: residual.map(Box::new),
        })
    }

    /// The stored parts: panels, int8 scales and column sums (empty otherwise).
    pub(crate) fn parts(&self) -> (&[u32], &[f32], &[i32]) {
        (&self.data, &self.scale, &self.colsum)
    }

    /// This weight without its residual (a test's stand-in for an old or damaged pack).
    #[cfg(test)]
    pub(crate) fn without_residual(mut self) -> Self {
        self.residual = None;
        self
    }

    /// The int8 weight's rounding error, itself packed as int8 (`None` for f32 and bf16).
    pub(crate) fn residual(&self) -> Option<&PackedWeight> {
        self.residual.as_deref()
    }

    /// The packed weight of output columns `cols` only (rows of `W`), in the same precision
    /// with the same values: lanes, scales and sums are copied, nothing is rounded again.
    ///
    /// # Panics
    /// If a column is out of range.
    pub fn select_outputs(&self, cols: &[usize]) -> Self {
        let u = units(self.precision, self.inner);
        let n_panels = cols.len().div_ceil(NR);
        let mut data = vec![0u32; n_panels * u * NR];
        let int8 = self.precision == Precision::Int8;
        let mut scale = vec![0f32; if int8 { n_panels * NR } else { 0 }];
        let mut colsum = vec![0i32; scale.len()];
        for (n, &c) in cols.iter().enumerate() {
            assert!(c < self.out, "column {c} outside a weight of {} outputs", self.out);
            let (sp, sj) = (c / NR, c % NR);
            let (dp, dj) = (n / NR, n % NR);
            for i in 0..u {
                data[(dp * u + i) * NR + dj] = self.data[(sp * u + i) * NR + sj];
            }
            if int8 {
                scale[n] = self.scale[c];
                colsum[n] = self.colsum[c];
            }
        }
        Self {
            out: cols.len(),
            inner: self.inner,
            precision: self.precision,
            data: Store::owned(data),
            scale: Store::owned(scale),
            colsum: Store::owned(colsum),
            residual: self.residual.as_ref().map(|r| Box::new(r.select_outputs(cols))),
        }
    }

    /// The weight back as row-major `[out, inner]` f32: exact for f32 panels, the rounded or
    /// dequantized values (`q₁ s₁ + q₂ s₂`, with the residual) for bf16 and int8.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = self.unpack_one();
        if let Some(r) = &self.residual {
            w.iter_mut().zip(r.unpack_one()).for_each(|(w, e)| *w += e);
        }
        w
    }

    fn unpack_one(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inner];
        for (o, row) in w.chunks_mut(self.inner.max(1)).take(self.out).enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                *v = self.value(o, k);
            }
        }
        w
    }

    /// Entry `(o, k)` of this matrix alone (its residual not added), as the kernels read it.
    fn value(&self, o: usize, k: usize) -> f32 {
        let u = units(self.precision, self.inner);
        let lane = |i: usize| self.data[(o / NR * u + i) * NR + o % NR];
        match self.precision {
            Precision::F32 => f32::from_bits(lane(k)),
            Precision::Bf16 => f32::from_bits(((lane(k / 2) >> (16 * (k % 2))) & 0xffff) << 16),
            Precision::Int8 => f32::from(((lane(k / 4) >> (8 * (k % 4))) & 0xff) as u8 as i8) * self.scale[o],
        }
    }

    /// Whether the panels live in a memory map (a pack file) rather than on the heap.
    pub fn is_mapped(&self) -> bool {
        self.data.is_mapped()
    }

    /// `(out, inner)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inner)
    }

    /// How the panels are stored.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes of packed data.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
            + self.scale.len() * 4
            + self.colsum.len() * 4
            + self.residual.as_ref().map_or(0, |r| r.bytes())
    }

    /// `y = x Wᵀ` for `x` row-major `[rows, inner]`; returns `[rows, out]` row-major.
    ///
    /// # Panics
    /// If `x` is not `rows · inner` long, or `tiling` is not for this precision or CPU.
    pub fn matmul_t(&self, x: &[f32], rows: usize, tiling: &Tiling) -> Vec<f32> {
        if self.precision == Precision::Int8 && rows > 0 && self.out > 0 && self.inner > 0 {
            // The two passes' products land in one buffer twice the output's size; the first
            // half becomes the output and the rest is handed back in place (no copy, and no
            // third buffer: on SmolLM2's 49,152-word LM head, 2 MiB per scored input less).
            self.check_run(x, rows, tiling);
            let mut y = vec![0f32; 2 * rows * self.out];
            // SAFETY: the tiling runs on this CPU and the buffers have the packed shapes
            // (`check_run`).
            unsafe { self.int8_halves(x, rows, &mut y, tiling) };
            let (first, second) = y.split_at_mut(rows * self.out);
            first.iter_mut().zip(second.iter()).for_each(|(a, b)| *a += b);
            y.truncate(rows * self.out);
            y.shrink_to_fit();
            return y;
        }
        let mut y = vec![0f32; rows * self.out];
        self.matmul_t_into(x, rows, &mut y, false, tiling);
        y
    }

    /// Panics unless `x` is `[rows, inner]` and `tiling` runs this precision on this CPU.
    fn check_run(&self, x: &[f32], rows: usize, tiling: &Tiling) {
        assert_eq!(x.len(), rows * self.inner, "input of {} values is not [{rows}, {}]", x.len(), self.inner);
        let caps = Caps::detect();
        assert!(
            tiling.valid(self.precision, &caps),
            "tiling {tiling} does not run {} panels on this CPU ({})",
            self.precision,
            caps.describe()
        );
    }

    /// The int8 product's two halves into `parts` (`[2 rows, out]`): each input row's first
    /// 8-bit pass times the weight (plus the weight's rounding error, where it is kept) in
    /// rows `0..rows`, its rounding error's pass in rows `rows..2 rows`. Their sum is `x Wᵀ`.
    ///
    /// # Safety
    /// `tiling` must run int8 panels on this CPU; `x` is `[rows, inner]` and `parts`
    /// `2 rows · out` long, both non-empty.
    unsafe fn int8_halves(&self, x: &[f32], rows: usize, parts: &mut [f32], tiling: &Tiling) {
        debug_assert_eq!(parts.len(), 2 * rows * self.out);
        let u = units(self.precision, self.inner);
        let n_panels = self.out.div_ceil(NR);
        // Each row and its rounding error as two rows of one product, then summed.
        let q = split_rows(x, rows, self.inner, u);
        let dq = Dequant {
            zx: q.zero.as_ptr(),
            sx: q.scale.as_ptr(),
            colsum: self.colsum.as_ptr(),
            sw: self.scale.as_ptr(),
        };
        let halves = Job {
            rows: 2 * rows,
            out: self.out,
            units: u,
            n_panels,
            y: SendPtr(parts.as_mut_ptr()),
            accumulate: false,
        };
        self.run_lowp(&halves, tiling, &q.codes, Some(&dq));
        // The weight's rounding error times the input's first pass (its second pass times the
        // error is below both roundings).
        if let Some(r) = &self.residual {
            let dq = Dequant { colsum: r.colsum.as_ptr(), sw: r.scale.as_ptr(), ..dq };
            let first = Job { rows, accumulate: true, ..halves };
            r.run_lowp(&first, tiling, &q.codes, Some(&dq));
        }
    }

    /// `y (+)= x Wᵀ` into `y` (`[rows, out]`), adding to what is there when `accumulate`.
    ///
    /// # Panics
    /// As [`PackedWeight::matmul_t`], and if `y` is not `rows · out` long.
    pub fn matmul_t_into(&self, x: &[f32], rows: usize, y: &mut [f32], accumulate: bool, tiling: &Tiling) {
        self.check_run(x, rows, tiling);
        assert_eq!(y.len(), rows * self.out, "output of {} values is not [{rows}, {}]", y.len(), self.out);
        if rows == 0 || self.out == 0 {
            return;
        }
        if self.inner == 0 {
            if !accumulate {
                y.fill(0.0);
            }
            return;
        }
        let u = units(self.precision, self.inner);
        let n_panels = self.out.div_ceil(NR);
        let job = Job { rows, out: self.out, units: u, n_panels, y: SendPtr(y.as_mut_ptr()), accumulate };
        // SAFETY: the tiling runs on this CPU (checked above); buffers have the packed shapes.
        unsafe {
            match self.precision {
                Precision::F32 => {
                    let panels: &[u32] = &self.data;
                    let at = |group: usize, k0: usize| {
                        (panels.as_ptr() as *const f32).add(group * tiling.panels as usize * u * NR + k0 * NR)
                    };
                    job.run_vector(tiling, |r, c, row0, group, k0, kc, y, acc, next| {
                        let tile = super::f32::tile(tiling.kernel == Kernel::F32Avx512, r, c);
                        let w = at(group, k0);
                        let cols = (self.out - group * tiling.panels as usize * NR).min(c * NR);
                        let pf = NextBlock::prefetch(next, |g, k| at(g, k) as *const u8, u * NR * 4);
                        let x = x.as_ptr().add(row0 * self.inner + k0);
                        tile(x, self.inner, w, u * NR, kc, y, self.out, cols, acc, pf);
                    });
                }
                Precision::Bf16 if tiling.kernel.widens() => self.run_widen(&job, tiling, x),
                Precision::Bf16 => {
                    let xb = to_bf16_rows(x, rows, self.inner, u);
                    self.run_lowp(&job, tiling, &xb, None);
                }
                Precision::Int8 => {
                    let mut parts = vec![0f32; 2 * rows * self.out];
                    self.int8_halves(x, rows, &mut parts, tiling);
                    let (first, second) = parts.split_at(rows * self.out);
                    if accumulate {
                        y.iter_mut().zip(first.iter().zip(second)).for_each(|(y, (a, b))| *y += a + b);
                    } else {
                        y.iter_mut().zip(first.iter().zip(second)).for_each(|(y, (a, b))| *y = a + b);
                    }
                }
            }
        }
    }

    /// The bf16 product on the widening kernel: f32 input rows as they are (copied with a zero
    /// column where `inner` is odd, so that every pair of inputs lies in its row).
    unsafe fn run_widen(&self, job: &Job, tiling: &Tiling, x: &[f32]) {
        let (rows, inner, u) = (job.rows, self.inner, job.units);
        let padded;
        let (x, xs) = if inner % 2 == 1 {
            padded = x.chunks(inner).flat_map(|row| row.iter().copied().chain([0.0])).collect::<Vec<f32>>();
            (&padded[..], inner + 1)
        } else {
            (x, inner)
        };
        let panels: &[u32] = &self.data;
        // The loop over `k` stops at the last real pair; the panels' padding to whole AMX
        // tiles holds zeros the inputs have no values for.
        let pairs = Job { units: xs / 2, ..*job };
        debug_assert!(pairs.units <= u && x.len() == rows * xs);
        let (c_max, wide) = (tiling.panels as usize, tiling.kernel == Kernel::Bf16Widen512);
        let at = |group: usize, k0: usize| panels.as_ptr().add(group * c_max * u * NR + k0 * NR);
        pairs.run_vector(tiling, |r, c, row0, group, k0, kc, y, acc, next| {
            let tile = super::widen::tile(wide, r, c);
            let w = at(group, k0);
            let cols = (self.out - group * c_max * NR).min(c * NR);
            let pf = NextBlock::prefetch(next, |g, k| at(g, k) as *const u8, u * NR * 4);
            tile(x.as_ptr().add(row0 * xs + 2 * k0), xs, w, u * NR, kc, y, self.out, cols, acc, pf);
        });
    }

    /// The bf16 and int8 products over prepared input rows `xp` (`units` lanes per row, rows
    /// padded to whole tiles).
    unsafe fn run_lowp(&self, job: &Job, tiling: &Tiling, xp: &[u32], dq: Option<&Dequant>) {
        let u = job.units;
        let panels: &[u32] = &self.data;
        if tiling.kernel.is_amx() {
            let block = if tiling.kernel == Kernel::Int8Amx {
                super::lowp::amx_block::<true>
            } else {
                super::lowp::amx_block::<false>
            };
            job.run_amx(tiling, u * 4, |row_range, panel_range, y| {
                block(
                    xp.as_ptr() as *const u8,
                    u * 4,
                    row_range,
                    job.rows,
                    panels.as_ptr() as *const u8,
                    u * NR * 4,
                    panel_range,
                    self.out,
                    u / TILE_ROWS,
                    y,
                    self.out,
                    job.accumulate,
                    dq,
                );
            });
            return;
        }
        let kind = match tiling.kernel {
            Kernel::Bf16Avx512 => LowpKind::Bf16Avx512,
            Kernel::Int8Avx512 => LowpKind::Int8Avx512,
            Kernel::Int8Avx256 => LowpKind::Int8Avx256,
            other => unreachable!("{other} is not a vector low-precision kernel"),
        };
        let c_max = tiling.panels as usize;
        let at = |group: usize, k0: usize| panels.as_ptr().add(group * c_max * u * NR + k0 * NR);
        job.run_vector(tiling, |r, c, row0, group, k0, kc, y, acc, next| {
            let tile = super::lowp::tile(kind, r, c);
            let col0 = group * c_max * NR;
            let w = at(group, k0);
            let pf = NextBlock::prefetch(next, |g, k| at(g, k) as *const u8, u * NR * 4);
            let cols = (self.out - col0).min(c * NR);
            let dq = dq.map(|d| Dequant {
                zx: d.zx.add(row0),
                sx: d.sx.add(row0),
                colsum: d.colsum.add(col0),
                sw: d.sw.add(col0),
            });
            tile(xp.as_ptr().add(row0 * u + k0), u, w, u * NR, kc, y, self.out, cols, acc, dq.as_ref(), pf);
        });
    }
}

/// The block of panels a thread multiplies after the current one (`panels` panels from group
/// `group`, units `k0..k0 + units`), and the share of its lines the current row tile fetches:
/// every `every`-th unit from `phase` (the tile's index among the block's `every` row tiles).
#[derive(Clone, Copy)]
struct NextBlock {
    group: usize,
    k0: usize,
    units: usize,
    panels: usize,
    phase: usize,
    every: usize,
}

impl NextBlock {
    /// What a tile prefetches of `next` (nothing without one): panels start at `at(group, k0)`,
    /// `panel_bytes` apart.
    fn prefetch(next: Option<Self>, at: impl Fn(usize, usize) -> *const u8, panel_bytes: usize) -> Prefetch {
        next.map_or(Prefetch::NONE, |n| Prefetch {
            w: at(n.group, n.k0),
            panel_bytes,
            units: n.units,
            panels: n.panels,
            phase: n.phase,
            every: n.every,
        })
    }
}

/// The shape of one product and where it writes.
#[derive(Clone, Copy)]
struct Job {
    rows: usize,
    out: usize,
    units: usize,
    n_panels: usize,
    y: SendPtr,
    accumulate: bool,
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: parallel parts of a product write disjoint columns (or disjoint row blocks) of `y`.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// How many parallel parts to cut `n` units of work into: a few per thread, so a descheduled
/// thread's share is stolen, and none where one thread suffices.
fn parts(n: usize) -> usize {
    (rayon::current_num_threads() * 4).min(n).max(1)
}

impl Job {
    /// Runs a vector kernel's loop nest: blocks of `mc` rows × chunks of panel groups in
    /// parallel; inside, group by group, blocks of `kc` units, tiles of `rows` rows.
    /// `tile(r, c, row0, group, k0, kc, y_at_tile, accumulate, next)` computes one tile;
    /// `next` is the block this thread multiplies after this one, and this tile's share of it
    /// to prefetch ([`NextBlock`]).
    unsafe fn run_vector(
        &self,
        tiling: &Tiling,
        tile: impl Fn(usize, usize, usize, usize, usize, usize, *mut f32, bool, Option<NextBlock>) + Sync,
    ) {
        let (r_max, c_max) = (tiling.rows as usize, tiling.panels as usize);
        let kc = if tiling.kc == 0 { self.units } else { tiling.kc as usize };
        let mc = if tiling.mc == 0 { self.rows } else { (tiling.mc as usize).max(r_max) };
        let groups = self.n_panels.div_ceil(c_max);
        let m_blocks = self.rows.div_ceil(mc);
        let chunks = parts(groups);
        let per = groups.div_ceil(chunks);
        let chunks = groups.div_ceil(per);
        let panels_of = |group: usize| c_max.min(self.n_panels - group * c_max);
        let work = |item: usize| {
            let (mb, chunk) = (item / chunks, item % chunks);
            let rows = mb * mc..(mb * mc + mc).min(self.rows);
            let last_group = (chunk * per + per).min(groups);
            // Tiles of equal height (35 rows at most 12 high: 12, 12, 11).
            let r_even = rows.len().div_ceil(rows.len().div_ceil(r_max).max(1)).max(1);
            let tiles = rows.len().div_ceil(r_even);
            for group in chunk * per..last_group {
                let c = panels_of(group);
                for k0 in (0..self.units).step_by(kc) {
                    let kn = kc.min(self.units - k0);
                    let acc = self.accumulate || k0 > 0;
                    let next = if k0 + kn < self.units {
                        Some((group, k0 + kn, kc.min(self.units - k0 - kn), c))
                    } else if group + 1 < last_group {
                        Some((group + 1, 0, kc.min(self.units), panels_of(group + 1)))
                    } else {
                        None
                    };
                    for (t, row0) in rows.clone().step_by(r_even).enumerate() {
                        let r = r_even.min(rows.end - row0);
                        let y = self.y.0.add(row0 * self.out + group * c_max * NR);
                        let next = next.map(|(group, k0, units, panels)| NextBlock {
                            group,
                            k0,
                            units,
                            panels,
                            phase: t,
                            every: tiles,
                        });
                        tile(r, c, row0, group, k0, kn, y, acc, next);
                    }
                }
            }
        };
        let items = m_blocks * chunks;
        if items == 1 {
            work(0);
        } else {
            (0..items).into_par_iter().for_each(work);
        }
    }

    /// Runs AMX over blocks of rows × chunks of panels in parallel, each thread with its tiles
    /// configured. `block(rows, panels, y)` computes padded rows `rows` (whole 32-row blocks but
    /// the last) times panels `panels`. Rows are cut into blocks of `mc` (the tiling's, else
    /// as many as keep [`AMX_ROW_BLOCK_BYTES`] of input in cache) so that a block's input rows
    /// are read from memory once and from cache for every panel pair; columns into as many
    /// chunks of whole panel pairs as give each thread a few parts.
    unsafe fn run_amx(
        &self,
        tiling: &Tiling,
        row_bytes: usize,
        block: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, *mut f32) + Sync,
    ) {
        let rows_pad = self.rows.div_ceil(TILE_ROWS) * TILE_ROWS;
        let step = 2 * TILE_ROWS;
        let mc = if tiling.mc > 0 { tiling.mc as usize } else { AMX_ROW_BLOCK_BYTES / row_bytes.max(1) };
        let mc = (mc / step).max(1) * step;
        let m_blocks = rows_pad.div_ceil(mc);
        let pairs = self.n_panels.div_ceil(2);
        let chunks = parts(pairs).div_ceil(m_blocks).max(1);
        let per = pairs.div_ceil(chunks);
        let chunks = pairs.div_ceil(per);
        let work = |item: usize| {
            let (mb, chunk) = (item / chunks, item % chunks);
            let rows = mb * mc..(mb * mc + mc).min(rows_pad);
            let start = chunk * per * 2;
            let end = ((chunk + 1) * per * 2).min(self.n_panels);
            super::amx::configure();
            block(rows, start..end, self.y.0);
            super::amx::release();
        };
        let items = m_blocks * chunks;
        if items == 1 {
            work(0);
        } else {
            (0..items).into_par_iter().for_each(work);
        }
    }
}

/// Inputs of fewer values are prepared (rounded, quantized) in one thread: below it the pool's
/// hand-off costs more than the work.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// Input bytes an AMX row block keeps in cache (half a Sapphire Rapids core's 2 MiB L2).
const AMX_ROW_BLOCK_BYTES: usize = 1 << 20;

/// Input rows as bf16 pairs (`units` per row, zero beyond `inner`), rows padded with zeros to
/// whole AMX tiles; rounded to nearest even, as [`bf16_pair`].
fn to_bf16_rows(x: &[f32], rows: usize, inner: usize, units: usize) -> Vec<u32> {
    let rows_pad = rows.div_ceil(TILE_ROWS) * TILE_ROWS;
    let mut out = vec![0u32; rows_pad * units];
    let avx512_bf16 = Caps::detect().avx512_bf16;
    let convert = |(row, dst): (&[f32], &mut [u32])| {
        #[cfg(target_arch = "x86_64")]
        if avx512_bf16 {
            // SAFETY: AVX512-BF16 checked; `dst` holds `units ≥ inner / 2` lanes.
            unsafe { bf16_row_avx512(row, dst) };
            return;
        }
        for (i, pair) in row.chunks(2).enumerate() {
            dst[i] = bf16_pair(pair[0], pair.get(1).copied().unwrap_or(0.0));
        }
    };
    if rows * inner < PARALLEL_MIN_VALUES {
        x.chunks(inner).zip(out.chunks_mut(units)).for_each(convert);
    } else {
        x.par_chunks(inner).zip(out.par_chunks_mut(units)).with_min_len(16).for_each(convert);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_row_avx512(row: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let dst16 = dst.as_mut_ptr() as *mut u16;
    let whole = row.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(row.as_ptr().add(i))));
        _mm256_storeu_si256(dst16.add(i) as *mut __m256i, b);
    }
    for (i, &v) in row.iter().enumerate().skip(whole) {
        *dst16.add(i) = half::bf16::from_f32(v).to_bits();
    }
}

/// Input rows quantized to u8 with a scale and zero point each (`x ≈ s (q - z)`, the range of
/// the row mapped onto 0..255 with 0 exact), `units` quads per row, rows padded to whole tiles.
pub(crate) struct QuantizedRows {
    pub codes: Vec<u32>,
    pub scale: Vec<f32>,
    pub zero: Vec<i32>,
}

/// The inputs of the int8 products: each row as two u8 passes, the row quantized (rows
/// `0..rows`, as [`quantize_rows`]) and then its rounding error quantized the same way (rows
/// `rows..2 rows`), so that `x = s₁ (q₁ - z₁) + s₂ (q₂ - z₂)` within `s₂ / 2`, about 1/130,000 of
/// the row's range. One pass leaves the channels below a row's few outliers two or three bits
/// and flips classifier answers (docs/results.md); with two the product's error is the int8
/// weights' alone, for twice the integer work.
pub(crate) fn split_rows(x: &[f32], rows: usize, inner: usize, units: usize) -> QuantizedRows {
    let rows_pad = (2 * rows).div_ceil(TILE_ROWS) * TILE_ROWS;
    let mut codes = vec![0u32; rows_pad * units];
    let mut scale = vec![1f32; rows_pad];
    let mut zero = vec![0i32; rows_pad];
    let (first, second) = codes.split_at_mut(rows * units);
    let min_len = if rows * inner < PARALLEL_MIN_VALUES { rows.max(1) } else { 1 };
    let params: Vec<[(f32, i32); 2]> = x
        .par_chunks(inner)
        .zip(first.par_chunks_mut(units))
        .zip(second.par_chunks_mut(units))
        .take(rows)
        .with_min_len(min_len)
        .map(|((row, c1), c2)| {
            let (s1, z1) = quantize_row(row, c1);
            let error = rounding_error(row, c1, s1, z1);
            [(s1, z1), quantize_row(&error, c2)]
        })
        .collect();
    for (r, [(s1, z1), (s2, z2)]) in params.into_iter().enumerate() {
        (scale[r], zero[r]) = (s1, z1);
        (scale[rows + r], zero[rows + r]) = (s2, z2);
    }
    QuantizedRows { codes, scale, zero }
}

/// One row onto u8 codes in `dst` (bytes, `dst` at least `row.len()` of them): its scale and
/// zero point.
fn quantize_row(row: &[f32], dst: &mut [u32]) -> (f32, i32) {
    let bytes = dst.as_mut_ptr() as *mut u8;
    assert!(dst.len() * 4 >= row.len(), "{} code bytes for a row of {}", dst.len() * 4, row.len());
    #[cfg(target_arch = "x86_64")]
    if Caps::detect().avx512 {
        // SAFETY: AVX-512 checked; `dst` holds `≥ row.len()` bytes (asserted).
        return unsafe { quantize_row_avx512(row, bytes) };
    }
    let (lo, hi) = row.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (s, z) = row_scale(lo, hi);
    let inv = 1.0 / s;
    for (k, &v) in row.iter().enumerate() {
        // SAFETY: `k < row.len() ≤ dst.len() · 4` (asserted).
        unsafe { *bytes.add(k) = v.mul_add(inv, z).round_ties_even().clamp(0.0, 255.0) as u8 };
    }
    (s, z as i32)
}

/// The scale and zero point that map `[lo, hi]` (`lo ≤ 0 ≤ hi`) onto 0..255, 0 exactly on a code.
fn row_scale(lo: f32, hi: f32) -> (f32, f32) {
    let s = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    (s, (-lo / s).round().clamp(0.0, 255.0))
}

/// `row - s (q - z)` for the codes `q` of `row` (bytes of `codes`): what one pass leaves out.
fn rounding_error(row: &[f32], codes: &[u32], s: f32, z: i32) -> Vec<f32> {
    let bytes = codes.as_ptr() as *const u8;
    assert!(codes.len() * 4 >= row.len(), "{} code bytes for a row of {}", codes.len() * 4, row.len());
    let mut error = vec![0f32; row.len()];
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if Caps::detect().avx512 {
        // SAFETY: AVX-512 checked; codes hold `≥ row.len()` bytes (asserted).
        done = unsafe { rounding_error_avx512(row, bytes, s, z as f32, &mut error) };
    }
    for k in done..row.len() {
        // SAFETY: `k < row.len() ≤ codes.len() · 4` (asserted).
        let q = f32::from(unsafe { *bytes.add(k) });
        // One rounding, as the vector code's fused multiply-add.
        error[k] = (-s).mul_add(q - z as f32, row[k]);
    }
    error
}

/// The whole 16-value blocks of [`rounding_error`]; returns how many values it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rounding_error_avx512(row: &[f32], codes: *const u8, s: f32, z: f32, out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let whole = row.len() / 16 * 16;
    let (vs, vz) = (_mm512_set1_ps(s), _mm512_set1_ps(z));
    for i in (0..whole).step_by(16) {
        let q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(i) as *const __m128i)));
        let e = _mm512_fnmadd_ps(vs, _mm512_sub_ps(q, vz), _mm512_loadu_ps(row.as_ptr().add(i)));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), e);
    }
    whole
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row_avx512(row: &[f32], out: *mut u8) -> (f32, i32) {
    use std::arch::x86_64::*;
    let whole = row.len() / 16 * 16;
    let (mut vlo, mut vhi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for i in (0..whole).step_by(16) {
        let v = _mm512_loadu_ps(row.as_ptr().add(i));
        vlo = _mm512_min_ps(vlo, v);
        vhi = _mm512_max_ps(vhi, v);
    }
    let (mut lo, mut hi) = (_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi));
    for &v in &row[whole..] {
        (lo, hi) = (lo.min(v), hi.max(v));
    }
    let (s, z) = row_scale(lo, hi);
    let inv = 1.0 / s;
    let (vi, vz) = (_mm512_set1_ps(inv), _mm512_set1_ps(z));
    let (floor, ceil) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
    for i in (0..whole).step_by(16) {
        let v = _mm512_fmadd_ps(_mm512_loadu_ps(row.as_ptr().add(i)), vi, vz);
        // Round to nearest even (the default MXCSR mode), as the scalar tail does.
        let q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, floor), ceil));
        _mm_storeu_si128(out.add(i) as *mut __m128i, _mm512_cvtepi32_epi8(q));
    }
    for (k, &v) in row.iter().enumerate().skip(whole) {
        *out.add(k) = v.mul_add(inv, z).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    (s, z as i32)
}
