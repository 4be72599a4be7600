//! zstd for `compressed-blobs/zstd/...` resources and batch compressors.
//!
//! Decompression is always bounded by the size the digest declares, so a
//! small compressed message cannot expand into an unbounded allocation.

use std::io::Write;

use zstd::stream::raw::{Decoder, Operation};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Level for data Kiln compresses itself: the fastest; reads are
/// latency-bound, not bandwidth-bound, on the networks Kiln serves.
const LEVEL: i32 = 1;

const OUT_CHUNK: usize = 256 << 10;

/// Decompresses a zstd stream that arrives in pieces.
pub struct StreamDecoder {
    decoder: Decoder<'static>,
    digest: Digest,
    produced: u64,
    fed: bool,
    /// The decoder reported the end of a frame after the last input.
    at_frame_end: bool,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("digest", &self.digest)
            .field("produced", &self.produced)
            .finish()
    }
}

impl StreamDecoder {
    /// A decoder for the compressed form of `digest`.
    pub fn new(digest: Digest) -> Result<Self> {
        Ok(StreamDecoder {
            decoder: Decoder::new().map_err(|e| Error::Task(format!("zstd decoder: {e}")))?,
            digest,
            produced: 0,
            fed: false,
            at_frame_end: false,
        })
    }

    /// Feeds compressed bytes, returning what they decompress to. More
    /// output than the digest's size is INVALID_ARGUMENT.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<u8>> {
        self.fed |= !input.is_empty();
        let mut out = Vec::new();
        let mut buf = vec![0u8; OUT_CHUNK];
        loop {
            let status = self.decoder.run_on_buffers(input, &mut buf).map_err(|e| {
                Error::InvalidArgument(format!(
                    "zstd data for blob {} does not decompress: {e}",
                    self.digest
                ))
            })?;
            input = &input[status.bytes_read..];
            self.produced += status.bytes_written as u64;
            if self.produced > self.digest.size() {
                return Err(Error::SizeMismatch {
                    digest: self.digest,
                    detail: format!(
                        "compressed data expands past the declared size {}",
                        self.digest.size()
                    ),
                });
            }
            out.extend_from_slice(&buf[..status.bytes_written]);
            self.at_frame_end = status.remaining == 0;
            // Done when the input is used up and the last call did not fill
            // the buffer (so nothing is left buffered inside the decoder).
            if input.is_empty() && status.bytes_written < buf.len() {
                break;
            }
            if status.bytes_read == 0 && status.bytes_written == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Checks that the compressed stream ended at the end of a frame.
    pub fn finish(&self) -> Result<()> {
        if self.fed && !self.at_frame_end {
            return Err(Error::InvalidArgument(format!(
                "zstd stream for blob {} ends in the middle of a frame",
                self.digest
            )));
        }
        Ok(())
    }
}

/// Decompresses a whole zstd blob of known size (batch requests).
pub fn decompress(digest: &Digest, data: &[u8]) -> Result<Vec<u8>> {
    let mut d = StreamDecoder::new(*digest)?;
    let out = d.feed(data)?;
    d.finish()?;
    Ok(out)
}

/// Compresses a whole blob (batch responses).
pub fn compress(data: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(data, LEVEL).map_err(|e| Error::Task(format!("zstd compress: {e}")))
}

/// Compresses a stream that is produced in pieces.
pub struct StreamEncoder {
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
}

impl std::fmt::Debug for StreamEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamEncoder")
    }
}

impl StreamEncoder {
    /// A new encoder.
    pub fn new() -> Result<Self> {
        Ok(StreamEncoder {
            encoder: zstd::stream::write::Encoder::new(Vec::new(), LEVEL)
                .map_err(|e| Error::Task(format!("zstd encoder: {e}")))?,
        })
    }

    /// Compresses `input`, returning the compressed bytes ready so far.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<u8>> {
        self.encoder
            .write_all(input)
            .map_err(|e| Error::Task(format!("zstd compress: {e}")))?;
        Ok(std::mem::take(self.encoder.get_mut()))
    }

    /// Ends the stream, returning the last compressed bytes.
    pub fn finish(self) -> Result<Vec<u8>> {
        self.encoder
            .finish()
            .map_err(|e| Error::Task(format!("zstd compress: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_in_pieces_and_bounds() {
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let mut enc = StreamEncoder::new().unwrap();
        let mut z = Vec::new();
        for piece in data.chunks(300_000) {
            z.extend(enc.feed(piece).unwrap());
        }
        z.extend(enc.finish().unwrap());
        let mut dec = StreamDecoder::new(digest).unwrap();
        let mut back = Vec::new();
        for piece in z.chunks(1000) {
            back.extend(dec.feed(piece).unwrap());
        }
        dec.finish().unwrap();
        assert_eq!(back, data);

        let small = Digest::of(&data[..10]);
        let e = decompress(&small, &z).unwrap_err();
        assert!(e.to_string().contains("expands past"), "{e}");
        let e = decompress(&digest, &z[..z.len() / 2]).unwrap_err();
        assert!(e.to_string().contains("middle of a frame"), "{e}");
    }
}
