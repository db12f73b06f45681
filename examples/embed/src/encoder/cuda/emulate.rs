//! Tests of the CUDA encoder's orchestration without a GPU: [`Emulator`] executes every
//! [`Exec`] operation on the host, over one array standing for device memory (a [`Buf`]'s
//! address is a byte offset into it), with the same bounds the kernels assume. The forward
//! pass, as the GPU runs it (layout, chunk word pieces, cuBLAS plans, kernel arguments), is then
//! compared with a direct BERT written out text by text.

use super::launch::Buf;
use super::plan::{self, Dims, GemmPlan, Layout};
use super::{chunk_words, forward, Exec};
use crate::error::EmbedError;
use crate::spec::{BertTensors, LayerTensors, Pooling};
use crate::testutil::Rng;
use crate::tokenize::TokenBatch;

/// Host memory standing in for the device's: f32 elements; u32 ones are stored as their bits.
struct Emulator {
    mem: Vec<f32>,
}

impl Emulator {
    fn put(&mut self, data: &[f32]) -> Buf {
        let b = Buf::new((self.mem.len() * 4) as u64, data.len());
        self.mem.extend_from_slice(data);
        b
    }

    fn zeros(&mut self, n: usize) -> Buf {
        self.put(&vec![0.0; n])
    }

    /// The element index of `b`'s start, checking that `n` elements fit in it.
    fn at(&self, b: Buf, n: usize) -> usize {
        assert!(
            n <= b.len(),
            "an access of {n} elements to a buffer of {}",
            b.len()
        );
        (b.ptr() / 4) as usize
    }

    fn word(&self, b: Buf, i: usize) -> usize {
        self.mem[self.at(b, i + 1) + i].to_bits() as usize
    }
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl Exec for Emulator {
    fn embed(
        &mut self,
        x: Buf,
        tokens: Buf,
        word: Buf,
        position: Buf,
        token_type: Buf,
        rows: usize,
        hidden: usize,
    ) -> Result<(), EmbedError> {
        let xi = self.at(x, rows * hidden);
        for r in 0..rows {
            let (id, ty, pos) = (
                self.word(tokens, r),
                self.word(tokens, rows + r),
                self.word(tokens, 2 * rows + r),
            );
            for f in 0..hidden {
                self.mem[xi + r * hidden + f] = self.mem
                    [self.at(word, (id + 1) * hidden) + id * hidden + f]
                    + self.mem[self.at(position, (pos + 1) * hidden) + pos * hidden + f]
                    + self.mem[self.at(token_type, (ty + 1) * hidden) + ty * hidden + f];
            }
        }
        Ok(())
    }

    fn add_bias(
        &mut self,
        y: Buf,
        bias: Buf,
        rows: usize,
        cols: usize,
        gelu_too: bool,
    ) -> Result<(), EmbedError> {
        let (yi, bi) = (self.at(y, rows * cols), self.at(bias, cols));
        for i in 0..rows * cols {
            let v = self.mem[yi + i] + self.mem[bi + i % cols];
            self.mem[yi + i] = if gelu_too { gelu(v) } else { v };
        }
        Ok(())
    }

    fn layer_norm(
        &mut self,
        x: Buf,
        residual: Option<Buf>,
        w: Buf,
        b: Buf,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), EmbedError> {
        let xi = self.at(x, rows * hidden);
        let ri = residual.map(|r| self.at(r, rows * hidden));
        let (wi, bi) = (self.at(w, hidden), self.at(b, hidden));
        for r in 0..rows {
            let row: Vec<f32> = (0..hidden)
                .map(|f| {
                    self.mem[xi + r * hidden + f]
                        + ri.map_or(0.0, |ri| self.mem[ri + r * hidden + f])
                })
                .collect();
            let mean = row.iter().sum::<f32>() / hidden as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / hidden as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (f, v) in row.iter().enumerate() {
                self.mem[xi + r * hidden + f] =
                    (v - mean) * inv * self.mem[wi + f] + self.mem[bi + f];
            }
        }
        Ok(())
    }

    fn softmax(&mut self, s: Buf, nrows: usize, len: usize) -> Result<(), EmbedError> {
        let si = self.at(s, nrows * len);
        for row in self.mem[si..si + nrows * len].chunks_exact_mut(len) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row
                .iter_mut()
                .map(|v| {
                    *v = (*v - m).exp();
                    *v
                })
                .sum();
            row.iter_mut().for_each(|v| *v /= sum);
        }
        Ok(())
    }

    fn pool(
        &mut self,
        out: Buf,
        x: Buf,
        spans: Buf,
        texts: usize,
        rows: usize,
        hidden: usize,
        mode: i32,
    ) -> Result<(), EmbedError> {
        let (oi, xi) = (self.at(out, texts * hidden), self.at(x, rows * hidden));
        for t in 0..texts {
            let (start, len) = (self.word(spans, t), self.word(spans, texts + t));
            assert!(start + len <= rows);
            for f in 0..hidden {
                let col = (start..start + len).map(|r| self.mem[xi + r * hidden + f]);
                self.mem[oi + t * hidden + f] = match mode {
                    0 => col.sum::<f32>() / len as f32,
                    1 => self.mem[xi + start * hidden + f],
                    2 => col.fold(f32::NEG_INFINITY, f32::max),
                    _ => col.sum::<f32>() / (len as f32).sqrt(),
                };
            }
        }
        Ok(())
    }

    fn l2_normalize(&mut self, v: Buf, texts: usize, hidden: usize) -> Result<(), EmbedError> {
        let vi = self.at(v, texts * hidden);
        for row in self.mem[vi..vi + texts * hidden].chunks_exact_mut(hidden) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= n);
        }
        Ok(())
    }

    fn sgemm(&mut self, p: &GemmPlan, a: Buf, b: Buf, c: Buf) -> Result<(), EmbedError> {
        let ai = self.at(a, p.extent_a());
        let bi = self.at(b, p.extent_b());
        let ci = self.at(c, p.extent_c());
        let av = self.mem[ai..ai + a.len()].to_vec();
        let bv = self.mem[bi..bi + b.len()].to_vec();
        plan::sgemm(p, &av, &bv, &mut self.mem[ci..ci + c.len()]);
        Ok(())
    }
}

/// A direct BERT over row-major host tensors, one text at a time.
struct Reference {
    t: BertTensors<Vec<f32>>,
    d: Dims,
}

impl Reference {
    fn linear(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let (out_dim, in_dim) = (b.len(), w.len() / b.len());
        let rows = x.len() / in_dim;
        let mut y = vec![0.0; rows * out_dim];
        for r in 0..rows {
            for o in 0..out_dim {
                y[r * out_dim + o] = b[o]
                    + (0..in_dim)
                        .map(|i| x[r * in_dim + i] * w[o * in_dim + i])
                        .sum::<f32>();
            }
        }
        y
    }

    fn norm(x: &mut [f32], res: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let h = w.len();
        for (r, row) in x.chunks_exact_mut(h).enumerate() {
            for (f, v) in row.iter_mut().enumerate() {
                *v += res.get(r * h + f).copied().unwrap_or(0.0);
            }
            let mean = row.iter().sum::<f32>() / h as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            for (f, v) in row.iter_mut().enumerate() {
                *v = (*v - mean) / (var + eps).sqrt() * w[f] + b[f];
            }
        }
    }

    fn embed_text(&self, ids: &[u32], types: &[u32]) -> Vec<f32> {
        let (d, t) = (&self.d, &self.t);
        let (h, n, hd) = (d.hidden, ids.len(), d.head_dim);
        let mut x = vec![0.0; n * h];
        for p in 0..n {
            let (id, ty) = (ids[p] as usize, types[p] as usize);
            for f in 0..h {
                x[p * h + f] =
                    t.word[id * h + f] + t.position[p * h + f] + t.token_type[ty * h + f];
            }
        }
        Self::norm(&mut x, &[], &t.emb_ln_w, &t.emb_ln_b, d.eps);
        for l in &t.layers {
            let q = Self::linear(&x, &l.query_w, &l.query_b);
            let k = Self::linear(&x, &l.key_w, &l.key_b);
            let v = Self::linear(&x, &l.value_w, &l.value_b);
            let mut ctx = vec![0.0; n * h];
            for head in 0..d.heads {
                let f0 = head * hd;
                for i in 0..n {
                    let s: Vec<f32> = (0..n)
                        .map(|j| {
                            (0..hd)
                                .map(|e| q[i * h + f0 + e] * k[j * h + f0 + e])
                                .sum::<f32>()
                                / (hd as f32).sqrt()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = s.iter().map(|v| (v - m).exp()).sum();
                    for j in 0..n {
                        let pj = (s[j] - m).exp() / z;
                        for e in 0..hd {
                            ctx[i * h + f0 + e] += pj * v[j * h + f0 + e];
                        }
                    }
                }
            }
            let a = Self::linear(&ctx, &l.attn_out_w, &l.attn_out_b);
            Self::norm(&mut x, &a, &l.attn_ln_w, &l.attn_ln_b, d.eps);
            let mut inter = Self::linear(&x, &l.inter_w, &l.inter_b);
            inter.iter_mut().for_each(|v| *v = gelu(*v));
            let o = Self::linear(&inter, &l.out_w, &l.out_b);
            Self::norm(&mut x, &o, &l.out_ln_w, &l.out_ln_b, d.eps);
        }
        let mut pooled: Vec<f32> = (0..h)
            .map(|f| (0..n).map(|p| x[p * h + f]).sum::<f32>() / n as f32)
            .collect();
        let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt();
        pooled.iter_mut().for_each(|v| *v /= norm);
        pooled
    }
}

#[test]
fn the_device_forward_pass_computes_bert() {
    let d = Dims {
        hidden: 8,
        heads: 2,
        head_dim: 4,
        inter: 12,
        max_positions: 10,
        eps: 1e-12,
    };
    let (vocab, types, layers) = (20, 2, 2);
    let mut rng = Rng::new(7);
    let mut rand = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
            .collect()
    };
    let (h, i) = (d.hidden, d.inter);
    let mut layer = || LayerTensors {
        query_w: rand(h * h, 1.0),
        query_b: rand(h, 0.2),
        key_w: rand(h * h, 1.0),
        key_b: rand(h, 0.2),
        value_w: rand(h * h, 1.0),
        value_b: rand(h, 0.2),
        attn_out_w: rand(h * h, 1.0),
        attn_out_b: rand(h, 0.2),
        attn_ln_w: rand(h, 0.5).iter().map(|v| v + 1.0).collect(),
        attn_ln_b: rand(h, 0.2),
        inter_w: rand(i * h, 1.0),
        inter_b: rand(i, 0.2),
        out_w: rand(h * i, 1.0),
        out_b: rand(h, 0.2),
        out_ln_w: rand(h, 0.5).iter().map(|v| v + 1.0).collect(),
        out_ln_b: rand(h, 0.2),
    };
    let layer_list: Vec<_> = (0..layers).map(|_| layer()).collect();
    let host = BertTensors {
        word: rand(vocab * h, 2.0),
        position: rand(d.max_positions * h, 2.0),
        token_type: rand(types * h, 2.0),
        emb_ln_w: rand(h, 0.5).iter().map(|v| v + 1.0).collect(),
        emb_ln_b: rand(h, 0.2),
        layers: layer_list,
    };

    // The weights in emulated device memory, bound as the encoder binds them.
    let mut em = Emulator { mem: Vec::new() };
    let mut put = |v: &Vec<f32>| em.put(v);
    let bound = BertTensors {
        word: put(&host.word),
        position: put(&host.position),
        token_type: put(&host.token_type),
        emb_ln_w: put(&host.emb_ln_w),
        emb_ln_b: put(&host.emb_ln_b),
        layers: host
            .layers
            .iter()
            .map(|l| LayerTensors {
                query_w: put(&l.query_w),
                query_b: put(&l.query_b),
                key_w: put(&l.key_w),
                key_b: put(&l.key_b),
                value_w: put(&l.value_w),
                value_b: put(&l.value_b),
                attn_out_w: put(&l.attn_out_w),
                attn_out_b: put(&l.attn_out_b),
                attn_ln_w: put(&l.attn_ln_w),
                attn_ln_b: put(&l.attn_ln_b),
                inter_w: put(&l.inter_w),
                inter_b: put(&l.inter_b),
                out_w: put(&l.out_w),
                out_b: put(&l.out_b),
                out_ln_w: put(&l.out_ln_w),
                out_ln_b: put(&l.out_ln_b),
            })
            .collect(),
    };
    let reference = Reference { t: host, d };

    // Texts of 3, 1, 7 and 2 word pieces, packed into one chunk.
    let mut batch = TokenBatch::default();
    for len in [3usize, 1, 7, 2] {
        let ids: Vec<u32> = (0..len).map(|_| rng.below(vocab) as u32).collect();
        let tys: Vec<u32> = (0..len).map(|_| rng.below(types) as u32).collect();
        batch.push(&ids, &tys);
    }
    let texts = 0..batch.len();
    let l = Layout::new(&d, batch.total_tokens(), batch.len(), batch.max_len()).unwrap();
    // Activations start as NaN: whatever the pass reads before writing poisons the result.
    let f = em.put(&vec![f32::NAN; l.floats]);
    let mut words = Vec::new();
    chunk_words(&batch, texts.clone(), &mut words);
    let w = em.put(&words.iter().map(|&u| f32::from_bits(u)).collect::<Vec<_>>());
    let _guard = em.zeros(1);
    let spans: Vec<(usize, usize)> = texts
        .map(|t| (batch.span(t).start, batch.lens()[t]))
        .collect();
    forward(&mut em, &bound, &d, &l, f, w, &spans, Pooling::Mean, true).unwrap();

    let fi = (f.ptr() / 4) as usize;
    let got = &em.mem[fi + l.out.start..fi + l.out.end];
    for t in 0..batch.len() {
        let span = batch.span(t);
        let want = reference.embed_text(&batch.ids[span.clone()], &batch.type_ids[span]);
        let g = &got[t * h..(t + 1) * h];
        for (a, b) in g.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "text {t}: {g:?} vs {want:?}");
        }
    }
}
