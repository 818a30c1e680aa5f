//! Prefill's matrix products on AMX tiles: bf16 weights by bf16 inputs, summed in f32.
//!
//! Owns the weights' bf16 copy in the tile layout, prepared once at load, and the product
//! that runs on it where the CPU has AMX and the OS grants its registers (Sapphire Rapids
//! and later; [`available`]). One `tdpbf16ps` multiplies a 16 × 32 block of inputs by a
//! 32 × 16 block of weights and adds into 16 × 16 f32 sums held in a tile register: 8192
//! multiply-adds per instruction against VNNI's 64, and no per-block epilogue, since the
//! products sum in f32 inside the tile across the whole row. Decode stays on the int8
//! kernels, which read 4-bit weights (a decode step is bound by the bytes it reads).
//!
//! Precision. The weights are the f32 path's (the GGUF's blocks dequantized) rounded to bf16,
//! the inputs rounded to bf16 (8 significant bits, nearest even): a relative error of 2⁻⁹ per
//! factor, where int8 inputs lose up to half a step of a block's largest value.
//!
//! Layout. Outputs are taken sixteen at a time (an output tile, padded with zero weights),
//! the inputs' width 32 at a time (a step). A weight tile of one step is 1 KiB: row `k`
//! (0..16) holds, for each of the sixteen outputs, the pair of weights at columns `2k, 2k + 1`
//! — the layout `tdpbf16ps` reads. An output tile's steps follow each other, so a product
//! walks its weights in order.
//!
//! Invariance. Each sum in a tile is one output of one input row, computed by the same
//! instruction sequence over the same steps whatever rows or outputs share the tile: a row's
//! result does not depend on the rows beside it, and a slice of a prompt gets what the whole
//! prompt gets.

use super::{Aligned, OutPtr};

/// Outputs and input rows of a tile.
const TILE: usize = 16;
/// Inputs' columns per step: 32 bf16 are one 64-byte tile row.
const STEP: usize = 32;
/// bf16 values of one weight tile of one step.
const STEP_VALUES: usize = TILE * STEP;
/// Input rows of a work item: a multiple of the kernel's 32; their bf16 copy (≤ 384 KiB for
/// rows 1536 wide) stays in L2 while the items' weights pass over it.
const ROW_BLOCK: usize = 128;
/// Multiply-adds below which a product stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Whether this process multiplies on AMX tiles: the CPU has AMX-TILE and AMX-BF16 and the
/// OS lets the process use the tile registers (asked once, for the whole process).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which XSAVE features the process
    // may use (Linux 5.16 and later; older kernels refuse it, and AMX is then not used).
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// A weight matrix (`rows` outputs × `cols` inputs) in bf16, in the tile layout.
pub struct Bf16Matrix {
    rows: usize,
    cols: usize,
    /// `rows` rounded up to two tiles (the kernel's 32 outputs).
    padded: usize,
    /// `padded / 16` output tiles × `cols / 32` steps × 512 values.
    w: Aligned<u16>,
}

/// `x` rounded to the nearest bf16, ties to even (finite values; what `vcvtneps2bf16` does).
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

impl Bf16Matrix {
    /// Takes `w`, `rows × cols` row-major f32 (`cols` a multiple of 32).
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        if !cols.is_multiple_of(STEP) || w.len() != rows * cols {
            return Err(format!("{} values are not a {rows} × {cols} matrix of 32-wide steps", w.len()));
        }
        let padded = rows.div_ceil(2 * TILE) * 2 * TILE;
        let steps = cols / STEP;
        let mut tiles = Aligned::zeroed(padded * cols);
        let out = &mut *tiles;
        for o in 0..rows {
            let (tile, n) = (o / TILE, o % TILE);
            for (c, &v) in w[o * cols..(o + 1) * cols].iter().enumerate() {
                let (step, k) = (c / STEP, c % STEP);
                out[(tile * steps + step) * STEP_VALUES + (k / 2) * 2 * TILE + n * 2 + k % 2] = bf16(v);
            }
        }
        Ok(Self { rows, cols, padded, w: tiles })
    }

    /// `x · Wᵀ` for the `n` rows of `x` (`n × cols`): `out` is `n × rows`. Only where
    /// [`available`] says so.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        assert!(available(), "AMX product on a process without AMX");
        assert_eq!(x.len(), n * self.cols, "bf16 matmul: input size");
        assert_eq!(out.len(), n * self.rows, "bf16 matmul: output size");
        with_input(x, n, self.cols, |xb| {
            let dst = OutPtr(out.as_mut_ptr());
            let pairs = self.padded / (2 * TILE);
            // Work items are (block of input rows, pair of output tiles), row blocks outermost.
            let run = |range: std::ops::Range<usize>| {
                let _tiles = Tiles::configure();
                let mut partial = [0f32; 4 * TILE * TILE];
                for item in range {
                    let (block, pair) = (item / pairs, item % pairs);
                    let rows = block * ROW_BLOCK..((block + 1) * ROW_BLOCK).min(n);
                    let outs = (self.rows - pair * 2 * TILE).min(2 * TILE);
                    for r0 in rows.clone().step_by(2 * TILE) {
                        let height = (rows.end - r0).min(2 * TILE);
                        if height == 2 * TILE && outs == 2 * TILE {
                            // SAFETY: rows r0..r0 + 32 are inside the padded input, output tiles
                            // 2·pair, 2·pair + 1 inside the padded weights, and the 32 × 32 sums
                            // inside `out` (n × rows, checked above), in a region only this item
                            // writes (items are disjoint in rows × outputs).
                            unsafe { self.kernel(xb, r0, pair, dst.at(r0 * self.rows + pair * 2 * TILE), self.rows) };
                            continue;
                        }
                        // A block at the edge of the rows or outputs: its sums into `partial`,
                        // the part inside the product copied out.
                        // SAFETY: as above, with the sums into `partial` (32 × 32).
                        unsafe { self.kernel(xb, r0, pair, partial.as_mut_ptr(), 2 * TILE) };
                        for (i, sums) in partial.chunks_exact(2 * TILE).take(height).enumerate() {
                            // SAFETY: as above: row r0 + i, outputs 32·pair.. of `out`.
                            let to = unsafe { dst.at((r0 + i) * self.rows + pair * 2 * TILE) };
                            // SAFETY: `outs` values from there are inside that row.
                            unsafe { std::ptr::copy_nonoverlapping(sums.as_ptr(), to, outs) };
                        }
                    }
                }
            };
            let items = n.div_ceil(ROW_BLOCK) * pairs;
            if n * self.rows * self.cols < PARALLEL_MIN_WORK {
                run(0..items)
            } else {
                candle_core::utils::barrier_pool().execute_chunked(items, run)
            }
        });
    }

    /// `x · Wᵀ` for the `n` rows of `x`, handed to `f` a tile at a time instead of written out:
    /// `f(rows, outputs, tile)` sees the sums of `rows` (at most 32) by `outputs` (one
    /// `segment` of them, a multiple of 32; the last may be shorter), row `i` of the tile at
    /// `tile[i * segment..]`. A work item is one segment for every row: its weights stay in
    /// L2 while the rows pass, so they are read once and the product never goes to memory
    /// (an LM head's is tens of MB per hundred rows). The sums are [`Bf16Matrix::matmul`]'s,
    /// bit for bit: the same kernel over the same steps. Only where [`available`] says so.
    pub fn matmul_by_segments(
        &self,
        x: &[f32],
        n: usize,
        segment: usize,
        f: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, &[f32]) + Sync,
    ) {
        assert!(available(), "AMX product on a process without AMX");
        assert_eq!(x.len(), n * self.cols, "bf16 matmul: input size");
        assert!(segment > 0 && segment.is_multiple_of(2 * TILE), "segments of whole kernel blocks");
        with_input(x, n, self.cols, |xb| {
            let run = |range: std::ops::Range<usize>| {
                let _tiles = Tiles::configure();
                // Rows of sums on line boundaries, as the tile stores write them.
                let mut sums = Aligned::<f32>::zeroed(2 * TILE * segment);
                for s in range {
                    let outs = s * segment..((s + 1) * segment).min(self.rows);
                    for r0 in (0..n).step_by(2 * TILE) {
                        for (k, pair) in (outs.start / (2 * TILE)..outs.end.div_ceil(2 * TILE)).enumerate() {
                            // SAFETY: rows r0..r0 + 32 are inside the padded input, output tiles
                            // 2·pair, 2·pair + 1 inside the padded weights (pair < padded / 32),
                            // and the 32 × 32 sums at column 32·k of `sums` (32 rows of `segment`).
                            unsafe { self.kernel(xb, r0, pair, sums.as_mut_ptr().add(k * 2 * TILE), segment) };
                        }
                        f(r0..(r0 + 2 * TILE).min(n), outs.clone(), &sums);
                    }
                }
            };
            let segments = self.rows.div_ceil(segment);
            if n * self.rows * self.cols < PARALLEL_MIN_WORK {
                run(0..segments)
            } else {
                candle_core::utils::barrier_pool().execute_chunked(segments, run)
            }
        });
    }

    /// Input rows `r0..r0 + 32` by output tiles `2·pair, 2·pair + 1`: a 32 × 32 block of sums,
    /// written at `c` with rows `stride` values apart.
    ///
    /// # Safety
    /// The calling thread holds a [`Tiles`]; rows `r0..r0 + 32` lie in `x` (`cols` wide),
    /// output tiles `2·pair + 1` and below in the weights; `c` is writable for 32 rows of 32
    /// values, `stride` apart.
    #[cfg(target_arch = "x86_64")]
    unsafe fn kernel(&self, x: &[u16], r0: usize, pair: usize, c: *mut f32, stride: usize) {
        let steps = self.cols / STEP;
        let w = &*self.w;
        debug_assert!((r0 + 2 * TILE) * self.cols <= x.len() && (2 * pair + 2) * steps * STEP_VALUES <= w.len());
        let a0 = x[r0 * self.cols..].as_ptr();
        let a1 = x[(r0 + TILE) * self.cols..].as_ptr();
        let b0 = w[2 * pair * steps * STEP_VALUES..].as_ptr();
        let b1 = w[(2 * pair + 1) * steps * STEP_VALUES..].as_ptr();
        // SAFETY: the tiles are configured (tmm0-3: 16 × 64-byte sums, tmm4-7: 16 × 64-byte
        // operands); every load reads 16 rows of 64 bytes inside the slices above; the stores
        // write rows 0..16 and 16..32 of the caller's block (c2 is row 16), 64 bytes each.
        unsafe {
            let c2 = c.add(TILE * stride);
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {k}",
                "jnz 2b",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c2} + {sc}*1 + 64], tmm3",
                a0 = inout(reg) a0 => _,
                a1 = inout(reg) a1 => _,
                b0 = inout(reg) b0 => _,
                b1 = inout(reg) b1 => _,
                k = inout(reg) steps => _,
                sa = in(reg) self.cols * 2,
                sb = in(reg) 64usize,
                sc = in(reg) stride * 4,
                c = in(reg) c,
                c2 = in(reg) c2,
                options(nostack),
            );
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn kernel(&self, _: &[u16], _: usize, _: usize, _: *mut f32, _: usize) {
        unreachable!("AMX is x86-64 only")
    }
}

/// `f` of the `n` rows of `x` (`cols` wide) in bf16, rounded up to the kernel's 32 rows with
/// zeros, in a buffer the thread reuses.
fn with_input<R>(x: &[f32], n: usize, cols: usize, f: impl FnOnce(&[u16]) -> R) -> R {
    thread_local! {
        static INPUT: std::cell::RefCell<Aligned<u16>> = const { std::cell::RefCell::new(Aligned::new()) };
    }
    INPUT.with(|cell| {
        let xb = &mut *cell.borrow_mut();
        xb.resize(n.div_ceil(2 * TILE) * 2 * TILE * cols);
        for (b, &v) in xb.iter_mut().zip(x) {
            *b = bf16(v);
        }
        // The padding rows are zeros.
        xb[x.len()..].fill(0);
        f(xb)
    })
}

/// The calling thread's tile registers, configured for [`Bf16Matrix::kernel`] (eight tiles of
/// 16 rows × 64 bytes) while this lives, released after.
struct Tiles;

impl Tiles {
    #[cfg(target_arch = "x86_64")]
    fn configure() -> Self {
        // Palette 1; bytes 16.. hold each tile's bytes per row (u16), bytes 48.. its rows.
        let mut config = [0u8; 64];
        config[0] = 1;
        for t in 0..8 {
            config[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            config[48 + t] = TILE as u8;
        }
        // SAFETY: only reached when `available` (the CPU has AMX and the OS granted it); the
        // configuration is 64 readable bytes.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) config.as_ptr(), options(nostack, readonly)) };
        Tiles
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn configure() -> Self {
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // The tile state released: context switches stop saving its 8 KiB.
        // SAFETY: as in `configure`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem))
        };
    }
}

/// Peak of the bf16 tile product on the engine's threads, GFLOP/s: best of five 512-row
/// products by a 2048 × 2048 matrix. `None` without AMX.
pub fn peak_bf16_gflops() -> Option<f64> {
    if !available() {
        return None;
    }
    let (n, rows, cols) = (512, 2048, 2048);
    let w: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32 * 0.1).collect();
    let m = Bf16Matrix::from_f32(&w, rows, cols).ok()?;
    let x: Vec<f32> = (0..n * cols).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut out = vec![0f32; n * rows];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        m.matmul(&x, n, &mut out);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&out);
    Some(2.0 * (n * rows * cols) as f64 / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(n: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..n * cols).map(|i| (((i * 7919 + seed) % 2003) as f32 / 1001.0 - 1.0) * 0.5).collect()
    }

    /// Rounding to bf16 is to nearest, ties to even.
    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3F80);
        assert_eq!(bf16(f32::from_bits(0x3F80_8000)), 0x3F80, "a tie goes to the even value");
        assert_eq!(bf16(f32::from_bits(0x3F81_8000)), 0x3F82, "a tie goes to the even value");
        assert_eq!(bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(bf16(-2.0), 0xC000);
    }

    /// The tile product is the f32 product of the bf16-rounded factors, to f32 summation
    /// order, for widths of one step and many, output counts that fill no tile, and row
    /// counts that fill no kernel block; and a row's result does not depend on the rows
    /// beside it.
    #[test]
    fn tile_product_is_the_bf16_factors_product_and_rows_are_independent() {
        if !available() {
            eprintln!("no AMX on this machine: the bf16 tile product is not tested");
            return;
        }
        for (rows, cols, n) in [(37, 32, 5), (64, 576, 40), (300, 1536, 33), (17, 96, 1)] {
            let w = input(rows, cols, 3);
            let x = input(n, cols, 11);
            let m = Bf16Matrix::from_f32(&w, rows, cols).unwrap();
            let mut got = vec![0f32; n * rows];
            m.matmul(&x, n, &mut got);
            let r = |v: f32| f32::from_bits((bf16(v) as u32) << 16);
            for i in 0..n {
                for o in 0..rows {
                    let (mut exact, mut scale) = (0f64, 0f64);
                    for c in 0..cols {
                        let p = r(x[i * cols + c]) as f64 * r(w[o * cols + c]) as f64;
                        exact += p;
                        scale += p.abs();
                    }
                    let g = got[i * rows + o] as f64;
                    assert!((g - exact).abs() <= 1e-5 * scale + 1e-6, "{rows}×{cols}: {i},{o}: {g} vs {exact}");
                }
            }
            for i in [0, n / 2, n - 1] {
                let mut alone = vec![0f32; rows];
                m.matmul(&x[i * cols..(i + 1) * cols], 1, &mut alone);
                assert!(alone == got[i * rows..(i + 1) * rows], "{rows}×{cols}: row {i} alone differs");
            }
        }
        assert!(Bf16Matrix::from_f32(&[0.0; 40], 2, 20).is_err());
    }

    /// The product handed out a segment at a time holds the sums the whole product writes, bit
    /// for bit, each (row, segment) handed out once: outputs that fill no segment and no tile,
    /// rows that fill no kernel block, one segment and many.
    #[test]
    fn segments_hold_the_products_sums() {
        if !available() {
            eprintln!("no AMX on this machine: the bf16 tile product is not tested");
            return;
        }
        for (rows, cols, n, segment) in [(1000, 576, 70, 128), (37, 64, 5, 64), (300, 96, 33, 512)] {
            let m = Bf16Matrix::from_f32(&input(rows, cols, 3), rows, cols).unwrap();
            let x = input(n, cols, 11);
            let mut want = vec![0f32; n * rows];
            m.matmul(&x, n, &mut want);
            let got = std::sync::Mutex::new((vec![f32::NAN; n * rows], vec![0u32; n * rows.div_ceil(segment)]));
            m.matmul_by_segments(&x, n, segment, |rs, outs, sums| {
                let (out, seen) = &mut *got.lock().unwrap();
                for (i, r) in rs.enumerate() {
                    seen[r * rows.div_ceil(segment) + outs.start / segment] += 1;
                    out[r * rows + outs.start..r * rows + outs.end].copy_from_slice(&sums[i * segment..][..outs.len()]);
                }
            });
            let (out, seen) = got.into_inner().unwrap();
            assert!(seen.iter().all(|&s| s == 1), "{rows}×{cols}, {n} rows: a (row, segment) not handed out once");
            assert!(out == want, "{rows}×{cols}, {n} rows by segments of {segment}: other sums");
        }
    }
}
