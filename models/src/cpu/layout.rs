//! The panel layout every kernel and the packing share, defined once below them all.

/// Output columns per panel (one 512-bit vector of f32 or 32-bit lanes).
pub const NR: usize = 16;

/// Bytes of one `k` unit of one panel in every precision (16 f32 values, or 16 lanes of bf16
/// pairs or int8 quads): one cache line.
pub const UNIT_BYTES: usize = 64;

/// Weight lines a tile asks the cache for while it computes: its share of the block of panels
/// the same thread multiplies next. In a forward pass every weight comes from memory once; a
/// block's first row tile would otherwise wait on it, while the row tiles after it find it in
/// cache and ask memory for nothing. So the `every` row tiles over one block each fetch every
/// `every`-th unit of the next block, starting at unit `phase`: the next block arrives spread
/// over the whole block's compute. Measured with `models/examples/stream_bench.rs`
/// (docs/benchmarks.md).
#[derive(Clone, Copy)]
pub(crate) struct Prefetch {
    /// The next block's first panel; its panels lie `panel_bytes` apart.
    pub w: *const u8,
    pub panel_bytes: usize,
    /// Its `k` units and panels.
    pub units: usize,
    pub panels: usize,
    pub phase: usize,
    pub every: usize,
}

impl Prefetch {
    /// Nothing to fetch (a thread's last block, or a caller without a next block).
    pub const NONE: Self =
        Self { w: std::ptr::null(), panel_bytes: 0, units: 0, panels: 0, phase: usize::MAX, every: 1 };

    /// At unit `k` of a tile's loop (`k` counts up from 0 by one): the next block's lines of
    /// unit `k` if it is due (`*due`), then the next due unit.
    ///
    /// # Safety
    /// `w` and `panel_bytes` describe `panels` panels of at least `units` units (prefetches
    /// never fault, but the addresses are computed with pointer arithmetic).
    #[inline(always)]
    pub unsafe fn at(&self, k: usize, due: &mut usize) {
        if k == *due {
            #[cfg(target_arch = "x86_64")]
            if k < self.units {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                for c in 0..self.panels {
                    _mm_prefetch::<_MM_HINT_T1>(self.w.add(c * self.panel_bytes + k * UNIT_BYTES) as *const i8);
                }
            }
            *due += self.every;
        }
    }
}
