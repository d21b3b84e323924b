//! Isolation forest anomaly scoring built on linfa's `ParamGuard`, `Fit` and `PredictInplace` traits.
//!
//! The forest follows Liu, Ting and Zhou (2008): every tree is grown on a random subsample of the
//! training rows (256 by default) up to a depth of `ceil(log2(subsample))`, splitting on a random
//! feature at a uniformly random value between the node's minimum and maximum. A point's anomaly
//! score is `2^(-E[h(x)] / c(n))`, where `h(x)` is the path length to the leaf that isolates it
//! (plus `c(leaf size)` for leaves that still hold several points) and `c(n)` is the average path
//! length of an unsuccessful binary-search-tree lookup among `n` points.
//!
//! Trees are stored in one flat `Vec` of 8-byte nodes whose two children sit next to each other,
//! so scoring walks a compact array instead of chasing boxed pointers.

use linfa::dataset::DatasetBase;
use linfa::traits::{Fit, PredictInplace};
use linfa::ParamGuard;
use ndarray::{Array1, ArrayBase, Data, Ix2};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Euler–Mascheroni constant, used to approximate harmonic numbers as `ln(n) + γ`.
const EULER_GAMMA: f64 = 0.577_215_664_901_532_9;

/// Marker stored in `Node::feature` for leaves.
const LEAF: u16 = u16::MAX;
/// Trees walked at once when scoring one point (see `score_one`).
const LANES: usize = 8;

/// Deepest tree allowed: depth 15 keeps every tree under 65,535 nodes, so tree-local child
/// indices fit in a `u16`.
pub const MAX_DEPTH: usize = 15;

/// Largest subsample allowed (2^15, whose automatic depth is exactly `MAX_DEPTH`).
pub const MAX_SUBSAMPLE: usize = 1 << 15;

/// Errors raised while validating parameters or fitting a forest.
#[derive(Debug, thiserror::Error)]
pub enum IForestError {
    /// The number of trees must be between 1 and 10,000.
    #[error("invalid number of trees {0}: must be between 1 and 10000")]
    InvalidTrees(usize),
    /// The subsample size must be between 2 and `MAX_SUBSAMPLE` (32,768).
    #[error("invalid subsample size {0}: must be between 2 and 32768")]
    InvalidSubsample(usize),
    /// The maximum depth must be between 1 and `MAX_DEPTH` (15).
    #[error("invalid maximum depth {0}: must be between 1 and 15")]
    InvalidDepth(usize),
    /// Fitting needs at least two rows and between 1 and 65,534 columns.
    #[error("the training set needs at least 2 rows and 1 to 65534 columns, got {rows}x{cols}")]
    TooFewRows {
        /// Rows in the training set.
        rows: usize,
        /// Columns in the training set.
        cols: usize,
    },
    /// The forest cannot split on NaN or infinite values.
    #[error("the training set contains a non-finite value")]
    NonFinite,
    /// An error reported by linfa itself.
    #[error(transparent)]
    Linfa(#[from] linfa::Error),
}

/// Checked isolation forest hyper-parameters (the `ParamGuard::Checked` type).
#[derive(Debug, Clone, PartialEq)]
pub struct IsolationForestValidParams {
    n_trees: usize,
    subsample: usize,
    max_depth: Option<usize>,
    seed: u64,
}

impl IsolationForestValidParams {
    /// Number of trees in the forest.
    pub fn n_trees(&self) -> usize {
        self.n_trees
    }

    /// Rows drawn (without replacement) to grow each tree.
    pub fn subsample(&self) -> usize {
        self.subsample
    }

    /// Depth limit; `None` means `ceil(log2(subsample))`.
    pub fn max_depth(&self) -> Option<usize> {
        self.max_depth
    }

    /// Seed of the random generator, so that a fit is reproducible.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

/// Unchecked isolation forest hyper-parameters with a builder API.
#[derive(Debug, Clone, PartialEq)]
pub struct IsolationForestParams(IsolationForestValidParams);

impl Default for IsolationForestParams {
    fn default() -> Self {
        Self(IsolationForestValidParams {
            n_trees: 100,
            subsample: 256,
            max_depth: None,
            seed: 0x5eed_1507,
        })
    }
}

impl IsolationForestParams {
    /// Parameters with the usual defaults: 100 trees, subsample 256, automatic depth.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the number of trees.
    pub fn n_trees(mut self, n: usize) -> Self {
        self.0.n_trees = n;
        self
    }

    /// Sets the per-tree subsample size.
    pub fn subsample(mut self, n: usize) -> Self {
        self.0.subsample = n;
        self
    }

    /// Sets an explicit depth limit.
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.0.max_depth = Some(depth);
        self
    }

    /// Sets the seed of the random generator.
    pub fn seed(mut self, seed: u64) -> Self {
        self.0.seed = seed;
        self
    }
}

impl ParamGuard for IsolationForestParams {
    type Checked = IsolationForestValidParams;
    type Error = IForestError;

    fn check_ref(&self) -> Result<&Self::Checked, Self::Error> {
        let p = &self.0;
        if p.n_trees == 0 || p.n_trees > 10_000 {
            return Err(IForestError::InvalidTrees(p.n_trees));
        }
        if p.subsample < 2 || p.subsample > MAX_SUBSAMPLE {
            return Err(IForestError::InvalidSubsample(p.subsample));
        }
        if let Some(d) = p.max_depth {
            if d == 0 || d > MAX_DEPTH {
                return Err(IForestError::InvalidDepth(d));
            }
        }
        Ok(p)
    }

    fn check(self) -> Result<Self::Checked, Self::Error> {
        self.check_ref()?;
        Ok(self.0)
    }
}

/// Average path length of an unsuccessful search in a binary search tree of `n` points,
/// `c(n) = 2 H(n-1) - 2 (n-1) / n`, with `c(2) = 1` and `c(n) = 0` for `n <= 1`.
pub fn average_path_length(n: usize) -> f64 {
    match n {
        0 | 1 => 0.0,
        2 => 1.0,
        _ => {
            let m = (n - 1) as f64;
            2.0 * (m.ln() + EULER_GAMMA) - 2.0 * m / n as f64
        }
    }
}

/// One 8-byte node of a flattened tree. For an inner node, `feature` is the split column, `value`
/// the split threshold and `left` the tree-local index of the left child (the right child is
/// `left + 1`). For a leaf, `feature` is `LEAF` and `value` is the full path length credited to
/// points ending there (depth plus `c(leaf size)`), precomputed so scoring does no arithmetic at
/// leaves. Thresholds are kept in `f32`: the split point is random anyway, so the rounding changes
/// nothing statistically, and it halves the memory a model takes per monitored metric.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    value: f32,
    feature: u16,
    left: u16,
}

/// A fitted isolation forest.
#[derive(Debug, Clone, PartialEq)]
pub struct IsolationForest {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    n_features: usize,
    /// `c(subsample)`, the normaliser of the mean path length.
    norm: f64,
}

impl IsolationForest {
    /// Number of features the forest was trained on.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Number of trees.
    pub fn n_trees(&self) -> usize {
        self.roots.len()
    }

    /// Total number of nodes over all trees (8 bytes each).
    pub fn n_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Path length of `x` in the tree rooted at `root`, including the leaf adjustment.
    #[inline]
    fn path_length(&self, root: u32, x: &[f64]) -> f64 {
        let tree = self.nodes.get(root as usize..).unwrap_or(&[]);
        let mut idx = 0usize;
        loop {
            // The indices were produced by `grow`, so they are always in range; `get` keeps the
            // walk panic-free even so.
            let Some(node) = tree.get(idx) else {
                return 0.0;
            };
            if node.feature == LEAF {
                return f64::from(node.value);
            }
            // A missing feature (short input) is treated as 0 rather than panicking.
            let v = x.get(node.feature as usize).copied().unwrap_or(0.0);
            idx = node.left as usize + usize::from(v >= f64::from(node.value));
        }
    }

    /// Anomaly score of one point, in (0, 1]; around 0.5 or below is normal, close to 1 is anomalous.
    pub fn score_one(&self, x: &[f64]) -> f64 {
        if self.roots.is_empty() || self.norm <= 0.0 {
            return 0.5;
        }
        // Trees are walked LANES at a time in lockstep: one forest per monitored metric does not
        // stay in cache when many devices are scored in turn, and walking one tree after the
        // other waits on one node load at a time, while independent walks overlap their loads.
        // The lengths are added in tree order, so the sum is the same as walking one by one.
        let mut total = 0.0f64;
        let mut roots = self.roots.chunks_exact(LANES);
        for chunk in &mut roots {
            for len in self.path_lengths(chunk, x) {
                total += len;
            }
        }
        for &root in roots.remainder() {
            total += self.path_length(root, x);
        }
        let mean = total / self.roots.len() as f64;
        (2.0f64).powf(-mean / self.norm)
    }

    /// Path lengths of `x` in the LANES trees rooted at `roots`, walked in lockstep.
    #[inline]
    fn path_lengths(&self, roots: &[u32], x: &[f64]) -> [f64; LANES] {
        let mut trees: [&[Node]; LANES] = [&[]; LANES];
        for (t, &r) in trees.iter_mut().zip(roots) {
            *t = self.nodes.get(r as usize..).unwrap_or(&[]);
        }
        // Tree-local index of each walk's current node, and its length once at a leaf.
        let mut at = [0usize; LANES];
        let mut lens = [0.0f64; LANES];
        let mut done = [false; LANES];
        let mut walking = LANES;
        while walking > 0 {
            walking = 0;
            for k in 0..LANES {
                if done[k] {
                    continue;
                }
                // Indices come from `grow` and are in range; `get` keeps the walk panic-free.
                let Some(node) = trees[k].get(at[k]) else {
                    done[k] = true;
                    continue;
                };
                if node.feature == LEAF {
                    lens[k] = f64::from(node.value);
                    done[k] = true;
                    continue;
                }
                let v = x.get(node.feature as usize).copied().unwrap_or(0.0);
                at[k] = node.left as usize + usize::from(v >= f64::from(node.value));
                walking += 1;
            }
        }
        lens
    }

    /// Scores every row of `x` into `out`, walking trees in the outer loop over blocks of rows so
    /// one tree's nodes stay in cache while it serves the whole block.
    pub fn score_rows<D: Data<Elem = f64>>(&self, x: &ArrayBase<D, Ix2>, out: &mut [f64]) {
        const BLOCK: usize = 64;
        let n = x.nrows().min(out.len());
        if self.roots.is_empty() || self.norm <= 0.0 {
            out.iter_mut().take(n).for_each(|o| *o = 0.5);
            return;
        }
        let inv = 1.0 / (self.roots.len() as f64 * self.norm);
        let mut row_buf: Vec<Vec<f64>> = Vec::with_capacity(BLOCK);
        let mut start = 0;
        while start < n {
            let end = (start + BLOCK).min(n);
            row_buf.clear();
            for i in start..end {
                row_buf.push(x.row(i).iter().copied().collect());
            }
            let mut sums = [0.0f64; BLOCK];
            for &root in &self.roots {
                for (s, row) in sums.iter_mut().zip(row_buf.iter()) {
                    *s += self.path_length(root, row);
                }
            }
            for (o, s) in out[start..end].iter_mut().zip(sums.iter()) {
                *o = (2.0f64).powf(-s * inv);
            }
            start = end;
        }
    }
}

/// What growing a forest reads and reuses: the training rows, row-major in one plain slice
/// (a row's features share a cache line, and indexing costs no stride arithmetic), and scratch
/// space for the per-node feature ranges, allocated once per fit instead of once per node.
struct Grower<'a> {
    data: &'a [f64],
    cols: usize,
    max_depth: usize,
    /// Per feature: lowest and highest value among the node's rows.
    lo: Vec<f64>,
    hi: Vec<f64>,
    /// The features that vary inside the node, in column order.
    candidates: Vec<usize>,
}

impl Grower<'_> {
    /// Grows one tree over `idx` (row indices into `data`) and appends its nodes to `nodes`,
    /// returning the root index.
    fn tree(
        &mut self,
        idx: &mut [usize],
        rng: &mut Xoshiro256PlusPlus,
        nodes: &mut Vec<Node>,
    ) -> u32 {
        let root = nodes.len();
        nodes.push(Node {
            feature: LEAF,
            left: 0,
            value: 0.0,
        });
        self.grow(idx, 0, rng, nodes, root, root);
        root as u32
    }

    /// Fills in node `at` for the rows `idx` at depth `depth`, recursing into freshly
    /// allocated, adjacent child slots. `root` is the tree's first node, the base of its local
    /// indices.
    fn grow(
        &mut self,
        idx: &mut [usize],
        depth: usize,
        rng: &mut Xoshiro256PlusPlus,
        nodes: &mut Vec<Node>,
        root: usize,
        at: usize,
    ) {
        let leaf = |n: usize| Node {
            feature: LEAF,
            left: 0,
            value: (depth as f64 + average_path_length(n)) as f32,
        };
        if idx.len() <= 1 || depth >= self.max_depth {
            nodes[at] = leaf(idx.len());
            return;
        }
        // Collect the features that still vary inside this node: splitting on a constant
        // feature would isolate nothing, and a node where every feature is constant is a leaf.
        let d = self.cols;
        // One feature at a time, its range in registers (the rows are finite: `fit` checked).
        for f in 0..d {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            for &i in idx.iter() {
                let v = self.data[i * d + f];
                if v < lo {
                    lo = v;
                }
                if v > hi {
                    hi = v;
                }
            }
            self.lo[f] = lo;
            self.hi[f] = hi;
        }
        self.candidates.clear();
        self.candidates
            .extend((0..d).filter(|&f| self.hi[f] > self.lo[f]));
        if self.candidates.is_empty() {
            nodes[at] = leaf(idx.len());
            return;
        }
        let feature = self.candidates[rng.gen_range(0..self.candidates.len())];
        let (lo, hi) = (self.lo[feature], self.hi[feature]);
        // Draw the split and round it to the stored `f32` precision first, so training
        // partitions exactly as scoring will route.
        let mut split = f64::from((lo + rng.gen::<f64>() * (hi - lo)) as f32);
        // Guard against rounding pushing the split to or past an end of the range, which would
        // send every row to one side and make no progress.
        if split <= lo || split > hi {
            split = hi;
        }
        // Partition: rows with value < split go to the front (left child).
        // Without a branch per row (which side a row goes is a coin toss to the CPU): every
        // row is swapped to the boundary, which moves only when the row goes left. Only the
        // sides' sets matter to the tree, not the order within them.
        let mut mid = 0;
        for k in 0..idx.len() {
            let i = idx[k];
            idx.swap(k, mid);
            mid += usize::from(self.data[i * d + feature] < split);
        }
        let left = nodes.len();
        let empty = Node {
            feature: LEAF,
            left: 0,
            value: 0.0,
        };
        nodes.push(empty);
        nodes.push(empty);
        nodes[at] = Node {
            feature: feature as u16,
            left: (left - root) as u16,
            value: split as f32,
        };
        let (l, r) = idx.split_at_mut(mid);
        self.grow(l, depth + 1, rng, nodes, root, left);
        self.grow(r, depth + 1, rng, nodes, root, left + 1);
    }
}

impl<D, T> Fit<ArrayBase<D, Ix2>, T, IForestError> for IsolationForestValidParams
where
    D: Data<Elem = f64>,
{
    type Object = IsolationForest;

    fn fit(
        &self,
        dataset: &DatasetBase<ArrayBase<D, Ix2>, T>,
    ) -> Result<IsolationForest, IForestError> {
        let x = &dataset.records;
        let (rows, cols) = (x.nrows(), x.ncols());
        if rows < 2 || cols == 0 || cols >= LEAF as usize {
            return Err(IForestError::TooFewRows { rows, cols });
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(IForestError::NonFinite);
        }
        // Row-major whatever the input's layout (`iter` walks rows in order).
        let data: Vec<f64> = x.iter().copied().collect();
        let psi = self.subsample.min(rows);
        let max_depth = self
            .max_depth
            .unwrap_or_else(|| (psi as f64).log2().ceil().max(1.0) as usize);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.seed);
        let mut all: Vec<usize> = (0..rows).collect();
        let mut nodes = Vec::with_capacity(self.n_trees * (2 * psi).min(1 << (max_depth + 1)));
        let mut roots = Vec::with_capacity(self.n_trees);
        let mut grower = Grower {
            data: &data,
            cols,
            max_depth,
            lo: vec![0.0; cols],
            hi: vec![0.0; cols],
            candidates: Vec::with_capacity(cols),
        };
        let mut sample = Vec::with_capacity(psi);
        for _ in 0..self.n_trees {
            // Partial Fisher–Yates: the first `psi` entries become a uniform sample without
            // replacement.
            for k in 0..psi {
                let j = rng.gen_range(k..rows);
                all.swap(k, j);
            }
            sample.clear();
            sample.extend_from_slice(&all[..psi]);
            roots.push(grower.tree(&mut sample, &mut rng, &mut nodes));
        }
        Ok(IsolationForest {
            nodes,
            roots,
            n_features: cols,
            norm: average_path_length(psi),
        })
    }
}

impl<D: Data<Elem = f64>> PredictInplace<ArrayBase<D, Ix2>, Array1<f64>> for IsolationForest {
    fn predict_inplace(&self, x: &ArrayBase<D, Ix2>, y: &mut Array1<f64>) {
        match y.as_slice_mut() {
            Some(out) => self.score_rows(x, out),
            None => {
                let mut tmp = vec![0.0; y.len()];
                self.score_rows(x, &mut tmp);
                y.iter_mut().zip(tmp).for_each(|(a, b)| *a = b);
            }
        }
    }

    fn default_target(&self, x: &ArrayBase<D, Ix2>) -> Array1<f64> {
        Array1::zeros(x.nrows())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linfa::traits::Predict;
    use ndarray::{Array2, ShapeBuilder};

    fn cluster(n: usize, seed: u64) -> Array2<f64> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        Array2::from_shape_fn((n, 2), |_| rng.gen::<f64>() - 0.5)
    }

    #[test]
    fn c_n_small_values() {
        assert_eq!(average_path_length(0), 0.0);
        assert_eq!(average_path_length(1), 0.0);
        assert_eq!(average_path_length(2), 1.0);
        // c(3) = 2 (ln 2 + γ) - 4/3 ≈ 1.2078.
        assert!((average_path_length(3) - 1.207_392).abs() < 1e-5);
        // c(256) ≈ 10.2448 is the classic normaliser for the default subsample.
        assert!((average_path_length(256) - 10.244_770).abs() < 1e-4);
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(matches!(
            IsolationForestParams::new().n_trees(0).check(),
            Err(IForestError::InvalidTrees(0))
        ));
        assert!(matches!(
            IsolationForestParams::new().subsample(1).check(),
            Err(IForestError::InvalidSubsample(1))
        ));
        assert!(matches!(
            IsolationForestParams::new().max_depth(0).check(),
            Err(IForestError::InvalidDepth(0))
        ));
        assert!(IsolationForestParams::new().check().is_ok());
        let ds = DatasetBase::new(Array2::<f64>::zeros((1, 2)), ());
        let r: Result<IsolationForest, IForestError> = IsolationForestParams::new().fit(&ds);
        assert!(matches!(r, Err(IForestError::TooFewRows { .. })));
        let mut bad = cluster(10, 1);
        bad[[3, 1]] = f64::NAN;
        let r: Result<IsolationForest, IForestError> =
            IsolationForestParams::new().fit(&DatasetBase::new(bad, ()));
        assert!(matches!(r, Err(IForestError::NonFinite)));
    }

    #[test]
    fn outliers_score_higher_and_scores_in_unit_interval() {
        let train = cluster(1000, 7);
        let forest = IsolationForestParams::new()
            .fit(&DatasetBase::new(train.clone(), ()))
            .expect("fit");
        let scores: Array1<f64> = forest.predict(&train);
        assert!(scores.iter().all(|&s| s > 0.0 && s < 1.0));
        let inlier = forest.score_one(&[0.0, 0.0]);
        let outlier = forest.score_one(&[5.0, -4.0]);
        assert!(outlier > 0.6, "outlier {outlier}");
        assert!(inlier < 0.5, "inlier {inlier}");
        assert!(outlier > inlier + 0.1, "{outlier} vs {inlier}");
        // The batch path and the single-point path agree.
        let one = forest.score_one(&[train[[5, 0]], train[[5, 1]]]);
        assert!((one - scores[5]).abs() < 1e-12);
    }

    #[test]
    fn same_seed_same_scores() {
        let train = cluster(500, 3);
        let fit = |seed| {
            IsolationForestParams::new()
                .seed(seed)
                .fit(&DatasetBase::new(train.clone(), ()))
                .expect("fit")
        };
        let (a, b, c) = (fit(11), fit(11), fit(12));
        assert_eq!(a, b);
        let probe = [0.3, -0.2];
        assert_eq!(a.score_one(&probe), b.score_one(&probe));
        assert_ne!(a, c);
        // The same rows in column-major memory grow the same trees.
        let mut fortran = Array2::<f64>::zeros(train.raw_dim().f());
        fortran.assign(&train);
        assert!(fortran.as_slice().is_none());
        let d = IsolationForestParams::new()
            .seed(11)
            .fit(&DatasetBase::new(fortran, ()))
            .expect("fit");
        assert_eq!(a, d);
    }

    #[test]
    fn nodes_are_eight_bytes() {
        assert_eq!(std::mem::size_of::<Node>(), 8);
    }

    #[test]
    fn depth_limit_and_constant_data() {
        let train = cluster(300, 5);
        let f = IsolationForestParams::new()
            .n_trees(10)
            .fit(&DatasetBase::new(train, ()))
            .expect("fit");
        // Depth 8 trees have at most 511 nodes each.
        assert!(f.n_nodes() <= 10 * 511);
        // Constant data cannot be split: every point lands in a root leaf holding the whole
        // subsample, so its path length equals c(n) and the score is exactly 0.5.
        let flat = Array2::from_elem((100, 3), 4.2);
        let f = IsolationForestParams::new()
            .fit(&DatasetBase::new(flat, ()))
            .expect("fit");
        assert!((f.score_one(&[4.2, 4.2, 4.2]) - 0.5).abs() < 1e-6);
    }
}
