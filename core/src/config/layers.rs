//! A run's configuration in layers: the embedded default, then a config file that names only
//! what it changes, then `--set key=value` overrides — merged key by key and checked as a whole,
//! remembering where each value came from (`troupe config show`).

use std::collections::BTreeMap;
use std::path::Path;

use super::{Config, ConfigError, DEFAULT_CONFIG_TOML};

/// Where a value of the resolved configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(String),
    Set,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(path) => write!(f, "{path}"),
            Origin::Set => f.write_str("--set"),
        }
    }
}

/// The resolved configuration and the origin of every value that is not the default's.
#[derive(Debug, Clone)]
pub struct Layered {
    pub config: Config,
    /// Dotted key → where its value came from (keys absent here are the default's).
    pub origins: BTreeMap<String, Origin>,
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse { origin: format!(" in {origin}"), message: e.to_string() })
}

/// Lays `over` onto `base`, key by key (tables merge, anything else replaces), noting each
/// leaf's origin.
fn merge(base: &mut toml::Table, over: toml::Table, prefix: &str, origin: &Origin, origins: &mut BTreeMap<String, Origin>) {
    for (key, value) in over {
        let dotted = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(over_inner)) => merge(inner, over_inner, &dotted, origin, origins),
            (_, value) => {
                note_leaves(&dotted, &value, origin, origins);
                base.insert(key, value);
            }
        }
    }
}

fn note_leaves(dotted: &str, value: &toml::Value, origin: &Origin, origins: &mut BTreeMap<String, Origin>) {
    match value {
        toml::Value::Table(table) => {
            for (key, inner) in table {
                note_leaves(&format!("{dotted}.{key}"), inner, origin, origins);
            }
        }
        _ => {
            origins.insert(dotted.to_string(), origin.clone());
        }
    }
}

/// `key=value` as a one-key table: the value is read as TOML (`3e-4`, `true`, `"ddp"`,
/// `[1, 2]`), or taken as a string when it is not TOML (`--set parallel.strategy=zero2`).
fn parse_set(assignment: &str) -> Result<toml::Table, ConfigError> {
    let bad = |message: String| ConfigError::Parse { origin: format!(" in --set {assignment}"), message };
    let (key, raw) = assignment.split_once('=').ok_or_else(|| bad("write KEY=VALUE, e.g. train.learning_rate=3e-4".into()))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
        return Err(bad(format!("{key:?} is not a dotted config key like train.learning_rate")));
    }
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut table) => table.remove("v").unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut table = toml::Table::new();
    let mut value = value;
    for (i, part) in parts.iter().enumerate().rev() {
        if i == 0 {
            table.insert(part.to_string(), value);
            break;
        }
        let mut inner = toml::Table::new();
        inner.insert(part.to_string(), value);
        value = toml::Value::Table(inner);
    }
    Ok(table)
}

impl Config {
    /// The embedded default, overlaid with `file` (which names only what it changes) and then
    /// with `sets` (`key=value`, dotted keys), deserialised (unknown keys refused, by name) and
    /// checked as a whole.
    pub fn layered(file: Option<&Path>, sets: &[String]) -> Result<Layered, ConfigError> {
        let mut table = parse_table(DEFAULT_CONFIG_TOML, "<embedded default>")?;
        let mut origins = BTreeMap::new();
        let mut origin_text = "<embedded default>".to_string();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            origin_text = path.display().to_string();
            let over = parse_table(&text, &origin_text)?;
            merge(&mut table, over, "", &Origin::File(origin_text.clone()), &mut origins);
        }
        for assignment in sets {
            merge(&mut table, parse_set(assignment)?, "", &Origin::Set, &mut origins);
        }
        if !sets.is_empty() {
            origin_text = format!("{origin_text} with --set {}", sets.join(" --set "));
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse { origin: format!(" in {origin_text}"), message: e.to_string() })?;
        config.validate()?;
        Ok(Layered { config, origins })
    }

    /// The resolved configuration as TOML, each value that is not the default's followed by a
    /// comment saying where it came from (secrets print as empty, as always).
    pub fn show(layered: &Layered) -> String {
        let text = layered.config.to_toml();
        let mut out = String::new();
        let mut section = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if let Some(name) = trimmed.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                section = name.trim_matches(|c| c == '[' || c == ']').to_string();
            }
            out.push_str(line);
            if let Some((key, _)) = trimmed.split_once(" = ") {
                let dotted = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
                if let Some(origin) = layered.origins.get(&dotted) {
                    out.push_str(&format!("  # {origin}"));
                }
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("troupe-layers-{}-{}.toml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_file_names_only_what_it_changes_and_set_overrides_it() {
        let path = file("[train]\nlearning_rate = 1e-3\n");
        let layered = Config::layered(Some(&path), &[]).unwrap();
        let default = Config::default_config();
        assert_eq!(layered.config.train.learning_rate, 1e-3);
        assert_eq!(layered.config.train.steps, default.train.steps, "everything else is the default's");
        assert_eq!(layered.origins.get("train.learning_rate"), Some(&Origin::File(path.display().to_string())));

        let sets = vec!["train.learning_rate=3e-4".to_string(), "parallel.strategy=zero2".into(), "model.bias=false".into()];
        let layered = Config::layered(Some(&path), &sets).unwrap();
        assert_eq!(layered.config.train.learning_rate, 3e-4);
        assert_eq!(layered.config.parallel.strategy, crate::shard::Strategy::Zero2);
        assert!(!layered.config.model.bias);
        assert_eq!(layered.origins.get("train.learning_rate"), Some(&Origin::Set));
        let shown = Config::show(&layered);
        assert!(shown.contains("learning_rate = 0.0003  # --set"), "{shown}");
        assert!(shown.contains(&format!("steps = {}\n", default.train.steps)), "{shown}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let err = Config::layered(None, &["train.lerning_rate=1".to_string()]).unwrap_err().to_string();
        assert!(err.contains("lerning_rate") && err.contains("--set"), "{err}");
        let err = Config::layered(None, &["train.steps=0".to_string()]).unwrap_err().to_string();
        assert!(err.contains("train.steps"), "{err}");
        let err = Config::layered(None, &["train.steps=many".to_string()]).unwrap_err().to_string();
        assert!(err.contains("steps") && err.contains("--set"), "{err}");
        for bad in ["no-equals-sign", "=1", "a..b=1", "train.steps"] {
            assert!(Config::layered(None, &[bad.to_string()]).is_err(), "{bad}");
        }
        let path = file("[train\nsteps = 3\n");
        let err = Config::layered(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
