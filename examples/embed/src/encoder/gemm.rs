//! Matrix products of the host encoder: a bounds-checked, safe face over the `gemm` crate's
//! sgemm (this module is the app's one `unsafe` leaf).
//!
//! `gemm` takes raw pointers and strides, which is what lets the encoder multiply by a
//! transposed weight without copying it: torch stores a linear layer's weight as `[out, in]`
//! row-major, and `x · Wᵀ` reads it with swapped strides. It picks AVX2/FMA (or AVX-512) kernels
//! at run time, and for the few-row products of short texts it avoids most of the packing a
//! classic sgemm does, which matters because there the weights' memory traffic is the cost.
//! [`Mat`] and [`MatMut`] check at construction that every element their shape and strides
//! reach lies inside their slice; [`matmul`] checks that the shapes agree. Past those checks
//! the call cannot read or write outside the slices.

/// A read-only matrix over a slice: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Index of the last element a `rows × cols` matrix with strides `rs`, `cs` reaches, if any.
fn last_index(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return None;
    }
    (rows - 1)
        .checked_mul(rs)
        .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)))
}

impl<'a> Mat<'a> {
    /// A strided view. Panics when the view would reach past `data` (a bug in the caller).
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if let Some(last) = last_index(rows, cols, rs, cs) {
            assert!(
                last < data.len(),
                "matrix {rows}x{cols} (strides {rs}, {cs}) overruns {} elements",
                data.len()
            );
        }
        assert!(
            rs <= isize::MAX as usize && cs <= isize::MAX as usize,
            "stride overflow"
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The first `rows × cols` elements of `data`, row-major.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The first `rows × cols` elements of `data`, column-major.
    pub fn col_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows)
    }

    /// The transpose (a view: nothing moves).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// A writable matrix over a slice: element `(i, j)` is `data[i * rs + j * cs]`. One of the
/// strides is 1 and the other spans the whole line (`rs ≥ cols` or `cs ≥ rows`), so no two
/// elements alias.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatMut<'a> {
    /// A strided view. Panics when it would overrun `data` or alias itself (a bug in the caller).
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let distinct = rows <= 1 && cs >= 1
            || cols <= 1 && rs >= 1
            || cs == 1 && rs >= cols
            || rs == 1 && cs >= rows;
        assert!(
            distinct,
            "strides ({rs}, {cs}) of a {rows}x{cols} matrix would alias"
        );
        if let Some(last) = last_index(rows, cols, rs, cs) {
            assert!(
                last < data.len(),
                "matrix {rows}x{cols} (strides {rs}, {cs}) overruns {} elements",
                data.len()
            );
        }
        assert!(
            rs <= isize::MAX as usize && cs <= isize::MAX as usize,
            "stride overflow"
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The first `rows × cols` elements of `data`, row-major.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The first `rows × cols` elements of `data`, column-major.
    pub fn col_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows)
    }
}

/// `c = scale · a · b`, or `c += scale · a · b` when `accumulate`. Single-threaded.
/// Panics when the shapes disagree (a bug in the caller).
pub fn matmul(c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, scale: f32, accumulate: bool) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "shapes disagree: ({}x{}) · ({}x{}) -> ({}x{})",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for i in 0..c.rows {
                for j in 0..c.cols {
                    c.data[i * c.rs + j * c.cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: `Mat::new`/`MatMut::new` checked that every element reached through each view's
    // shape and strides lies inside its slice, and the assert above that the shapes agree, so
    // gemm reads `a` and `b` and writes `c` only within their slices; strides fit in isize
    // (checked at construction). `c` is borrowed mutably and its elements do not alias each
    // other (checked at construction); it cannot alias `a` or `b`, which are shared borrows.
    // `read_dst` is false when not accumulating, so gemm never reads `c`'s old values then.
    unsafe {
        gemm::gemm(
            c.rows,
            c.cols,
            a.cols,
            c.data.as_mut_ptr(),
            c.cs as isize,
            c.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matches_the_naive_product_with_transposed_views() {
        let (m, k, n) = (7, 19, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
        // w is [n, k] (torch layout); the product needs wᵀ = [k, n].
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5).collect();
        let mut wt = vec![0.0; k * n];
        for r in 0..n {
            for c in 0..k {
                wt[c * n + r] = w[r * k + c];
            }
        }
        let want = naive(&a, &wt, m, k, n);
        let mut c = vec![1.0; m * n];
        matmul(
            MatMut::row_major(&mut c, m, n),
            Mat::row_major(&a, m, k),
            Mat::row_major(&w, n, k).t(),
            1.0,
            false,
        );
        assert_eq!(c, want);
        // Accumulating with a scale.
        matmul(
            MatMut::row_major(&mut c, m, n),
            Mat::row_major(&a, m, k),
            Mat::row_major(&w, n, k).t(),
            2.0,
            true,
        );
        let want3: Vec<f32> = want.iter().map(|x| 3.0 * x).collect();
        assert_eq!(c, want3);
    }

    #[test]
    fn strided_output_leaves_other_columns_alone() {
        // Write a 2x2 product into columns 1..3 of a 2x4 buffer.
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [1.0, 0.0, 0.0, 1.0];
        let mut c = [9.0; 8];
        matmul(
            MatMut::new(&mut c[1..], 2, 2, 4, 1),
            Mat::row_major(&a, 2, 2),
            Mat::row_major(&b, 2, 2),
            1.0,
            false,
        );
        assert_eq!(c, [9.0, 1.0, 2.0, 9.0, 9.0, 3.0, 4.0, 9.0]);
    }

    #[test]
    fn column_major_operands() {
        // a = [[1, 2], [3, 4]] stored column-major; b = identity; c column-major.
        let a = [1.0, 3.0, 2.0, 4.0];
        let b = [1.0, 0.0, 0.0, 1.0];
        let mut c = [0.0; 4];
        matmul(
            MatMut::col_major(&mut c, 2, 2),
            Mat::col_major(&a, 2, 2),
            Mat::row_major(&b, 2, 2),
            1.0,
            false,
        );
        assert_eq!(c, a);
    }

    #[test]
    #[should_panic(expected = "alias")]
    fn refuses_aliasing_outputs() {
        let mut data = [0.0; 10];
        let _ = MatMut::new(&mut data, 3, 3, 2, 1);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn refuses_views_past_the_slice() {
        let data = [0.0; 10];
        let _ = Mat::new(&data, 3, 4, 4, 1);
    }

    #[test]
    #[should_panic(expected = "shapes disagree")]
    fn refuses_mismatched_shapes() {
        let (a, b) = ([0.0; 6], [0.0; 6]);
        let mut c = [0.0; 4];
        matmul(
            MatMut::row_major(&mut c, 2, 2),
            Mat::row_major(&a, 2, 3),
            Mat::row_major(&b, 2, 3),
            1.0,
            false,
        );
    }
}
