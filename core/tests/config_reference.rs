//! `docs/configuration.md` against `Config`, in both directions: every field of the run
//! configuration has a row in the reference, every row names a field, each row sits under the
//! `## [section]` heading of its section, and a default written as a TOML value in backticks is
//! the embedded default's (`configs/default.toml`, with serde's defaults for what it leaves out).
//!
//! The fields are found by serializing a `Config` and walking the result, so a field added to
//! `core/src/config.rs` fails this test until the reference documents it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use troupe_core::config::{Config, TlsConfig};

const TABLE_HEADER: &str = "| field | default | allowed | meaning |";

fn reference_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md")
}

/// The embedded default with every optional section filled in. Serialization leaves out an
/// `Option` that is `None` (`skip_serializing_if`), and the embedded default leaves `[tls]`
/// out, so its fields are set here. A new `Option` field of `Config` (or of a section) must be
/// set here too, or its keys cannot be found: the test then reports its row as naming no field.
fn every_option_set() -> Config {
    let mut config = Config::default_config();
    config.tls =
        Some(TlsConfig { ca: "certs/ca.pem".into(), cert: "certs/coordinator.pem".into(), key: "certs/coordinator-key.pem".into() });
    // Left out of the file when empty: set here so that its row is checked.
    config.model.init_from = "models/gpt2".into();
    config.checkpoint.store = "s3://bucket/checkpoints".into();
    config
}

/// Dotted keys of every leaf under `table` (arrays are leaves: `eval.prompts` is one field).
fn leaves(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (name, value) in table {
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        match value {
            toml::Value::Table(inner) => leaves(&key, inner, out),
            leaf => {
                out.insert(key, leaf.clone());
            }
        }
    }
}

fn config_fields(config: &Config) -> BTreeMap<String, toml::Value> {
    let value = toml::Value::try_from(config).expect("a Config serializes to TOML");
    let toml::Value::Table(table) = value else { panic!("a Config serializes to a table") };
    let mut out = BTreeMap::new();
    leaves("", &table, &mut out);
    out
}

/// One table row of the reference.
#[derive(Debug)]
struct Row {
    line: usize,
    key: String,
    default: String,
    /// The `## [section]` heading the row sits under.
    section: Option<String>,
}

/// Rows of the reference (lines starting with "| `"), with the heading above each; and
/// every section heading, checked to be followed by the table header.
fn parse_reference(text: &str) -> (Vec<Row>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut rows = Vec::new();
    let mut sections = Vec::new();
    let mut section = None;
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix("## [").and_then(|rest| rest.strip_suffix(']')) {
            section = Some(name.to_string());
            sections.push(name.to_string());
            let header = lines[i + 1..].iter().map(|l| l.trim_end()).find(|l| l.starts_with('|'));
            assert_eq!(
                header,
                Some(TABLE_HEADER),
                "docs/configuration.md:{}: the table under `## [{name}]` must start with {TABLE_HEADER}",
                i + 1
            );
        } else if line.starts_with("## ") {
            section = None;
        }
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 4, "docs/configuration.md:{}: a row has 4 cells (field, default, allowed, meaning): {line}", i + 1);
        let key = cells[0].trim_matches('`').to_string();
        assert!(
            cells[0].starts_with('`') && cells[0].ends_with('`') && !key.contains('`') && !key.is_empty(),
            "docs/configuration.md:{}: the first cell is one dotted key in backticks: {line}",
            i + 1
        );
        rows.push(Row { line: i + 1, key, default: cells[1].to_string(), section: section.clone() });
    }
    (rows, sections)
}

/// A default cell that is one code span holding a TOML value (`0.1`, `"ddp"`, `[]`), parsed.
fn documented_default(cell: &str) -> Option<toml::Value> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    if inner.contains('`') {
        return None;
    }
    toml::from_str::<toml::Table>(&format!("v = {inner}")).ok()?.remove("v")
}

/// TOML values equal as configuration values: `25` and `25.0` are the same number.
fn same_value(a: &toml::Value, b: &toml::Value) -> bool {
    let number = |v: &toml::Value| match v {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    };
    match (number(a), number(b)) {
        (Some(x), Some(y)) => x == y || ((x - y) / y.abs().max(f64::MIN_POSITIVE)).abs() < 1e-12,
        _ => a == b,
    }
}

#[test]
fn every_config_field_has_a_row_and_every_row_names_a_field() {
    let text = std::fs::read_to_string(reference_path()).expect("docs/configuration.md exists");
    let (rows, sections) = parse_reference(&text);
    let fields = config_fields(&every_option_set());
    assert!(fields.len() > 40 && fields.contains_key("train.learning_rate") && fields.contains_key("tls.ca"), "{fields:?}");

    let mut documented = BTreeSet::new();
    let mut problems = Vec::new();
    for row in &rows {
        if !documented.insert(row.key.clone()) {
            problems.push(format!("line {}: `{}` has a second row", row.line, row.key));
        }
        if !fields.contains_key(&row.key) {
            problems.push(format!(
                "line {}: `{}` is not a field of Config (misspelt, removed, or an Option left None in every_option_set())",
                row.line, row.key
            ));
        }
        let section = row.key.rsplit_once('.').map(|(s, _)| s);
        if section.is_none() || row.section.as_deref() != section {
            problems.push(format!(
                "line {}: `{}` belongs under `## [{}]`, not {:?}",
                row.line,
                row.key,
                section.unwrap_or("?"),
                row.section.as_deref().map(|s| format!("## [{s}]"))
            ));
        }
    }
    for key in fields.keys() {
        if !documented.contains(key) {
            problems.push(format!("`{key}` has no row in docs/configuration.md"));
        }
    }
    let field_sections: BTreeSet<&str> = fields.keys().filter_map(|k| k.rsplit_once('.').map(|(s, _)| s)).collect();
    for s in &field_sections {
        if sections.iter().filter(|h| h.as_str() == *s).count() != 1 {
            problems.push(format!("section [{s}] needs exactly one `## [{s}]` heading"));
        }
    }
    assert!(problems.is_empty(), "docs/configuration.md and core/src/config.rs disagree:\n  {}", problems.join("\n  "));
}

#[test]
fn documented_defaults_are_the_embedded_defaults() {
    let text = std::fs::read_to_string(reference_path()).expect("docs/configuration.md exists");
    let (rows, _) = parse_reference(&text);
    // The embedded default as it is (no optional section): its keys have a default to check.
    let defaults = config_fields(&Config::default_config());
    let mut checked = 0;
    let mut problems = Vec::new();
    for row in &rows {
        let Some(actual) = defaults.get(&row.key) else { continue };
        match documented_default(&row.default) {
            Some(documented) if same_value(&documented, actual) => checked += 1,
            Some(documented) => problems.push(format!("line {}: `{}` defaults to {actual}, not {documented}", row.line, row.key)),
            None => {
                problems.push(format!("line {}: `{}`: write its default as a TOML value in backticks, e.g. `{actual}`", row.line, row.key))
            }
        }
    }
    assert!(problems.is_empty(), "docs/configuration.md:\n  {}", problems.join("\n  "));
    assert!(checked > 40, "only {checked} defaults checked");
}

#[test]
fn the_reader_finds_rows_and_sections() {
    let text = "# x\n\n## [a]\n\ntext\n\n| field | default | allowed | meaning |\n|---|---|---|---|\n\
                | `a.b` | `1` | 1..=2 | one |\n| `a.c.d` | `\"x\"` | any | two |\n\n## Notes\n\n| `a.e` | — | — | three |\n";
    let (rows, sections) = parse_reference(text);
    assert_eq!(sections, vec!["a".to_string()]);
    let keys: Vec<(&str, Option<&str>)> = rows.iter().map(|r| (r.key.as_str(), r.section.as_deref())).collect();
    assert_eq!(keys, vec![("a.b", Some("a")), ("a.c.d", Some("a")), ("a.e", None)]);
    assert_eq!(documented_default("`\"x\"`"), Some(toml::Value::String("x".into())));
    assert_eq!(documented_default("`[]`"), Some(toml::Value::Array(vec![])));
    assert_eq!(documented_default("none"), None);
    assert!(same_value(&toml::Value::Integer(25), &toml::Value::Float(25.0)));
    assert!(same_value(&documented_default("`3e-3`").unwrap(), &toml::Value::Float(0.003)));
    assert!(!same_value(&toml::Value::Integer(2), &toml::Value::Float(2.5)));
}
