//! Importing a Hugging Face GPT-2 folder (`config.json`, `model.safetensors` or its shards,
//! the tokenizer) as a troupe model folder: the inverse of `troupe export`.
//!
//! The model's shape comes from `config.json`; anything GPT-2 allows that troupe's model does
//! not compute the same way (another activation, LayerNorm epsilon, an untied head, a
//! different MLP width) is refused by name rather than imported into something that would
//! give other logits. Weights keep Hugging Face's names and Conv1D layout, which is troupe's
//! file layout already; float16 and bfloat16 files are widened to float32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

use super::gpt::{Gpt, GptConfig};
use super::io::{serialize, RawTensor};

/// What was imported.
#[derive(Debug, Clone)]
pub struct Imported {
    pub config: GptConfig,
    pub parameters: usize,
    /// Where the tokenizer came from: `tokenizer.json`, or `vocab.json` + `merges.txt`.
    pub tokenizer_from: &'static str,
    /// The tensors' dtype in the source files.
    pub source_dtype: String,
}

/// The model shape `config.json` describes, or why troupe cannot compute that model.
pub fn config_from_hf(dir: &Path) -> anyhow::Result<GptConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a Hugging Face model folder: cannot read {}", dir.display(), path.display()))?;
    let c: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let model_type = c.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "gpt2" {
        bail!("{}: model_type {model_type:?}; troupe imports GPT-2 models (model_type \"gpt2\") only", path.display());
    }
    let size = |key: &str| -> anyhow::Result<usize> {
        c.get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .with_context(|| format!("{}: {key} is missing or not a positive integer", path.display()))
    };
    let (n_embd, n_layer, n_head, vocab_size, block_size) =
        (size("n_embd")?, size("n_layer")?, size("n_head")?, size("vocab_size")?, size("n_positions")?);
    let refuse = |what: String| -> anyhow::Result<GptConfig> {
        bail!("{}: {what}; troupe's GPT-2 computes differently and cannot import it", path.display())
    };
    let activation = c.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
    if !["gelu_new", "gelu_pytorch_tanh"].contains(&activation) {
        return refuse(format!("activation_function {activation:?} (troupe uses GPT-2's tanh GELU, \"gelu_new\")"));
    }
    let eps = c.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5);
    if (eps - 1e-5).abs() > 1e-12 {
        return refuse(format!("layer_norm_epsilon {eps} (troupe uses 1e-5)"));
    }
    if c.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
        return refuse("tie_word_embeddings = false (troupe's head is the token embedding)".into());
    }
    if let Some(inner) = c.get("n_inner").and_then(Value::as_u64) {
        if inner as usize != 4 * n_embd {
            return refuse(format!("n_inner {inner} (troupe's MLP is 4 × n_embd = {})", 4 * n_embd));
        }
    }
    if c.get("scale_attn_weights").and_then(Value::as_bool) == Some(false) {
        return refuse("scale_attn_weights = false".into());
    }
    if c.get("scale_attn_by_inverse_layer_idx").and_then(Value::as_bool) == Some(true) {
        return refuse("scale_attn_by_inverse_layer_idx = true".into());
    }
    let dropout = c.get("resid_pdrop").and_then(Value::as_f64).unwrap_or(0.1);
    let config = GptConfig { vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias: true };
    config.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config)
}

/// The safetensors files of the weights: `model.safetensors`, or the shards its index lists.
fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: Value = serde_json::from_slice(&std::fs::read(&index).with_context(|| format!("cannot read {}", index.display()))?)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v.get("weight_map").and_then(Value::as_object).with_context(|| format!("{} has no weight_map", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        if let Some(bad) = files.iter().find(|f| f.contains('/') || f.contains("..")) {
            bail!("{} names a file outside the folder: {bad:?}", index.display());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    if dir.join("pytorch_model.bin").is_file() {
        bail!(
            "{} holds only pytorch_model.bin (a pickle, which troupe does not load); convert it to safetensors first:\n  \
             python -c \"from transformers import GPT2LMHeadModel as M; M.from_pretrained('{0}').save_pretrained('{0}', safe_serialization=True)\"",
            dir.display()
        );
    }
    bail!("{} has no model.safetensors (nor model.safetensors.index.json)", dir.display())
}

/// Little-endian f32 bytes of a tensor stored as f32, f16 or bf16.
fn widen(dtype: Dtype, data: &[u8], origin: &str, name: &str) -> anyhow::Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => data.to_vec(),
        Dtype::BF16 => {
            data.chunks_exact(2).flat_map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16).to_le_bytes()).collect()
        }
        Dtype::F16 => data.chunks_exact(2).flat_map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])).to_le_bytes()).collect(),
        other => bail!("{origin}: tensor {name} is {other:?}; troupe imports float32, float16 or bfloat16 weights"),
    })
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        // Subnormal: normalise the fraction.
        (0, f) => {
            let shift = f.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((f << shift) & 0x3ff) << 13
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// The model in a Hugging Face GPT-2 folder, with Hugging Face's weights.
pub fn load_hf_model(dir: &Path) -> anyhow::Result<(Gpt, String)> {
    let config = config_from_hf(dir)?;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut head: Option<(Vec<usize>, Vec<u8>)> = None;
    let mut dtypes = std::collections::BTreeSet::new();
    for file in weight_files(dir)? {
        let origin = file.display().to_string();
        let bytes = std::fs::read(&file).with_context(|| format!("cannot read {origin}"))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{origin} is not a valid safetensors file: {e}"))?;
        for (name, view) in st.tensors() {
            dtypes.insert(format!("{:?}", view.dtype()));
            // GPT2LMHeadModel saves `transformer.…`, GPT2Model the same names without it.
            let bare = name.strip_prefix("transformer.").unwrap_or(&name);
            // The causal-mask buffers some versions save are not parameters.
            if bare.ends_with(".attn.bias") || bare.ends_with(".attn.masked_bias") {
                continue;
            }
            let value = (view.shape().to_vec(), widen(view.dtype(), view.data(), &origin, &name)?);
            if bare == "lm_head.weight" {
                head = Some(value);
            } else {
                tensors.insert(format!("transformer.{bare}"), value);
            }
        }
    }
    // The head is the token embedding: a saved copy must be exactly that.
    if let (Some(head), Some(wte)) = (&head, tensors.get("transformer.wte.weight")) {
        if head != wte {
            bail!("{}: lm_head.weight differs from transformer.wte.weight; troupe's head is tied to the embedding", dir.display());
        }
    }
    let raw: Vec<(String, RawTensor)> =
        tensors.into_iter().map(|(name, (shape, data))| (name, RawTensor::f32_bytes(shape, data))).collect();
    let bytes = serialize(raw)?;
    let mut model = Gpt::for_loading(&config, tch::Device::Cpu)?;
    model.load_safetensors_bytes(&bytes, &format!("the weights in {}", dir.display()))?;
    Ok((model, dtypes.into_iter().collect::<Vec<_>>().join("+")))
}

/// The tokenizer of a Hugging Face folder as a `tokenizer.json`: the fast tokenizer's file, or
/// one made from the slow tokenizer's `vocab.json` and `merges.txt` (byte-level BPE).
pub fn hf_tokenizer_json(dir: &Path) -> anyhow::Result<(String, &'static str)> {
    let fast = dir.join("tokenizer.json");
    let json = if fast.is_file() {
        (std::fs::read_to_string(&fast).with_context(|| format!("cannot read {}", fast.display()))?, "tokenizer.json")
    } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let bpe = tokenizers::models::bpe::BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| anyhow::anyhow!("{} and {} do not make a BPE tokenizer: {e}", vocab.display(), merges.display()))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        tok.add_special_tokens(&[tokenizers::AddedToken::from(crate::data::EOT_TOKEN, true)]);
        (tok.to_string(false).map_err(|e| anyhow::anyhow!("cannot write the tokenizer: {e}"))?, "vocab.json + merges.txt")
    } else {
        bail!("{} has no tokenizer: neither tokenizer.json nor vocab.json and merges.txt", dir.display());
    };
    crate::data::Tokenizer::from_json(&json.0).map_err(|e| anyhow::anyhow!("the tokenizer of {}: {e}", dir.display()))?;
    Ok(json)
}

/// Reads a Hugging Face GPT-2 folder and writes it to `out` as a troupe model folder
/// (`model.safetensors`, `model.json`, `tokenizer.json`, `source.json`, and a `MANIFEST` with
/// every file's sha256), written aside and renamed into place.
pub fn import_hf(dir: &Path, out: &Path) -> anyhow::Result<Imported> {
    let (model, source_dtype) = load_hf_model(dir)?;
    let (tokenizer, tokenizer_from) = hf_tokenizer_json(dir)?;
    let tok = crate::data::Tokenizer::from_json(&tokenizer)?;
    let config = model.config().clone();
    if tok.vocab_size() > config.vocab_size {
        bail!("{}: the tokenizer has {} tokens, the model's vocab_size is {}", dir.display(), tok.vocab_size(), config.vocab_size);
    }
    let source = serde_json::json!({
        "base_model": format!("hf:{}", dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()).display()),
        "format": "huggingface gpt2",
        "dtype": source_dtype,
    });
    let files: Vec<(&str, Vec<u8>)> = vec![
        (crate::checkpoint::MODEL_FILE, model.to_safetensors_bytes()?),
        (crate::checkpoint::MODEL_CONFIG_FILE, serde_json::to_vec_pretty(&config)?),
        (crate::checkpoint::TOKENIZER_FILE, tokenizer.into_bytes()),
        (SOURCE_FILE, serde_json::to_vec_pretty(&source)?),
    ];
    write_model_folder(out, &files)?;
    Ok(Imported { parameters: model.num_params(), config, tokenizer_from, source_dtype })
}

/// `source.json` of an imported model folder: where it came from.
pub const SOURCE_FILE: &str = "source.json";

/// Writes `files` and a MANIFEST listing them into `<out>.partial-<pid>`, then renames it to
/// `out` (which must not exist or be empty).
fn write_model_folder(out: &Path, files: &[(&str, Vec<u8>)]) -> anyhow::Result<()> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} exists and is not empty; choose another --out or remove it", out.display());
    }
    let name = out.file_name().with_context(|| format!("--out {}: name a folder", out.display()))?.to_string_lossy().into_owned();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let partial = parent.join(format!("{name}.partial-{}", std::process::id()));
    let write = || -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
        let mut digests = Vec::new();
        for (file, bytes) in files {
            let path = partial.join(file);
            crate::checkpoint::write_atomic(&path, bytes)?;
            digests.push(crate::checkpoint::digest_file(&path)?);
        }
        let manifest = serde_json::json!({ "kind": "model", "files": digests });
        crate::checkpoint::write_atomic(&partial.join(crate::checkpoint::MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
        if out.exists() {
            std::fs::remove_dir(out).with_context(|| format!("cannot replace the empty folder {}", out.display()))?;
        }
        std::fs::rename(&partial, out).with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&partial);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_widens_exactly() {
        for (h, f) in
            [(0x3c00u16, 1.0f32), (0xc000, -2.0), (0x0001, 5.960_464_5e-8), (0x7bff, 65504.0), (0x0000, 0.0), (0x3555, 0.333_251_95)]
        {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn what_troupe_cannot_compute_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("troupe-hf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = serde_json::json!({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 32});
        assert!(config_from_hf(&dir).unwrap_err().to_string().contains("not a Hugging Face model folder"));
        for (key, value, says) in [
            ("model_type", serde_json::json!("llama"), "llama"),
            ("activation_function", serde_json::json!("relu"), "relu"),
            ("layer_norm_epsilon", serde_json::json!(1e-6), "layer_norm_epsilon"),
            ("tie_word_embeddings", serde_json::json!(false), "tie_word_embeddings"),
            ("n_inner", serde_json::json!(100), "n_inner"),
            ("n_head", serde_json::json!(5), "multiple of n_head"),
        ] {
            let mut c = base.clone();
            c[key] = value;
            std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
            let err = format!("{:#}", config_from_hf(&dir).unwrap_err());
            assert!(err.contains(says), "{key}: {err}");
        }
        std::fs::write(dir.join("config.json"), base.to_string()).unwrap();
        let c = config_from_hf(&dir).unwrap();
        assert_eq!((c.n_embd, c.n_layer, c.block_size, c.vocab_size, c.bias), (64, 2, 32, 100, true));
        std::fs::write(dir.join("pytorch_model.bin"), b"pickle").unwrap();
        assert!(format!("{:#}", load_hf_model(&dir).err().unwrap()).contains("safe_serialization"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
