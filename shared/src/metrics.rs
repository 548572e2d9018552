//! Evaluation metrics for GLUE / SuperGLUE-style tasks, with bootstrap confidence intervals.
//!
//! Trainer, evaluator and server all score through this module so that a number means the same
//! thing wherever it is printed. The low-level functions ([`accuracy`], [`f1`], [`matthews`], ...)
//! compute one metric on plain slices; [`score_task`] computes a task's metrics, its single score
//! and 95% bootstrap intervals from a [`Predictions`] value.
//!
//! # Conventions
//!
//! A task's score is the unweighted mean of its metrics (the GLUE leaderboard rule), and a
//! benchmark's score is the unweighted mean of its task scores ([`average`]). The metrics per task
//! (the task registry, `crate::task`, holds each task's metric list; this table documents them):
//!
//! | Benchmark | Task | Metrics | Task score |
//! |---|---|---|---|
//! | GLUE | CoLA | Matthews correlation | MCC |
//! | GLUE | SST-2 | accuracy | acc |
//! | GLUE | MRPC, QQP | F1 (positive class 1) and accuracy | mean of the two |
//! | GLUE | STS-B | Pearson and Spearman | mean of the two |
//! | GLUE | MNLI-m, MNLI-mm | accuracy (each split scored separately) | acc |
//! | GLUE | QNLI, RTE, WNLI | accuracy | acc |
//! | GLUE | AX (diagnostic) | Matthews correlation, 3 classes | MCC |
//! | SuperGLUE | BoolQ, COPA, WiC, WSC, RTE | accuracy | acc |
//! | SuperGLUE | CB | accuracy and macro-F1 | mean of the two |
//! | SuperGLUE | MultiRC | F1a (over all answer options) and EM (per question) | mean of the two |
//! | SuperGLUE | ReCoRD | token F1 and exact match (max over gold answers) | mean of the two |
//! | SuperGLUE | AX-b (diagnostic) | Matthews correlation | MCC |
//! | SuperGLUE | AX-g (diagnostic) | accuracy | acc |
//!
//! The diagnostics (AX, AX-b, AX-g) are conventionally reported but left out of benchmark
//! averages.
//!
//! # Undefined values
//!
//! Where a metric is undefined (no examples, zero variance, zero denominator) the functions
//! return `0.0` rather than `NaN`, the convention of scikit-learn's `matthews_corrcoef` and of
//! `f1_score(zero_division=0)`; a bootstrap resample that happens to degenerate then still yields
//! a number. [`score_task`] instead rejects empty or malformed input with an error.

#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Coverage of the intervals [`score_task`] reports: 0.95, i.e. the 2.5th to 97.5th percentile.
pub const CI_LEVEL: f64 = 0.95;

fn check_len(a: usize, b: usize, what: &str) {
    assert_eq!(a, b, "{what}: the two inputs have different lengths ({a} vs {b})");
}

fn check_label(label: usize, n_classes: usize, what: &str) {
    assert!(label < n_classes, "{what}: label {label} is not below n_classes = {n_classes}");
}

// ----------------------------------------------------------------------------------------------
// Classification
// ----------------------------------------------------------------------------------------------

/// Fraction of positions where `pred` equals `gold`: the metric of most single-label tasks
/// (SST-2, QNLI, RTE, BoolQ, ...). Returns 0.0 for empty input.
///
/// # Panics
/// If the slices differ in length.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    check_len(pred.len(), gold.len(), "accuracy");
    if pred.is_empty() {
        return 0.0;
    }
    let correct = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    correct as f64 / pred.len() as f64
}

/// F1 from counts, `2tp / (2tp + fp + fn)`, which equals `2PR / (P + R)` whenever it is defined
/// and is 0.0 when there are no true positives (including the fully undefined 0/0 case).
fn f1_from_counts(tp: usize, fp: usize, fn_: usize) -> f64 {
    let denom = 2 * tp + fp + fn_;
    if denom == 0 {
        0.0
    } else {
        (2 * tp) as f64 / denom as f64
    }
}

/// Binary F1 of the class `positive` (harmonic mean of its precision and recall), as MRPC and QQP
/// report it with `positive = 1`. Every other label counts as negative.
///
/// Defined as `2tp / (2tp + fp + fn)`. When there are no predicted and no gold positives the
/// value is 0/0; this function returns 0.0 then (scikit-learn's `zero_division=0`), and also
/// whenever there is no true positive.
///
/// # Panics
/// If the slices differ in length.
pub fn f1(pred: &[usize], gold: &[usize], positive: usize) -> f64 {
    check_len(pred.len(), gold.len(), "f1");
    let (mut tp, mut fp, mut fn_) = (0, 0, 0);
    for (&p, &g) in pred.iter().zip(gold) {
        match (p == positive, g == positive) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    f1_from_counts(tp, fp, fn_)
}

/// Macro-averaged F1: the unweighted mean of the per-class F1 (see [`f1`]), as SuperGLUE CB
/// reports it.
///
/// The mean runs over the classes in `0..n_classes` that occur in `pred` or `gold` (the
/// scikit-learn `average="macro"` rule); a class absent from both has no F1 and is skipped rather
/// than counted as 0. With every class present this is the plain mean over all `n_classes`.
/// Returns 0.0 for empty input.
///
/// # Panics
/// If the slices differ in length or a label is `>= n_classes`.
pub fn macro_f1(pred: &[usize], gold: &[usize], n_classes: usize) -> f64 {
    check_len(pred.len(), gold.len(), "macro_f1");
    // Per class: [tp, fp, fn].
    let mut counts = vec![[0usize; 3]; n_classes];
    for (&p, &g) in pred.iter().zip(gold) {
        check_label(p, n_classes, "macro_f1");
        check_label(g, n_classes, "macro_f1");
        if p == g {
            counts[p][0] += 1;
        } else {
            counts[p][1] += 1;
            counts[g][2] += 1;
        }
    }
    let present: Vec<f64> =
        counts.iter().filter(|c| c.iter().sum::<usize>() > 0).map(|c| f1_from_counts(c[0], c[1], c[2])).collect();
    if present.is_empty() {
        0.0
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    }
}

/// Matthews correlation coefficient for `n_classes` classes: Gorodkin's R_K, the metric of CoLA
/// and of the GLUE / SuperGLUE diagnostics. Unlike accuracy it is not inflated by a majority
/// class: a constant predictor scores 0.
///
/// With `s` examples, `c` correct ones, `t_k` gold and `p_k` predicted examples of class `k`:
///
/// `R_K = (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²) · (s² − Σ_k t_k²))`
///
/// For two classes this equals the binary `(tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))`.
/// Returns 0.0 when the denominator is zero (all predictions, or all gold labels, in one class;
/// empty input).
///
/// # Panics
/// If the slices differ in length or a label is `>= n_classes`.
pub fn matthews(pred: &[usize], gold: &[usize], n_classes: usize) -> f64 {
    check_len(pred.len(), gold.len(), "matthews");
    let mut t = vec![0usize; n_classes];
    let mut p = vec![0usize; n_classes];
    let mut correct = 0usize;
    for (&pk, &gk) in pred.iter().zip(gold) {
        check_label(pk, n_classes, "matthews");
        check_label(gk, n_classes, "matthews");
        p[pk] += 1;
        t[gk] += 1;
        correct += usize::from(pk == gk);
    }
    // All quantities are integers far below 2^53, so the f64 arithmetic is exact up to the final
    // product, and a zero factor is exactly zero.
    let s = pred.len() as f64;
    let c = correct as f64;
    let sum_pt: f64 = p.iter().zip(&t).map(|(&a, &b)| a as f64 * b as f64).sum();
    let sum_pp: f64 = p.iter().map(|&a| (a as f64) * (a as f64)).sum();
    let sum_tt: f64 = t.iter().map(|&a| (a as f64) * (a as f64)).sum();
    let den = ((s * s - sum_pp) * (s * s - sum_tt)).sqrt();
    if den > 0.0 {
        ((c * s - sum_pt) / den).clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

// ----------------------------------------------------------------------------------------------
// Regression
// ----------------------------------------------------------------------------------------------

/// Pearson correlation of `x` and `y` (STS-B): covariance over the product of standard
/// deviations, computed around the means (two passes) for numerical stability.
///
/// Returns 0.0 when fewer than two points are given or either input is constant (zero
/// variance, undefined correlation). Non-finite inputs give a non-finite result.
///
/// # Panics
/// If the slices differ in length.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    check_len(x.len(), y.len(), "pearson");
    if x.len() < 2 || is_constant(x) || is_constant(y) {
        return 0.0;
    }
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    let r = sxy / (sxx * syy).sqrt();
    if r.is_nan() {
        r
    } else {
        r.clamp(-1.0, 1.0)
    }
}

/// Whether every value equals the first, checked exactly: the mean of identical values is not
/// always bit-identical to them, and the rounding residue must not pass for variance.
fn is_constant(v: &[f64]) -> bool {
    v.iter().all(|&a| a.total_cmp(&v[0]).is_eq())
}

/// Spearman rank correlation (STS-B): the Pearson correlation of the ranks of `x` and of `y`.
/// Tied values all get the mean of the ranks they span (ranks `2, 3, 4` tied → `3, 3, 3`), the
/// convention of `scipy.stats.spearmanr`. Returns 0.0 under the same conditions as [`pearson`].
///
/// # Panics
/// If the slices differ in length.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    check_len(x.len(), y.len(), "spearman");
    pearson(&average_ranks(x), &average_ranks(y))
}

/// 1-based ranks, ties sharing the mean of the ranks they span.
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && v[order[end]].total_cmp(&v[order[start]]).is_eq() {
            end += 1;
        }
        // Sorted positions start..end hold ranks start+1 ..= end; their mean:
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

// ----------------------------------------------------------------------------------------------
// Grouped metrics: MultiRC and ReCoRD
// ----------------------------------------------------------------------------------------------

/// MultiRC F1a: binary F1 of the "correct answer" class (label 1) over all answer options of all
/// questions pooled together; same as `f1(pred, gold, 1)`.
///
/// # Panics
/// If the slices differ in length.
pub fn multirc_f1a(pred: &[usize], gold: &[usize]) -> f64 {
    f1(pred, gold, 1)
}

/// MultiRC exact match: the fraction of questions all of whose answer options are predicted
/// right. `groups[i]` is the question id of answer option `i`; ids need not be contiguous or
/// sorted. Returns 0.0 for empty input.
///
/// # Panics
/// If the three slices differ in length.
pub fn multirc_em(pred: &[usize], gold: &[usize], groups: &[usize]) -> f64 {
    check_len(pred.len(), gold.len(), "multirc_em");
    check_len(pred.len(), groups.len(), "multirc_em groups");
    let mut all_right: HashMap<usize, bool> = HashMap::new();
    for ((&p, &g), &q) in pred.iter().zip(gold).zip(groups) {
        *all_right.entry(q).or_insert(true) &= p == g;
    }
    if all_right.is_empty() {
        return 0.0;
    }
    all_right.values().filter(|&&ok| ok).count() as f64 / all_right.len() as f64
}

/// SQuAD answer normalisation, as tokens: lowercase, delete ASCII punctuation (Python's
/// `string.punctuation`), drop the articles a/an/the, split on whitespace.
fn answer_tokens(s: &str) -> Vec<String> {
    let cleaned: String = s.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    cleaned.split_whitespace().filter(|t| !matches!(*t, "a" | "an" | "the")).map(str::to_owned).collect()
}

/// SQuAD token F1 between two normalised token lists: overlap counted as a multiset
/// intersection; 0.0 when nothing overlaps (including when either side is empty).
fn token_f1(pred: &[String], gold: &[String]) -> f64 {
    let mut gold_counts: HashMap<&str, usize> = HashMap::new();
    for t in gold {
        *gold_counts.entry(t.as_str()).or_insert(0) += 1;
    }
    let mut common = 0usize;
    for t in pred {
        if let Some(c) = gold_counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / pred.len() as f64;
    let recall = common as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// (exact match, token F1) of one ReCoRD query: maxima over its gold answers, each 0.0 when
/// there is no gold answer.
fn record_query(predicted: &str, gold_answers: &[String]) -> (f64, f64) {
    let p = answer_tokens(predicted);
    let mut best = (0.0f64, 0.0f64);
    for gold in gold_answers {
        let g = answer_tokens(gold);
        let em = if p == g { 1.0 } else { 0.0 };
        best = (best.0.max(em), best.1.max(token_f1(&p, &g)));
    }
    best
}

/// ReCoRD scores `(exact match, token F1)`, the official SQuAD-v1.1-style evaluation: for each
/// query, the maximum over its gold answers of exact match and of token-level F1, both after
/// SQuAD normalisation (lowercase, delete ASCII punctuation, drop the articles a/an/the, collapse
/// whitespace); then each averaged over queries.
///
/// Token F1 counts overlapping tokens as a multiset and is 0 when nothing overlaps. A query with
/// no gold answers scores 0 on both; empty input returns `(0.0, 0.0)`.
///
/// # Panics
/// If the slices differ in length.
pub fn record_em_f1(predicted: &[String], gold_answers: &[Vec<String>]) -> (f64, f64) {
    check_len(predicted.len(), gold_answers.len(), "record_em_f1");
    if predicted.is_empty() {
        return (0.0, 0.0);
    }
    let (mut em, mut f1) = (0.0, 0.0);
    for (p, golds) in predicted.iter().zip(gold_answers) {
        let (e, f) = record_query(p, golds);
        em += e;
        f1 += f;
    }
    let n = predicted.len() as f64;
    (em / n, f1 / n)
}

// ----------------------------------------------------------------------------------------------
// Bootstrap
// ----------------------------------------------------------------------------------------------

/// Draws `resamples` bootstrap resamples of `0..n_units` (with replacement, each of length
/// `n_units`) from ChaCha8 seeded with `seed`, and hands each to `visit`. Every caller shares
/// this, so the same seed gives the same resamples everywhere.
fn for_each_resample(n_units: usize, resamples: usize, seed: u64, mut visit: impl FnMut(&[usize])) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx = vec![0usize; n_units];
    for _ in 0..resamples {
        for slot in idx.iter_mut() {
            *slot = rng.random_range(0..n_units);
        }
        visit(&idx);
    }
}

/// Percentile `q` in [0, 1] of sorted, non-empty `sorted`, by linear interpolation between order
/// statistics: position `h = (len − 1)·q`, value `x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋])`
/// (NumPy's default "linear" method, Hyndman–Fan type 7).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = (h.floor() as usize).min(sorted.len() - 1);
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = h - lo as f64;
    if frac == 0.0 {
        sorted[lo]
    } else {
        sorted[lo] + frac * (sorted[hi] - sorted[lo])
    }
}

/// The central `level` percentile interval of `values` (sorted in place).
fn percentile_interval(values: &mut [f64], level: f64) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    (percentile(values, tail), percentile(values, 1.0 - tail))
}

fn check_level(level: f64) {
    assert!(level > 0.0 && level < 1.0, "bootstrap level must lie strictly between 0 and 1, got {level}");
}

/// Percentile bootstrap confidence interval of a statistic, so that a score comes with its
/// sampling uncertainty (dev sets of a few hundred examples move by several points).
///
/// Draws `resamples` resamples of the units `0..n_units`, each `n_units` indices drawn uniformly
/// with replacement from a `ChaCha8Rng` seeded with `seed` (so the result is reproducible), and
/// evaluates `statistic` on each; the closure maps the resampled unit indices to the statistic
/// (units are examples, or whole groups for grouped metrics such as MultiRC). Returns the
/// `(1 − level)/2` and `(1 + level)/2` percentiles of the resampled values, e.g. the 2.5th and
/// 97.5th for `level = 0.95`.
///
/// Percentile rule: linear interpolation between order statistics. With the `B` values sorted
/// as `x[0] ≤ … ≤ x[B−1]`, percentile `q` is at position `h = (B − 1)·q` and equals
/// `x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋])` (NumPy's default). A constant statistic `c` gives
/// exactly `(c, c)`. `resamples == 0` gives `(NaN, NaN)`: no interval.
///
/// # Panics
/// If `level` is not strictly between 0 and 1.
pub fn bootstrap_ci(
    n_units: usize,
    resamples: usize,
    seed: u64,
    level: f64,
    statistic: impl Fn(&[usize]) -> f64,
) -> (f64, f64) {
    check_level(level);
    if resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut values = Vec::with_capacity(resamples);
    for_each_resample(n_units, resamples, seed, |idx| values.push(statistic(idx)));
    percentile_interval(&mut values, level)
}

// ----------------------------------------------------------------------------------------------
// Task conventions
// ----------------------------------------------------------------------------------------------

/// One metric of the GLUE / SuperGLUE conventions. Serialised in snake_case
/// (`"accuracy"`, `"macro_f1"`, `"multirc_f1a"`, ...); [`Metric::name`] is the short display name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// [`accuracy`].
    Accuracy,
    /// [`f1`] of the positive class 1 (MRPC, QQP); binary tasks only.
    F1,
    /// [`macro_f1`] (CB).
    MacroF1,
    /// [`matthews`] correlation (CoLA, AX, AX-b).
    Matthews,
    /// [`pearson`] correlation (STS-B).
    Pearson,
    /// [`spearman`] correlation (STS-B).
    Spearman,
    /// [`multirc_f1a`]: F1 over all MultiRC answer options.
    #[serde(rename = "multirc_f1a")]
    MultiRcF1a,
    /// [`multirc_em`]: fraction of MultiRC questions answered entirely right; needs groups.
    #[serde(rename = "multirc_em")]
    MultiRcEm,
    /// ReCoRD token F1 ([`record_em_f1`]).
    RecordF1,
    /// ReCoRD exact match ([`record_em_f1`]).
    RecordEm,
}

impl Metric {
    /// Every metric, in declaration order (for listings, parsing and tests).
    pub const ALL: [Metric; 10] = [
        Metric::Accuracy,
        Metric::F1,
        Metric::MacroF1,
        Metric::Matthews,
        Metric::Pearson,
        Metric::Spearman,
        Metric::MultiRcF1a,
        Metric::MultiRcEm,
        Metric::RecordF1,
        Metric::RecordEm,
    ];

    /// Short name as leaderboards and reports print it: "accuracy", "f1", "macro_f1", "mcc",
    /// "pearson", "spearman", "f1a", "em", "record_f1", "record_em".
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::MacroF1 => "macro_f1",
            Metric::Matthews => "mcc",
            Metric::Pearson => "pearson",
            Metric::Spearman => "spearman",
            Metric::MultiRcF1a => "f1a",
            Metric::MultiRcEm => "em",
            Metric::RecordF1 => "record_f1",
            Metric::RecordEm => "record_em",
        }
    }

    /// The serde (snake_case) identifier; kept in step with the derive by a test.
    fn serde_name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::MacroF1 => "macro_f1",
            Metric::Matthews => "matthews",
            Metric::Pearson => "pearson",
            Metric::Spearman => "spearman",
            Metric::MultiRcF1a => "multirc_f1a",
            Metric::MultiRcEm => "multirc_em",
            Metric::RecordF1 => "record_f1",
            Metric::RecordEm => "record_em",
        }
    }
}

impl fmt::Display for Metric {
    /// Writes [`Metric::name`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = crate::UnknownName;

    /// Parses either the short name ([`Metric::name`], e.g. "mcc") or the serde identifier
    /// (e.g. "matthews"), ignoring ASCII case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Metric::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s) || m.serde_name().eq_ignore_ascii_case(s))
            .ok_or_else(|| crate::UnknownName {
                what: "metric",
                given: s.to_string(),
                known: Metric::ALL.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
            })
    }
}

/// One computed metric with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MetricValue {
    /// Which metric.
    pub metric: Metric,
    /// The metric on the full evaluation set.
    pub value: f64,
    /// Lower end of the [`CI_LEVEL`] bootstrap interval (NaN when no resamples were drawn).
    pub ci_low: f64,
    /// Upper end of the [`CI_LEVEL`] bootstrap interval (NaN when no resamples were drawn).
    pub ci_high: f64,
}

/// A task's evaluation: each metric, and the task's single number.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskScore {
    /// The metrics in the order they were requested.
    pub metrics: Vec<MetricValue>,
    /// The task's single number: the mean of its metrics (the GLUE leaderboard convention).
    pub score: f64,
    /// [`CI_LEVEL`] bootstrap interval of `score`, from the same resamples as the metrics (NaN
    /// when no resamples were drawn).
    pub score_ci: (f64, f64),
}

/// What a task's evaluation produced, per unit (example): classification predictions and gold
/// labels, or regression values, with optional group ids (MultiRC question) and ReCoRD texts.
#[derive(Debug, Clone, PartialEq)]
pub enum Predictions {
    /// Single-label classification.
    Classes {
        /// Predicted label per example, in `0..n_classes`.
        pred: Vec<usize>,
        /// Gold label per example, in `0..n_classes`.
        gold: Vec<usize>,
        /// Number of classes (at least 2).
        n_classes: usize,
        /// Group id per example (MultiRC: the question an answer option belongs to). When given,
        /// the bootstrap resamples whole groups, and [`Metric::MultiRcEm`] becomes available.
        groups: Option<Vec<usize>>,
    },
    /// Regression (STS-B).
    Scores {
        /// Predicted value per example.
        pred: Vec<f64>,
        /// Gold value per example.
        gold: Vec<f64>,
    },
    /// ReCoRD: one predicted answer text and the accepted gold answers per query.
    Record {
        /// Predicted answer text per query.
        predicted: Vec<String>,
        /// Accepted gold answers per query (at least one each).
        gold_answers: Vec<Vec<String>>,
    },
}

/// Validated predictions in the form the bootstrap needs.
enum Prepared<'a> {
    Classes {
        pred: &'a [usize],
        gold: &'a [usize],
        n_classes: usize,
        groups: Option<&'a [usize]>,
        /// Example indices of each group (when grouped): the bootstrap units.
        members: Option<Vec<Vec<usize>>>,
    },
    Scores {
        pred: &'a [f64],
        gold: &'a [f64],
    },
    /// Per query (exact match, token F1): ReCoRD metrics are means over queries.
    Record {
        per_query: Vec<(f64, f64)>,
    },
}

/// Why predictions could not be scored: lengths, labels or groups that do not fit the metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScoreError(pub String);

fn kind_mismatch(metric: Metric, kind: &str) -> String {
    format!("metric {metric} does not apply to {kind} predictions")
}

impl<'a> Prepared<'a> {
    fn new(metrics: &[Metric], preds: &'a Predictions) -> Result<Self, String> {
        match preds {
            Predictions::Classes { pred, gold, n_classes, groups } => {
                let n_classes = *n_classes;
                if pred.len() != gold.len() {
                    return Err(format!("{} predictions but {} gold labels", pred.len(), gold.len()));
                }
                if pred.is_empty() {
                    return Err("no examples to score".into());
                }
                if n_classes < 2 {
                    return Err(format!("n_classes must be at least 2, got {n_classes}"));
                }
                if let Some(&bad) = pred.iter().chain(gold).find(|&&l| l >= n_classes) {
                    return Err(format!("label {bad} is out of range for {n_classes} classes"));
                }
                if let Some(g) = groups {
                    if g.len() != pred.len() {
                        return Err(format!("{} group ids for {} examples", g.len(), pred.len()));
                    }
                }
                for &m in metrics {
                    match m {
                        Metric::Accuracy | Metric::MacroF1 | Metric::Matthews => {}
                        Metric::F1 | Metric::MultiRcF1a if n_classes != 2 => {
                            return Err(format!("metric {m} needs binary labels, got {n_classes} classes"));
                        }
                        Metric::F1 | Metric::MultiRcF1a => {}
                        Metric::MultiRcEm if groups.is_none() => {
                            return Err(format!("metric {m} needs group ids (the question of each answer option)"));
                        }
                        Metric::MultiRcEm => {}
                        _ => return Err(kind_mismatch(m, "classification")),
                    }
                }
                let members = groups.as_ref().map(|g| {
                    // BTreeMap: group order, hence resamples, must not depend on hashing.
                    let mut by_group: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                    for (i, &q) in g.iter().enumerate() {
                        by_group.entry(q).or_default().push(i);
                    }
                    by_group.into_values().collect()
                });
                Ok(Prepared::Classes { pred, gold, n_classes, groups: groups.as_deref(), members })
            }
            Predictions::Scores { pred, gold } => {
                if pred.len() != gold.len() {
                    return Err(format!("{} predictions but {} gold values", pred.len(), gold.len()));
                }
                if pred.is_empty() {
                    return Err("no examples to score".into());
                }
                if pred.iter().chain(gold).any(|v| !v.is_finite()) {
                    return Err("regression values must be finite".into());
                }
                if let Some(&m) = metrics.iter().find(|m| !matches!(m, Metric::Pearson | Metric::Spearman)) {
                    return Err(kind_mismatch(m, "regression"));
                }
                Ok(Prepared::Scores { pred, gold })
            }
            Predictions::Record { predicted, gold_answers } => {
                if predicted.len() != gold_answers.len() {
                    return Err(format!(
                        "{} predicted answers but gold answers for {} queries",
                        predicted.len(),
                        gold_answers.len()
                    ));
                }
                if predicted.is_empty() {
                    return Err("no queries to score".into());
                }
                if let Some(i) = gold_answers.iter().position(Vec::is_empty) {
                    return Err(format!("query {i} has no gold answer"));
                }
                if let Some(&m) = metrics.iter().find(|m| !matches!(m, Metric::RecordF1 | Metric::RecordEm)) {
                    return Err(kind_mismatch(m, "ReCoRD"));
                }
                let per_query = predicted.iter().zip(gold_answers).map(|(p, g)| record_query(p, g)).collect();
                Ok(Prepared::Record { per_query })
            }
        }
    }

    /// Number of bootstrap units: examples, groups, or queries.
    fn n_units(&self) -> usize {
        match self {
            Prepared::Classes { pred, members, .. } => members.as_ref().map_or(pred.len(), Vec::len),
            Prepared::Scores { pred, .. } => pred.len(),
            Prepared::Record { per_query } => per_query.len(),
        }
    }

    /// Every metric on the full data.
    fn full(&self, metrics: &[Metric]) -> Vec<f64> {
        match self {
            Prepared::Classes { pred, gold, n_classes, groups, .. } => {
                metrics.iter().map(|&m| class_metric(m, pred, gold, *n_classes, *groups)).collect()
            }
            Prepared::Scores { pred, gold } => metrics.iter().map(|&m| score_metric(m, pred, gold)).collect(),
            Prepared::Record { per_query } => {
                let all: Vec<usize> = (0..per_query.len()).collect();
                record_metrics(metrics, per_query, &all)
            }
        }
    }

    /// Every metric on a resample of the units.
    fn resampled(&self, metrics: &[Metric], units: &[usize]) -> Vec<f64> {
        match self {
            Prepared::Classes { pred, gold, n_classes, members, .. } => {
                let (mut p, mut g) = (Vec::with_capacity(pred.len()), Vec::with_capacity(pred.len()));
                let mut q = Vec::new();
                match members {
                    None => {
                        for &i in units {
                            p.push(pred[i]);
                            g.push(gold[i]);
                        }
                    }
                    Some(members) => {
                        // A group drawn twice counts as two questions: each draw gets its own id.
                        for (draw, &u) in units.iter().enumerate() {
                            for &i in &members[u] {
                                p.push(pred[i]);
                                g.push(gold[i]);
                                q.push(draw);
                            }
                        }
                    }
                }
                let q = members.as_ref().map(|_| q.as_slice());
                metrics.iter().map(|&m| class_metric(m, &p, &g, *n_classes, q)).collect()
            }
            Prepared::Scores { pred, gold } => {
                let p: Vec<f64> = units.iter().map(|&i| pred[i]).collect();
                let g: Vec<f64> = units.iter().map(|&i| gold[i]).collect();
                metrics.iter().map(|&m| score_metric(m, &p, &g)).collect()
            }
            Prepared::Record { per_query } => record_metrics(metrics, per_query, units),
        }
    }
}

/// A classification metric; kinds were validated by `Prepared::new`.
fn class_metric(m: Metric, pred: &[usize], gold: &[usize], n_classes: usize, groups: Option<&[usize]>) -> f64 {
    match m {
        Metric::Accuracy => accuracy(pred, gold),
        Metric::F1 => f1(pred, gold, 1),
        Metric::MacroF1 => macro_f1(pred, gold, n_classes),
        Metric::Matthews => matthews(pred, gold, n_classes),
        Metric::MultiRcF1a => multirc_f1a(pred, gold),
        Metric::MultiRcEm => multirc_em(pred, gold, groups.expect("validated: MultiRC EM has groups")),
        _ => unreachable!("validated: {m} is not a classification metric"),
    }
}

/// A regression metric; kinds were validated by `Prepared::new`.
fn score_metric(m: Metric, pred: &[f64], gold: &[f64]) -> f64 {
    match m {
        Metric::Pearson => pearson(pred, gold),
        Metric::Spearman => spearman(pred, gold),
        _ => unreachable!("validated: {m} is not a regression metric"),
    }
}

/// ReCoRD metrics over the queries `units`: means of the per-query values.
fn record_metrics(metrics: &[Metric], per_query: &[(f64, f64)], units: &[usize]) -> Vec<f64> {
    let n = units.len() as f64;
    let em = units.iter().map(|&i| per_query[i].0).sum::<f64>() / n;
    let f1 = units.iter().map(|&i| per_query[i].1).sum::<f64>() / n;
    metrics
        .iter()
        .map(|&m| match m {
            Metric::RecordEm => em,
            Metric::RecordF1 => f1,
            _ => unreachable!("validated: {m} is not a ReCoRD metric"),
        })
        .collect()
}

/// Scores one task the GLUE / SuperGLUE way: every requested metric on the full data, the task
/// score (mean of the metrics), and a [`CI_LEVEL`] (95%) percentile bootstrap interval for each
/// metric and for the score.
///
/// All intervals come from the same `resamples` resamples (drawn as in [`bootstrap_ci`] with
/// `seed`, so a single metric's interval equals `bootstrap_ci` of that metric with the same
/// seed), and the score's interval is of the per-resample mean, not a combination of the metric
/// intervals. Units are examples; when `groups` is given they are whole groups (MultiRC
/// questions: a question's answer options are not independent), and for ReCoRD they are queries.
/// `resamples == 0` skips the bootstrap and reports NaN bounds.
///
/// Errors (rather than panics) on: no metrics; length mismatches; empty input; `n_classes < 2`
/// or a label outside `0..n_classes`; non-finite regression values; a ReCoRD query without gold
/// answers; a metric that does not fit the kind of predictions (e.g. Pearson on classes, F1 on
/// more than two classes, MultiRC EM without groups).
pub fn score_task(
    metrics: &[Metric],
    preds: &Predictions,
    resamples: usize,
    seed: u64,
) -> Result<TaskScore, ScoreError> {
    if metrics.is_empty() {
        return Err(ScoreError("no metrics requested".into()));
    }
    let prepared = Prepared::new(metrics, preds).map_err(ScoreError)?;
    let values = prepared.full(metrics);
    let score = average(&values);

    // One column per metric, then the task score.
    let mut columns: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); metrics.len() + 1];
    for_each_resample(prepared.n_units(), resamples, seed, |units| {
        let vals = prepared.resampled(metrics, units);
        let s = average(&vals);
        for (column, v) in columns.iter_mut().zip(vals.into_iter().chain([s])) {
            column.push(v);
        }
    });
    let mut intervals: Vec<(f64, f64)> = columns
        .iter_mut()
        .map(|c| if resamples == 0 { (f64::NAN, f64::NAN) } else { percentile_interval(c, CI_LEVEL) })
        .collect();
    let score_ci = intervals.pop().expect("one interval per metric plus the score");
    let metrics = metrics
        .iter()
        .zip(values)
        .zip(intervals)
        .map(|((&metric, value), (ci_low, ci_high))| MetricValue { metric, value, ci_low, ci_high })
        .collect();
    Ok(TaskScore { metrics, score, score_ci })
}

/// Unweighted mean, for benchmark averages (the GLUE / SuperGLUE score is the mean of the task
/// scores) and task scores (mean of a task's metrics). Returns 0.0 for an empty slice.
pub fn average(scores: &[f64]) -> f64 {
    if scores.is_empty() {
        0.0
    } else {
        scores.iter().sum::<f64>() / scores.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-12;

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < EPS, "got {actual}, expected {expected}");
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Labels realising a 2x2 confusion table: (gold, pred) pairs repeated.
    fn binary_table(tp: usize, tn: usize, fp: usize, fn_: usize) -> (Vec<usize>, Vec<usize>) {
        let mut pred = Vec::new();
        let mut gold = Vec::new();
        for (n, p, g) in [(tp, 1, 1), (tn, 0, 0), (fp, 1, 0), (fn_, 0, 1)] {
            pred.extend(std::iter::repeat_n(p, n));
            gold.extend(std::iter::repeat_n(g, n));
        }
        (pred, gold)
    }

    #[test]
    fn accuracy_by_hand() {
        // Matches at positions 0, 1, 3 → 3/5.
        close(accuracy(&[0, 1, 1, 0, 1], &[0, 1, 0, 0, 0]), 3.0 / 5.0);
        close(accuracy(&[2, 1, 0], &[2, 1, 0]), 1.0);
        close(accuracy(&[1, 1, 0], &[0, 0, 1]), 0.0);
        close(accuracy(&[], &[]), 0.0);
    }

    #[test]
    #[should_panic(expected = "different lengths")]
    fn accuracy_panics_on_length_mismatch() {
        accuracy(&[0, 1], &[0]);
    }

    #[test]
    fn f1_by_hand() {
        let pred = [1, 1, 1, 0, 0];
        let gold = [1, 0, 1, 1, 0];
        // Class 1: tp = {0, 2} = 2, fp = {1} = 1, fn = {3} = 1 → 2·2 / (2·2 + 1 + 1) = 4/6.
        // (P = 2/3, R = 2/3 → F1 = 2/3.)
        close(f1(&pred, &gold, 1), 4.0 / 6.0);
        // Class 0: pred 0 at {3, 4}, gold 0 at {1, 4}: tp = 1, fp = 1, fn = 1 → 2 / 4.
        close(f1(&pred, &gold, 0), 2.0 / 4.0);
        // No predicted and no gold positives: 0/0, defined as 0.
        close(f1(&[0, 0], &[0, 0], 1), 0.0);
        // Positives exist but none hit: tp = 0 → 0.
        close(f1(&[1, 0], &[0, 1], 1), 0.0);
        // Perfect: 2·2 / (2·2) = 1.
        close(f1(&[1, 0, 1], &[1, 0, 1], 1), 1.0);
    }

    #[test]
    fn macro_f1_three_classes_by_hand() {
        let pred = [0, 0, 1, 1, 2, 2, 0];
        let gold = [0, 1, 1, 2, 2, 2, 0];
        // Class 0: pred {0,1,6}, gold {0,6}: tp 2, fp 1, fn 0 → 4/5 = 0.8.
        // Class 1: pred {2,3}, gold {1,2}: tp 1, fp 1, fn 1 → 2/4 = 0.5.
        // Class 2: pred {4,5}, gold {3,4,5}: tp 2, fp 0, fn 1 → 4/5 = 0.8.
        // Mean: (0.8 + 0.5 + 0.8) / 3 = 0.7.
        close(macro_f1(&pred, &gold, 3), 0.7);
        // A fourth class that never occurs is skipped (scikit-learn's rule), not counted as 0.
        close(macro_f1(&pred, &gold, 4), 0.7);
        // A class that is only predicted counts, with F1 0. pred [0, 1], gold [0, 0]:
        // class 0: tp 1, fn 1 → 2/3; class 1: fp 1 → 0; class 2 absent. Mean (2/3 + 0)/2 = 1/3.
        close(macro_f1(&[0, 1], &[0, 0], 3), 1.0 / 3.0);
        close(macro_f1(&[], &[], 3), 0.0);
    }

    #[test]
    fn matthews_binary_by_hand() {
        let (pred, gold) = binary_table(6, 3, 1, 2);
        // (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
        //   = (18 − 2) / sqrt(7 · 8 · 4 · 5) = 16 / sqrt(1120) ≈ 0.478091.
        close(matthews(&pred, &gold, 2), 16.0 / 1120f64.sqrt());
        assert!((matthews(&pred, &gold, 2) - 0.478091).abs() < 1e-6);
        // Perfect → 1; perfectly inverted → (0·0 − 3·3)/sqrt(3·3·3·3) = −1.
        close(matthews(&[1, 0, 1, 0], &[1, 0, 1, 0], 2), 1.0);
        let (pred, gold) = binary_table(0, 0, 3, 3);
        close(matthews(&pred, &gold, 2), -1.0);
    }

    #[test]
    fn matthews_three_classes_by_hand() {
        // Confusion C[gold][pred]:
        //   gold 0: [3, 1, 0]   t0 = 4
        //   gold 1: [0, 2, 1]   t1 = 3
        //   gold 2: [1, 1, 3]   t2 = 5
        // predicted counts p = column sums = [4, 4, 4]; s = 12; c = trace = 3 + 2 + 3 = 8.
        let table = [[3, 1, 0], [0, 2, 1], [1, 1, 3]];
        let (mut pred, mut gold) = (Vec::new(), Vec::new());
        for (g, row) in table.iter().enumerate() {
            for (p, &n) in row.iter().enumerate() {
                pred.extend(std::iter::repeat_n(p, n));
                gold.extend(std::iter::repeat_n(g, n));
            }
        }
        // numerator   = c·s − Σ p_k t_k = 96 − (16 + 12 + 20) = 48
        // s² − Σ p_k² = 144 − 48 = 96;  s² − Σ t_k² = 144 − (16 + 9 + 25) = 94
        // R_K = 48 / sqrt(96 · 94) = 48 / sqrt(9024) ≈ 0.505291
        close(matthews(&pred, &gold, 3), 48.0 / 9024f64.sqrt());
        assert!((matthews(&pred, &gold, 3) - 0.505291).abs() < 1e-6);
    }

    #[test]
    fn matthews_undefined_is_zero() {
        // Constant predictions: s² − Σ p_k² = 16 − 16 = 0.
        close(matthews(&[1, 1, 1, 1], &[1, 0, 1, 0], 2), 0.0);
        // Constant gold: s² − Σ t_k² = 0.
        close(matthews(&[1, 0, 1, 0], &[0, 0, 0, 0], 2), 0.0);
        close(matthews(&[], &[], 2), 0.0);
    }

    #[test]
    fn binary_mcc_equals_rk_formula_on_other_tables() {
        // The R_K path must agree with the 2x2 formula: tp 10, tn 20, fp 5, fn 7:
        // (200 − 35) / sqrt(15 · 17 · 25 · 27) = 165 / sqrt(172125).
        let (pred, gold) = binary_table(10, 20, 5, 7);
        close(matthews(&pred, &gold, 2), 165.0 / 172125f64.sqrt());
    }

    #[test]
    fn pearson_four_points_by_hand() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = [2.0, 4.0, 5.0, 9.0];
        // means 2.5 and 5; dx = [−1.5, −0.5, 0.5, 1.5], dy = [−3, −1, 0, 4]
        // Σ dx·dy = 4.5 + 0.5 + 0 + 6 = 11; Σ dx² = 5; Σ dy² = 9 + 1 + 0 + 16 = 26
        // r = 11 / sqrt(130) ≈ 0.964764
        close(pearson(&x, &y), 11.0 / 130f64.sqrt());
        assert!((pearson(&x, &y) - 0.964764).abs() < 1e-6);
        // Negated y → −r.
        let neg: Vec<f64> = y.iter().map(|v| -v).collect();
        close(pearson(&x, &neg), -11.0 / 130f64.sqrt());
    }

    #[test]
    fn pearson_degenerate_is_zero() {
        close(pearson(&[0.1, 0.1, 0.1], &[1.0, 2.0, 3.0]), 0.0);
        close(pearson(&[1.0], &[2.0]), 0.0);
        close(pearson(&[], &[]), 0.0);
    }

    #[test]
    fn average_ranks_share_ties() {
        // Sorted: 1 (rank 1), then three 3s at ranks 2, 3, 4 → mean 3.
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0, 3.0]), vec![3.0, 1.0, 3.0, 3.0]);
        // 5 (rank 1), 7 and 7 at ranks 2, 3 → 2.5, 9 (rank 4).
        assert_eq!(average_ranks(&[7.0, 5.0, 9.0, 7.0]), vec![2.5, 1.0, 4.0, 2.5]);
    }

    #[test]
    fn spearman_with_ties_by_hand() {
        let x = [10.0, 20.0, 20.0, 30.0, 40.0];
        let y = [1.0, 3.0, 2.0, 5.0, 4.0];
        // ranks x = [1, 2.5, 2.5, 4, 5], ranks y = [1, 3, 2, 5, 4]; both means 3
        // drx = [−2, −0.5, −0.5, 1, 2], dry = [−2, 0, −1, 2, 1]
        // Σ drx·dry = 4 + 0 + 0.5 + 2 + 2 = 8.5; Σ drx² = 9.5; Σ dry² = 10
        // ρ = 8.5 / sqrt(95) ≈ 0.872082
        close(spearman(&x, &y), 8.5 / 95f64.sqrt());
        assert!((spearman(&x, &y) - 0.872082).abs() < 1e-6);
        // Any strictly increasing transform of y is a perfect rank correlation.
        close(spearman(&[1.0, 2.0, 3.0], &[1.0, 10.0, 1000.0]), 1.0);
    }

    #[test]
    fn multirc_by_hand() {
        let groups = [0, 0, 0, 1, 1];
        let pred = [1, 0, 1, 0, 1];
        let gold = [1, 0, 1, 0, 0];
        // Question 0 (options 0..3) all right; question 1 wrong at option 4 → EM 1/2.
        close(multirc_em(&pred, &gold, &groups), 0.5);
        // F1a: tp = {0, 2} = 2, fp = {4} = 1, fn = 0 → 4 / 5.
        close(multirc_f1a(&pred, &gold), 0.8);
        // Group ids need not be contiguous: questions 7 = {0, 2}, 3 = {1, 3}, 9 = {4}.
        // 7 right, 3 wrong at option 3, 9 right → 2/3.
        close(multirc_em(&[1, 0, 0, 1, 1], &[1, 0, 0, 0, 1], &[7, 3, 7, 3, 9]), 2.0 / 3.0);
        close(multirc_em(&[], &[], &[]), 0.0);
    }

    #[test]
    fn squad_normalisation() {
        assert_eq!(answer_tokens("The  Eiffel Tower!"), strings(&["eiffel", "tower"]));
        // Articles only as whole words; punctuation deleted, not replaced by a space.
        assert_eq!(answer_tokens("An  the theater, a-b"), strings(&["theater", "ab"]));
        assert!(answer_tokens("  the  ").is_empty());
    }

    #[test]
    fn record_by_hand() {
        // Normalisation makes these identical → EM 1, F1 1.
        let (em, f1) = record_em_f1(&strings(&["The  Eiffel Tower!"]), &[strings(&["eiffel tower"])]);
        close(em, 1.0);
        close(f1, 1.0);

        // Query 1: exact after normalisation → (1, 1).
        // Query 2: "Paris France" vs "Paris": common 1, P = 1/2, R = 1 → F1 = 2·(1/2)/(3/2) = 2/3;
        //          vs "Lyon": 0. Max: EM 0, F1 2/3.
        // Means: EM (1 + 0)/2 = 0.5, F1 (1 + 2/3)/2 = 5/6.
        let predicted = strings(&["an apple", "Paris France"]);
        let gold = vec![strings(&["Apple."]), strings(&["Lyon", "Paris"])];
        let (em, f1) = record_em_f1(&predicted, &gold);
        close(em, 0.5);
        close(f1, 5.0 / 6.0);

        // Repeated tokens overlap as a multiset: "cat cat" vs "cat" → common 1, P 1/2, R 1 → 2/3.
        let (em, f1) = record_em_f1(&strings(&["the cat cat"]), &[strings(&["cat"])]);
        close(em, 0.0);
        close(f1, 2.0 / 3.0);

        // No gold answer → 0; empty input → (0, 0).
        assert_eq!(record_em_f1(&strings(&["x"]), &[vec![]]), (0.0, 0.0));
        assert_eq!(record_em_f1(&[], &[]), (0.0, 0.0));
    }

    #[test]
    fn percentile_interpolates_linearly() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        // h = 4·0.25 = 1 → x[1] = 2.
        close(percentile(&v, 0.25), 2.0);
        // h = 4·0.1 = 0.4 → 1 + 0.4·(2 − 1) = 1.4.
        close(percentile(&v, 0.1), 1.4);
        // h = 4·0.975 = 3.9 → 4 + 0.9·(5 − 4) = 4.9.
        close(percentile(&v, 0.975), 4.9);
        close(percentile(&v, 0.0), 1.0);
        close(percentile(&v, 1.0), 5.0);
        // Central 50% of 1..=5 (sorted in place): 25th → 2, 75th → h = 3 → 4.
        let mut u = [5.0, 3.0, 1.0, 4.0, 2.0];
        assert_eq!(percentile_interval(&mut u, 0.5), (2.0, 4.0));
    }

    /// Accuracy-0.8 data of size n: the first 80% right.
    fn acc_data(n: usize) -> (Vec<usize>, Vec<usize>) {
        let gold = vec![1usize; n];
        let pred: Vec<usize> = (0..n).map(|i| usize::from(i < n * 4 / 5)).collect();
        (pred, gold)
    }

    fn acc_ci(n: usize, seed: u64, level: f64) -> (f64, f64) {
        let (pred, gold) = acc_data(n);
        bootstrap_ci(n, 1000, seed, level, |idx| {
            idx.iter().filter(|&&i| pred[i] == gold[i]).count() as f64 / idx.len() as f64
        })
    }

    #[test]
    fn bootstrap_brackets_estimate_and_is_reproducible() {
        let (lo, hi) = acc_ci(50, 7, 0.95);
        assert!(lo < 0.8 && 0.8 < hi, "({lo}, {hi}) should contain 0.8");
        assert_eq!(acc_ci(50, 7, 0.95), (lo, hi));
        // Another seed draws other resamples. Shown on a continuous statistic (mean of sqrt of the
        // unit index): accuracies of n = 50 are multiples of 1/50, so two seeds can share bounds.
        let root_mean = |idx: &[usize]| idx.iter().map(|&i| (i as f64).sqrt()).sum::<f64>() / idx.len() as f64;
        let full: Vec<usize> = (0..50).collect();
        let estimate = root_mean(&full);
        let a = bootstrap_ci(50, 1000, 7, 0.95, root_mean);
        assert!(a.0 < estimate && estimate < a.1, "{a:?} should contain {estimate}");
        assert_eq!(bootstrap_ci(50, 1000, 7, 0.95, root_mean), a);
        let b = bootstrap_ci(50, 1000, 8, 0.95, root_mean);
        assert!(a.0 != b.0 && a.1 != b.1, "{a:?} vs {b:?}");
        // A narrower level gives a narrower interval on the same resamples.
        let (l50, h50) = acc_ci(50, 7, 0.5);
        assert!(lo <= l50 && h50 <= hi && h50 - l50 < hi - lo);
    }

    #[test]
    fn bootstrap_narrows_with_n_and_matches_normal_width() {
        let (lo50, hi50) = acc_ci(50, 1, 0.95);
        let (lo2k, hi2k) = acc_ci(2000, 1, 0.95);
        // Normal approximation: width ≈ 2·1.96·sqrt(0.8·0.2/n): 0.222 for n = 50, 0.0351 for 2000.
        assert!(hi50 - lo50 > 3.0 * (hi2k - lo2k), "{} vs {}", hi50 - lo50, hi2k - lo2k);
        assert!((0.18..0.27).contains(&(hi50 - lo50)), "n=50 width {}", hi50 - lo50);
        assert!((0.029..0.042).contains(&(hi2k - lo2k)), "n=2000 width {}", hi2k - lo2k);
    }

    #[test]
    fn bootstrap_constant_statistic_and_no_resamples() {
        assert_eq!(bootstrap_ci(30, 200, 3, 0.95, |_| 0.625), (0.625, 0.625));
        let (lo, hi) = bootstrap_ci(30, 0, 3, 0.95, |_| 0.625);
        assert!(lo.is_nan() && hi.is_nan());
    }

    #[test]
    fn bootstrap_resamples_with_replacement() {
        // Statistic: number of distinct units drawn. With replacement, a resample of 100 from 100
        // almost never covers all (expected distinct ≈ 100·(1 − 1/e) ≈ 63.2).
        let (lo, hi) = bootstrap_ci(100, 500, 11, 0.95, |idx| {
            assert_eq!(idx.len(), 100);
            assert!(idx.iter().all(|&i| i < 100));
            let mut seen = idx.to_vec();
            seen.sort_unstable();
            seen.dedup();
            seen.len() as f64
        });
        assert!(55.0 < lo && hi < 72.0, "({lo}, {hi})");
    }

    #[test]
    #[should_panic(expected = "strictly between 0 and 1")]
    fn bootstrap_rejects_bad_level() {
        bootstrap_ci(10, 10, 0, 95.0, |_| 0.0);
    }

    fn classes(pred: &[usize], gold: &[usize], n_classes: usize, groups: Option<&[usize]>) -> Predictions {
        Predictions::Classes {
            pred: pred.to_vec(),
            gold: gold.to_vec(),
            n_classes,
            groups: groups.map(<[usize]>::to_vec),
        }
    }

    #[test]
    fn score_task_mrpc_style_by_hand() {
        let preds = classes(&[1, 1, 1, 0, 0], &[1, 0, 1, 1, 0], 2, None);
        let s = score_task(&[Metric::F1, Metric::Accuracy], &preds, 300, 5).unwrap();
        // F1 = 4/6 (see f1_by_hand); accuracy: right at 0, 2, 4 → 3/5; score = (2/3 + 3/5)/2 = 19/30.
        assert_eq!(s.metrics.len(), 2);
        assert_eq!(s.metrics[0].metric, Metric::F1);
        close(s.metrics[0].value, 4.0 / 6.0);
        assert_eq!(s.metrics[1].metric, Metric::Accuracy);
        close(s.metrics[1].value, 3.0 / 5.0);
        close(s.score, 19.0 / 30.0);
        for m in &s.metrics {
            assert!(m.ci_low <= m.value && m.value <= m.ci_high, "{m:?}");
            assert!(m.ci_low < m.ci_high, "5 examples must leave uncertainty: {m:?}");
        }
        assert!(s.score_ci.0 <= s.score && s.score <= s.score_ci.1);
    }

    #[test]
    fn score_task_interval_equals_bootstrap_ci() {
        let (pred, gold) = acc_data(50);
        let preds = classes(&pred, &gold, 2, None);
        let s = score_task(&[Metric::Accuracy], &preds, 400, 9).unwrap();
        let direct = bootstrap_ci(50, 400, 9, 0.95, |idx| {
            let p: Vec<usize> = idx.iter().map(|&i| pred[i]).collect();
            let g: Vec<usize> = idx.iter().map(|&i| gold[i]).collect();
            accuracy(&p, &g)
        });
        assert_eq!((s.metrics[0].ci_low, s.metrics[0].ci_high), direct);
        // One metric: the score is that metric, interval included.
        assert_eq!(s.score_ci, direct);
    }

    #[test]
    fn score_task_regression_and_record() {
        let preds = Predictions::Scores { pred: vec![1.0, 2.0, 3.0, 4.0], gold: vec![2.0, 4.0, 5.0, 9.0] };
        let s = score_task(&[Metric::Pearson, Metric::Spearman], &preds, 100, 1).unwrap();
        // Pearson 11/sqrt(130) (see pearson_four_points_by_hand); ranks agree exactly → Spearman 1.
        close(s.metrics[0].value, 11.0 / 130f64.sqrt());
        close(s.metrics[1].value, 1.0);
        close(s.score, (11.0 / 130f64.sqrt() + 1.0) / 2.0);

        let preds = Predictions::Record {
            predicted: strings(&["an apple", "Paris France"]),
            gold_answers: vec![strings(&["Apple."]), strings(&["Lyon", "Paris"])],
        };
        let s = score_task(&[Metric::RecordF1, Metric::RecordEm], &preds, 100, 1).unwrap();
        // See record_by_hand: F1 5/6, EM 1/2; score (5/6 + 1/2)/2 = 2/3.
        close(s.metrics[0].value, 5.0 / 6.0);
        close(s.metrics[1].value, 0.5);
        close(s.score, 2.0 / 3.0);
    }

    #[test]
    fn score_task_resamples_whole_groups() {
        // Every question has two options, both right or both wrong. Resampling whole questions,
        // each resample's accuracy is 2k/2n = k/n, its EM: the two intervals must coincide.
        // Resampling options independently would break that.
        let groups: Vec<usize> = (0..40).flat_map(|q| [q, q]).collect();
        let gold: Vec<usize> = (0..80).map(|i| i % 2).collect();
        // Questions 0..30 right, 30..40 wrong → accuracy = EM = 30/40.
        let pred: Vec<usize> = (0..80).map(|i| if i < 60 { gold[i] } else { 1 - gold[i] }).collect();
        let preds = classes(&pred, &gold, 2, Some(&groups));
        let s = score_task(&[Metric::Accuracy, Metric::MultiRcEm], &preds, 500, 2).unwrap();
        close(s.metrics[0].value, 0.75);
        close(s.metrics[1].value, 0.75);
        assert_eq!((s.metrics[0].ci_low, s.metrics[0].ci_high), (s.metrics[1].ci_low, s.metrics[1].ci_high));
        assert!(s.metrics[1].ci_low < 0.75 && 0.75 < s.metrics[1].ci_high);
    }

    #[test]
    fn score_task_all_correct_and_all_wrong() {
        // 40 examples, half of each class. F1 and MCC would be 0 on a resample holding one class
        // only; with 40 draws that has probability 2·2^-40, so every resample scores 1.
        let gold: Vec<usize> = (0..40).map(|i| i % 2).collect();
        let s = score_task(&[Metric::Accuracy, Metric::F1, Metric::Matthews], &classes(&gold, &gold, 2, None), 200, 4)
            .unwrap();
        for m in &s.metrics {
            assert_eq!((m.value, m.ci_low, m.ci_high), (1.0, 1.0, 1.0), "{m:?}");
        }
        assert_eq!((s.score, s.score_ci), (1.0, (1.0, 1.0)));

        let wrong: Vec<usize> = gold.iter().map(|g| 1 - g).collect();
        let s = score_task(&[Metric::Accuracy, Metric::F1, Metric::Matthews], &classes(&wrong, &gold, 2, None), 200, 4)
            .unwrap();
        // Accuracy 0, F1 0 (tp = 0), MCC of a perfectly inverted table −1 → score −1/3.
        close(s.metrics[0].value, 0.0);
        close(s.metrics[1].value, 0.0);
        close(s.metrics[2].value, -1.0);
        close(s.score, -1.0 / 3.0);
    }

    #[test]
    fn score_task_without_resamples_reports_nan_bounds() {
        let s = score_task(&[Metric::Accuracy], &classes(&[1, 0], &[1, 1], 2, None), 0, 0).unwrap();
        close(s.score, 0.5);
        assert!(s.metrics[0].ci_low.is_nan() && s.score_ci.1.is_nan());
    }

    #[test]
    fn score_task_errors() {
        let acc = [Metric::Accuracy];
        let err = |m: &[Metric], p: &Predictions| score_task(m, p, 10, 0).unwrap_err().0;
        assert!(err(&acc, &classes(&[], &[], 2, None)).contains("no examples"));
        assert!(err(&acc, &classes(&[0, 1], &[0], 2, None)).contains("2 predictions but 1"));
        assert!(err(&acc, &classes(&[0, 2], &[0, 1], 2, None)).contains("label 2"));
        assert!(err(&acc, &classes(&[0], &[0], 1, None)).contains("n_classes"));
        assert!(err(&acc, &classes(&[0, 1], &[0, 1], 2, Some(&[0]))).contains("group ids"));
        assert!(err(&[], &classes(&[0], &[0], 2, None)).contains("no metrics"));
        assert!(err(&[Metric::Pearson], &classes(&[0], &[0], 2, None)).contains("pearson"));
        assert!(err(&[Metric::F1], &classes(&[0], &[0], 3, None)).contains("binary"));
        assert!(err(&[Metric::MultiRcEm], &classes(&[0], &[0], 2, None)).contains("group"));
        let scores = Predictions::Scores { pred: vec![1.0, f64::NAN], gold: vec![1.0, 2.0] };
        assert!(err(&[Metric::Pearson], &scores).contains("finite"));
        let scores = Predictions::Scores { pred: vec![], gold: vec![] };
        assert!(err(&[Metric::Pearson], &scores).contains("no examples"));
        let scores = Predictions::Scores { pred: vec![1.0, 2.0], gold: vec![1.0, 2.0] };
        assert!(err(&acc, &scores).contains("regression"));
        let record = Predictions::Record { predicted: vec![], gold_answers: vec![] };
        assert!(err(&[Metric::RecordEm], &record).contains("no queries"));
        let record = Predictions::Record { predicted: strings(&["a"]), gold_answers: vec![vec![]] };
        assert!(err(&[Metric::RecordEm], &record).contains("no gold answer"));
        let record = Predictions::Record { predicted: strings(&["a"]), gold_answers: vec![strings(&["a"])] };
        assert!(err(&acc, &record).contains("ReCoRD"));
    }

    #[test]
    fn metric_names_parse_and_serialise() {
        let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(
            names,
            ["accuracy", "f1", "macro_f1", "mcc", "pearson", "spearman", "f1a", "em", "record_f1", "record_em"]
        );
        for m in Metric::ALL {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.serde_name()));
            assert_eq!(serde_json::from_str::<Metric>(&json).unwrap(), m);
            assert_eq!(m.name().parse::<Metric>().unwrap(), m);
            assert_eq!(m.serde_name().to_uppercase().parse::<Metric>().unwrap(), m);
            assert_eq!(m.to_string(), m.name());
        }
        assert_eq!(serde_json::to_string(&Metric::MacroF1).unwrap(), "\"macro_f1\"");
        assert_eq!(serde_json::to_string(&Metric::MultiRcF1a).unwrap(), "\"multirc_f1a\"");
        assert!("bleu".parse::<Metric>().unwrap_err().to_string().contains("unknown metric \"bleu\": use accuracy"));
    }

    #[test]
    fn task_score_serialises() {
        // All correct: every resample has accuracy 1, so the interval is (1, 1).
        let s = score_task(&[Metric::Accuracy], &classes(&[1, 0], &[1, 0], 2, None), 10, 0).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["metrics"][0]["metric"], "accuracy");
        assert_eq!(v["metrics"][0]["value"], 1.0);
        assert_eq!(v["score_ci"], serde_json::json!([1.0, 1.0]));
    }

    #[test]
    fn average_by_hand() {
        // (0.5 + 0.7 + 0.9) / 3 = 0.7
        close(average(&[0.5, 0.7, 0.9]), 0.7);
        close(average(&[]), 0.0);
    }
}
