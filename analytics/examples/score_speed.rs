//! Measures isolation forest scoring throughput on one core (100 trees, subsample 256).
//!
//! Run with `cargo run -p vigil-analytics --release --example score_speed`.

use std::time::Instant;

use linfa::dataset::DatasetBase;
use linfa::traits::{Fit, Predict};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use vigil_analytics::features::N_FEATURES;
use vigil_analytics::iforest::{IForestError, IsolationForest, IsolationForestParams};

fn main() -> Result<(), IForestError> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(42);
    let train = Array2::from_shape_fn((4096, N_FEATURES), |_| rng.gen::<f64>());
    let points = Array2::from_shape_fn((1_000_000, N_FEATURES), |_| rng.gen::<f64>() * 1.2 - 0.1);

    let t = Instant::now();
    let forest: IsolationForest = IsolationForestParams::new()
        .n_trees(100)
        .subsample(256)
        .fit(&DatasetBase::new(train, ()))?;
    let fit_ms = t.elapsed().as_secs_f64() * 1e3;

    // Batch scoring through linfa's `Predict` (tree-major over blocks of rows).
    let t = Instant::now();
    let scores: Array1<f64> = forest.predict(&points);
    let batch = points.nrows() as f64 / t.elapsed().as_secs_f64();

    // One point at a time, as the streaming detector does.
    let t = Instant::now();
    let mut sum = 0.0;
    let single_n = 200_000;
    for row in points.rows().into_iter().take(single_n) {
        let x: [f64; N_FEATURES] = std::array::from_fn(|j| row[j]);
        sum += forest.score_one(&x);
    }
    let single = single_n as f64 / t.elapsed().as_secs_f64();

    println!(
        "fit: {fit_ms:.1} ms for 100 trees ({} nodes, {} KB)",
        forest.n_nodes(),
        forest.n_nodes() * 8 / 1024
    );
    println!(
        "batch predict: {batch:.0} points/s/core (mean score {:.4})",
        scores.mean().unwrap_or(0.0)
    );
    println!("score_one:     {single:.0} points/s/core (checksum {sum:.1})");
    Ok(())
}
