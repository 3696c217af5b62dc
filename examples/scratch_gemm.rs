use half::f16;
use hiprune::backend::cpu::{DenseData, LinearWeights, linear};
use hiprune::quant::{Q4Kind, Q4Weights};
use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (m, k, n) = (args[0], args[1], args[2]);
    let g = 64;
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w32: Vec<f32> = (0..n * k)
        .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let packed: Vec<u8> = (0..n * k / 2).map(|i| (i * 31 % 251) as u8).collect();
    let scales = vec![f16::from_f32(0.01); n * k / g];
    let offsets = vec![f16::from_f32(-0.08); n * k / g];
    let q = Q4Weights::new(Q4Kind::Int4, n, k, g, &packed, &scales, &offsets).unwrap();
    let dense = LinearWeights::dense(DenseData::F32(&w32), n, k).unwrap();
    let mut y = vec![0.0; m * n];
    for rep in 0..3 {
        let t = Instant::now();
        linear(&x, m, &dense, None, &mut y).unwrap();
        let td = t.elapsed().as_secs_f64();
        let t = Instant::now();
        linear(&x, m, &LinearWeights::Q4(q), None, &mut y).unwrap();
        let tq = t.elapsed().as_secs_f64();
        let fl = 2.0 * (m * n * k) as f64;
        println!(
            "rep {rep}: dense {:.1} GFLOP/s  q4 {:.1} GFLOP/s  ratio {:.3}",
            fl / td / 1e9,
            fl / tq / 1e9,
            td / tq
        );
    }
}
