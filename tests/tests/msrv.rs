//! The declared `rust-version` is true for what is built: every member inherits the workspace's,
//! and no locked dependency declares a newer one. (The workspace's own code is held to it by
//! clippy's `incompatible_msrv` lint, on by default: `cargo clippy --all-targets -- -D warnings`.)

use std::process::Command;

fn version(v: &str) -> (u64, u64, u64) {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn the_declared_rust_version_covers_every_member_and_dependency() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Offline first; a fresh machine has fetched only this platform's crates, and metadata
    // needs every locked package's manifest: then from the registry.
    let metadata = |offline: bool| {
        let mut args = vec!["metadata", "--format-version", "1", "--locked"];
        if offline {
            args.push("--offline");
        }
        Command::new(&cargo).args(&args).current_dir(&root).output().expect("run cargo metadata")
    };
    let mut out = metadata(true);
    if !out.status.success() {
        out = metadata(false);
    }
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: Vec<&str> =
        meta["workspace_members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    let resolved: std::collections::HashSet<&str> =
        meta["resolve"]["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    let packages = meta["packages"].as_array().unwrap();
    let declared: Vec<(&str, Option<&str>)> = packages
        .iter()
        .filter(|p| members.contains(&p["id"].as_str().unwrap()))
        .map(|p| (p["name"].as_str().unwrap(), p["rust_version"].as_str()))
        .collect();
    assert_eq!(declared.len(), 5, "models, shared, trainer, serve, tests: {declared:?}");
    let msrv = declared[0].1.expect("members declare a rust-version");
    assert!(declared.iter().all(|(_, v)| *v == Some(msrv)), "every member inherits one rust-version: {declared:?}");
    let newer: Vec<String> = packages
        .iter()
        .filter(|p| resolved.contains(p["id"].as_str().unwrap()))
        .filter_map(|p| {
            let v = p["rust_version"].as_str()?;
            (version(v) > version(msrv)).then(|| format!("{} {} needs {v}", p["name"], p["version"]))
        })
        .collect();
    assert!(newer.is_empty(), "rust-version {msrv} is below what dependencies declare: {newer:?}");
}
