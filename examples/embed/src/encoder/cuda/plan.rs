//! The arithmetic of the CUDA encoder, free of CUDA so that it is tested on any machine: which
//! texts run together, where each activation lives in the one device buffer, the launch
//! geometry of the kernels, and the cuBLAS calls (transposes, leading dimensions, strides)
//! with the extent of memory each one reads or writes, which [`super::launch`] checks against
//! the buffers before every call.
//!
//! Layout: activations are token-major (`[rows][features]`, row-major), the natural form of a
//! column-major BLAS: `[rows][n]` row-major is the column-major `n × rows` matrix with leading
//! dimension `n`. A torch weight `W` (`[out][in]`, row-major) is the column-major `in × out`
//! matrix, so `Y = X · Wᵀ` is, column-major, `Yᶜ = op_T(Wᶜ) · Xᶜ` — the weight is read in
//! place, transposed by the call, never copied.

use std::ops::Range;

/// Threads per block of every kernel (a power of two; `BLOCK` in the kernels' source).
pub const BLOCK: u32 = 256;

/// Most blocks an element-wise launch uses; the kernels stride over the rest.
pub const MAX_GRID: u32 = 65_535;

/// Dimensions of the model, copied out of the config once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub max_positions: usize,
    pub eps: f32,
}

/// `(grid, block)` of a kernel launch, x dimension only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: u32,
    pub block: u32,
}

impl Geometry {
    /// A grid-stride kernel over `n` elements: enough blocks to give every element a thread,
    /// at most [`MAX_GRID`], at least one.
    pub fn elementwise(n: usize) -> Self {
        let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID as usize);
        Self {
            grid: blocks as u32,
            block: BLOCK,
        }
    }

    /// One block per row (LayerNorm, softmax, pooling, normalisation). `None` when there are
    /// no rows or more than a grid can hold.
    pub fn per_row(rows: usize) -> Option<Self> {
        let grid = u32::try_from(rows)
            .ok()
            .filter(|&g| g >= 1 && g <= i32::MAX as u32)?;
        Some(Self { grid, block: BLOCK })
    }
}

/// Consecutive runs of whole texts, each at most `max_rows` word pieces (a longer text runs
/// alone): the chunks the encoder computes one after another.
pub fn chunks(lens: &[usize], max_rows: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut first = 0;
    while first < lens.len() {
        let mut last = first + 1;
        let mut rows = lens[first];
        while last < lens.len() && rows + lens[last] <= max_rows {
            rows += lens[last];
            last += 1;
        }
        out.push(first..last);
        first = last;
    }
    out
}

/// Where each activation of a chunk lives, in elements from the start of the one f32 buffer
/// (and, for the word pieces and spans, the one u32 buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub rows: usize,
    pub texts: usize,
    pub max_len: usize,
    /// Hidden states, `[rows][hidden]`.
    pub x: Range<usize>,
    pub q: Range<usize>,
    pub k: Range<usize>,
    pub v: Range<usize>,
    /// Attention output before its projection, `[rows][hidden]`.
    pub ctx: Range<usize>,
    /// A sublayer's output before add & norm, `[rows][hidden]`.
    pub tmp: Range<usize>,
    /// Feed-forward activations, `[rows][inter]`.
    pub inter: Range<usize>,
    /// Attention probabilities of one text, `[heads][len][len]` (query-major).
    pub scores: Range<usize>,
    /// Sentence vectors, `[texts][hidden]`.
    pub out: Range<usize>,
    /// f32 elements in all.
    pub floats: usize,
    /// In the u32 buffer: word piece ids, type ids, positions (`rows` each).
    pub tokens: Range<usize>,
    /// In the u32 buffer: each text's first row (relative to the chunk), then each length.
    pub spans: Range<usize>,
    /// u32 elements in all.
    pub words: usize,
}

impl Layout {
    /// The layout of a chunk of `texts` texts, `rows` word pieces, the longest `max_len`.
    /// `None` if a size overflows.
    pub fn new(d: &Dims, rows: usize, texts: usize, max_len: usize) -> Option<Self> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<Range<usize>> {
            let r = at..at.checked_add(n)?;
            at = r.end;
            Some(r)
        };
        let rh = rows.checked_mul(d.hidden)?;
        let x = take(rh)?;
        let q = take(rh)?;
        let k = take(rh)?;
        let v = take(rh)?;
        let ctx = take(rh)?;
        let tmp = take(rh)?;
        let inter = take(rows.checked_mul(d.inter)?)?;
        let scores = take(d.heads.checked_mul(max_len)?.checked_mul(max_len)?)?;
        let out = take(texts.checked_mul(d.hidden)?)?;
        let floats = at;
        let tokens = 0..rows.checked_mul(3)?;
        let spans = tokens.end..tokens.end.checked_add(texts.checked_mul(2)?)?;
        let words = spans.end;
        Some(Self {
            rows,
            texts,
            max_len,
            x,
            q,
            k,
            v,
            ctx,
            tmp,
            inter,
            scores,
            out,
            floats,
            tokens,
            spans,
            words,
        })
    }
}

/// Capacity to allocate for `needed` elements when `have` are too few: at least half as much
/// again as before, so a slowly growing load reallocates a few times only.
pub fn grow(have: usize, needed: usize) -> usize {
    if needed <= have {
        have
    } else {
        needed.max(have.saturating_add(have / 2))
    }
}

/// One (strided-batched) cuBLAS `sgemm`, column-major: `C = alpha · op(A) · op(B) + beta · C`
/// for each of `batch` matrices, operands at element offsets `*_off` of their buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmPlan {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub a_off: usize,
    pub b_off: usize,
    pub c_off: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
}

/// Elements from the start of a buffer that a column-major `rows × cols` operand with leading
/// dimension `ld`, batched, touches.
fn extent(off: usize, rows: usize, cols: usize, ld: usize, stride: usize, batch: usize) -> usize {
    if rows == 0 || cols == 0 || batch == 0 {
        return off;
    }
    off + (batch - 1) * stride + (cols - 1) * ld + rows
}

impl GemmPlan {
    /// Stored shape of A (rows, cols) in column-major terms.
    fn a_shape(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    fn b_shape(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Elements of A's buffer the call reads (from the buffer's start).
    pub fn extent_a(&self) -> usize {
        let (r, c) = self.a_shape();
        extent(self.a_off, r, c, self.lda, self.stride_a, self.batch)
    }

    pub fn extent_b(&self) -> usize {
        let (r, c) = self.b_shape();
        extent(self.b_off, r, c, self.ldb, self.stride_b, self.batch)
    }

    /// Elements of C's buffer the call writes.
    pub fn extent_c(&self) -> usize {
        extent(
            self.c_off,
            self.m,
            self.n,
            self.ldc,
            self.stride_c,
            self.batch,
        )
    }

    /// Whether the leading dimensions are legal for cuBLAS (at least the stored rows) and
    /// every size fits its `int`.
    pub fn is_valid(&self) -> bool {
        let (ar, _) = self.a_shape();
        let (br, _) = self.b_shape();
        let fits = |v: usize| i32::try_from(v).is_ok();
        self.lda >= ar.max(1)
            && self.ldb >= br.max(1)
            && self.ldc >= self.m.max(1)
            && [
                self.m, self.n, self.k, self.lda, self.ldb, self.ldc, self.batch,
            ]
            .into_iter()
            .all(fits)
            && self.batch >= 1
    }

    /// `Y[rows][out] = X[rows][in] · Wᵀ` (torch's `W`, `[out][in]`), no bias, `Y` overwritten.
    /// A is the weight, B the activations, C the output; offsets are 0.
    pub fn linear(rows: usize, in_dim: usize, out_dim: usize) -> Self {
        Self {
            trans_a: true,
            trans_b: false,
            m: out_dim,
            n: rows,
            k: in_dim,
            alpha: 1.0,
            beta: 0.0,
            lda: in_dim,
            ldb: in_dim,
            ldc: out_dim,
            a_off: 0,
            b_off: 0,
            c_off: 0,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            batch: 1,
        }
    }

    /// Attention scores of every head of one text (rows `start..start + len` of the chunk):
    /// `S[h][i][j] = scale · q_i · k_j` over head `h`'s features. A is K, B is Q (both
    /// `[rows][hidden]`), C the scores buffer, `[heads][len][len]` query-major.
    pub fn scores(d: &Dims, start: usize, len: usize, scale: f32) -> Self {
        Self {
            trans_a: true,
            trans_b: false,
            m: len,
            n: len,
            k: d.head_dim,
            alpha: scale,
            beta: 0.0,
            lda: d.hidden,
            ldb: d.hidden,
            ldc: len,
            a_off: start * d.hidden,
            b_off: start * d.hidden,
            c_off: 0,
            stride_a: d.head_dim,
            stride_b: d.head_dim,
            stride_c: len * len,
            batch: d.heads,
        }
    }

    /// The attention output of every head of one text: `ctx[i][h·hd + e] = Σ_j P[h][i][j] ·
    /// v_j[h·hd + e]`. A is V, B the probabilities, C the context buffer.
    pub fn context(d: &Dims, start: usize, len: usize) -> Self {
        Self {
            trans_a: false,
            trans_b: false,
            m: d.head_dim,
            n: len,
            k: len,
            alpha: 1.0,
            beta: 0.0,
            lda: d.hidden,
            ldb: len,
            ldc: d.hidden,
            a_off: start * d.hidden,
            b_off: 0,
            c_off: start * d.hidden,
            stride_a: d.head_dim,
            stride_b: len * len,
            stride_c: d.head_dim,
            batch: d.heads,
        }
    }
}

#[cfg(test)]
/// cuBLAS' `sgemmStridedBatched`, on the host: the reference the plans are checked with.
pub(crate) fn sgemm(p: &GemmPlan, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(p.is_valid(), "{p:?}");
    assert!(p.extent_a() <= a.len() && p.extent_b() <= b.len() && p.extent_c() <= c.len());
    for bi in 0..p.batch {
        let (ao, bo, co) = (
            p.a_off + bi * p.stride_a,
            p.b_off + bi * p.stride_b,
            p.c_off + bi * p.stride_c,
        );
        for i in 0..p.m {
            for j in 0..p.n {
                let mut acc = 0.0;
                for l in 0..p.k {
                    let av = if p.trans_a {
                        a[ao + l + i * p.lda]
                    } else {
                        a[ao + i + l * p.lda]
                    };
                    let bv = if p.trans_b {
                        b[bo + j + l * p.ldb]
                    } else {
                        b[bo + l + j * p.ldb]
                    };
                    acc += av * bv;
                }
                // As cuBLAS: with beta = 0, C is not read (it may hold NaN).
                let cv = &mut c[co + i + j * p.ldc];
                *cv = if p.beta == 0.0 {
                    p.alpha * acc
                } else {
                    p.alpha * acc + p.beta * *cv
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dims {
        Dims {
            hidden: 6,
            heads: 2,
            head_dim: 3,
            inter: 8,
            max_positions: 16,
            eps: 1e-12,
        }
    }

    /// Deterministic, distinct test values.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 97) as f32 / 37.0 - 1.3)
            .collect()
    }

    #[test]
    fn linear_multiplies_by_the_transposed_torch_weight() {
        let (rows, in_dim, out_dim) = (3, 4, 5);
        let x = values(rows * in_dim, 1);
        let w = values(out_dim * in_dim, 2);
        let mut y = vec![f32::NAN; rows * out_dim];
        sgemm(&GemmPlan::linear(rows, in_dim, out_dim), &w, &x, &mut y);
        for r in 0..rows {
            for o in 0..out_dim {
                let want: f32 = (0..in_dim)
                    .map(|i| x[r * in_dim + i] * w[o * in_dim + i])
                    .sum();
                assert!((y[r * out_dim + o] - want).abs() < 1e-5, "({r}, {o})");
            }
        }
    }

    #[test]
    fn attention_plans_compute_each_head_of_one_text() {
        let d = dims();
        // A chunk of 5 rows: text 0 is rows 0..2, text 1 rows 2..5.
        let rows = 5;
        let q = values(rows * d.hidden, 3);
        let k = values(rows * d.hidden, 4);
        let v = values(rows * d.hidden, 5);
        let (start, len, scale) = (2, 3, 0.5);
        let mut s = vec![f32::NAN; d.heads * len * len];
        sgemm(&GemmPlan::scores(&d, start, len, scale), &k, &q, &mut s);
        for h in 0..d.heads {
            for i in 0..len {
                for j in 0..len {
                    let want: f32 = (0..d.head_dim)
                        .map(|e| {
                            let f = h * d.head_dim + e;
                            q[(start + i) * d.hidden + f] * k[(start + j) * d.hidden + f]
                        })
                        .sum::<f32>()
                        * scale;
                    let got = s[h * len * len + i * len + j];
                    assert!((got - want).abs() < 1e-5, "head {h} ({i}, {j})");
                }
            }
        }
        // Any probabilities will do for the context product.
        let p = values(d.heads * len * len, 6);
        let mut ctx = vec![f32::NAN; rows * d.hidden];
        sgemm(&GemmPlan::context(&d, start, len), &v, &p, &mut ctx);
        for h in 0..d.heads {
            for i in 0..len {
                for e in 0..d.head_dim {
                    let f = h * d.head_dim + e;
                    let want: f32 = (0..len)
                        .map(|j| p[h * len * len + i * len + j] * v[(start + j) * d.hidden + f])
                        .sum();
                    let got = ctx[(start + i) * d.hidden + f];
                    assert!((got - want).abs() < 1e-5, "head {h} row {i} feature {e}");
                }
            }
        }
        // The other text's rows are not written.
        assert!(ctx[..start * d.hidden].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn extents_are_exact() {
        let d = dims();
        let p = GemmPlan::linear(3, 4, 5);
        assert_eq!((p.extent_a(), p.extent_b(), p.extent_c()), (20, 12, 15));
        // The last text of a 5-row chunk: the scores reach exactly the end of Q and K.
        let p = GemmPlan::scores(&d, 2, 3, 1.0);
        assert_eq!((p.extent_a(), p.extent_b()), (5 * d.hidden, 5 * d.hidden));
        assert_eq!(p.extent_c(), d.heads * 9);
        let p = GemmPlan::context(&d, 2, 3);
        assert_eq!((p.extent_a(), p.extent_b(), p.extent_c()), (30, 18, 30));
        let mut bad = GemmPlan::linear(3, 4, 5);
        bad.lda = 3;
        assert!(!bad.is_valid());
        assert!(!GemmPlan::linear(1 << 31, 4, 5).is_valid());
    }

    #[test]
    fn geometry_covers_every_element_and_row() {
        assert_eq!(
            Geometry::elementwise(0),
            Geometry {
                grid: 1,
                block: 256
            }
        );
        assert_eq!(Geometry::elementwise(256).grid, 1);
        assert_eq!(Geometry::elementwise(257).grid, 2);
        assert_eq!(Geometry::elementwise(usize::MAX).grid, MAX_GRID);
        assert!(BLOCK.is_power_of_two());
        assert_eq!(
            Geometry::per_row(7),
            Some(Geometry {
                grid: 7,
                block: 256
            })
        );
        assert_eq!(Geometry::per_row(0), None);
        assert_eq!(Geometry::per_row(1 << 40), None);
    }

    #[test]
    fn chunks_hold_whole_texts() {
        assert_eq!(chunks(&[3, 4, 2, 9, 1], 8), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(chunks(&[1, 1, 1], 8), vec![0..3]);
        assert!(chunks(&[], 8).is_empty());
    }

    #[test]
    fn layout_packs_every_buffer_without_overlap() {
        let d = dims();
        let l = Layout::new(&d, 5, 2, 3).unwrap();
        let mut ranges = [
            &l.x, &l.q, &l.k, &l.v, &l.ctx, &l.tmp, &l.inter, &l.scores, &l.out,
        ];
        ranges.sort_by_key(|r| r.start);
        for w in ranges.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        assert_eq!(l.x.len(), 30);
        assert_eq!(l.inter.len(), 40);
        assert_eq!(l.scores.len(), 18);
        assert_eq!(l.out.len(), 12);
        assert_eq!(l.floats, 6 * 30 + 40 + 18 + 12);
        assert_eq!(
            (l.tokens.clone(), l.spans.clone(), l.words),
            (0..15, 15..19, 19)
        );
        assert!(Layout::new(&d, usize::MAX / 2, 1, 1).is_none());
    }

    #[test]
    fn buffers_grow_geometrically() {
        assert_eq!(grow(100, 50), 100);
        assert_eq!(grow(100, 120), 150);
        assert_eq!(grow(100, 400), 400);
        assert_eq!(grow(0, 7), 7);
    }
}
