//! `troupe export`: a checkpoint (or registry version) as a Hugging Face GPT-2 model folder —
//! `model.safetensors`, `config.json`, the tokenizer (`tokenizer.json`, `vocab.json`,
//! `merges.txt`, `tokenizer_config.json`) and `generation_config.json` — that
//! `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load as they are.
//!
//! The folder is written as `<out>.partial-<pid>` next to `--out` and renamed into place, so an
//! interrupted export leaves no half-written model where a loader would look.

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use troupe_common::checkpoint;
use troupe_common::data::EOT_TOKEN;

/// One file of the exported folder.
struct OutFile {
    name: &'static str,
    bytes: Vec<u8>,
    what: String,
}

/// Exports `checkpoint_dir` to `out`; prints what it wrote.
pub(crate) fn export(checkpoint_dir: &Path, out: &Path, force: bool) -> anyhow::Result<()> {
    if !checkpoint_dir.is_dir() {
        bail!("--checkpoint {}: no such folder", checkpoint_dir.display());
    }
    let source = checkpoint_dir.canonicalize().with_context(|| format!("cannot resolve {}", checkpoint_dir.display()))?;
    let Some(out_name) = out.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        bail!("--out {}: name a folder to write (e.g. --out exports/my-model)", out.display());
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    check_destination(&source, out, force)?;

    // The files must be the ones the checkpoint (or registry version) committed: a flipped
    // byte is refused here, naming the file, before anything is loaded.
    let step = if checkpoint_dir.join(checkpoint::MANIFEST).exists() {
        let manifest = checkpoint::verify_files(checkpoint_dir)?;
        let value: serde_json::Value = serde_json::from_slice(&manifest).unwrap_or_default();
        value.get("step").and_then(|s| s.as_u64())
    } else {
        troupe_common::say_err!("warning: {} has no {}: its files cannot be verified", checkpoint_dir.display(), checkpoint::MANIFEST);
        None
    };

    let (model, tokenizer) = troupe_common::model::load_for_inference(checkpoint_dir, tch::Device::Cpu)
        .with_context(|| format!("cannot load the model in {}", checkpoint_dir.display()))?;
    let cfg = model.config().clone();
    if !cfg.bias {
        bail!(
            "{} was trained with model.bias = false; Hugging Face's GPT-2 (GPT2LMHeadModel) has biases in every \
             linear layer and LayerNorm and cannot load it. Train with bias = true to export",
            checkpoint_dir.display()
        );
    }
    let tokenizer_path = checkpoint_dir.join(checkpoint::TOKENIZER_FILE);
    let tokenizer_json = std::fs::read(&tokenizer_path).with_context(|| format!("cannot read {}", tokenizer_path.display()))?;
    let hf_tok = HfTokenizer::from_json(&tokenizer_json).with_context(|| format!("{} cannot be exported", tokenizer_path.display()))?;
    if hf_tok.vocab.len() != tokenizer.vocab_size() {
        bail!(
            "{}: its model holds {} tokens but the tokenizer reports {}",
            tokenizer_path.display(),
            hf_tok.vocab.len(),
            tokenizer.vocab_size()
        );
    }
    // The document separator is GPT-2's <|endoftext|>: its begin, end and unknown token.
    let eot = hf_tok.special_id(EOT_TOKEN);

    let mut config = cfg.to_hf_config();
    if let (Some(id), Some(obj)) = (eot, config.as_object_mut()) {
        obj.insert("bos_token_id".into(), json!(id));
        obj.insert("eos_token_id".into(), json!(id));
    }
    let mut tok_config = Map::new();
    tok_config.insert("tokenizer_class".into(), json!("GPT2TokenizerFast"));
    tok_config.insert("model_max_length".into(), json!(cfg.block_size));
    tok_config.insert("add_prefix_space".into(), json!(false));
    tok_config.insert("add_bos_token".into(), json!(false));
    // troupe decodes exactly what it encoded; HF's clean-up would rewrite " ." to ".".
    tok_config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if eot.is_some() {
        for key in ["bos_token", "eos_token", "unk_token"] {
            tok_config.insert(key.into(), json!(EOT_TOKEN));
        }
    }

    let weights = model.to_safetensors_bytes().context("cannot serialise the weights")?;
    let mut files = vec![
        OutFile {
            name: "model.safetensors",
            bytes: weights,
            what: format!("{} parameters, float32, Hugging Face GPT-2 names", model.num_params()),
        },
        OutFile {
            name: "config.json",
            bytes: pretty(&config)?,
            what: format!(
                "GPT2Config: {} layers, {} heads, n_embd {}, n_positions {}, vocab {}",
                cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size
            ),
        },
        OutFile { name: "tokenizer.json", bytes: tokenizer_json, what: "the fast tokenizer (byte-level BPE)".into() },
        OutFile {
            name: "vocab.json",
            bytes: pretty(&Value::Object(hf_tok.vocab.clone()))?,
            what: format!("{} tokens", hf_tok.vocab.len()),
        },
        OutFile { name: "merges.txt", bytes: hf_tok.merges_txt(), what: format!("{} merges", hf_tok.merges.len()) },
        OutFile {
            name: "tokenizer_config.json",
            bytes: pretty(&Value::Object(tok_config))?,
            what: match eot {
                Some(_) => format!("GPT2TokenizerFast, model_max_length {}, bos/eos/unk {EOT_TOKEN}", cfg.block_size),
                None => format!("GPT2TokenizerFast, model_max_length {}", cfg.block_size),
            },
        },
    ];
    if let Some(id) = eot {
        files.push(OutFile {
            name: "generation_config.json",
            bytes: pretty(&json!({ "bos_token_id": id, "eos_token_id": id }))?,
            what: format!("bos/eos token id {id}"),
        });
    }

    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let partial = parent.join(format!("{out_name}.partial-{}", std::process::id()));
    if let Err(e) = write_folder(&partial, &files) {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if let Err(e) = put_in_place(&partial, out, &out_name) {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }

    let from = match step {
        Some(step) => format!("{} (step {step}, verified against its MANIFEST)", checkpoint_dir.display()),
        None => checkpoint_dir.display().to_string(),
    };
    troupe_common::say!("exported {from} to {}:", out.display());
    for f in &files {
        troupe_common::say!("  {:<24} {:>10}  {}", f.name, human_size(f.bytes.len()), f.what);
    }
    troupe_common::say!("parameters: {}", model.num_params());
    troupe_common::say!(
        "load it with transformers: GPT2LMHeadModel.from_pretrained({0:?}), AutoTokenizer.from_pretrained({0:?})",
        out.display().to_string()
    );
    Ok(())
}

/// Refuses an `--out` that is a file, a non-empty folder without `--force`, or anything that
/// holds (or is) the checkpoint. With `--force` only a flat folder of files — what an export
/// writes — is replaced, so a mistyped `--out ~` cannot wipe a home folder.
fn check_destination(source: &Path, out: &Path, force: bool) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(out) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Not there yet: it must not end up inside the checkpoint either.
            let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if let Ok(parent) = parent.canonicalize() {
                if parent.starts_with(source) {
                    bail!("--out {} is inside the checkpoint {}; export somewhere else", out.display(), source.display());
                }
            }
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot inspect --out {}", out.display())),
    };
    if !meta.is_dir() {
        bail!("--out {} exists and is not a folder", out.display());
    }
    let dest = out.canonicalize().with_context(|| format!("cannot resolve {}", out.display()))?;
    if source.starts_with(&dest) || dest.starts_with(source) {
        bail!("--out {} and the checkpoint {} overlap; export to a folder of its own", out.display(), source.display());
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(out).with_context(|| format!("cannot read --out {}", out.display()))? {
        let entry = entry.with_context(|| format!("cannot read --out {}", out.display()))?;
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(true);
        entries.push((entry.file_name().to_string_lossy().into_owned(), is_dir));
    }
    if entries.is_empty() {
        return Ok(());
    }
    if !force {
        bail!("--out {} exists and is not empty; pass --force to replace it", out.display());
    }
    if let Some((name, _)) = entries.iter().find(|(_, is_dir)| *is_dir) {
        bail!(
            "--out {} holds a folder ({name}), so it is not an earlier export; --force only replaces a folder of \
             files. Remove it yourself or choose another --out",
            out.display()
        );
    }
    Ok(())
}

fn write_folder(dir: &Path, files: &[OutFile]) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for f in files {
        let path = dir.join(f.name);
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&path)?;
            std::io::Write::write_all(&mut file, &f.bytes)?;
            file.sync_all()
        };
        write().with_context(|| format!("cannot write {}", path.display()))?;
    }
    checkpoint::fsync_path(dir)?;
    Ok(())
}

/// Renames `partial` to `out`; an existing (checked) `out` is moved aside first and removed
/// once the new folder is in place.
fn put_in_place(partial: &Path, out: &Path, out_name: &str) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(out).is_err() {
        return std::fs::rename(partial, out).with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()));
    }
    let aside = out.with_file_name(format!("{out_name}.replaced-{}", std::process::id()));
    std::fs::rename(out, &aside).with_context(|| format!("cannot move the old {} aside", out.display()))?;
    if let Err(e) = std::fs::rename(partial, out) {
        let _ = std::fs::rename(&aside, out);
        return Err(e).with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()));
    }
    std::fs::remove_dir_all(&aside)
        .with_context(|| format!("the export is in place, but the old folder {} could not be removed", aside.display()))?;
    Ok(())
}

/// What `vocab.json` and `merges.txt` need from a `tokenizer.json` of the `tokenizers` crate.
struct HfTokenizer {
    /// Token to id, the added (special) tokens included.
    vocab: Map<String, Value>,
    merges: Vec<(String, String)>,
    /// The added tokens marked special, with their ids.
    special: Vec<(String, u64)>,
}

impl HfTokenizer {
    fn from_json(bytes: &[u8]) -> anyhow::Result<HfTokenizer> {
        let root: Value = serde_json::from_slice(bytes).context("it is not valid JSON")?;
        let model = root.get("model").context("it has no \"model\"")?;
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        if kind != "BPE" {
            bail!("its model is {kind}; only byte-level BPE (GPT-2's) can be written as vocab.json and merges.txt");
        }
        let byte_level = |v: Option<&Value>| v.and_then(|v| v.get("type")).and_then(Value::as_str) == Some("ByteLevel");
        if !byte_level(root.get("pre_tokenizer")) {
            bail!("its pre-tokenizer is not ByteLevel; GPT-2's tokenizer is byte-level BPE");
        }
        let mut vocab = model.get("vocab").and_then(Value::as_object).cloned().context("its model has no \"vocab\" map")?;
        if let Some((token, id)) = vocab.iter().find(|(_, id)| id.as_u64().is_none()) {
            bail!("vocab entry {token:?} has id {id}, not a non-negative integer");
        }
        let mut merges = Vec::new();
        for (i, m) in model.get("merges").and_then(Value::as_array).context("its model has no \"merges\" list")?.iter().enumerate() {
            // Older files store "a b", newer ones ["a", "b"].
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
                Value::Array(parts) => match parts.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            let Some((a, b)) = pair else { bail!("merge {i} ({m}) is neither \"a b\" nor [\"a\", \"b\"]") };
            if a.contains([' ', '\n']) || b.contains([' ', '\n']) {
                bail!("merge {i} ({m}) holds a space or newline, which merges.txt cannot express");
            }
            merges.push((a, b));
        }
        let mut special = Vec::new();
        for t in root.get("added_tokens").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
            let (Some(content), Some(id)) = (t.get("content").and_then(Value::as_str), t.get("id").and_then(Value::as_u64)) else {
                bail!("added token {t} has no content or id");
            };
            // The slow GPT2Tokenizer knows only vocab.json: added tokens belong there too.
            vocab.entry(content.to_owned()).or_insert(json!(id));
            if t.get("special").and_then(Value::as_bool).unwrap_or(false) {
                special.push((content.to_owned(), id));
            }
        }
        Ok(HfTokenizer { vocab, merges, special })
    }

    fn special_id(&self, token: &str) -> Option<u64> {
        self.special.iter().find(|(t, _)| t == token).map(|&(_, id)| id)
    }

    /// GPT-2's merges.txt: a version line, then one "a b" per line, in rank order; the
    /// trailing newline matters (GPT2Tokenizer drops the last line).
    fn merges_txt(&self) -> Vec<u8> {
        let mut text = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            text.push_str(a);
            text.push(' ');
            text.push_str(b);
            text.push('\n');
        }
        text.into_bytes()
    }
}

fn pretty(v: &Value) -> anyhow::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(v)?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn human_size(n: usize) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer_json(merges: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "added_tokens": [{"id": 0, "content": EOT_TOKEN, "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
            "model": {"type": "BPE", "vocab": {EOT_TOKEN: 0, "a": 1, "b": 2, "Ġ": 3, "ab": 4, "Ġab": 5}, "merges": merges},
        }))
        .unwrap()
    }

    #[test]
    fn merges_as_strings_or_pairs_give_the_same_merges_txt() {
        let pairs = HfTokenizer::from_json(&tokenizer_json(json!([["a", "b"], ["Ġ", "ab"]]))).unwrap();
        let strings = HfTokenizer::from_json(&tokenizer_json(json!(["a b", "Ġ ab"]))).unwrap();
        assert_eq!(pairs.merges_txt(), b"#version: 0.2\na b\n\xc4\xa0 ab\n");
        assert_eq!(strings.merges_txt(), pairs.merges_txt());
        assert_eq!(pairs.vocab.len(), 6);
        assert_eq!(pairs.special_id(EOT_TOKEN), Some(0));
    }

    #[test]
    fn what_merges_txt_cannot_hold_is_refused() {
        for merges in [json!(["ab"]), json!([["a", "b", "c"]]), json!([["a b", "c"]]), json!([1])] {
            let err = HfTokenizer::from_json(&tokenizer_json(merges.clone())).err().unwrap();
            assert!(err.to_string().contains("merge 0"), "{merges}: {err}");
        }
        let unigram = json!({"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "Unigram", "vocab": []}});
        let err = HfTokenizer::from_json(&serde_json::to_vec(&unigram).unwrap()).err().unwrap();
        assert!(err.to_string().contains("Unigram"), "{err}");
    }
}
