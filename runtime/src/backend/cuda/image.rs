//! The bytes an arena holds, produced on the host one chunk at a time.
//!
//! The owner never builds the compute copy in host memory: it fills a pinned bounce buffer
//! with the next chunk of an arena's image (tensors widened as the host backend does, zeros in
//! the alignment padding), copies that chunk to the device, and moves on. [`ArenaImage::fill`]
//! writes any byte range of the image, so chunk boundaries may fall anywhere, even inside an
//! element that is being widened. The padding is written too, so the device holds exactly the
//! image and its digest is a function of the model alone.

use crate::backend::host;
use crate::backend::TensorLayout;
use crate::model::Dtype;

/// One tensor of an arena's image: its place in the arena and its bytes in the model file.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// Offset in the arena.
    pub offset: u64,
    /// Bytes in the arena (the compute form).
    pub len: u64,
    /// Dtype in the model file.
    pub src_dtype: Dtype,
    /// The tensor's bytes in the model file.
    pub src: &'a [u8],
}

/// The image of one arena: its pieces in offset order and its used length.
#[derive(Debug, Clone)]
pub struct ArenaImage<'a> {
    pieces: Vec<Piece<'a>>,
    used: u64,
}

impl<'a> ArenaImage<'a> {
    /// Builds the image of an arena from its layouts and the matching model bytes (same order).
    pub fn new(layouts: &[TensorLayout], sources: &[(Dtype, &'a [u8])], used: u64) -> Self {
        let mut pieces: Vec<Piece<'a>> = layouts
            .iter()
            .zip(sources)
            .map(|(l, &(src_dtype, src))| Piece {
                offset: l.offset,
                len: l.len,
                src_dtype,
                src,
            })
            .collect();
        pieces.sort_by_key(|p| p.offset);
        Self { pieces, used }
    }

    /// Bytes of the image.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Writes the image's bytes `start .. start + out.len()` into `out`.
    pub fn fill(&self, start: u64, out: &mut [u8]) {
        let end = start + out.len() as u64;
        out.fill(0);
        let first = self.pieces.partition_point(|p| p.offset + p.len <= start);
        for p in &self.pieces[first..] {
            if p.offset >= end {
                break;
            }
            let a = start.max(p.offset);
            let b = end.min(p.offset + p.len);
            if a >= b {
                continue;
            }
            let dst = &mut out[(a - start) as usize..(b - start) as usize];
            convert_range(p, (a - p.offset) as usize, dst);
        }
    }
}

/// Writes bytes `from .. from + dst.len()` of the compute form of `p` into `dst`.
fn convert_range(p: &Piece<'_>, from: usize, dst: &mut [u8]) {
    let out_size = host::widened_dtype(p.src_dtype).size();
    let in_size = p.src_dtype.size();
    if out_size == in_size {
        dst.copy_from_slice(&p.src[from..from + dst.len()]);
        return;
    }
    // Widened: whole elements go straight through `widen_into`; an element cut by the chunk
    // boundary is converted into a scratch element and the wanted bytes are copied out of it.
    let to = from + dst.len();
    let mut pos = from;
    let mut scratch = [0u8; 8];
    while pos < to {
        let elem = pos / out_size;
        let within = pos % out_size;
        let whole = (to - pos) / out_size;
        if within == 0 && whole > 0 {
            let src = &p.src[elem * in_size..(elem + whole) * in_size];
            let out = &mut dst[pos - from..pos - from + whole * out_size];
            host::widen_into(p.src_dtype, src, out);
            pos += whole * out_size;
        } else {
            let src = &p.src[elem * in_size..(elem + 1) * in_size];
            host::widen_into(p.src_dtype, src, &mut scratch[..out_size]);
            let n = (out_size - within).min(to - pos);
            dst[pos - from..pos - from + n].copy_from_slice(&scratch[within..within + n]);
            pos += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::plan::{plan_arenas, DEFAULT_ARENA_CAP};
    use crate::model::TensorInfo;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// The image built the simple way: the whole arena at once, like the host backend does.
    fn reference(layouts: &[TensorLayout], sources: &[(Dtype, &[u8])], used: u64) -> Vec<u8> {
        let mut out = vec![0u8; used as usize];
        for (l, (d, src)) in layouts.iter().zip(sources) {
            let dst = &mut out[l.offset as usize..(l.offset + l.len) as usize];
            host::widen_into(*d, src, dst);
        }
        out
    }

    #[test]
    fn any_chunking_yields_the_reference_image_and_digest() {
        let data = [
            (Dtype::F16, bytes(2 * 301, 1)),
            (Dtype::U8, bytes(13, 2)),
            (Dtype::BF16, bytes(2 * 77, 3)),
            (Dtype::F32, bytes(4 * 50, 4)),
            (Dtype::I64, bytes(8 * 3, 5)),
            (Dtype::F16, bytes(2, 6)),
        ];
        let infos: Vec<TensorInfo> = data
            .iter()
            .enumerate()
            .map(|(i, (d, b))| TensorInfo {
                name: format!("t{i}"),
                dtype: *d,
                shape: vec![b.len() / d.size()],
                offset: 0,
                len: b.len(),
            })
            .collect();
        let plan = plan_arenas(&infos, 4096, DEFAULT_ARENA_CAP).unwrap();
        assert_eq!(plan.arenas.len(), 1);
        let sources: Vec<(Dtype, &[u8])> = data.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        let used = plan.arenas[0].used;
        let want = reference(&plan.tensors, &sources, used);
        let image = ArenaImage::new(&plan.tensors, &sources, used);
        for chunk in [1usize, 2, 3, 5, 7, 64, 255, 256, 1000, used as usize] {
            let mut got = Vec::new();
            let mut hasher = crate::backend::cuda::digest::ContentHasher::new();
            let mut start = 0u64;
            // Start each chunk with garbage: fill must overwrite padding too.
            while start < used {
                let n = chunk.min((used - start) as usize);
                let mut buf = vec![0xa5u8; n];
                image.fill(start, &mut buf);
                hasher.update(&buf);
                got.extend_from_slice(&buf);
                start += n as u64;
            }
            assert!(got == want, "chunk size {chunk} changes the image");
            assert_eq!(hasher.finish(), crate::backend::digest_bytes(&[&want]));
        }
        // Spot-check the widening itself: f16 element 0 of t0 read across a chunk boundary.
        let mut lo = [0u8; 2];
        let mut hi = [0u8; 2];
        image.fill(0, &mut lo);
        image.fill(2, &mut hi);
        let bits = u16::from_le_bytes([data[0].1[0], data[0].1[1]]);
        let mut one = [0u8; 4];
        host::widen_into(Dtype::F16, &bits.to_le_bytes(), &mut one);
        assert_eq!([lo[0], lo[1], hi[0], hi[1]], one);
    }
}
