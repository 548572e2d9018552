//! The panel layout every kernel and the packing share, defined once below them all.

/// Output columns per panel (one 512-bit vector of f32 or 32-bit lanes).
pub const NR: usize = 16;
