//! Measures how long the isolation forest takes to fit, as the streaming detector refits it:
//! 100 trees, subsample 256, on 1,024 feature rows (the last 512 plus a 512-row reservoir).
//! Prints the median and fastest of 200 fits, and a checksum of the last forest's scores so
//! that a faster fit can be checked to build the same trees.
//!
//! Run with `cargo run -p vigil-analytics --release --example fit_speed`.

use std::time::Instant;

use linfa::dataset::DatasetBase;
use linfa::traits::Fit;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use vigil_analytics::features::N_FEATURES;
use vigil_analytics::iforest::{IForestError, IsolationForest, IsolationForestParams};

fn main() -> Result<(), IForestError> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    // A signal-like mix: most columns continuous, one with few distinct values (a quantised
    // sensor), so some nodes meet constant features.
    let train = Array2::from_shape_fn((1024, N_FEATURES), |(_, j)| match j {
        0 => (rng.gen::<f64>() * 4.0).floor(),
        _ => rng.gen::<f64>() * (j as f64 + 1.0),
    });
    let probe = Array2::from_shape_fn((10_000, N_FEATURES), |_| rng.gen::<f64>() * 6.0 - 1.0);
    let mut times = Vec::with_capacity(200);
    let mut forest: Option<IsolationForest> = None;
    for seed in 0..200u64 {
        let t = Instant::now();
        let f = IsolationForestParams::new()
            .n_trees(100)
            .subsample(256)
            .max_depth(8)
            .seed(seed)
            .fit(&DatasetBase::new(train.clone(), ()))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        forest = Some(f);
    }
    times.sort_by(f64::total_cmp);
    let checksum: f64 = match &forest {
        Some(f) => probe
            .rows()
            .into_iter()
            .map(|row| {
                let x: [f64; N_FEATURES] = std::array::from_fn(|j| row[j]);
                f.score_one(&x)
            })
            .sum(),
        None => 0.0,
    };
    println!(
        "fit: median {:.3} ms, fastest {:.3} ms (200 fits of 100 trees on 1024 rows); checksum {checksum:.9}",
        times[times.len() / 2],
        times[0]
    );
    Ok(())
}
