//! Request bodies held compressed from the moment records are encoded.
//!
//! Each batch's part of a request (its `_bulk` lines, its OTLP `ResourceLogs`) is compressed
//! once, when the batch is made, into a [`Packed`] piece: raw deflate from a fresh compressor
//! ending on a byte boundary (a sync flush), with the CRC-32 and length of what it holds. Such
//! pieces put back to back are one deflate stream (no piece refers back into another), so a
//! request's body is a gzip header, the pieces, an empty final block, and the CRC-32 combined
//! from the pieces' own: one gzip member, as any receiver reads it, built by copying
//! compressed bytes. Nothing holds a request's uncompressed body, and a batch waiting for its
//! acknowledgement holds only its compressed bytes. A part of a piece (records sent again
//! alone) is inflated and compressed again.

use std::borrow::Cow;
use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// `1f 8b`, deflate, no flags, no time, no extra flags, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// A final, empty block with fixed codes: ends the deflate stream after the pieces.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// Bytes a gzip member adds around its pieces.
pub const GZIP_OVERHEAD: usize = GZIP_HEADER.len() + FINAL_BLOCK.len() + 8;

/// One batch's part of a request body, compressed or as is.
#[derive(Debug, Default)]
pub struct Packed {
    /// Raw deflate ending in a sync flush (`gzip`), or the plain bytes.
    data: Vec<u8>,
    gzip: bool,
    /// CRC-32 of the plain bytes.
    crc: u32,
    plain_len: usize,
    /// Where each record's bytes end in the plain bytes (empty when not asked for).
    ends: Vec<u32>,
}

impl Packed {
    /// Size of the plain bytes: what the request carries once the receiver inflates it.
    pub fn plain_len(&self) -> usize {
        self.plain_len
    }

    /// Size as held and sent (compressed, when it is).
    pub fn packed_len(&self) -> usize {
        self.data.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.plain_len == 0
    }

    /// Memory held.
    pub fn held_bytes(&self) -> usize {
        self.data.capacity() + self.ends.capacity() * 4
    }

    /// Where each record's bytes end in the plain bytes.
    pub fn ends(&self) -> &[u32] {
        &self.ends
    }

    /// The plain bytes (inflated when compressed).
    pub fn plain(&self) -> Cow<'_, [u8]> {
        if !self.gzip {
            return Cow::Borrowed(&self.data);
        }
        let mut inflate = Decompress::new(false);
        let mut out = Vec::with_capacity(self.plain_len);
        while (inflate.total_in() as usize) < self.data.len() {
            let before = (inflate.total_in(), inflate.total_out());
            out.reserve(self.plain_len.saturating_sub(out.len()).max(64));
            inflate.decompress_vec(&self.data[inflate.total_in() as usize..], &mut out, FlushDecompress::Sync).expect("our own deflate");
            assert_ne!(before, (inflate.total_in(), inflate.total_out()), "inflating our own deflate made no progress");
        }
        debug_assert_eq!(out.len(), self.plain_len);
        Cow::Owned(out)
    }
}

/// Compresses pieces; keeps its compressor and buffers from one piece to the next.
pub struct Packer {
    /// Made on first use: a thread that only joins pieces never needs one.
    deflate: Option<Compress>,
    out: Vec<u8>,
    /// Plain bytes being put together by [`Packer::pack_with`].
    plain: Vec<u8>,
}

thread_local! {
    static PACKER: RefCell<Packer> = RefCell::new(Packer::new());
}

impl Default for Packer {
    fn default() -> Self {
        Packer::new()
    }
}

impl Packer {
    /// A packer compressing at level 1, as gzip's fastest.
    pub fn new() -> Packer {
        Packer { deflate: None, out: Vec::new(), plain: Vec::new() }
    }

    /// Runs `f` with this thread's packer (for producers that keep none of their own).
    pub fn with<R>(f: impl FnOnce(&mut Packer) -> R) -> R {
        PACKER.with(|packer| f(&mut packer.borrow_mut()))
    }

    /// Packs `plain` (compressed when `gzip`), with the record ends `ends`.
    pub fn pack(&mut self, plain: &[u8], gzip: bool, ends: Vec<u32>) -> Packed {
        let crc = crc32fast::hash(plain);
        let data = if gzip { self.deflate(plain) } else { plain.to_vec() };
        Packed { data, gzip, crc, plain_len: plain.len(), ends }
    }

    /// Packs what `write` puts into a reused buffer; `write` returns the record ends.
    pub fn pack_with(&mut self, gzip: bool, write: impl FnOnce(&mut Vec<u8>) -> Vec<u32>) -> Packed {
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let ends = write(&mut plain);
        let packed = self.pack(&plain, gzip, ends);
        // A rare huge batch does not keep its buffer.
        if plain.capacity() <= KEPT_BUFFER {
            self.plain = plain;
        }
        packed
    }

    /// Raw deflate of `plain` from a fresh state, ending in a sync flush; sized to fit.
    fn deflate(&mut self, plain: &[u8]) -> Vec<u8> {
        let deflate = self.deflate.get_or_insert_with(|| Compress::new(Compression::fast(), false));
        deflate.reset();
        self.out.clear();
        self.out.reserve(plain.len() / 4 + 64);
        let (start_in, start_out) = (deflate.total_in(), deflate.total_out());
        loop {
            let consumed = (deflate.total_in() - start_in) as usize;
            deflate.compress_vec(&plain[consumed..], &mut self.out, FlushCompress::Sync).expect("deflate into memory");
            // Done once every byte is in and the flush left room to spare.
            if (deflate.total_in() - start_in) as usize == plain.len() && self.out.len() < self.out.capacity() {
                break;
            }
            self.out.reserve(self.out.capacity().max(4096));
        }
        debug_assert_eq!((deflate.total_out() - start_out) as usize, self.out.len());
        let data = self.out.as_slice().to_vec();
        if self.out.capacity() > KEPT_BUFFER {
            self.out = Vec::new();
        }
        data
    }
}

/// Buffers larger than this are given back rather than kept for the next piece.
const KEPT_BUFFER: usize = 4 << 20;

/// A request body put together from pieces: one gzip member, or the plain bytes back to back.
pub struct Body {
    out: Vec<u8>,
    gzip: bool,
    prefix: usize,
    crc: crc32fast::Hasher,
    plain_len: u64,
}

impl Body {
    /// An empty body, compressed or not, after `prefix` bytes left for the caller to fill
    /// (the gRPC frame header) once it is finished; `capacity` is the expected size.
    pub fn new(gzip: bool, prefix: usize, capacity: usize) -> Body {
        let mut out = Vec::with_capacity(prefix + capacity + GZIP_OVERHEAD);
        out.resize(prefix, 0);
        if gzip {
            out.extend_from_slice(&GZIP_HEADER);
        }
        Body { out, gzip, prefix, crc: crc32fast::Hasher::new(), plain_len: 0 }
    }

    /// Appends a piece packed as this body is (compressed or not).
    pub fn push(&mut self, piece: &Packed) {
        assert_eq!(piece.gzip, self.gzip, "a piece packed for another body");
        self.out.extend_from_slice(&piece.data);
        self.crc.combine(&crc32fast::Hasher::new_with_initial_len(piece.crc, piece.plain_len as u64));
        self.plain_len += piece.plain_len as u64;
    }

    /// Appends plain bytes, compressed with `packer` when this body is.
    pub fn push_plain(&mut self, plain: &[u8], packer: &mut Packer) {
        if self.gzip {
            let piece = packer.pack(plain, true, Vec::new());
            self.push(&piece);
        } else {
            self.out.extend_from_slice(plain);
            self.plain_len += plain.len() as u64;
        }
    }

    /// Bytes the receiver reads once it has inflated the body.
    pub fn plain_len(&self) -> u64 {
        self.plain_len
    }

    /// The finished body, the prefix left as zeros.
    pub fn finish(mut self) -> Vec<u8> {
        if self.gzip {
            self.out.extend_from_slice(&FINAL_BLOCK);
            self.out.extend_from_slice(&self.crc.finalize().to_le_bytes());
            // ISIZE: the length modulo 2^32.
            self.out.extend_from_slice(&(self.plain_len as u32).to_le_bytes());
        }
        debug_assert!(self.out.len() >= self.prefix);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn text(seed: u64, lines: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..lines as u64 {
            out.extend_from_slice(
                format!("{{\"message\":\"step {} loss {:.5}\",\"seed\":{seed}}}\n", i * seed, 1.0 / (i + 1) as f64).as_bytes(),
            );
        }
        out
    }

    fn gunzip(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut decoder = flate2::read::GzDecoder::new(body);
        decoder.read_to_end(&mut out).expect("a valid gzip member");
        // One member: nothing after it.
        let mut rest = Vec::new();
        decoder.into_inner().read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes after the member", rest.len());
        out
    }

    #[test]
    fn pieces_compressed_apart_make_one_gzip_member_with_the_right_checksum_and_length() {
        let mut packer = Packer::new();
        let parts = [text(1, 2000), Vec::new(), text(7, 1), text(3, 5000)];
        let pieces: Vec<Packed> = parts.iter().map(|p| packer.pack(p, true, Vec::new())).collect();
        let mut body = Body::new(true, 0, 0);
        for piece in &pieces {
            body.push(piece);
        }
        body.push_plain(b"{\"tail\":1}\n", &mut packer);
        let body = body.finish();
        let mut expected = parts.concat();
        expected.extend_from_slice(b"{\"tail\":1}\n");
        // GzDecoder checks the CRC-32 and the length in the trailer.
        assert_eq!(gunzip(&body), expected);
        let compressed: usize = pieces.iter().map(|p| p.data.len()).sum();
        assert!(compressed * 5 < expected.len(), "compressed: {compressed} of {}", expected.len());
    }

    #[test]
    fn a_piece_inflates_back_and_plain_pieces_are_kept_as_they_are() {
        let mut packer = Packer::new();
        let plain = text(5, 3000);
        let piece = packer.pack(&plain, true, vec![1, 2]);
        assert_eq!(&piece.plain()[..], &plain[..]);
        assert_eq!((piece.plain_len(), piece.ends()), (plain.len(), &[1, 2][..]));
        assert!(piece.held_bytes() < plain.len() / 4, "held {} for {}", piece.held_bytes(), plain.len());
        let raw = packer.pack(&plain, false, Vec::new());
        assert!(matches!(raw.plain(), Cow::Borrowed(_)));
        let mut body = Body::new(false, 5, plain.len());
        body.push(&raw);
        body.push_plain(b"x", &mut packer);
        let body = body.finish();
        assert_eq!((&body[..5], &body[5..body.len() - 1], body[body.len() - 1]), (&[0u8; 5][..], &plain[..], b'x'));
    }

    #[test]
    fn a_prefix_is_left_before_the_member() {
        let mut packer = Packer::new();
        let mut body = Body::new(true, 5, 0);
        body.push(&packer.pack(b"hello\n", true, Vec::new()));
        assert_eq!(body.plain_len(), 6);
        let body = body.finish();
        assert_eq!(&body[..5], &[0; 5]);
        assert_eq!(gunzip(&body[5..]), b"hello\n");
    }

    #[test]
    #[should_panic(expected = "a piece packed for another body")]
    fn a_plain_piece_in_a_gzip_body_is_refused() {
        let piece = Packer::new().pack(b"x", false, Vec::new());
        Body::new(true, 0, 0).push(&piece);
    }
}
