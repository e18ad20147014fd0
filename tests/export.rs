//! `troupe export` with real processes: a tiny model trained by `troupe local`, exported, and
//! loaded by the Hugging Face stack (tests/python/check_hf_export.py): GPT-2's tensor names
//! and shapes with PyPI's `safetensors`, then `GPT2LMHeadModel` and `AutoTokenizer` from
//! `transformers` on torch, whose logits must match troupe's own. The Python packages are
//! installed by scripts/test.sh into the cache (`python-hf-export`, next to the torch package
//! LIBTORCH belongs to); where they do not import the Python half is skipped with a message,
//! except in CI, where it fails.
//!
//! Also: an existing folder is only replaced with --force, a model without biases is refused,
//! and a flipped byte in any file of the checkpoint is refused, naming the file.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Encoded, truncated to the block, and run through both models.
const TEXT: &str = "ROMEO.\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun.";

fn train(dir: &Path, bias: bool, steps: u64) -> PathBuf {
    let data = prepare_small_corpus(dir);
    let config = tiny_config(dir, &data, 1, steps);
    if !bias {
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains("bias = true"));
        std::fs::write(&config, text.replace("bias = true", "bias = false")).unwrap();
    }
    assert_success(&run_local(&config, &[]));
    // The newest complete checkpoint, found the way resume finds it.
    troupe_common::checkpoint::find_resumable(&dir.join("runs/tiny")).unwrap().expect("a complete checkpoint").dir
}

fn export(checkpoint: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = troupe();
    cmd.arg("export").arg("--checkpoint").arg(checkpoint).arg("--out").arg(out).args(extra);
    run(cmd, Duration::from_secs(120))
}

fn assert_refused(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "troupe export should have failed:\n{}\n{err}", stdout(o));
    assert!(!err.contains("panicked"), "an error, not a panic: {err}");
    for n in needles {
        assert!(err.contains(n), "the error names {n:?}: {err}");
    }
}

/// Folder names under `dir` (to see that nothing half-written is left).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn an_export_loads_in_transformers_with_troupes_logits() {
    let dir = scratch("export-hf");
    let ckpt = train(&dir, true, 10);
    let exports = dir.join("exports");
    let out = exports.join("tiny");
    let o = export(&ckpt, &out, &[]);
    assert_success(&o);
    let printed = stdout(&o);
    println!("{printed}");
    let files = [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ];
    assert_eq!(names(&out), files, "the folder holds the Hugging Face files");
    assert_eq!(names(&exports), ["tiny"], "no partial folder left behind");
    for f in files {
        assert!(printed.contains(f), "the summary lists {f}: {printed}");
    }

    // An existing folder is replaced only with --force.
    let refused = export(&ckpt, &out, &[]);
    assert_refused(&refused, &["--force", &out.display().to_string()]);
    assert_success(&export(&ckpt, &out, &["--force"]));
    assert_eq!(names(&exports), ["tiny"]);

    // troupe's own view of the checkpoint: its tokenizer and its logits on the text.
    let (model, tokenizer) = troupe_common::model::load_for_inference(&ckpt, tch::Device::Cpu).unwrap();
    let cfg = model.config().clone();
    assert!(printed.contains(&format!("parameters: {}", model.num_params())), "{printed}");
    let text_ids: Vec<i64> = tokenizer.encode(TEXT).unwrap().into_iter().map(i64::from).collect();
    assert!(text_ids.len() > 8);
    let ids = &text_ids[..text_ids.len().min(cfg.block_size)];
    let logits: Vec<f32> = {
        let _no_grad = tch::no_grad_guard();
        let idx = tch::Tensor::from_slice(ids).view([1, ids.len() as i64]);
        let t = model.forward(&idx, false).to_kind(tch::Kind::Float).contiguous();
        let mut v = vec![0f32; t.numel()];
        let n = v.len();
        t.copy_data(&mut v, n);
        v
    };
    assert_eq!(logits.len(), ids.len() * cfg.vocab_size);

    let config: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["eos_token_id"], tokenizer.eot_id());
    let tok_config: Value = serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tok_config["model_max_length"], cfg.block_size);
    assert_eq!(tok_config["eos_token"], troupe_common::data::EOT_TOKEN);
    let merges = std::fs::read_to_string(out.join("merges.txt")).unwrap();
    assert!(merges.starts_with("#version: 0.2\n") && merges.ends_with('\n'));
    let vocab: Value = serde_json::from_slice(&std::fs::read(out.join("vocab.json")).unwrap()).unwrap();
    assert_eq!(vocab.as_object().unwrap().len(), tokenizer.vocab_size());
    assert_eq!(merges.lines().count() - 1, tokenizer.vocab_size() - 257, "one merge per token beyond the 256 bytes and <|endoftext|>");

    // The Hugging Face side.
    let pythonpath = hf_python_path();
    if !python_importable(&pythonpath, "numpy, safetensors.numpy") {
        skip_or_fail(&format!("the Python half: safetensors does not import from {pythonpath:?} (scripts/test.sh installs it)"));
        return;
    }
    let with_transformers = python_importable(&pythonpath, "torch, transformers");
    if !with_transformers {
        skip_or_fail(&format!(
            "the transformers half: torch and transformers do not import from {pythonpath:?} (scripts/test.sh installs them)"
        ));
    }
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", &pythonpath)
        .arg(root().join("tests/python/check_hf_export.py"))
        .arg(&out)
        .args(["--vocab", &cfg.vocab_size.to_string(), "--block", &cfg.block_size.to_string()])
        .args(["--n-layer", &cfg.n_layer.to_string(), "--n-head", &cfg.n_head.to_string(), "--n-embd", &cfg.n_embd.to_string()])
        .args(["--text", TEXT, "--ids", &serde_json::to_string(ids).unwrap()]);
    if !with_transformers {
        cmd.arg("--no-transformers");
    }
    let o = run(cmd, Duration::from_secs(240));
    assert!(o.status.success(), "check_hf_export.py failed:\n{}\n{}", stdout(&o), stderr(&o));
    let seen: Value = serde_json::from_str(stdout(&o).trim()).expect("the script prints JSON");
    assert_eq!(seen["tensors"], 4 + 12 * cfg.n_layer);
    assert_eq!(seen["parameters"], model.num_params());
    println!("safetensors: {} tensors, {} parameters, GPT-2 names and shapes", seen["tensors"], seen["parameters"]);
    if !with_transformers {
        return;
    }
    let hf = &seen["hf"];
    let as_ids = |v: &Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    assert_eq!(hf["tokenizer_class"], "GPT2TokenizerFast");
    assert_eq!(as_ids(&hf["fast_ids"]), text_ids, "AutoTokenizer (tokenizer.json) encodes as troupe does");
    assert_eq!(as_ids(&hf["slow_ids"]), text_ids, "GPT2Tokenizer (vocab.json + merges.txt) encodes as troupe does");
    assert_eq!(hf["fast_decoded"], TEXT);
    assert_eq!(hf["eos_token"], troupe_common::data::EOT_TOKEN);
    assert_eq!(hf["model_max_length"], cfg.block_size);
    let rows = hf["logits"].as_array().unwrap();
    assert_eq!(rows.len(), ids.len());
    let mut max_diff = 0f64;
    for (t, row) in rows.iter().enumerate() {
        let row = row.as_array().unwrap();
        assert_eq!(row.len(), cfg.vocab_size);
        for (v, x) in row.iter().enumerate() {
            let d = (x.as_f64().unwrap() - f64::from(logits[t * cfg.vocab_size + v])).abs();
            max_diff = max_diff.max(d);
        }
    }
    println!(
        "transformers {} on torch {}: GPT2LMHeadModel logits over {} positions x {} tokens, max abs diff from troupe's {max_diff:e}",
        hf["transformers"],
        hf["torch"],
        ids.len(),
        cfg.vocab_size
    );
    assert!(max_diff < 1e-4, "logits differ by {max_diff}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn export_refuses_corrupted_checkpoints_and_models_without_biases() {
    let dir = scratch("export-refusals");
    let ckpt = train(&dir, false, 5);
    let exports = dir.join("exports");
    std::fs::create_dir_all(&exports).unwrap();

    // A flipped byte in any file the MANIFEST lists is refused before anything is loaded,
    // naming the file (a copy, so the run's own checkpoint stays as it is).
    let copy = dir.join("copy");
    copy_dir(&ckpt, &copy);
    let manifest = troupe_common::checkpoint::verify(&copy).expect("the copy is complete");
    assert!(!manifest.files.is_empty());
    for file in &manifest.files {
        let path = copy.join(&file.name);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let o = export(&copy, &exports.join("corrupt"), &[]);
        assert_refused(&o, &[&file.name, "corrupted"]);
        std::fs::write(&path, original).unwrap();
    }
    assert!(names(&exports).is_empty(), "nothing written: {:?}", names(&exports));
    println!("a flipped byte in each of {} files was refused, naming the file", manifest.files.len());

    // Hugging Face's GPT-2 has biases: a model trained without them is refused, clearly.
    let o = export(&ckpt, &exports.join("nobias"), &[]);
    assert_refused(&o, &["bias = false", "GPT2LMHeadModel"]);
    assert!(names(&exports).is_empty(), "nothing written: {:?}", names(&exports));

    // Neither a missing checkpoint nor an --out that overlaps the checkpoint.
    assert_refused(&export(&dir.join("nowhere"), &exports.join("x"), &[]), &["nowhere"]);
    assert_refused(&export(&ckpt, &ckpt.join("hf"), &["--force"]), &["inside the checkpoint"]);
    assert_refused(&export(&ckpt, &ckpt, &["--force"]), &["overlap"]);
    let _ = std::fs::remove_dir_all(&dir);
}
