//! Buffers of plain numbers that live on the heap or in a read-only memory map (a packed-weight
//! cache file shared by every process serving the same model).

use memmap2::Mmap;
use std::sync::Arc;

/// Number types that may be read from any properly aligned bytes.
///
/// # Safety
/// Every bit pattern must be a valid value and the type must have no padding.
pub(crate) unsafe trait Plain: Copy + Send + Sync + 'static {}
// SAFETY: integers and floats accept every bit pattern and have no padding.
unsafe impl Plain for u32 {}
unsafe impl Plain for i32 {}
unsafe impl Plain for f32 {}

/// `len` values of `T`: owned, or borrowed from a shared memory map.
#[derive(Clone)]
pub(crate) enum Store<T: Plain> {
    Owned(Arc<Vec<T>>),
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
}

impl<T: Plain> Store<T> {
    pub fn owned(v: Vec<T>) -> Self {
        Self::Owned(Arc::new(v))
    }

    /// `len` values at byte `offset` of `map`; `None` if they do not fit or are misaligned.
    pub fn mapped(map: Arc<Mmap>, offset: usize, len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let fits = offset.checked_add(bytes).is_some_and(|end| end <= map.len());
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>());
        (fits && aligned).then_some(Self::Mapped { map, offset, len })
    }

    /// Whether the values are in a memory map.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Self::Mapped { .. })
    }
}

impl<T: Plain> std::fmt::Debug for Store<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({} values{})", self.len(), if self.is_mapped() { ", mapped" } else { "" })
    }
}

impl<T: Plain> std::ops::Deref for Store<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Self::Owned(v) => v,
            // SAFETY: `mapped` checked bounds and alignment; `T: Plain` accepts any bits; the
            // map is read-only and kept alive by the `Arc`.
            Self::Mapped { map, offset, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset) as *const T, *len)
            },
        }
    }
}
