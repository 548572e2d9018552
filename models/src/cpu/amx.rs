//! Intel AMX (Advanced Matrix Extensions): eight tile registers of 16 rows × 64 bytes and a
//! unit that multiplies them (`tdpbf16ps`: bf16 pairs into f32; `tdpbusd`: u8 × i8 quads into
//! i32), about 1,000 multiply-adds per cycle per core against 32 for AVX-512 f32 FMA.
//!
//! Rust has no stable AMX intrinsics, so the instructions are written as inline assembly (the
//! assembler knows them whatever the target features). Every tile here is configured the same
//! way, 16 rows of 64 bytes: inputs are padded to whole tiles by the callers
//! ([`super::packed`]), so one configuration serves every shape. Tile registers: `tmm0..3`
//! accumulators, `tmm4..5` input rows (A), `tmm6..7` weight panels (B).

/// The 64-byte tile configuration (`ldtilecfg`): palette 1, every tile 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Rows per tile.
pub const TILE_ROWS: usize = 16;
/// Bytes per tile row.
pub const TILE_BYTES: usize = 64;

/// Loads the one tile configuration on this thread. Call it before any tile instruction on a
/// thread (the configuration is per thread), and [`release`] when done.
///
/// # Safety
/// The CPU must have AMX and the process the tile permission ([`super::caps::Caps::amx`]).
#[cfg(target_arch = "x86_64")]
#[inline]
pub unsafe fn configure() {
    let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        cfg.colsb[t] = TILE_BYTES as u16;
        cfg.rows[t] = TILE_ROWS as u8;
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
}

/// Frees the tile state (so a context switch need not save it).
///
/// # Safety
/// As [`configure`].
#[cfg(target_arch = "x86_64")]
#[inline]
pub unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// `tileloadd tmmN, [ptr + stride]`: 16 rows of 64 bytes, `stride` bytes apart.
macro_rules! load {
    ($t:literal, $ptr:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tileloadd tmm", $t, ", [{0} + {1}*1]"),
            in(reg) $ptr,
            in(reg) $stride,
            options(nostack, readonly)
        )
    };
}

/// `tilestored [ptr + stride], tmmN`.
macro_rules! store {
    ($t:literal, $ptr:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tilestored [{0} + {1}*1], tmm", $t),
            in(reg) $ptr,
            in(reg) $stride,
            options(nostack)
        )
    };
}

/// `tilezero tmmN`.
macro_rules! zero {
    ($t:literal) => {
        std::arch::asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
    };
}

/// `tdpbf16ps tmmC, tmmA, tmmB`: `C += A · B` over bf16 pairs, f32 sums.
macro_rules! dp_bf16 {
    ($c:literal, $a:literal, $b:literal) => {
        std::arch::asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
    };
}

/// `tdpbusd tmmC, tmmA, tmmB`: `C += A · B` over quads of u8 (A) × i8 (B), i32 sums.
macro_rules! dp_u8i8 {
    ($c:literal, $a:literal, $b:literal) => {
        std::arch::asm!(concat!("tdpbusd tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
    };
}

pub(crate) use {dp_bf16, dp_u8i8, load, store, zero};

/// Runs one tiny product on the tiles and checks it: a hypervisor may report AMX and grant the
/// permission yet not run the instructions correctly. Called once, after the permission.
#[cfg(target_arch = "x86_64")]
pub(crate) fn self_test() -> bool {
    let a = [3u8; TILE_ROWS * TILE_BYTES];
    let b = [-2i8; TILE_ROWS * TILE_BYTES];
    let mut c = [0i32; TILE_ROWS * 16];
    // SAFETY: called only after the kernel granted the tile state; buffers are whole tiles.
    unsafe {
        configure();
        zero!(0);
        load!(4, a.as_ptr(), TILE_BYTES);
        load!(6, b.as_ptr(), TILE_BYTES);
        dp_u8i8!(0, 4, 6);
        store!(0, c.as_mut_ptr(), 64usize);
        release();
    }
    // Each output sums 64 products of 3 · -2.
    c.iter().all(|&v| v == -384)
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn self_test() -> bool {
    false
}
