//! An owned byte buffer that io_uring can read into and write from without copying.
//!
//! Reads land in the spare capacity after the filled bytes; writes send a prefix of the
//! unconsumed bytes. The forwarding loop hands the buffer to the kernel and gets it back,
//! so a message is never copied in user space on its way through.

use monoio::buf::{IoBuf, IoBufMut};

pub struct MsgBuf {
    /// `buf.len()` is the end of the filled bytes; reads append after it.
    buf: Vec<u8>,
    /// Bytes before `pos` have been consumed (forwarded or parsed).
    pos: usize,
}

impl MsgBuf {
    pub fn with_capacity(capacity: usize) -> MsgBuf {
        MsgBuf {
            buf: Vec::with_capacity(capacity),
            pos: 0,
        }
    }

    /// The unconsumed bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.pos..]
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Room left for the next read.
    #[inline]
    pub fn spare(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }

    /// Marks `n` bytes at the front as done. Resets to the start once all are done, so
    /// the common case (everything forwarded) needs no copying at all.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.pos += n;
        if self.pos == self.buf.len() {
            self.clear();
        }
    }

    #[inline]
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
    }

    /// Moves the unconsumed tail (usually a few bytes of a split header) to the front so
    /// the next read has the whole capacity after it.
    pub fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Makes room for at least `additional` more bytes, compacting first and growing only
    /// when compacting is not enough.
    pub fn reserve(&mut self, additional: usize) {
        if self.spare() >= additional {
            return;
        }
        self.compact();
        if self.spare() < additional {
            self.buf.reserve(additional);
        }
    }

    /// Returns to `capacity` after a large message made the buffer grow, so one big
    /// result does not pin memory for the rest of a long session.
    pub fn shrink_to(&mut self, capacity: usize) {
        if self.buf.capacity() > capacity && self.len() <= capacity {
            self.compact();
            self.buf.shrink_to(capacity);
        }
    }

    /// Keeps only the first `n` unconsumed bytes.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.buf.truncate(self.pos + n);
        }
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// For building messages in place: the caller appends to the filled bytes.
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The buffer as a read target: the kernel fills the spare capacity.
    pub fn into_read(self) -> ReadTail {
        ReadTail(self)
    }

    /// The first `n` unconsumed bytes as a write source.
    pub fn into_write(self, n: usize) -> WritePrefix {
        debug_assert!(n <= self.len());
        WritePrefix { buf: self, n }
    }
}

/// A worker's spare forwarding buffers. Sessions take one per direction while they have a
/// server and give it back when idle, so thousands of idle clients hold no large buffer
/// and busy ones never call the allocator per transaction.
pub struct BufPool {
    size: usize,
    free: std::cell::RefCell<Vec<MsgBuf>>,
}

impl BufPool {
    /// Buffers kept for reuse; beyond this, returned buffers are freed.
    const KEEP: usize = 256;

    pub fn new(size: usize) -> BufPool {
        BufPool {
            size,
            free: std::cell::RefCell::new(Vec::new()),
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn take(&self) -> MsgBuf {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| MsgBuf::with_capacity(self.size))
    }

    /// Takes back a buffer of the pool's size; others (grown for a large message) are
    /// freed so the pool never hoards memory.
    pub fn give(&self, mut b: MsgBuf) {
        let mut free = self.free.borrow_mut();
        if b.capacity() == self.size && free.len() < Self::KEEP {
            b.clear();
            free.push(b);
        }
    }
}

/// A [`MsgBuf`] lent to a read: bytes land after the filled part.
pub struct ReadTail(MsgBuf);

impl ReadTail {
    pub fn into_inner(self) -> MsgBuf {
        self.0
    }
}

// SAFETY: the pointer and capacity describe the spare capacity of a Vec the ReadTail owns;
// the Vec is neither moved nor reallocated while the kernel holds it, because the
// ReadTail is owned by the in-flight operation until it completes.
unsafe impl IoBufMut for ReadTail {
    #[inline]
    fn write_ptr(&mut self) -> *mut u8 {
        let len = self.0.buf.len();
        // SAFETY: len <= capacity, so the result is within (or one past) the allocation.
        unsafe { self.0.buf.as_mut_ptr().add(len) }
    }

    #[inline]
    fn bytes_total(&mut self) -> usize {
        self.0.spare()
    }

    #[inline]
    unsafe fn set_init(&mut self, pos: usize) {
        let len = self.0.buf.len();
        // SAFETY: the kernel initialised `pos` bytes after the old end, within capacity.
        unsafe { self.0.buf.set_len(len + pos) };
    }
}

/// A [`MsgBuf`] lent to a write: the first `n` unconsumed bytes go out.
pub struct WritePrefix {
    buf: MsgBuf,
    n: usize,
}

impl WritePrefix {
    pub fn into_inner(self) -> MsgBuf {
        self.buf
    }
}

// SAFETY: the pointer covers `n` initialised bytes of a Vec owned by the WritePrefix.
unsafe impl IoBuf for WritePrefix {
    #[inline]
    fn read_ptr(&self) -> *const u8 {
        self.buf.data().as_ptr()
    }

    #[inline]
    fn bytes_init(&self) -> usize {
        self.n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_all_resets_to_start() {
        let mut b = MsgBuf::with_capacity(16);
        b.extend_from_slice(b"hello world");
        b.consume(6);
        assert_eq!(b.data(), b"world");
        b.consume(5);
        assert!(b.is_empty());
        assert_eq!(b.spare(), 16);
    }

    #[test]
    fn reserve_compacts_before_growing() {
        let mut b = MsgBuf::with_capacity(16);
        b.extend_from_slice(&[1u8; 14]);
        b.consume(12);
        b.reserve(10);
        assert_eq!(b.capacity(), 16);
        assert_eq!(b.data(), &[1, 1]);
        b.reserve(100);
        assert!(b.spare() >= 100);
    }

    #[test]
    fn read_tail_appends_after_filled_bytes() {
        let mut b = MsgBuf::with_capacity(8);
        b.extend_from_slice(b"ab");
        let mut r = b.into_read();
        assert_eq!(r.bytes_total(), 6);
        unsafe {
            std::ptr::copy_nonoverlapping(b"cd".as_ptr(), r.write_ptr(), 2);
            r.set_init(2);
        }
        assert_eq!(r.into_inner().data(), b"abcd");
    }
}
