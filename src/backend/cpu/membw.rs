//! Measures the machine's memory read bandwidth, the ceiling for memory-bound kernels
//! such as the 4-bit GEMV.

use std::time::Instant;

/// Repetitions of the timed pass; the fastest one counts.
const REPEATS: usize = 5;

/// Reads a `bytes`-long buffer (rounded down to whole 64-byte lines, at least one line)
/// with `threads` threads (at least one), each summing its contiguous share with
/// independent vector-friendly accumulators, and returns the best read bandwidth of a
/// few repetitions in GB/s (10^9 bytes per second).
///
/// Use a buffer several times larger than the last-level cache to measure DRAM rather
/// than cache bandwidth.
pub fn measure_read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let threads = threads.max(1);
    let lines = (bytes / 64).max(threads);
    let floats = lines * 16;
    // Non-zero contents, so the pages are really backed and read.
    let buf: Vec<f32> = (0..floats).map(|i| (i % 7) as f32).collect();
    let per_thread = lines.div_ceil(threads) * 16;
    let mut best = f64::INFINITY;
    let mut sink = 0.0f32;
    for _ in 0..REPEATS {
        let start = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(per_thread)
                .map(|part| s.spawn(move || sum_f32(part)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        sink += total;
        best = best.min(secs);
    }
    std::hint::black_box(sink);
    (floats * 4) as f64 / best / 1e9
}

/// Sums a slice with 32 independent accumulators (the compiler keeps them in vector
/// registers), so the loop is limited by memory, not by add latency.
fn sum_f32(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    let mut chunks = v.chunks_exact(32);
    for c in &mut chunks {
        for (a, &e) in acc.iter_mut().zip(c) {
            *a += e;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}
