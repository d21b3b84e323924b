//! What the analytics examples share.

use rand::Rng;
use rand_xoshiro::Xoshiro256PlusPlus;

/// A draw from N(0, `sd`²) (Box-Muller).
pub fn gauss(rng: &mut Xoshiro256PlusPlus, sd: f64) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
