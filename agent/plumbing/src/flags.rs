//! The `--config` YAML file of a binary's flags: keys are the long flag names, values are what
//! the command line would say; the command line (and the environment) win over the file.
//!
//! Every key is checked against its flag on its own, so that an error names the key; a list
//! repeats a repeatable flag; `true`/`false` set or leave a switch; an empty value leaves a flag
//! unset. Values of the flags the binary names as paths are resolved against the file's
//! directory when relative, like the etcd client YAML's files.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{ArgMatches, Command, parser::ValueSource};
use serde_json::Value;

/// The flag that names the file.
pub const CONFIG_FLAG: &str = "config";

/// Why the flags cannot be loaded; the binaries exit 64 with this one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The command line does not parse (clap's message in one line).
    #[error("{0} (see --help)")]
    Cli(String),
    /// The `--config` file cannot be read.
    #[error("--config {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML, not a mapping, or names an unknown key.
    #[error("--config {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line where known.
        message: String,
    },
    /// A key of the file holds a value its flag does not accept.
    #[error("--config {path}: field {field:?}: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The key (the flag's long name).
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The parsed flags.
#[derive(Debug)]
pub struct Loaded {
    /// The command line merged with the file.
    pub matches: ArgMatches,
    /// The command line alone (required flags relaxed): tells where a value came from.
    pub command_line: ArgMatches,
    /// The `--config` file, when one was given.
    pub file: Option<PathBuf>,
}

impl Loaded {
    /// Whether the flag with this id got its value from the `--config` file.
    pub fn from_file(&self, id: &str) -> bool {
        self.file.is_some()
            && !matches!(
                self.command_line.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
            && self.matches.value_source(id) == Some(ValueSource::CommandLine)
    }
}

/// Parses `argv` (the first is the program name) against `cmd`, with the
/// `--config` file it names; `path_flags` are the long names of the flags
/// whose values are paths. `--help`/`--version` print and exit here, like clap does.
pub fn load(cmd: Command, argv: Vec<OsString>, path_flags: &[&str]) -> Result<Loaded, LoadError> {
    // Without required flags (they may come from the file) and without the
    // environment (a key of the file is checked on its own).
    let relaxed = cmd.clone().mut_args(|a| a.required(false));
    let command_line = relaxed
        .clone()
        .try_get_matches_from(&argv)
        .map_err(clap_error)?;
    let Some(path) = command_line.get_one::<PathBuf>(CONFIG_FLAG).cloned() else {
        let matches = cmd.try_get_matches_from(&argv).map_err(clap_error)?;
        return Ok(Loaded {
            matches,
            command_line,
            file: None,
        });
    };
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
        path: path.clone(),
        source,
    })?;
    let single = relaxed.mut_args(|a| a.env(None::<&str>));
    let file_args = file_to_args(&path, &text, &single, path_flags, |id| {
        matches!(
            command_line.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    })?;
    let program = argv
        .first()
        .cloned()
        .unwrap_or_else(|| cmd.get_name().into());
    let mut merged = vec![program];
    merged.extend(file_args);
    merged.extend(argv.into_iter().skip(1));
    let matches = cmd.try_get_matches_from(&merged).map_err(clap_error)?;
    Ok(Loaded {
        matches,
        command_line,
        file: Some(path),
    })
}

fn clap_error(e: clap::Error) -> LoadError {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    LoadError::Cli(first_line(&e))
}

/// clap's message in one line (a missing-flags error lists the flags on
/// the lines that follow its first).
fn first_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let line = line.trim_start_matches("error: ");
    if line.is_empty() {
        "invalid arguments".to_owned()
    } else {
        line.to_owned()
    }
}

/// Turns the YAML mapping into `--flag=value` arguments, skipping flags
/// `already_set` on the command line.
fn file_to_args(
    path: &Path,
    text: &str,
    single: &Command,
    path_flags: &[&str],
    already_set: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, LoadError> {
    let file = |message: String| LoadError::File {
        path: path.to_owned(),
        message,
    };
    let value: Value = crate::yaml::from_str(text).map_err(|e| {
        file(match e.line {
            Some(l) => format!("not valid YAML at line {l}: {}", e.message),
            None => format!("not valid YAML: {}", e.message),
        })
    })?;
    let map = match value {
        Value::Object(m) => m,
        Value::Null => return Ok(Vec::new()),
        _ => return Err(file("expected a mapping of flag names to values".into())),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let program = OsString::from(single.get_name());
    let mut out = Vec::new();
    for (name, v) in map {
        let Some(arg) = single
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()) && name != CONFIG_FLAG)
        else {
            return Err(file(format!(
                "unknown key {name:?} (keys are the long flag names of --help, without dashes)"
            )));
        };
        let field = |message: String| LoadError::Field {
            path: path.to_owned(),
            field: name.clone(),
            message,
        };
        let is_switch = matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        );
        let scalar = |v: &Value| -> Result<String, LoadError> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                _ => Err(field("expected a value or a list of values".into())),
            }
        };
        let values: Vec<String> = match &v {
            Value::Null => continue,
            _ if is_switch => match scalar(&v)?.as_str() {
                "true" => Vec::new(),
                "false" => continue,
                other => return Err(field(format!("{other:?}: expected true or false"))),
            },
            Value::Array(items) => items.iter().map(scalar).collect::<Result<_, _>>()?,
            other => vec![scalar(other)?],
        };
        let flag_args: Vec<OsString> = if is_switch {
            vec![OsString::from(format!("--{name}"))]
        } else {
            values
                .into_iter()
                .map(|value| {
                    let value =
                        if path_flags.contains(&name.as_str()) && Path::new(&value).is_relative() {
                            dir.join(&value).into_os_string()
                        } else {
                            OsString::from(value)
                        };
                    // `--flag=value`, so that a value starting with '-' stays a value.
                    let mut flag = OsString::from(format!("--{name}="));
                    flag.push(&value);
                    flag
                })
                .collect()
        };
        single
            .clone()
            .try_get_matches_from(std::iter::once(program.clone()).chain(flag_args.iter().cloned()))
            .map_err(|e| field(first_line(&e)))?;
        if already_set(arg.get_id().as_str()) {
            continue;
        }
        out.extend(flag_args);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{Arg, ArgAction};

    use super::*;

    fn cmd() -> Command {
        Command::new("prog")
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_parser(clap::value_parser!(PathBuf)),
            )
            .arg(Arg::new("listen").long("listen").required(true))
            .arg(
                Arg::new("cert")
                    .long("cert")
                    .value_parser(clap::value_parser!(PathBuf)),
            )
            .arg(Arg::new("cidr").long("cidr").action(ArgAction::Append))
            .arg(
                Arg::new("count")
                    .long("count")
                    .value_parser(clap::value_parser!(u32)),
            )
            .arg(Arg::new("dry").long("dry").action(ArgAction::SetTrue))
            .arg(
                Arg::new("every")
                    .long("every")
                    .value_parser(crate::duration::with_unit),
            )
            .arg(
                Arg::new("name")
                    .long("name")
                    .env("PODMESH_PLUMBING_TEST_NAME"),
            )
    }

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once("prog")
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn write(text: &str) -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.yaml");
        std::fs::write(&f, text).unwrap();
        (d, f.to_str().unwrap().to_owned())
    }

    #[test]
    fn without_a_file_required_flags_are_required() {
        let l = load(cmd(), args(&["--listen", "x"]), &[]).unwrap();
        assert_eq!(l.matches.get_one::<String>("listen").unwrap(), "x");
        let e = load(cmd(), args(&[]), &[]).unwrap_err().to_string();
        assert!(e.contains("--listen") && e.contains("see --help"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn file_values_lists_switches_paths_and_the_command_line_winning() {
        let (d, f) = write(
            "listen: a\ncert: c.crt\ncidr: [10.0.0.0/8, 10.1.0.0/16]\ncount: 3\ndry: true\nevery: 2m\nname:\n",
        );
        let l = load(cmd(), args(&["--config", &f, "--count", "4"]), &["cert"]).unwrap();
        let m = &l.matches;
        assert_eq!(m.get_one::<String>("listen").unwrap(), "a");
        assert_eq!(
            m.get_one::<PathBuf>("cert").unwrap(),
            &d.path().join("c.crt")
        );
        assert_eq!(m.get_many::<String>("cidr").unwrap().count(), 2);
        assert_eq!(*m.get_one::<u32>("count").unwrap(), 4);
        assert!(m.get_flag("dry"));
        assert_eq!(
            *m.get_one::<Duration>("every").unwrap(),
            Duration::from_secs(120)
        );
        assert!(l.from_file("listen"));
        assert!(!l.from_file("count"));
        assert!(!l.from_file("name"));
    }

    #[test]
    fn errors_name_the_key_in_one_line() {
        for (text, want) in [
            ("listen: a\nlisten-addr: x\n", "unknown key \"listen-addr\""),
            ("count: -3\n", "\"count\""),
            ("every: 10\n", "\"every\""),
            ("listen: [a, b]\n", "\"listen\""),
            ("dry: maybe\n", "\"dry\""),
            ("cert: {a: 1}\n", "\"cert\""),
            ("config: other.yaml\n", "\"config\""),
            ("- listen\n", "mapping"),
            ("listen: [\n", "line"),
        ] {
            let (_d, f) = write(text);
            let e = load(cmd(), args(&["--config", &f]), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains(&f), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{text:?}: {e}");
        }
        let e = load(cmd(), args(&["--config", "/nonexistent/c.yaml"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
