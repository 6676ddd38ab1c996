//! Reading and writing little-endian fields: every byte layout of the protocol (frame header,
//! handshake messages, device declarations, nonces) goes through these, so no module decodes
//! bytes by offset.
//!
//! [`Reader`] takes fields off the front of a byte slice, bounds-checked (a field past the end is
//! [`Short`], never a panic); [`Put`] appends them to a `Vec<u8>` or an [`ArrayWriter`] (a
//! fixed-size header without allocating). A type with one encoding implements [`WireCodec`].
//!
//! ```
//! use vfmig_wire::codec::{Put, Reader};
//! let mut out = Vec::new();
//! out.put_u16(0x0102);
//! out.put_u64(7);
//! let mut r = Reader::new(&out);
//! assert_eq!((r.u16(), r.u64()), (Ok(0x0102), Ok(7)));
//! assert!(r.is_empty());
//! assert!(r.u8().is_err());
//! ```

/// The bytes ran out before a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Short {
    /// Where the field starts.
    pub at: usize,
    /// Bytes the field needs.
    pub wanted: usize,
    /// Bytes there are in all.
    pub len: usize,
}

/// Bounds-checked little-endian reader over a byte slice.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let short = Short {
            at: self.pos,
            wanted: n,
            len: self.buf.len(),
        };
        let end = self.pos.checked_add(n).ok_or(short)?;
        let s = self.buf.get(self.pos..end).ok_or(short)?;
        self.pos = end;
        Ok(s)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A byte.
    pub fn u8(&mut self) -> Result<u8, Short> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, Short> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, Short> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, Short> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A value with its own encoding.
    pub fn read<T: WireCodec>(&mut self) -> Result<T, T::Error> {
        T::read(self)
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// How many bytes are not read yet.
    pub fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.left() == 0
    }
}

/// Somewhere to append encoded fields.
pub trait Put {
    /// Appends bytes as they are.
    fn put(&mut self, bytes: &[u8]);

    /// Appends a byte.
    fn put_u8(&mut self, v: u8) {
        self.put(&[v]);
    }

    /// Appends a little-endian `u16`.
    fn put_u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }

    /// Appends a little-endian `u32`.
    fn put_u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }

    /// Appends a little-endian `u64`.
    fn put_u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
}

impl Put for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Writes an encoding of exactly `N` bytes into an array, without allocating.
#[derive(Clone, Debug)]
pub struct ArrayWriter<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for ArrayWriter<N> {
    fn default() -> Self {
        ArrayWriter::new()
    }
}

impl<const N: usize> ArrayWriter<N> {
    /// An empty writer.
    pub const fn new() -> ArrayWriter<N> {
        ArrayWriter {
            buf: [0; N],
            len: 0,
        }
    }

    /// The bytes written so far.
    pub fn written(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The array. Bytes not written are 0; the encodings that use a writer write all `N`.
    pub fn finish(self) -> [u8; N] {
        debug_assert_eq!(self.len, N, "encoding shorter than its array");
        self.buf
    }
}

impl<const N: usize> Put for ArrayWriter<N> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        debug_assert!(end <= N, "encoding longer than its array");
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            dst.copy_from_slice(bytes);
            self.len = end;
        }
    }
}

/// A type with one wire encoding.
pub trait WireCodec: Sized {
    /// What reading fails with; a field past the end converts into it.
    type Error: From<Short>;

    /// Appends the encoding.
    fn encode<P: Put + ?Sized>(&self, out: &mut P);

    /// Reads one value off the front of `r`.
    fn read(r: &mut Reader<'_>) -> Result<Self, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked_and_little_endian() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut r = Reader::new(&b);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(0x0302));
        assert_eq!(r.left(), 6);
        assert_eq!(
            r.u64(),
            Err(Short {
                at: 3,
                wanted: 8,
                len: 9
            })
        );
        // A failed read takes nothing.
        assert_eq!(r.u32(), Ok(0x0706_0504));
        assert_eq!(r.rest(), &[8, 9]);
        assert_eq!(r.take(usize::MAX).unwrap_err().wanted, usize::MAX);
        assert_eq!(r.array::<2>(), Ok([8, 9]));
        assert!(r.is_empty());
    }

    #[test]
    fn array_writer_fills_exactly() {
        let mut w = ArrayWriter::<7>::new();
        w.put_u8(1);
        w.put_u16(0x0302);
        assert_eq!(w.written(), &[1, 2, 3]);
        w.put_u32(0x0706_0504);
        assert_eq!(w.finish(), [1, 2, 3, 4, 5, 6, 7]);
    }
}
