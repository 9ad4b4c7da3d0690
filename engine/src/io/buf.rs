//! Page-aligned owned buffers, so data can go to an O_DIRECT file descriptor
//! without a bounce copy whenever the request itself is aligned.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

pub const ALIGN: usize = 4096;

pub struct Buf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: Buf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for Buf {}
// SAFETY: shared references only permit reads of the bytes.
unsafe impl Sync for Buf {}

impl Buf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Buf {
        let cap = len.max(1).next_multiple_of(ALIGN);
        let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
            // Only reachable for sizes near usize::MAX, which callers cap far below.
            alloc::handle_alloc_error(Layout::new::<u8>());
        };
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        Buf { ptr, len, cap }
    }

    pub fn from_slice(data: &[u8]) -> Buf {
        let mut b = Buf::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shrinks the visible length (never the allocation).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn is_zero(&self) -> bool {
        let (pre, words, post) = {
            // SAFETY: u64 has no invalid bit patterns; align_to keeps the bytes in bounds.
            unsafe { self.align_to::<u64>() }
        };
        pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap >= len bytes and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        };
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_zero_detection() {
        let mut b = Buf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.is_zero());
        b[4999] = 1;
        assert!(!b.is_zero());
        b.truncate(4999);
        assert!(b.is_zero());
        assert!(Buf::zeroed(0).is_empty());
        assert_eq!(&*Buf::from_slice(b"abc"), b"abc");
    }
}
