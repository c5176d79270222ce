//! Request bodies held compressed from the moment records are encoded.
//!
//! Each batch's part of a request (its `_bulk` lines, its OTLP `ResourceLogs`) is compressed
//! once, when the batch is made, into a [`Packed`] piece: raw deflate from a fresh compressor
//! ending on a byte boundary (a sync flush), with the CRC-32 and length of what it holds. Such
//! pieces put back to back are one deflate stream (no piece refers back into another), so a
//! request's body is a gzip header, the pieces, an empty final block, and the CRC-32 combined
//! from the pieces' own: one gzip member, as any receiver reads it, sent from the pieces as
//! they are held (shared, not copied). Nothing holds a request's uncompressed body (small pieces wait plain,
//! at most 256 KiB of them, then are compressed together), and a batch waiting for its
//! acknowledgement holds only its compressed bytes. A part of a piece (records sent again
//! alone) is inflated and compressed again.

use std::borrow::Cow;
use std::cell::RefCell;

use bytes::Bytes;
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
    /// Raw deflate ending in a sync flush (`gzip`), or the plain bytes; shared with the
    /// request bodies that send it.
    data: Bytes,
    /// Compressed (the piece of a gzip body; a small one for a gzip body is kept plain).
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

    /// `plain` held as it is (copied), with the record ends `ends`.
    fn kept_plain(plain: &[u8], ends: Vec<u32>) -> Packed {
        Packed { data: Bytes::copy_from_slice(plain), gzip: false, crc: 0, plain_len: plain.len(), ends }
    }

    /// Whether it is held compressed.
    pub fn is_compressed(&self) -> bool {
        self.gzip
    }

    /// Plain bytes that sending it whole in a body (compressed when `gzip`) compresses:
    /// none when it is already compressed, or the body is not.
    pub fn work(&self, gzip: bool) -> usize {
        if gzip && !self.gzip {
            self.plain_len
        } else {
            0
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.plain_len == 0
    }

    /// Memory held.
    pub fn held_bytes(&self) -> usize {
        self.data.len() + self.ends.capacity() * 4
    }

    /// Whether `part` (of a request body) is this piece's bytes, shared.
    pub fn shares(&self, part: &Bytes) -> bool {
        !part.is_empty() && part.as_ptr() == self.data.as_ptr() && part.len() == self.data.len()
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

    /// Packs `plain` for a gzip body (when `gzip`) or a plain one, with the record ends
    /// `ends`. For a gzip body, a piece under [`SMALL_PIECE`] is kept plain: compressed
    /// alone it would barely shrink, so it is compressed with its neighbours in the body.
    pub fn pack(&mut self, plain: &[u8], gzip: bool, ends: Vec<u32>) -> Packed {
        if !gzip || plain.len() < SMALL_PIECE {
            return Packed::kept_plain(plain, ends);
        }
        let mut piece = self.piece(gzip);
        piece.write(plain);
        piece.finish(ends)
    }

    /// `plain` compressed as a piece, whatever its size.
    pub fn compressed(&mut self, plain: &[u8], ends: Vec<u32>) -> Packed {
        let mut piece = self.piece(true);
        piece.write(plain);
        piece.finish_compressed(ends)
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

    /// A piece written part by part ([`Piece::write`]), for a gzip body (when `gzip`) or a
    /// plain one. For a gzip body, its parts are compressed as they come once they are past
    /// [`SMALL_PIECE`]: the caller renders a little at a time, and the piece is never held
    /// whole uncompressed.
    pub fn piece(&mut self, gzip: bool) -> Piece<'_> {
        let mut held = std::mem::take(&mut self.plain);
        held.clear();
        Piece { packer: self, gzip, started: false, crc: crc32fast::Hasher::new(), plain_len: 0, held }
    }

    /// Starts a raw deflate stream from a fresh state into the output buffer.
    fn begin(&mut self) {
        self.deflate.get_or_insert_with(|| Compress::new(Compression::fast(), false)).reset();
        self.out.clear();
    }

    /// Compresses `input` into the stream begun by [`Packer::begin`] (`flush`: none between
    /// parts, a sync flush at the end, so the piece ends on a byte boundary).
    fn deflate(&mut self, mut input: &[u8], flush: FlushCompress) {
        let deflate = self.deflate.as_mut().expect("begun");
        self.out.reserve(input.len() / 4 + 64);
        loop {
            let before = deflate.total_in();
            deflate.compress_vec(input, &mut self.out, flush).expect("deflate into memory");
            input = &input[(deflate.total_in() - before) as usize..];
            // Done once every byte is in and the output has room to spare (a flush that
            // filled it may have more to write).
            if input.is_empty() && self.out.len() < self.out.capacity() {
                return;
            }
            self.out.reserve(self.out.capacity().max(4096));
        }
    }

    /// What the stream wrote, sized to fit; the output buffer is kept when modest.
    fn take_output(&mut self) -> Bytes {
        let data = Bytes::copy_from_slice(&self.out);
        if self.out.capacity() > KEPT_OUTPUT {
            self.out = Vec::new();
        }
        data
    }
}

/// A piece being written: see [`Packer::piece`].
pub struct Piece<'p> {
    packer: &'p mut Packer,
    gzip: bool,
    /// Compressing has begun: what came is in the packer's deflate stream.
    started: bool,
    crc: crc32fast::Hasher,
    plain_len: usize,
    /// Plain bytes not compressed (yet): all of them for a plain body, the first ones of a
    /// gzip body until they pass [`SMALL_PIECE`].
    held: Vec<u8>,
}

impl Piece<'_> {
    /// Appends `plain` to the piece.
    pub fn write(&mut self, plain: &[u8]) {
        self.plain_len += plain.len();
        if !self.gzip {
            return self.held.extend_from_slice(plain);
        }
        self.crc.update(plain);
        if !self.started {
            if self.held.len() + plain.len() < SMALL_PIECE {
                return self.held.extend_from_slice(plain);
            }
            self.start();
        }
        self.packer.deflate(plain, FlushCompress::None);
    }

    /// Plain bytes written so far.
    pub fn written(&self) -> usize {
        self.plain_len
    }

    /// Writes what `rendered` holds once it has reached [`SPILL_BYTES`], and empties it: bytes
    /// rendered a little at a time go in while they are still in the CPU's cache.
    pub fn spill(&mut self, rendered: &mut Vec<u8>) {
        if rendered.len() >= SPILL_BYTES {
            self.write(rendered);
            rendered.clear();
        }
    }

    /// Begins compressing, with what was held.
    fn start(&mut self) {
        self.packer.begin();
        self.started = true;
        self.packer.deflate(&self.held, FlushCompress::None);
        self.held.clear();
    }

    /// The piece, with the record ends `ends`: compressed, or plain where it stayed small (or
    /// the body is plain).
    pub fn finish(self, ends: Vec<u32>) -> Packed {
        if !self.started {
            return Packed::kept_plain(&self.held, ends);
        }
        self.packer.deflate(&[], FlushCompress::Sync);
        let crc = self.crc.clone().finalize();
        Packed { data: self.packer.take_output(), gzip: true, crc, plain_len: self.plain_len, ends }
    }

    /// The piece compressed, however small.
    pub fn finish_compressed(mut self, ends: Vec<u32>) -> Packed {
        assert!(self.gzip, "a compressed piece for a plain body");
        if !self.started {
            self.start();
        }
        self.finish(ends)
    }
}

impl Drop for Piece<'_> {
    /// Gives the held buffer back for the next piece, unless a rare huge piece grew it.
    fn drop(&mut self) {
        if self.held.capacity() <= KEPT_BUFFER {
            self.packer.plain = std::mem::take(&mut self.held);
        }
    }
}

/// Rendered bytes gathered before they go into a piece (documents, OTLP records): small
/// enough to be compressed while they are still in the CPU's cache.
pub const SPILL_BYTES: usize = 64 * 1024;

/// Buffers larger than this are given back rather than kept for the next piece.
pub const KEPT_BUFFER: usize = 4 << 20;

/// The compressed-output buffer kept for the next piece: every thread that ever put a body
/// together keeps one, so only a modest one.
const KEPT_OUTPUT: usize = 1 << 20;

/// Plain bytes a body may compress or inflate on an async thread (a fraction of a
/// millisecond at gzip's fastest level); a body that takes more is put together off them.
pub const INLINE_WORK: usize = 64 * 1024;

/// Plain bytes a body gathers before it compresses them as a piece.
const PENDING_LIMIT: usize = 256 * 1024;

/// Pieces smaller than this are kept plain, and compressed together with their neighbours
/// when a request is put together: a quiet container's batch of a line or two, compressed
/// alone, would shrink little (a fresh compressor knows none of the text before it) and cost
/// a compressor reset each.
pub const SMALL_PIECE: usize = 16 * 1024;

/// A request body put together from pieces: one gzip member, or the plain bytes back to back.
/// The pieces go into it shared, not copied. Plain bytes pushed into a gzip body (small
/// pieces, records sent again alone) gather until a compressed piece or the end, and are
/// compressed together as one piece.
pub struct Body<'p> {
    /// The prefix and the gzip header.
    head: Vec<u8>,
    parts: Vec<Bytes>,
    len: usize,
    gzip: bool,
    crc: crc32fast::Hasher,
    plain_len: u64,
    /// Plain bytes waiting to be compressed (or, in a plain body, to be one part).
    pending: Vec<u8>,
    packer: &'p mut Packer,
}

impl<'p> Body<'p> {
    /// An empty body, compressed or not, after `prefix` bytes for the caller to fill in when
    /// it is finished ([`Body::finish_with_prefix`]); `parts` is how many pieces to expect.
    /// What must be compressed here is compressed with `packer`.
    pub fn new(gzip: bool, prefix: usize, parts: usize, packer: &'p mut Packer) -> Body<'p> {
        let mut head = vec![0; prefix];
        if gzip {
            head.extend_from_slice(&GZIP_HEADER);
        }
        let len = head.len();
        Body {
            head,
            parts: Vec::with_capacity(parts + 2),
            len,
            gzip,
            crc: crc32fast::Hasher::new(),
            plain_len: 0,
            pending: Vec::new(),
            packer,
        }
    }

    /// Appends a piece packed for this body (compressed or kept plain for a gzip body, plain
    /// for a plain one).
    pub fn push(&mut self, piece: &Packed) {
        if piece.is_empty() {
            return;
        }
        if piece.gzip {
            assert!(self.gzip, "a compressed piece in a plain body");
        } else if self.gzip {
            return self.push_plain(&piece.data);
        }
        self.flush_pending();
        self.append(piece);
    }

    /// Appends plain bytes, compressed (with what else waits) when this body is.
    pub fn push_plain(&mut self, plain: &[u8]) {
        self.pending.extend_from_slice(plain);
        // A body of many small pieces is compressed as it grows, not held whole.
        if self.pending.len() >= PENDING_LIMIT {
            self.flush_pending();
        }
    }

    fn append(&mut self, piece: &Packed) {
        self.len += piece.data.len();
        self.parts.push(piece.data.clone());
        if self.gzip {
            self.crc.combine(&crc32fast::Hasher::new_with_initial_len(piece.crc, piece.plain_len as u64));
        }
        self.plain_len += piece.plain_len as u64;
    }

    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let piece = match self.gzip {
            true => self.packer.compressed(&self.pending, Vec::new()),
            false => Packed::kept_plain(&self.pending, Vec::new()),
        };
        self.pending.clear();
        self.append(&piece);
    }

    /// The finished body, the prefix left as zeros.
    pub fn finish(self) -> Chunks {
        self.finish_with_prefix(|_, _| {})
    }

    /// The finished body, the prefix filled in by `fill` given the length of what follows it.
    pub fn finish_with_prefix(mut self, fill: impl FnOnce(&mut [u8], usize)) -> Chunks {
        self.flush_pending();
        if self.gzip {
            let mut trailer = Vec::with_capacity(FINAL_BLOCK.len() + 8);
            trailer.extend_from_slice(&FINAL_BLOCK);
            trailer.extend_from_slice(&self.crc.clone().finalize().to_le_bytes());
            // ISIZE: the length modulo 2^32.
            trailer.extend_from_slice(&(self.plain_len as u32).to_le_bytes());
            self.len += trailer.len();
            self.parts.push(Bytes::from(trailer));
        }
        let prefix = self.head.len() - if self.gzip { GZIP_HEADER.len() } else { 0 };
        let (head_prefix, _) = self.head.split_at_mut(prefix);
        fill(head_prefix, self.len - prefix);
        let mut parts = Vec::with_capacity(self.parts.len() + 1);
        parts.push(Bytes::from(std::mem::take(&mut self.head)));
        parts.append(&mut self.parts);
        Chunks { parts, len: self.len }
    }
}

/// A finished request body: its parts in order, the pieces among them shared with their
/// batches. Clones share the parts.
#[derive(Debug, Clone, Default)]
pub struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    /// Bytes sent.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The body as one buffer (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.concat()
    }

    /// An HTTP body sending the parts in turn, its exact length known (`Content-Length`).
    pub fn http_body(&self) -> ChunksBody {
        ChunksBody { parts: self.parts.iter().rev().filter(|p| !p.is_empty()).cloned().collect(), left: self.len as u64 }
    }
}

/// [`Chunks`] as an `http_body::Body`.
#[derive(Debug)]
pub struct ChunksBody {
    /// Left to send, last first.
    parts: Vec<Bytes>,
    left: u64,
}

impl http_body::Body for ChunksBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.parts.pop();
        if let Some(part) = &next {
            self.left -= part.len() as u64;
        }
        std::task::Poll::Ready(next.map(|part| Ok(http_body::Frame::data(part))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
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
        let parts = [text(1, 2000), Vec::new(), text(7, 1), text(3, 5000), text(9, 3)];
        let pieces: Vec<Packed> = parts.iter().map(|p| packer.pack(p, true, Vec::new())).collect();
        assert_eq!(pieces.iter().map(|p| p.gzip).collect::<Vec<_>>(), [true, false, false, true, false], "small pieces kept plain");
        let mut joiner = Packer::new();
        let mut body = Body::new(true, 0, 0, &mut joiner);
        for piece in &pieces {
            body.push(piece);
        }
        body.push_plain(b"{\"tail\":1}\n");
        let body = body.finish().to_vec();
        let mut expected = parts.concat();
        expected.extend_from_slice(b"{\"tail\":1}\n");
        // GzDecoder checks the CRC-32 and the length in the trailer.
        assert_eq!(gunzip(&body), expected);
        let compressed: usize = pieces.iter().filter(|p| p.gzip).map(|p| p.data.len()).sum();
        assert!(compressed * 5 < expected.len(), "compressed: {compressed} of {}", expected.len());
    }

    #[test]
    fn small_pieces_are_compressed_together_when_the_body_is_put_together() {
        let mut packer = Packer::new();
        // A request of 300 one-line batches from quiet containers.
        let parts: Vec<Vec<u8>> = (0..300).map(|i| text(i, 1)).collect();
        let pieces: Vec<Packed> = parts.iter().map(|p| packer.pack(p, true, Vec::new())).collect();
        let held: usize = pieces.iter().map(Packed::packed_len).sum();
        let plain: usize = parts.iter().map(Vec::len).sum();
        assert_eq!(held, plain, "kept plain until the request");
        let mut body = Body::new(true, 0, 0, &mut packer);
        for piece in &pieces {
            body.push(piece);
        }
        let body = body.finish().to_vec();
        assert_eq!(gunzip(&body), parts.concat());
        assert!(body.len() * 4 < plain, "{} bytes for {plain}: compressed as one", body.len());
    }

    #[test]
    fn a_body_of_many_small_pieces_never_holds_much_of_them_plain() {
        let mut packer = Packer::new();
        let parts: Vec<Vec<u8>> = (0..5000).map(|i| text(i, 4)).collect();
        let pieces: Vec<Packed> = parts.iter().map(|p| packer.pack(p, true, Vec::new())).collect();
        let mut joiner = Packer::new();
        let mut body = Body::new(true, 0, pieces.len(), &mut joiner);
        let mut most = 0;
        for piece in &pieces {
            body.push(piece);
            most = most.max(body.pending.capacity());
        }
        assert!(most <= 2 * PENDING_LIMIT, "{most} bytes held plain");
        let plain: usize = parts.iter().map(Vec::len).sum();
        assert!(plain > 2 * PENDING_LIMIT, "enough to need more than one flush");
        assert_eq!(gunzip(&body.finish().to_vec()), parts.concat());
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
        let mut joiner = Packer::new();
        let mut body = Body::new(false, 5, plain.len(), &mut joiner);
        body.push(&raw);
        body.push(&Packed::default());
        body.push_plain(b"x");
        let body = body.finish().to_vec();
        assert_eq!((&body[..5], &body[5..body.len() - 1], body[body.len() - 1]), (&[0u8; 5][..], &plain[..], b'x'));
    }

    #[test]
    fn a_piece_written_part_by_part_is_the_piece_of_the_whole_and_stays_plain_while_small() {
        let mut packer = Packer::new();
        let plain = text(7, 4000);
        let mut piece = packer.piece(true);
        for part in plain.chunks(1000) {
            piece.write(part);
        }
        let piece = piece.finish(vec![3]);
        let whole = Packer::new().pack(&plain, true, vec![3]);
        assert!(piece.gzip && piece.packed_len() * 4 < plain.len(), "{} bytes for {}", piece.packed_len(), plain.len());
        assert_eq!((&piece.plain()[..], piece.ends(), piece.crc), (&plain[..], &[3][..], whole.crc));
        let mut body = Body::new(true, 0, 2, &mut packer);
        body.push(&piece);
        body.push(&whole);
        assert_eq!(gunzip(&body.finish().to_vec()), [&plain[..], &plain[..]].concat(), "pieces back to back are one member");
        // Parts adding up to less than a small piece are held plain, then compressed only
        // when asked to be.
        let mut piece = packer.piece(true);
        piece.write(b"one line\n");
        piece.write(b"another\n");
        let small = piece.finish(Vec::new());
        assert!(!small.gzip);
        assert_eq!(&small.plain()[..], b"one line\nanother\n");
        let mut piece = packer.piece(true);
        piece.write(b"one line\n");
        let forced = piece.finish_compressed(Vec::new());
        assert!(forced.gzip);
        assert_eq!(&forced.plain()[..], b"one line\n");
        // For a plain body, parts are simply joined.
        let mut piece = packer.piece(false);
        piece.write(&plain[..5000]);
        piece.write(&plain[5000..]);
        let raw = piece.finish(Vec::new());
        assert_eq!((raw.gzip, &raw.plain()[..]), (false, &plain[..]));
    }

    #[test]
    fn a_prefix_is_left_before_the_member_and_an_empty_body_is_a_valid_member() {
        let mut packer = Packer::new();
        let mut body = Body::new(true, 5, 0, &mut packer);
        body.push_plain(b"hello\n");
        let body = body.finish().to_vec();
        assert_eq!(&body[..5], &[0; 5]);
        assert_eq!(gunzip(&body[5..]), b"hello\n");
        let mut body = Body::new(true, 0, 0, &mut packer);
        body.push(&Packed::default());
        assert_eq!(gunzip(&body.finish().to_vec()), b"");
    }

    #[test]
    #[should_panic(expected = "a compressed piece in a plain body")]
    fn a_compressed_piece_in_a_plain_body_is_refused() {
        let mut packer = Packer::new();
        let piece = packer.pack(&text(1, 1000), true, Vec::new());
        Body::new(false, 0, 0, &mut packer).push(&piece);
    }
}
