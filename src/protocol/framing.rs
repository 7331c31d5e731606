//! Message boundaries. Every regular message is a type byte and a big-endian length that
//! counts itself but not the type byte; nothing else is needed to forward a message.

/// The type byte plus the 4-byte length.
pub const HEADER_LEN: usize = 5;

/// A regular message header found at the front of a byte slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// The length field as sent: it counts itself (4) plus the body.
    pub len: u32,
}

impl Header {
    /// Reads a header if at least five bytes are present. The length is not validated here:
    /// callers decide (with [`Header::validate`]) because limits differ per direction.
    #[inline]
    pub fn peek(bytes: &[u8]) -> Option<Header> {
        if bytes.len() < HEADER_LEN {
            return None;
        }
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        Some(Header { tag: bytes[0], len })
    }

    /// Bytes of the whole message on the wire, type byte included.
    #[inline]
    pub fn total(&self) -> usize {
        self.len as usize + 1
    }

    /// Bytes of the body, the part after the header.
    #[inline]
    pub fn body_len(&self) -> usize {
        self.len as usize - 4
    }

    /// A length below 4 cannot even hold itself; above `limit` it is a hostile or broken peer.
    pub fn validate(&self, limit: u32) -> Result<(), super::ProtocolError> {
        if self.len < 4 {
            return Err(super::ProtocolError::BadLength {
                tag: self.tag as char,
                len: self.len,
            });
        }
        if self.len > limit {
            return Err(super::ProtocolError::TooLong {
                tag: self.tag as char,
                len: self.len,
                limit,
            });
        }
        Ok(())
    }
}

/// Where a scan of buffered bytes stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// A complete message starts at the offset.
    Whole(Header),
    /// Only part of a message is buffered; `have` bytes of it, header included if known.
    Partial { header: Option<Header>, have: usize },
}

/// Classifies the bytes at the front of `bytes`.
#[inline]
pub fn scan(bytes: &[u8]) -> Scan {
    match Header::peek(bytes) {
        Some(h) if bytes.len() >= h.total() => Scan::Whole(h),
        header => Scan::Partial {
            header,
            have: bytes.len(),
        },
    }
}

/// Reads a NUL-terminated string starting at `at`; returns it and the offset after the NUL.
pub fn read_cstr(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = bytes.get(at..)?;
    let nul = rest.iter().position(|&b| b == 0)?;
    Some((&rest[..nul], at + nul + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn finds_boundaries_in_mixed_messages() {
        let mut buf = msg(b'Q', b"select 1\0");
        buf.extend(msg(b'S', b""));
        buf.extend(msg(b'D', &[7u8; 300]));
        let mut at = 0;
        let mut tags = vec![];
        while let Scan::Whole(h) = scan(&buf[at..]) {
            tags.push(h.tag);
            at += h.total();
        }
        assert_eq!(tags, b"QSD");
        assert_eq!(at, buf.len());
    }

    #[test]
    fn partial_header_and_partial_body() {
        let m = msg(b'D', &[1u8; 50]);
        assert_eq!(scan(&m[..3]), Scan::Partial { header: None, have: 3 });
        match scan(&m[..20]) {
            Scan::Partial {
                header: Some(h),
                have: 20,
            } => assert_eq!(h.total(), 55),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn validates_lengths() {
        let h = Header { tag: b'Q', len: 3 };
        assert!(h.validate(1 << 20).is_err());
        let h = Header {
            tag: b'Q',
            len: 2 << 20,
        };
        assert!(h.validate(1 << 20).is_err());
        assert!(Header { tag: b'S', len: 4 }.validate(1 << 20).is_ok());
    }

    #[test]
    fn reads_cstrings() {
        let b = b"user\0alice\0\0";
        let (k, at) = read_cstr(b, 0).unwrap();
        assert_eq!(k, b"user");
        let (v, at) = read_cstr(b, at).unwrap();
        assert_eq!(v, b"alice");
        assert_eq!(read_cstr(b, at).unwrap().0, b"");
        assert!(read_cstr(b"abc", 0).is_none());
    }
}
