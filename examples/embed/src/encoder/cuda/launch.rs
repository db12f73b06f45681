//! The unsafe leaf of the CUDA encoder: the NVRTC kernels and the cuBLAS calls. It owns every
//! launch and product on the encoder's stream, and needs `unsafe` because a kernel launch and
//! a cuBLAS call take raw device addresses whose sizes the compiler cannot check (the crate
//! denies `unsafe` everywhere else).
//!
//! Everything here takes device memory as [`Buf`]: an address and a length in elements, for
//! the imported weights (which must never be wrapped in a cudarc `CudaSlice`) and for the
//! encoder's own activations alike. Before every launch or cuBLAS call the sizes the kernel or
//! the product will touch are checked against the lengths of the buffers it is given; a
//! mismatch is an error, never a launch. All work goes to the one stream of the encoder, so
//! the kernels and products run in the order they were issued.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::plan::{GemmPlan, Geometry};
use crate::error::EmbedError;

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The kernels the encoder launches, by their `extern "C"` names.
pub const KERNEL_NAMES: [&str; 6] = [
    "embed",
    "add_bias",
    "layer_norm",
    "softmax",
    "pool",
    "l2_normalize",
];

fn cuda_error(call: &'static str) -> impl Fn(&dyn std::fmt::Display) -> EmbedError {
    move |e| EmbedError::Cuda {
        call,
        message: e.to_string(),
    }
}

fn size_error(what: &str, needed: usize, have: usize) -> EmbedError {
    EmbedError::Cuda {
        call: "bounds check",
        message: format!("{what}: the launch needs {needed} elements, the buffer has {have}"),
    }
}

/// Whether the libraries the encoder loads at run time (NVRTC, cuBLAS) can be opened: cudarc
/// panics on the first call into a library it cannot load, so this is asked first.
pub fn libraries_present() -> Result<(), EmbedError> {
    // SAFETY: `is_culib_present` only tries to dlopen each candidate name of the library and
    // drops the handle again; no function of it is called.
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    // SAFETY: as above, for cuBLAS.
    let cublas = unsafe { cudarc::cublas::sys::is_culib_present() };
    let missing: Vec<&str> = [("libnvrtc", nvrtc), ("libcublas", cublas)]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(EmbedError::CudaUnavailable(format!(
            "{} not found (install the CUDA runtime libraries, or put them on the library path)",
            missing.join(" and ")
        )))
    }
}

/// A span of device memory of `f32` or `u32` elements: an address and a length. It owns
/// nothing; whoever makes one keeps the memory alive while it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    ptr: CUdeviceptr,
    len: usize,
}

impl Buf {
    /// `len` 4-byte elements at `ptr`.
    pub fn new(ptr: CUdeviceptr, len: usize) -> Self {
        Self { ptr, len }
    }

    /// Device address of the first element.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `range` of this buffer (panics outside it: the layout is planned to fit).
    pub fn at(&self, range: std::ops::Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "{range:?} outside a buffer of {}",
            self.len
        );
        Self {
            ptr: self.ptr + (range.start * 4) as u64,
            len: range.end - range.start,
        }
    }

    fn need(&self, what: &str, n: usize) -> Result<(), EmbedError> {
        if n > self.len {
            Err(size_error(what, n, self.len))
        } else {
            Ok(())
        }
    }
}

fn u32_of(what: &str, v: usize) -> Result<u32, EmbedError> {
    u32::try_from(v).map_err(|_| size_error(what, v, u32::MAX as usize))
}

fn config(g: Geometry) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (g.grid, 1, 1),
        block_dim: (g.block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn per_row(what: &str, rows: usize) -> Result<LaunchConfig, EmbedError> {
    Geometry::per_row(rows)
        .map(config)
        .ok_or_else(|| size_error(what, rows, i32::MAX as usize))
}

/// The compiled kernels, loaded into the weights' context.
#[derive(Debug)]
pub struct Kernels {
    embed: CudaFunction,
    add_bias: CudaFunction,
    layer_norm: CudaFunction,
    softmax: CudaFunction,
    pool: CudaFunction,
    l2_normalize: CudaFunction,
}

impl Kernels {
    /// Compiles [`SOURCE`] with NVRTC and loads it into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, EmbedError> {
        libraries_present()?;
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE).map_err(|e| EmbedError::Cuda {
            call: "nvrtcCompileProgram",
            message: e.to_string(),
        })?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| cuda_error("cuModuleLoadData")(&e))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| cuda_error("cuModuleGetFunction")(&e))
        };
        Ok(Self {
            embed: f(KERNEL_NAMES[0])?,
            add_bias: f(KERNEL_NAMES[1])?,
            layer_norm: f(KERNEL_NAMES[2])?,
            softmax: f(KERNEL_NAMES[3])?,
            pool: f(KERNEL_NAMES[4])?,
            l2_normalize: f(KERNEL_NAMES[5])?,
        })
    }

    /// `x[rows][hidden]` = word + position + token type embeddings of the word pieces in
    /// `tokens` (ids, type ids, positions: `rows` each). The caller has checked every id,
    /// type id and position against its table (`vocab`, `types`, `positions` rows).
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        stream: &CudaStream,
        x: Buf,
        tokens: Buf,
        word: Buf,
        position: Buf,
        token_type: Buf,
        rows: usize,
        hidden: usize,
    ) -> Result<(), EmbedError> {
        let n = rows * hidden;
        x.need("embeddings", n)?;
        tokens.need("word pieces", 3 * rows)?;
        let (rows32, hidden32) = (u32_of("rows", rows)?, u32_of("hidden", hidden)?);
        let mut b = stream.launch_builder(&self.embed);
        b.arg(&x.ptr)
            .arg(&tokens.ptr)
            .arg(&word.ptr)
            .arg(&position.ptr)
            .arg(&token_type.ptr)
            .arg(&rows32)
            .arg(&hidden32);
        // SAFETY: the kernel writes x[0..rows·hidden] (checked above) and reads tokens[0..3·rows]
        // (checked above) and rows id, type and position of the tables, each of `hidden`
        // floats; the caller checked every id, type id and position against its table's
        // rows before copying them in. The argument types match the kernel's signature.
        unsafe { b.launch(config(Geometry::elementwise(n))) }
            .map_err(|e| cuda_error("cuLaunchKernel(embed)")(&e))?;
        Ok(())
    }

    /// `y[rows][cols] += b`, then the erf GELU when `gelu`.
    pub fn add_bias(
        &self,
        stream: &CudaStream,
        y: Buf,
        bias: Buf,
        rows: usize,
        cols: usize,
        gelu: bool,
    ) -> Result<(), EmbedError> {
        let n = rows * cols;
        y.need("bias output", n)?;
        bias.need("bias", cols)?;
        let (rows32, cols32, g) = (u32_of("rows", rows)?, u32_of("cols", cols)?, gelu as i32);
        let mut b = stream.launch_builder(&self.add_bias);
        b.arg(&y.ptr)
            .arg(&bias.ptr)
            .arg(&rows32)
            .arg(&cols32)
            .arg(&g);
        // SAFETY: the kernel touches y[0..rows·cols] and bias[0..cols], both checked above;
        // the argument types match the kernel's signature.
        unsafe { b.launch(config(Geometry::elementwise(n))) }
            .map_err(|e| cuda_error("cuLaunchKernel(add_bias)")(&e))?;
        Ok(())
    }

    /// `x[r] = LayerNorm(x[r] + residual[r]) · w + b` for every row (`residual` optional).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        stream: &CudaStream,
        x: Buf,
        residual: Option<Buf>,
        w: Buf,
        bias: Buf,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), EmbedError> {
        x.need("layer norm", rows * hidden)?;
        if let Some(r) = residual {
            r.need("residual", rows * hidden)?;
        }
        w.need("layer norm weight", hidden)?;
        bias.need("layer norm bias", hidden)?;
        let cfg = per_row("layer norm rows", rows)?;
        let res_ptr: CUdeviceptr = residual.map_or(0, |r| r.ptr);
        let (rows32, hidden32) = (u32_of("rows", rows)?, u32_of("hidden", hidden)?);
        let mut b = stream.launch_builder(&self.layer_norm);
        b.arg(&x.ptr)
            .arg(&res_ptr)
            .arg(&w.ptr)
            .arg(&bias.ptr)
            .arg(&rows32)
            .arg(&hidden32)
            .arg(&eps);
        // SAFETY: block r touches row r (r < rows) of x and of the residual, rows·hidden
        // elements each, and w, b[0..hidden], all checked above; a null residual is not read.
        // The argument types match the kernel's signature.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_error("cuLaunchKernel(layer_norm)")(&e))?;
        Ok(())
    }

    /// Softmax of each of `nrows` rows of `len` scores, in place.
    pub fn softmax(
        &self,
        stream: &CudaStream,
        s: Buf,
        nrows: usize,
        len: usize,
    ) -> Result<(), EmbedError> {
        s.need("scores", nrows * len)?;
        let cfg = per_row("score rows", nrows)?;
        let (n32, len32) = (u32_of("rows", nrows)?, u32_of("len", len)?);
        let mut b = stream.launch_builder(&self.softmax);
        b.arg(&s.ptr).arg(&n32).arg(&len32);
        // SAFETY: block r touches s[r·len..(r + 1)·len] for r < nrows: nrows·len elements,
        // checked above. The argument types match the kernel's signature.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_error("cuLaunchKernel(softmax)")(&e))?;
        Ok(())
    }

    /// Pools each text's rows of `x[rows][hidden]` into `out[texts][hidden]`. `spans` holds
    /// each text's first row, then each length; the caller checked that every span lies in
    /// `0..rows`.
    #[allow(clippy::too_many_arguments)]
    pub fn pool(
        &self,
        stream: &CudaStream,
        out: Buf,
        x: Buf,
        spans: Buf,
        texts: usize,
        rows: usize,
        hidden: usize,
        mode: i32,
    ) -> Result<(), EmbedError> {
        out.need("pooled", texts * hidden)?;
        x.need("hidden states", rows * hidden)?;
        spans.need("spans", 2 * texts)?;
        let cfg = per_row("texts", texts)?;
        let (t32, h32) = (u32_of("texts", texts)?, u32_of("hidden", hidden)?);
        let mut b = stream.launch_builder(&self.pool);
        b.arg(&out.ptr)
            .arg(&x.ptr)
            .arg(&spans.ptr)
            .arg(&t32)
            .arg(&h32)
            .arg(&mode);
        // SAFETY: block t writes out[t·hidden..(t + 1)·hidden] (texts·hidden checked), reads
        // spans[t] and spans[texts + t] (2·texts checked) and the rows of its span, which the
        // caller checked lie within the rows·hidden elements of x (checked). The argument
        // types match the kernel's signature.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_error("cuLaunchKernel(pool)")(&e))?;
        Ok(())
    }

    /// Divides each of `texts` vectors of `v[texts][hidden]` by its norm.
    pub fn l2_normalize(
        &self,
        stream: &CudaStream,
        v: Buf,
        texts: usize,
        hidden: usize,
    ) -> Result<(), EmbedError> {
        v.need("vectors", texts * hidden)?;
        let cfg = per_row("texts", texts)?;
        let (t32, h32) = (u32_of("texts", texts)?, u32_of("hidden", hidden)?);
        let mut b = stream.launch_builder(&self.l2_normalize);
        b.arg(&v.ptr).arg(&t32).arg(&h32);
        // SAFETY: block t touches v[t·hidden..(t + 1)·hidden] for t < texts, checked above.
        // The argument types match the kernel's signature.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_error("cuLaunchKernel(l2_normalize)")(&e))?;
        Ok(())
    }
}

fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// Runs `p` on `blas`'s stream: A, B and C are buffers from whose starts the plan's offsets
/// count. Refuses a plan that is not valid for cuBLAS or that reaches past a buffer.
pub fn sgemm(blas: &CudaBlas, p: &GemmPlan, a: Buf, b: Buf, c: Buf) -> Result<(), EmbedError> {
    if !p.is_valid() {
        return Err(EmbedError::Cuda {
            call: "bounds check",
            message: format!("an invalid matrix product: {p:?}"),
        });
    }
    a.need("gemm A", p.extent_a())?;
    b.need("gemm B", p.extent_b())?;
    c.need("gemm C", p.extent_c())?;
    let (pa, pb, pc) = (
        (a.ptr + (p.a_off * 4) as u64) as *const f32,
        (b.ptr + (p.b_off * 4) as u64) as *const f32,
        (c.ptr + (p.c_off * 4) as u64) as *mut f32,
    );
    // Every size below fits an i32 (is_valid).
    let i = |v: usize| v as i32;
    let l = |v: usize| v as i64;
    let result = if p.batch == 1 {
        // SAFETY: the handle is live (borrowed), its stream is the encoder's; A, B and C hold
        // at least extent_a/b/c elements from their starts (checked above), which is every
        // element the product reads or writes given its shapes and leading dimensions
        // (GemmPlan::extent_*); the leading dimensions are legal (is_valid); alpha and beta
        // are host values, the handle's default pointer mode.
        unsafe {
            cudarc::cublas::result::sgemm(
                *blas.handle(),
                op(p.trans_a),
                op(p.trans_b),
                i(p.m),
                i(p.n),
                i(p.k),
                &p.alpha,
                pa,
                i(p.lda),
                pb,
                i(p.ldb),
                &p.beta,
                pc,
                i(p.ldc),
            )
        }
    } else {
        // SAFETY: as for sgemm above; the extents include the (batch - 1) strides of every
        // operand.
        unsafe {
            cudarc::cublas::result::sgemm_strided_batched(
                *blas.handle(),
                op(p.trans_a),
                op(p.trans_b),
                i(p.m),
                i(p.n),
                i(p.k),
                &p.alpha,
                pa,
                i(p.lda),
                l(p.stride_a),
                pb,
                i(p.ldb),
                l(p.stride_b),
                &p.beta,
                pc,
                i(p.ldc),
                l(p.stride_c),
                i(p.batch),
            )
        }
    };
    result.map_err(|e| cuda_error("cublasSgemm")(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_in_the_source() {
        for name in KERNEL_NAMES {
            let decl = format!("extern \"C\" __global__ void {name}(");
            assert_eq!(SOURCE.matches(&decl).count(), 1, "{name}");
        }
        assert_eq!(
            SOURCE.matches("extern \"C\" __global__").count(),
            KERNEL_NAMES.len()
        );
        assert!(SOURCE.contains(&format!("#define BLOCK {}", super::super::plan::BLOCK)));
    }

    /// The parameters of kernel `name` in the source, split at the commas.
    fn params(name: &str) -> Vec<String> {
        let decl = format!("void {name}(");
        let at = SOURCE.find(&decl).unwrap() + decl.len();
        let end = at + SOURCE[at..].find(')').unwrap();
        SOURCE[at..end]
            .split(',')
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    #[test]
    fn kernel_signatures_match_the_arguments_pushed() {
        // What each launch above pushes, in order: a device address is a 64-bit integer in
        // the launch, a pointer in the kernel; sizes are u32, flags and modes i32, eps f32.
        let expected: [(&str, &[&str]); 6] = [
            (
                "embed",
                &[
                    "float*",
                    "const unsigned int*",
                    "const float*",
                    "const float*",
                    "const float*",
                    "unsigned int",
                    "unsigned int",
                ],
            ),
            (
                "add_bias",
                &[
                    "float*",
                    "const float*",
                    "unsigned int",
                    "unsigned int",
                    "int",
                ],
            ),
            (
                "layer_norm",
                &[
                    "float*",
                    "const float*",
                    "const float*",
                    "const float*",
                    "unsigned int",
                    "unsigned int",
                    "float",
                ],
            ),
            ("softmax", &["float*", "unsigned int", "unsigned int"]),
            (
                "pool",
                &[
                    "float*",
                    "const float*",
                    "const unsigned int*",
                    "unsigned int",
                    "unsigned int",
                    "int",
                ],
            ),
            ("l2_normalize", &["float*", "unsigned int", "unsigned int"]),
        ];
        for (name, types) in expected {
            let got = params(name);
            assert_eq!(got.len(), types.len(), "{name}: {got:?}");
            for (p, ty) in got.iter().zip(types) {
                // The parameter is its type followed by its name.
                let (t, _) = p.rsplit_once(' ').unwrap();
                assert_eq!(t, *ty, "{name}: {p}");
            }
        }
    }

    #[test]
    fn kernel_source_is_balanced_and_header_free() {
        // Comments aside, every bracket closes, and nothing is included (NVRTC has no
        // standard headers unless given a path).
        let code: String = SOURCE
            .lines()
            .map(|l| l.split("//").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
            let mut depth = 0i32;
            for c in code.chars() {
                if c == open {
                    depth += 1;
                } else if c == close {
                    depth -= 1;
                }
                assert!(depth >= 0, "{close} before its {open}");
            }
            assert_eq!(depth, 0, "unbalanced {open}{close}");
        }
        assert!(!code.contains("#include"));
        // Plain ASCII: no typographic characters slipped into the C source.
        assert!(SOURCE.is_ascii());
    }

    #[test]
    fn buffers_are_bounds_checked() {
        let b = Buf::new(0x1000, 10);
        assert_eq!(b.at(2..5), Buf::new(0x1008, 3));
        assert!(b.need("x", 10).is_ok());
        match b.need("x", 11) {
            Err(EmbedError::Cuda { message, .. }) => assert!(message.contains("11"), "{message}"),
            other => panic!("expected a bounds error, got {other:?}"),
        }
        assert!(u32_of("rows", 1 << 33).is_err());
    }
}
