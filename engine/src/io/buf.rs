//! Page-aligned owned buffers, so data can go to an O_DIRECT file descriptor
//! without a bounce copy whenever the request itself is aligned.

use parking_lot::Mutex;
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const ALIGN: usize = 4096;

/// Freed buffers of power-of-two sizes from 4 KiB to 1 MiB are kept for
/// reuse: the data path allocates one per request. The pool holds at most
/// `KEEP_PER_CLASS` buffers of a size and `KEEP_BYTES` in all; beyond that
/// freed buffers go back to the allocator.
const MIN_CLASS: u32 = 12;
const MAX_CLASS: u32 = 20;
const KEEP_PER_CLASS: usize = 64;
const KEEP_BYTES: usize = 16 << 20;

/// Buffers from this size up are mapped and unmapped directly: freed, they
/// go back to the kernel at once (the allocator would keep them in its
/// per-thread arenas, where a busy device's RSS grew by hundreds of MiB).
const MMAP_MIN: usize = 128 << 10;

/// Bytes held by the pool.
static POOLED: AtomicUsize = AtomicUsize::new(0);

struct FreeBuf(NonNull<u8>);
// SAFETY: a free buffer is owned by the pool alone.
unsafe impl Send for FreeBuf {}

static POOL: [Mutex<Vec<FreeBuf>>; (MAX_CLASS - MIN_CLASS + 1) as usize] =
    [const { Mutex::new(Vec::new()) }; (MAX_CLASS - MIN_CLASS + 1) as usize];

fn class_of(cap: usize) -> Option<usize> {
    let bits = cap.trailing_zeros();
    (cap.is_power_of_two() && (MIN_CLASS..=MAX_CLASS).contains(&bits))
        .then(|| (bits - MIN_CLASS) as usize)
}

pub struct Buf {
    ptr: NonNull<u8>,
    len: usize,
    /// 0 for memory the buffer does not own ([`Buf::borrowed`]).
    cap: usize,
}

// SAFETY: Buf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for Buf {}
// SAFETY: shared references only permit reads of the bytes.
unsafe impl Sync for Buf {}

impl Buf {
    /// A buffer of `len` bytes whose content is unspecified (left over from
    /// earlier use, never uninitialised); for data about to be overwritten.
    pub fn recycled(len: usize) -> Buf {
        let cap = len.max(1).next_multiple_of(ALIGN).next_power_of_two();
        if let Some(class) = class_of(cap) {
            if let Some(FreeBuf(ptr)) = POOL[class].lock().pop() {
                POOLED.fetch_sub(cap, Ordering::Relaxed);
                return Buf { ptr, len, cap };
            }
            let mut b = Buf::zeroed(cap);
            b.len = len;
            return b;
        }
        Buf::zeroed(len)
    }

    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Buf {
        let cap = len.max(1).next_multiple_of(ALIGN);
        if cap >= MMAP_MIN {
            // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    cap,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            // Anonymous mappings are zero-filled and page-aligned.
            let ptr = (raw != libc::MAP_FAILED)
                .then(|| NonNull::new(raw.cast::<u8>()))
                .flatten();
            let Some(ptr) = ptr else {
                alloc::handle_alloc_error(
                    Layout::from_size_align(cap, ALIGN).unwrap_or(Layout::new::<u8>()),
                );
            };
            return Buf { ptr, len, cap };
        }
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

    /// A buffer over `len` bytes at `ptr` that it does not own: dropping it
    /// frees nothing. For a transport's own memory (a FUSE ring entry's
    /// payload) that a read fills in place.
    ///
    /// # Safety
    /// `ptr` is valid for reads and writes of `len` bytes, initialised, and
    /// used by nothing else until this buffer and every I/O into it are
    /// gone.
    pub unsafe fn borrowed(ptr: *mut u8, len: usize) -> Buf {
        match NonNull::new(ptr) {
            Some(ptr) => Buf { ptr, len, cap: 0 },
            None => Buf::zeroed(0),
        }
    }

    pub fn from_slice(data: &[u8]) -> Buf {
        let mut b = Buf::recycled(data.len());
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
        if self.cap == 0 {
            return;
        }
        if let Some(class) = class_of(self.cap) {
            let mut free = POOL[class].lock();
            if free.len() < KEEP_PER_CLASS {
                if POOLED.fetch_add(self.cap, Ordering::Relaxed) + self.cap <= KEEP_BYTES {
                    free.push(FreeBuf(self.ptr));
                    return;
                }
                POOLED.fetch_sub(self.cap, Ordering::Relaxed);
            }
        }
        if self.cap >= MMAP_MIN {
            // SAFETY: mapped in `zeroed` with exactly this length, owned by us alone.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
            return;
        }
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
        let r = Buf::recycled(5000);
        assert_eq!(r.len(), 5000);
        assert_eq!(r.as_ptr() as usize % ALIGN, 0);
        let big = Buf::recycled(3 << 20);
        assert_eq!(big.len(), 3 << 20);
    }

    #[test]
    fn a_borrowed_buffer_writes_in_place_and_frees_nothing() {
        let mut owner = Buf::zeroed(1 << 20);
        let at = owner.as_mut_ptr();
        {
            // SAFETY: `owner` outlives it and is not used meanwhile.
            let mut b = unsafe { Buf::borrowed(at, 1 << 20) };
            b.truncate(4096);
            b.fill(0xab);
            assert_eq!(b.as_ptr(), at.cast_const());
        }
        // Not freed (an unmapped megabyte would fault here) nor pooled.
        assert!(owner[..4096].iter().all(|&b| b == 0xab));
        assert!(owner[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_pool_is_bounded_in_bytes() {
        // Free 64 MiB of 1 MiB buffers at once: the pool keeps at most KEEP_BYTES.
        let bufs: Vec<Buf> = (0..64).map(|_| Buf::recycled(1 << 20)).collect();
        drop(bufs);
        assert!(POOLED.load(Ordering::Relaxed) <= KEEP_BYTES);
        let held: usize = POOL.iter().map(|p| p.lock().len()).sum();
        assert!(held <= KEEP_BYTES / ALIGN);
        assert!(POOL[(MAX_CLASS - MIN_CLASS) as usize].lock().len() <= KEEP_BYTES >> 20);
    }
}
