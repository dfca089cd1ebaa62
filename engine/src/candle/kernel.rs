//! A batch-invariant matrix product for CPU linear layers (`x · Wᵀ` with `W`
//! stored `[out, in]`), plugged into candle as a custom op.
//!
//! **Owns**: the arithmetic of one output element: `y[r][o] = Σ_k x[r][k] ·
//! W[o][k]` accumulated in 8 lanes (lane `l` sums `k ≡ l mod 8` in increasing
//! `k`, with a fused multiply-add where the CPU has AVX2+FMA), the lanes
//! summed as `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`, then the `k mod 8` tail
//! added in order. That sequence is the same whatever the number of rows,
//! the row's place among them, the tile it falls in or the thread that
//! computes it, so a row's result never depends on its batch: no padding to
//! a fixed shape is needed (see [`super::forward`]). **Never touches**:
//! anything but its input and output buffers.
//!
//! The instruction set is picked once per process (AVX2+FMA when present,
//! portable code otherwise); two machines agree bit for bit only when they
//! pick the same one (as with any BLAS).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;

/// The custom op: `lhs: [rows, k]`, `rhs: [out, k]`, both contiguous f32.
pub(crate) struct RowDot;

impl CustomOp2 for RowDot {
    fn name(&self) -> &'static str {
        "row-dot"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let (out_dim, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("row-dot: x has {k} columns but W has {k2}");
        }
        let x = match l1.contiguous_offsets() {
            Some((a, b)) => &s1.as_slice::<f32>()?[a..b],
            None => candle_core::bail!("row-dot: x must be contiguous"),
        };
        let w = match l2.contiguous_offsets() {
            Some((a, b)) => &s2.as_slice::<f32>()?[a..b],
            None => candle_core::bail!("row-dot: W must be contiguous"),
        };
        Ok((
            CpuStorage::F32(row_dot(x, rows, w, out_dim, k)),
            Shape::from((rows, out_dim)),
        ))
    }
}

/// Output columns (rows of `W`) per parallel task.
const BLOCK: usize = 64;

/// Products smaller than this many multiply-adds run on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 20;

type TileFn = unsafe fn(*const f32, *const f32, usize, usize, *mut f32, usize);

struct Kernels {
    t4x2: TileFn,
    t2x4: TileFn,
    t1x4: TileFn,
    t1x1: TileFn,
}

fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Kernels {
                t4x2: avx2::tile::<4, 2>,
                t2x4: avx2::tile::<2, 4>,
                t1x4: avx2::tile::<1, 4>,
                t1x1: avx2::tile::<1, 1>,
            };
        }
        Kernels {
            t4x2: portable::tile::<4, 2>,
            t2x4: portable::tile::<2, 4>,
            t1x4: portable::tile::<1, 4>,
            t1x1: portable::tile::<1, 1>,
        }
    })
}

/// Which instruction set the kernel uses in this process.
pub fn kernel_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return "avx2+fma";
    }
    "portable"
}

/// `y = x · Wᵀ` for `x: [rows, k]`, `w: [out_dim, k]` (row-major), returning
/// `[rows, out_dim]`; batch-invariant (see the module doc).
pub fn row_dot(x: &[f32], rows: usize, w: &[f32], out_dim: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "row-dot: x is not [rows, k]");
    assert_eq!(w.len(), out_dim * k, "row-dot: W is not [out, k]");
    let kern = kernels();
    let block = |b: usize| {
        let o0 = b * BLOCK;
        let n = BLOCK.min(out_dim - o0);
        // [rows, n]
        let mut local = vec![0f32; rows * n];
        let mut r = 0;
        while r < rows {
            let (tile, tr, tc): (TileFn, usize, usize) = match rows - r {
                4.. => (kern.t4x2, 4, 2),
                2 | 3 => (kern.t2x4, 2, 4),
                _ => (kern.t1x4, 1, 4),
            };
            let mut c = 0;
            while c < n {
                let (f, cols) = if n - c >= tc {
                    (tile, tc)
                } else {
                    (kern.t1x1, 1)
                };
                let rows_here = if cols == tc { tr } else { 1 };
                for rr in (0..tr).step_by(rows_here) {
                    // SAFETY: rows r+rr .. r+rr+rows_here < rows and
                    // columns o0+c .. o0+c+cols <= out_dim lie inside x, w
                    // and `local` (checked by the asserts above).
                    unsafe {
                        f(
                            x.as_ptr().add((r + rr) * k),
                            w.as_ptr().add((o0 + c) * k),
                            k,
                            k,
                            local.as_mut_ptr().add((r + rr) * n + c),
                            n,
                        )
                    };
                }
                c += cols;
            }
            r += tr;
        }
        local
    };
    // Threads split output columns only, so they never change an element's
    // arithmetic; small products stay on the calling thread.
    let n_blocks = out_dim.div_ceil(BLOCK);
    let blocks: Vec<Vec<f32>> = if rows * out_dim * k < PARALLEL_MIN_MACS {
        (0..n_blocks).map(block).collect()
    } else {
        (0..n_blocks).into_par_iter().map(block).collect()
    };
    let mut out = vec![0f32; rows * out_dim];
    for (b, local) in blocks.iter().enumerate() {
        let o0 = b * BLOCK;
        let n = BLOCK.min(out_dim - o0);
        for r in 0..rows {
            out[r * out_dim + o0..r * out_dim + o0 + n].copy_from_slice(&local[r * n..(r + 1) * n]);
        }
    }
    out
}

/// The fixed lane reduction and tail shared by every kernel.
#[inline(always)]
fn finish(l: &[f32; 8], x_tail: &[f32], w_tail: &[f32]) -> f32 {
    let mut s = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    for (a, b) in x_tail.iter().zip(w_tail) {
        s += a * b;
    }
    s
}

mod portable {
    /// `R` rows of x (`k` apart) times `C` rows of W (`k` apart) into
    /// `out[i * out_stride + j]`; lane-wise multiply then add.
    ///
    /// # Safety
    /// The pointers must cover `R` (resp. `C`) rows of `len` floats and the
    /// output `R` rows of `C` floats.
    pub unsafe fn tile<const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        len: usize,
        k: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        let chunks = len / 8;
        let mut acc = [[[0f32; 8]; C]; R];
        for ch in 0..chunks {
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xs = std::slice::from_raw_parts(x.add(i * k + ch * 8), 8);
                for (j, acc_ij) in acc_i.iter_mut().enumerate() {
                    let ws = std::slice::from_raw_parts(w.add(j * k + ch * 8), 8);
                    for l in 0..8 {
                        acc_ij[l] += xs[l] * ws[l];
                    }
                }
            }
        }
        let tail = len - chunks * 8;
        for (i, acc_i) in acc.iter().enumerate() {
            let xt = std::slice::from_raw_parts(x.add(i * k + chunks * 8), tail);
            for (j, lanes) in acc_i.iter().enumerate() {
                let wt = std::slice::from_raw_parts(w.add(j * k + chunks * 8), tail);
                *out.add(i * out_stride + j) = super::finish(lanes, xt, wt);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// As [`super::portable::tile`], with 8-lane fused multiply-adds.
    ///
    /// # Safety
    /// As the portable kernel; the CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        len: usize,
        k: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        let chunks = len / 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for ch in 0..chunks {
            let mut wv = [_mm256_setzero_ps(); C];
            for (j, wv_j) in wv.iter_mut().enumerate() {
                *wv_j = _mm256_loadu_ps(w.add(j * k + ch * 8));
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(i * k + ch * 8));
                for (j, acc_ij) in acc_i.iter_mut().enumerate() {
                    *acc_ij = _mm256_fmadd_ps(xv, wv[j], *acc_ij);
                }
            }
        }
        let tail = len - chunks * 8;
        for (i, acc_i) in acc.iter().enumerate() {
            let xt = std::slice::from_raw_parts(x.add(i * k + chunks * 8), tail);
            for (j, a) in acc_i.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let wt = std::slice::from_raw_parts(w.add(j * k + chunks * 8), tail);
                *out.add(i * out_stride + j) = super::finish(&lanes, xt, wt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::weights::SplitMix64;

    fn rand(seed: u64, n: usize) -> Vec<f32> {
        let mut r = SplitMix64(seed);
        (0..n).map(|_| (r.next_f64() * 2.0 - 1.0) as f32).collect()
    }

    #[test]
    fn matches_f64_reference_and_is_row_invariant() {
        for (k, out_dim) in [(128, 200), (13, 7), (576, 65), (8, 1)] {
            let w = rand(1, out_dim * k);
            let x = rand(2, 11 * k);
            let all = row_dot(&x, 11, &w, out_dim, k);
            for r in 0..11 {
                for o in 0..out_dim {
                    let want: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                        .sum();
                    assert!(
                        (all[r * out_dim + o] as f64 - want).abs() < 1e-4,
                        "k {k} r {r} o {o}"
                    );
                }
                // Row r alone, and inside other batch sizes / positions: bit-identical.
                let alone = row_dot(&x[r * k..(r + 1) * k], 1, &w, out_dim, k);
                assert_eq!(
                    alone,
                    all[r * out_dim..(r + 1) * out_dim],
                    "k {k} row {r} alone"
                );
                let pair_start = r.saturating_sub(1);
                let two = row_dot(
                    &x[pair_start * k..(pair_start + 2).min(11) * k],
                    (pair_start + 2).min(11) - pair_start,
                    &w,
                    out_dim,
                    k,
                );
                let at = r - pair_start;
                assert_eq!(
                    two[at * out_dim..(at + 1) * out_dim],
                    all[r * out_dim..(r + 1) * out_dim]
                );
            }
        }
    }

    #[test]
    fn every_tile_shape_computes_an_element_the_same_way() {
        let k = 77;
        let x = rand(3, 4 * k);
        let w = rand(4, 4 * k);
        let isas: Vec<[TileFn; 4]> = {
            let mut v: Vec<[TileFn; 4]> = vec![[
                portable::tile::<4, 2>,
                portable::tile::<2, 4>,
                portable::tile::<1, 4>,
                portable::tile::<1, 1>,
            ]];
            #[cfg(target_arch = "x86_64")]
            if kernel_isa() == "avx2+fma" {
                v.push([
                    avx2::tile::<4, 2>,
                    avx2::tile::<2, 4>,
                    avx2::tile::<1, 4>,
                    avx2::tile::<1, 1>,
                ]);
            }
            v
        };
        #[allow(clippy::needless_range_loop)]
        for fns in isas {
            // Element (r, o) from each tile shape that covers it.
            let mut reference = [[0f32; 4]; 4];
            for r in 0..4 {
                for o in 0..4 {
                    unsafe {
                        fns[3](
                            x.as_ptr().add(r * k),
                            w.as_ptr().add(o * k),
                            k,
                            k,
                            &mut reference[r][o],
                            1,
                        )
                    };
                }
            }
            let mut out = [0f32; 16];
            unsafe { fns[0](x.as_ptr(), w.as_ptr(), k, k, out.as_mut_ptr(), 4) }; // rows 0..4, cols 0..2
            unsafe {
                fns[1](
                    x.as_ptr(),
                    w.as_ptr().add(0),
                    k,
                    k,
                    out.as_mut_ptr().add(0),
                    4,
                )
            }; // rows 0..2, cols 0..4
            unsafe {
                fns[2](
                    x.as_ptr().add(3 * k),
                    w.as_ptr(),
                    k,
                    k,
                    out.as_mut_ptr().add(12),
                    4,
                )
            }; // row 3
            for r in 0..4 {
                for o in 0..4 {
                    let covered = r < 2 || o < 2 || r == 3;
                    if covered {
                        assert_eq!(
                            out[r * 4 + o].to_bits(),
                            reference[r][o].to_bits(),
                            "({r}, {o})"
                        );
                    }
                }
            }
        }
    }
}
