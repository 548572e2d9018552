//! `--config FILE.toml` for the Verdict binaries: every key is a flag (its long name, `-` or `_`
//! alike), turned into command-line tokens before clap parses. A flag given on the command line
//! wins over the file's key (the key is then left out); the file wins over the environment and
//! the defaults. Unknown keys are refused, naming the key and the file.
//!
//! ```toml
//! # verdict-train sft --config run.toml --max-steps 50
//! model = "qwen0.5b"
//! task = "mr"
//! batch_size = 8
//! lr = "2e-4"
//! targets = ["q", "v"]          # a list: comma-joined, or the flag repeated
//! gradient_checkpointing = true
//! ```

use clap::{Arg, ArgAction, Command};
use std::ffi::{OsStr, OsString};
use std::path::Path;

/// The long name of the config flag.
pub const CONFIG_FLAG: &str = "config";

/// `argv` with the keys of the `--config` file (if one is given) inserted as flags right after
/// the subcommand's name (after the program's name without subcommands). On a bad file or key,
/// clap's usage error (exit status 2) naming the key and the file.
pub fn expand_or_exit(cmd: Command, argv: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut cmd = cmd;
    match expand(&mut cmd, argv.into_iter().collect()) {
        Ok(v) => v,
        Err(msg) => cmd.error(clap::error::ErrorKind::ValueValidation, msg).exit(),
    }
}

/// [`expand_or_exit`]'s work: the message of what is wrong, if anything is.
pub fn expand(cmd: &mut Command, argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    cmd.build();
    let Some(path) = config_path(&argv) else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| format!("config file {}: {e}", path.display()))?;
    // The subcommand named on the command line: its flags (and the global ones) are the keys.
    let (at, target) = match subcommand_position(cmd, &argv) {
        Some((i, name)) => (i + 1, cmd.find_subcommand(&name).expect("found above")),
        None => (1.min(argv.len()), &*cmd),
    };
    let user = &argv[at..];
    let name = if std::ptr::eq(target, &*cmd) {
        cmd.get_name().to_string()
    } else {
        format!("{} {}", cmd.get_name(), target.get_name())
    };
    let mut tokens = Vec::new();
    for (key, value) in &table {
        let arg = find_arg(target, key).ok_or_else(|| {
            format!("unknown key `{key}` in config file {} (`{name}` has no flag --{})", path.display(), norm(key))
        })?;
        let long = arg.get_long().expect("find_arg only finds long flags");
        if given(arg, &argv[1..]) {
            continue; // the command line wins
        }
        tokens.extend(
            flag_tokens(target, arg, long, value)
                .map_err(|e| format!("key `{key}` in config file {}: {e}", path.display()))?,
        );
    }
    let mut out = argv[..at].to_vec();
    out.extend(tokens.into_iter().map(OsString::from));
    out.extend_from_slice(user);
    Ok(out)
}

/// The value of the (last) `--config` before any `--`.
fn config_path(argv: &[OsString]) -> Option<std::path::PathBuf> {
    let mut found = None;
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        } else if s == "--config" {
            found = it.next().map(|v| Path::new(v).to_path_buf());
        } else if let Some(v) = s.strip_prefix("--config=") {
            found = Some(Path::new(v).to_path_buf());
        }
    }
    found
}

/// Where the subcommand's name is in `argv`, skipping the values of the top-level flags.
fn subcommand_position(cmd: &Command, argv: &[OsString]) -> Option<(usize, String)> {
    if !cmd.has_subcommands() {
        return None;
    }
    let mut i = 1;
    while i < argv.len() {
        let s = argv[i].to_string_lossy();
        if s == "--" {
            return None;
        }
        if let Some(flag) = s.strip_prefix("--") {
            let takes = !flag.contains('=')
                && cmd.get_arguments().any(|a| a.get_long() == Some(flag) && a.get_action().takes_values());
            i += if takes { 2 } else { 1 };
        } else if s.starts_with('-') && s.len() > 1 {
            let takes = s.len() == 2
                && cmd.get_arguments().any(|a| {
                    a.get_short().map(|c| format!("-{c}")) == Some(s.to_string()) && a.get_action().takes_values()
                });
            i += if takes { 2 } else { 1 };
        } else {
            return cmd.find_subcommand(OsStr::new(&*s)).map(|c| (i, c.get_name().to_string()));
        }
    }
    None
}

fn norm(key: &str) -> String {
    key.replace('_', "-")
}

/// The flag a key names: its long name or an alias (`-` or `_`), or its field name.
fn find_arg<'c>(cmd: &'c Command, key: &str) -> Option<&'c Arg> {
    let key = norm(key);
    if key == CONFIG_FLAG {
        return None;
    }
    cmd.get_arguments().filter(|a| a.get_long().is_some() && !matches!(a.get_id().as_str(), "help" | "version")).find(
        |a| {
            a.get_long() == Some(&key)
                || a.get_all_aliases().is_some_and(|al| al.contains(&key.as_str()))
                || norm(a.get_id().as_str()) == key
        },
    )
}

/// Whether the command line already gives `arg` (long, alias or short), before any `--`.
fn given(arg: &Arg, user: &[OsString]) -> bool {
    let mut longs: Vec<&str> = arg.get_long().into_iter().collect();
    longs.extend(arg.get_all_aliases().unwrap_or_default());
    for t in user {
        let s = t.to_string_lossy();
        if s == "--" {
            break;
        }
        if let Some(f) = s.strip_prefix("--") {
            let name = f.split('=').next().unwrap_or(f);
            if longs.contains(&name) {
                return true;
            }
        } else if let (Some(c), Some(rest)) = (arg.get_short(), s.strip_prefix('-')) {
            if rest.starts_with(c) {
                return true;
            }
        }
    }
    false
}

/// The tokens that give `arg` the value `value`.
fn flag_tokens(cmd: &Command, arg: &Arg, long: &str, value: &toml::Value) -> Result<Vec<String>, String> {
    let flag = format!("--{long}");
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => {
            let on = value.as_bool().ok_or("expects true or false")?;
            let set = on == matches!(arg.get_action(), ArgAction::SetTrue);
            if set {
                return Ok(vec![flag]);
            }
            // false: the `--no-<flag>` form where there is one, else the default (unset).
            let no = format!("no-{long}");
            if cmd.get_arguments().any(|a| a.get_long() == Some(&no)) {
                Ok(vec![format!("--{no}")])
            } else {
                Ok(Vec::new())
            }
        }
        ArgAction::Count => {
            let n = value.as_integer().filter(|n| *n >= 0).ok_or("expects a count")?;
            Ok(vec![flag; n as usize])
        }
        a if a.takes_values() => {
            let values = match value {
                toml::Value::Array(items) => items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?,
                v => vec![scalar(v)?],
            };
            if values.len() == 1 {
                Ok(vec![flag, values.into_iter().next().unwrap()])
            } else if let Some(d) = arg.get_value_delimiter() {
                Ok(vec![flag, values.join(&d.to_string())])
            } else if matches!(a, ArgAction::Append) {
                Ok(values.into_iter().flat_map(|v| [flag.clone(), v]).collect())
            } else {
                Err("expects one value, not a list".into())
            }
        }
        _ => Err("is not a setting".into()),
    }
}

fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        _ => Err("expects a value or a list of values, not a table".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, global = true)]
        config: Option<std::path::PathBuf>,
        #[arg(long, global = true)]
        threads: Option<usize>,
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Sft {
            #[arg(long, default_value_t = 4)]
            batch_size: usize,
            #[arg(long)]
            packing: bool,
            #[arg(long, default_value_t = true, action = ArgAction::Set)]
            whiten: bool,
            #[arg(long, value_delimiter = ',')]
            targets: Vec<String>,
            #[arg(long = "task-file")]
            task_files: Vec<String>,
            #[arg(long, short = 'l')]
            lr: Option<f64>,
        },
    }

    fn expanded(toml: &str, args: &[&str]) -> Result<Vec<String>, String> {
        let dir = std::env::temp_dir().join(format!(
            "verdict-cli-config-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, toml).unwrap();
        let mut argv: Vec<OsString> = vec!["prog".into()];
        argv.extend(args.iter().map(|a| a.replace("FILE", path.to_str().unwrap()).into()));
        let out = expand(&mut Cli::command(), argv)?;
        Ok(out.into_iter().skip(1).map(|s| s.into_string().unwrap()).collect())
    }

    use clap::CommandFactory;

    #[test]
    fn keys_become_flags_after_the_subcommand_and_the_command_line_wins() {
        let toml = "batch_size = 8\n\"task-file\" = [\"a\", \"b\"]\ntargets = [\"q\", \"v\"]\npacking = true\nwhiten = false\nlr = 0.5\nthreads = 2\n";
        let out = expanded(toml, &["--threads", "1", "sft", "--config", "FILE", "-l", "0.25"]).unwrap();
        let want = [
            "--threads",
            "1",
            "sft",
            "--batch-size",
            "8",
            "--packing",
            "--targets",
            "q,v",
            "--task-file",
            "a",
            "--task-file",
            "b",
            "--whiten",
            "false",
        ];
        assert_eq!(&out[..want.len()], want);
        assert_eq!(&out[want.len()..want.len() + 1], ["--config"]);
        assert_eq!(&out[want.len() + 2..], ["-l", "0.25"]);
        // `threads` is given before the subcommand; inserted after it the file's key would win.
        let cli = Cli::try_parse_from(std::iter::once("prog".to_string()).chain(out)).unwrap();
        let Sub::Sft { batch_size, packing, whiten, targets, task_files, lr } = cli.cmd;
        assert_eq!((batch_size, packing, whiten, lr), (8, true, false, Some(0.25)));
        assert_eq!((targets, task_files), (vec!["q".to_string(), "v".into()], vec!["a".to_string(), "b".into()]));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_naming_the_key_and_file() {
        let e = expanded("batch_sise = 8\n", &["sft", "--config=FILE"]).unwrap_err();
        assert!(e.contains("unknown key `batch_sise`") && e.contains("run.toml"), "{e}");
        let e = expanded("packing = 3\n", &["sft", "--config", "FILE"]).unwrap_err();
        assert!(e.contains("key `packing`") && e.contains("true or false"), "{e}");
        let e = expanded("config = \"x.toml\"\n", &["sft", "--config", "FILE"]).unwrap_err();
        assert!(e.contains("unknown key `config`"), "{e}");
        // Without --config nothing changes.
        assert_eq!(expanded("", &["sft", "--batch-size", "2"]).unwrap(), ["sft", "--batch-size", "2"]);
    }
}
