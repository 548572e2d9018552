//! Facts shared by every Verdict binary: which model assets exist and where they are cached.

pub mod assets;
