//! Unit tests of the model module: tiny configs, CPU, a few seconds in all.

use super::rng::Rng;
use super::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};
use troupe_core::config::{Config, TrainConfig};

fn tiny() -> GptConfig {
    GptConfig { vocab_size: 64, block_size: 16, n_layer: 2, n_head: 4, n_embd: 32, dropout: 0.0, bias: true }
}

fn train_config() -> TrainConfig {
    let mut t = Config::default_config().train;
    t.steps = 100;
    t.warmup_steps = 10;
    t.learning_rate = 1e-2;
    t.min_learning_rate = 1e-3;
    t.weight_decay = 0.1;
    t.beta1 = 0.9;
    t.beta2 = 0.99;
    t.eps = 1e-8;
    t
}

/// Random token batch (inputs, next-token targets) of shape [b, t].
fn batch(seed: u64, b: usize, t: usize, vocab: usize) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let toks: Vec<i64> = (0..b * (t + 1)).map(|_| (rng.next_u64() % vocab as u64) as i64).collect();
    let all = Tensor::from_slice(&toks).view([b as i64, t as i64 + 1]);
    (all.narrow(1, 0, t as i64), all.narrow(1, 1, t as i64))
}

fn tmp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("troupe-model-test-{}-{name}", std::process::id()))
}

fn same_params(a: &Gpt, b: &Gpt) -> bool {
    a.parameters().iter().zip(b.parameters()).all(|((na, ta), (nb, tb))| *na == nb && ta.equal(&tb))
}

fn snapshot(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(|p| p.detach().copy()).collect()
}

fn backward(model: &Gpt, x: &Tensor, y: &Tensor) -> f64 {
    let loss = model.loss(x, y, true);
    loss.backward();
    loss.double_value(&[])
}

#[test]
fn init_is_deterministic_for_a_seed_and_follows_gpt2() {
    let a = Gpt::new(&tiny(), Device::Cpu, 7).unwrap();
    let b = Gpt::new(&tiny(), Device::Cpu, 7).unwrap();
    let c = Gpt::new(&tiny(), Device::Cpu, 8).unwrap();
    assert!(same_params(&a, &b));
    assert!(!same_params(&a, &c));
    assert_eq!(a.to_safetensors_bytes().unwrap(), b.to_safetensors_bytes().unwrap());

    let p: HashMap<String, Tensor> = a.parameters().into_iter().collect();
    let std = |n: &str| p[n].std(false).double_value(&[]);
    assert!((std("transformer.wte.weight") - 0.02).abs() < 0.002);
    assert!((std("transformer.h.0.attn.c_attn.weight") - 0.02).abs() < 0.002);
    let resid = 0.02 / (4f64).sqrt();
    assert!((std("transformer.h.1.mlp.c_proj.weight") - resid).abs() < 0.1 * resid);
    assert!((std("transformer.h.1.attn.c_proj.weight") - resid).abs() < 0.15 * resid);
    assert_eq!(p["transformer.h.0.attn.c_attn.bias"].abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert!(p["transformer.ln_f.weight"].equal(&Tensor::ones([32], (Kind::Float, Device::Cpu))));
    assert!(p.values().all(|t| t.requires_grad()));
}

#[test]
fn names_and_shapes_match_hugging_face_gpt2() {
    let cfg = tiny();
    let model = Gpt::new(&cfg, Device::Cpu, 1).unwrap();
    let (v, t, c) = (64usize, 16usize, 32usize);
    let mut expected: Vec<(String, Vec<usize>)> =
        vec![("transformer.wte.weight".into(), vec![v, c]), ("transformer.wpe.weight".into(), vec![t, c])];
    for i in 0..2 {
        let h = format!("transformer.h.{i}");
        for (name, shape) in [
            ("ln_1.weight", vec![c]),
            ("ln_1.bias", vec![c]),
            ("attn.c_attn.weight", vec![c, 3 * c]),
            ("attn.c_attn.bias", vec![3 * c]),
            ("attn.c_proj.weight", vec![c, c]),
            ("attn.c_proj.bias", vec![c]),
            ("ln_2.weight", vec![c]),
            ("ln_2.bias", vec![c]),
            ("mlp.c_fc.weight", vec![c, 4 * c]),
            ("mlp.c_fc.bias", vec![4 * c]),
            ("mlp.c_proj.weight", vec![4 * c, c]),
            ("mlp.c_proj.bias", vec![c]),
        ] {
            expected.push((format!("{h}.{name}"), shape));
        }
    }
    expected.push(("transformer.ln_f.weight".into(), vec![c]));
    expected.push(("transformer.ln_f.bias".into(), vec![c]));

    assert_eq!(model.file_layout(), expected);
    let names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(model.parameter_names(), names);
    assert_eq!(model.num_params(), expected.iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>());
    // Inside, linear weights are tch's [out, in].
    let params: HashMap<String, Tensor> = model.parameters().into_iter().collect();
    assert_eq!(params["transformer.h.0.attn.c_attn.weight"].size(), [3 * c as i64, c as i64]);

    // In the file they are Hugging Face's Conv1D [in, out]: the transpose, same values.
    let bytes = model.to_safetensors_bytes().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut file_names: Vec<String> = st.names().iter().map(|s| s.to_string()).collect();
    file_names.sort();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(file_names, sorted, "no lm_head.weight: the head is tied to wte");
    for (name, shape) in &expected {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), Dtype::F32);
        assert_eq!(view.shape(), shape.as_slice(), "{name}");
    }
    let w = io::f32_tensor(&st.tensor("transformer.h.1.mlp.c_fc.weight").unwrap()).unwrap();
    assert!(w.equal(&params["transformer.h.1.mlp.c_fc.weight"].detach().tr()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    assert_eq!(cfg.to_hf_config()["activation_function"], "gelu_new");
}

#[test]
fn no_bias_config_has_no_bias_tensors() {
    let cfg = GptConfig { bias: false, ..tiny() };
    let model = Gpt::new(&cfg, Device::Cpu, 1).unwrap();
    assert!(model.parameter_names().iter().all(|n| !n.ends_with(".bias")));
    assert_eq!(model.parameter_names().len(), 2 + 2 * 6 + 1);
    let (x, y) = batch(1, 2, 16, 64);
    assert!(model.loss(&x, &y, false).double_value(&[]).is_finite());
}

#[test]
fn invalid_config_is_an_error() {
    let bad = GptConfig { n_head: 5, ..tiny() };
    let err = Gpt::new(&bad, Device::Cpu, 1).err().unwrap().to_string();
    assert!(err.contains("n_embd = 32 must be a multiple of n_head = 5"), "{err}");
    assert!(Gpt::new(&GptConfig { vocab_size: 0, ..tiny() }, Device::Cpu, 1).is_err());
}

#[test]
fn save_load_round_trip_is_bit_exact() {
    let a = Gpt::new(&tiny(), Device::Cpu, 3).unwrap();
    let mut b = Gpt::new(&tiny(), Device::Cpu, 4).unwrap();
    let path = tmp_path("roundtrip.safetensors");
    a.save_safetensors(&path).unwrap();
    b.load_safetensors(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert!(same_params(&a, &b));
    let (x, _) = batch(5, 2, 16, 64);
    assert!(a.forward(&x, false).equal(&b.forward(&x, false)));
    assert_eq!(a.to_safetensors_bytes().unwrap(), b.to_safetensors_bytes().unwrap());
}

/// Rewrites a model file through `edit` (name -> (dtype, shape, bytes)).
fn edited_file(model: &Gpt, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> Vec<u8> {
    let bytes = model.to_safetensors_bytes().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut entries);
    let views: Vec<(String, TensorView<'_>)> =
        entries.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn bad_model_files_give_clear_errors_and_change_nothing() {
    let source = Gpt::new(&tiny(), Device::Cpu, 1).unwrap();
    let mut target = Gpt::new(&tiny(), Device::Cpu, 2).unwrap();
    let before = target.to_safetensors_bytes().unwrap();
    let name = "transformer.h.1.attn.c_proj.weight";
    let mut load = |bytes: &[u8]| target.load_safetensors_bytes(bytes, "test.safetensors").unwrap_err();

    let missing = edited_file(&source, |e| e.retain(|t| t.0 != name));
    let err = load(&missing);
    assert!(matches!(&err, ModelError::MissingTensor { name: n, .. } if n == name), "{err}");
    assert!(err.to_string().contains("test.safetensors: missing tensor `transformer.h.1.attn.c_proj.weight`"));

    let renamed =
        edited_file(&source, |e| e.iter_mut().filter(|t| t.0 == name).for_each(|t| t.0 = "transformer.h.1.attn.out.weight".into()));
    let msg = load(&renamed).to_string();
    assert!(msg.contains("missing tensor `transformer.h.1.attn.c_proj.weight`"), "{msg}");
    assert!(msg.contains("unexpected tensors: transformer.h.1.attn.out.weight"), "{msg}");

    let extra = edited_file(&source, |e| e.push(("lm_head.weight".into(), Dtype::F32, vec![1], vec![0; 4])));
    let err = load(&extra);
    assert!(matches!(&err, ModelError::UnexpectedTensor { name, .. } if name == "lm_head.weight"), "{err}");

    // A weight in tch's [out, in] layout instead of Conv1D's [in, out].
    let c_fc = "transformer.h.0.mlp.c_fc.weight";
    let wrong_shape = edited_file(&source, |e| e.iter_mut().filter(|t| t.0 == c_fc).for_each(|t| t.2.reverse()));
    let msg = load(&wrong_shape).to_string();
    assert!(msg.contains("`transformer.h.0.mlp.c_fc.weight` has shape [128, 32], expected [32, 128]"), "{msg}");

    let wrong_dtype = edited_file(&source, |e| {
        for t in e.iter_mut().filter(|t| t.0 == "transformer.ln_f.bias") {
            t.1 = Dtype::F16;
            t.3.truncate(t.3.len() / 2);
        }
    });
    let msg = load(&wrong_dtype).to_string();
    assert!(msg.contains("`transformer.ln_f.bias` has dtype F16, expected F32"), "{msg}");

    assert!(matches!(load(b"not a safetensors file"), ModelError::Format { .. }));
    let truncated = source.to_safetensors_bytes().unwrap();
    assert!(matches!(load(&truncated[..truncated.len() - 10]), ModelError::Format { .. }));

    let other = Gpt::new(&GptConfig { n_embd: 48, ..tiny() }, Device::Cpu, 1).unwrap();
    assert!(matches!(load(&other.to_safetensors_bytes().unwrap()), ModelError::WrongShape { .. }));

    let err = target.load_safetensors(tmp_path("does-not-exist")).unwrap_err().to_string();
    assert!(err.starts_with("cannot read ") && err.contains("does-not-exist"), "{err}");
    assert_eq!(target.to_safetensors_bytes().unwrap(), before, "failed loads must not touch the model");
}

#[test]
fn loss_at_init_is_about_ln_vocab() {
    let model = Gpt::new(&tiny(), Device::Cpu, 11).unwrap();
    let (x, y) = batch(12, 8, 16, 64);
    let logits = model.forward(&x, false);
    assert_eq!(logits.size(), [8, 16, 64]);
    let loss = model.loss(&x, &y, false).double_value(&[]);
    assert!((loss - (64f64).ln()).abs() < 0.1, "loss {loss} vs ln 64 = {}", (64f64).ln());
}

#[test]
fn adamw_overfits_one_batch() {
    let model = Gpt::new(&tiny(), Device::Cpu, 5).unwrap();
    let params = model.parameter_tensors();
    let mut opt = AdamW::new(&params, &train_config());
    let (x, y) = batch(6, 4, 16, 64);
    let mut first = 0.0;
    let mut last = 0.0;
    for step in 0..200 {
        zero_grads(&params);
        last = backward(&model, &x, &y);
        if step == 0 {
            first = last;
        }
        clip_grad_norm(&params, 1.0);
        opt.step(&params, 3e-3);
    }
    assert_eq!(opt.step_count(), 200);
    assert!(last < first / 20.0, "loss went from {first} to {last}");
}

#[test]
fn adamw_update_matches_the_formula() {
    // One step from zero state: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
    let w = Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2]).set_requires_grad(true);
    let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
    let params = [w.shallow_clone(), b.shallow_clone()];
    set_flat_grads(&params, &[0.5, -4.0, 2.0]).unwrap();
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::with_decay(&params, cfg, vec![true, false]);
    opt.step(&params, 0.01);
    let w_after: Vec<f32> = Vec::try_from(w.detach().view([-1])).unwrap();
    let b_after = b.double_value(&[0]);
    let decayed = 1.0 - 0.01 * 0.1;
    assert!((w_after[0] as f64 - (1.0 * decayed - 0.01)).abs() < 1e-6, "{w_after:?}");
    assert!((w_after[1] as f64 - (-2.0 * decayed + 0.01)).abs() < 1e-6, "{w_after:?}");
    assert!((b_after - (0.5 - 0.01)).abs() < 1e-6, "{b_after}");
}

#[test]
fn weight_decay_skips_biases_and_layer_norms() {
    let model = Gpt::new(&tiny(), Device::Cpu, 9).unwrap();
    let params = model.parameter_tensors();
    // Zero gradients: the Adam part of the update is exactly 0, only decay moves weights.
    set_flat_grads(&params, &vec![0.0; total_numel(&params)]).unwrap();
    let mut train = train_config();
    train.weight_decay = 0.5;
    let mut opt = AdamW::new(&params, &train);
    let before = snapshot(&params);
    opt.step(&params, 0.1);
    for ((name, p), old) in model.parameters().iter().zip(&before) {
        if p.dim() >= 2 {
            assert!(p.detach().equal(&(old * (1.0 - 0.1 * 0.5))), "{name} should be decayed");
        } else {
            assert!(p.detach().equal(old), "{name} must not be decayed");
            assert!(name.ends_with(".bias") || name.contains(".ln_"), "{name}");
        }
    }
    assert_eq!(opt.decays().iter().filter(|&&d| d).count(), 2 + 2 * 4);
}

#[test]
fn adamw_state_round_trip_then_step_is_bit_identical() {
    let train = train_config();
    let model = Gpt::new(&tiny(), Device::Cpu, 21).unwrap();
    let params = model.parameter_tensors();
    let names = model.parameter_names();
    let mut opt = AdamW::new(&params, &train);
    for i in 0..3 {
        zero_grads(&params);
        let (x, y) = batch(100 + i, 2, 16, 64);
        backward(&model, &x, &y);
        opt.step(&params, lr_at(i, &train).max(1e-3));
    }
    let model_path = tmp_path("resume-model.safetensors");
    let opt_path = tmp_path("resume-optim.safetensors");
    model.save_safetensors(&model_path).unwrap();
    opt.save_safetensors(&opt_path, &names).unwrap();

    zero_grads(&params);
    let (x, y) = batch(200, 2, 16, 64);
    backward(&model, &x, &y);
    let grads = flat_grads(&params);
    opt.step(&params, 5e-3);

    let mut resumed = Gpt::new(&tiny(), Device::Cpu, 99).unwrap();
    resumed.load_safetensors(&model_path).unwrap();
    let params2 = resumed.parameter_tensors();
    let mut opt2 = AdamW::new(&params2, &train);
    opt2.load_safetensors(&opt_path, &names).unwrap();
    assert_eq!(opt2.step_count(), 3);
    set_flat_grads(&params2, &grads).unwrap();
    opt2.step(&params2, 5e-3);
    assert!(same_params(&model, &resumed));
    for ((n1, t1), (n2, t2)) in opt.state_tensors(&names).iter().zip(opt2.state_tensors(&names)) {
        assert_eq!(*n1, n2);
        assert!(t1.equal(&t2), "{n1}");
    }

    // Errors: wrong names, a state file of another model, a missing file.
    let st_bytes = std::fs::read(&opt_path).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    assert!(st.names().contains(&"exp_avg.transformer.wte.weight"));
    assert!(st.names().contains(&"exp_avg_sq.transformer.ln_f.bias"));
    assert_eq!(st.tensor("step").unwrap().dtype(), Dtype::I64);
    let err = opt2.load_safetensors(&opt_path, &names[1..]).unwrap_err();
    assert!(matches!(err, ModelError::LengthMismatch { .. }), "{err}");
    let other = Gpt::new(&GptConfig { vocab_size: 80, ..tiny() }, Device::Cpu, 1).unwrap();
    let mut other_opt = AdamW::new(&other.parameter_tensors(), &train);
    let msg = other_opt.load_safetensors(&opt_path, &other.parameter_names()).unwrap_err().to_string();
    assert!(msg.contains("`exp_avg.transformer.wte.weight` has shape [64, 32], expected [80, 32]"), "{msg}");
    assert_eq!(other_opt.step_count(), 0);
    let mut renamed = names.clone();
    renamed[0] = "wte".into();
    let msg = opt2.load_safetensors(&opt_path, &renamed).unwrap_err().to_string();
    assert!(msg.contains("missing tensor `exp_avg.wte`"), "{msg}");
    std::fs::remove_file(&model_path).ok();
    std::fs::remove_file(&opt_path).ok();
}

#[test]
fn gradient_of_a_batch_is_the_mean_of_half_batch_gradients() {
    let model = Gpt::new(&tiny(), Device::Cpu, 31).unwrap();
    let params = model.parameter_tensors();
    let (x, y) = batch(32, 8, 16, 64);
    zero_grads(&params);
    backward(&model, &x, &y);
    let full = flat_grads(&params);

    zero_grads(&params);
    for half in 0..2 {
        let (xs, ys) = (x.narrow(0, 4 * half, 4), y.narrow(0, 4 * half, 4));
        (model.loss(&xs, &ys, true) * 0.5).backward(); // accumulates into .grad
    }
    let accumulated = flat_grads(&params);
    let max_diff = full.iter().zip(&accumulated).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-5, "max difference {max_diff}");
    assert!(full.iter().any(|&g| g.abs() > 1e-4));
}

#[test]
fn flat_grads_round_trip_and_length_check() {
    let model = Gpt::new(&tiny(), Device::Cpu, 41).unwrap();
    let params = model.parameter_tensors();
    // No backward yet: every gradient is missing and counts as zeros.
    let zeros = flat_grads(&params);
    assert_eq!(zeros.len(), model.num_params());
    assert!(zeros.iter().all(|&g| g == 0.0));

    let (x, y) = batch(42, 2, 16, 64);
    backward(&model, &x, &y);
    let flat = flat_grads(&params);

    // Into a fresh model whose gradients do not exist yet.
    let fresh = Gpt::new(&tiny(), Device::Cpu, 41).unwrap();
    let fresh_params = fresh.parameter_tensors();
    set_flat_grads(&fresh_params, &flat).unwrap();
    assert_eq!(flat_grads(&fresh_params), flat);
    let pairs = params.iter().zip(&fresh_params);
    assert!(pairs.into_iter().all(|(a, b)| a.grad().equal(&b.grad())));

    let err = set_flat_grads(&fresh_params, &flat[1..]).unwrap_err().to_string();
    assert_eq!(err, format!("flat gradient: expected {} values, got {}", flat.len(), flat.len() - 1));
    zero_grads(&fresh_params);
    assert!(flat_grads(&fresh_params).iter().all(|&g| g == 0.0));
}

#[test]
fn clip_grad_norm_returns_the_norm_before_clipping() {
    let model = Gpt::new(&tiny(), Device::Cpu, 51).unwrap();
    let params = model.parameter_tensors();
    let n = total_numel(&params);
    let flat: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
    set_flat_grads(&params, &flat).unwrap();
    let expected = 0.5 * (n as f64).sqrt();
    assert!((grad_norm(&params) - expected).abs() < 1e-9 * expected);

    // Below the threshold, or disabled: untouched.
    assert!((clip_grad_norm(&params, expected * 2.0) - expected).abs() < 1e-9 * expected);
    assert!((clip_grad_norm(&params, 0.0) - expected).abs() < 1e-9 * expected);
    assert_eq!(flat_grads(&params), flat);

    let before = clip_grad_norm(&params, 1.0);
    assert!((before - expected).abs() < 1e-9 * expected);
    let after = grad_norm(&params);
    assert!((after - 1.0).abs() < 1e-5, "norm after clipping {after}");
}

#[test]
fn clipping_the_flat_gradient_matches_clipping_the_tensors_bit_for_bit() {
    let model = Gpt::new(&tiny(), Device::Cpu, 52).unwrap();
    let params = model.parameter_tensors();
    let (x, y) = batch(53, 2, 16, 64);
    backward(&model, &x, &y);
    let flat = flat_grads(&params);
    let norm = grad_norm(&params);
    for max_norm in [0.0, norm * 2.0, norm / 3.0] {
        let mut clipped = flat.clone();
        let from_flat = clip_flat_grads(&params, &mut clipped, max_norm).unwrap();
        set_flat_grads(&params, &flat).unwrap();
        let from_tensors = clip_grad_norm(&params, max_norm);
        assert_eq!(from_flat.to_bits(), from_tensors.to_bits(), "the same norm at max_norm {max_norm}");
        assert_eq!(flat_grads(&params), clipped, "the same clipped values at max_norm {max_norm}");
    }
    let err = clip_flat_grads(&params, &mut flat.clone()[1..], 1.0).unwrap_err().to_string();
    assert!(err.starts_with("flat gradient: expected"), "{err}");
}

#[test]
fn lr_schedule_endpoints() {
    let t = train_config(); // 100 steps, 10 warmup, 1e-2 -> 1e-3
    assert!((lr_at(0, &t) - 1e-2 / 11.0).abs() < 1e-15, "the first warmup step already learns");
    assert!((lr_at(5, &t) - 6e-2 / 11.0).abs() < 1e-15);
    assert_eq!(lr_at(10, &t), 1e-2);
    let mid = lr_at(55, &t); // halfway through the decay: the mean of max and min
    assert!((mid - 5.5e-3).abs() < 1e-12, "{mid}");
    assert!((lr_at(99, &t) - 1e-3).abs() < 1e-5);
    assert_eq!(lr_at(100, &t), 1e-3);
    assert_eq!(lr_at(10_000, &t), 1e-3);
    let lrs: Vec<f64> = (10..=100).map(|s| lr_at(s, &t)).collect();
    assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "decay must be monotone");
    let no_warmup = TrainConfig { warmup_steps: 0, ..t.clone() };
    assert_eq!(lr_at(0, &no_warmup), 1e-2);
    let all_warmup = TrainConfig { warmup_steps: 100, ..t };
    assert!((lr_at(50, &all_warmup) - 1e-2 * 51.0 / 101.0).abs() < 1e-15);
    assert_eq!(lr_at(100, &all_warmup), 1e-3);
}

#[test]
fn generate_is_deterministic_and_respects_max_new_tokens() {
    let model = Gpt::new(&tiny(), Device::Cpu, 61).unwrap();
    let prompt = [1i64, 2, 3];
    let a = model.generate(&prompt, 20, 1.0, Some(10), 7).unwrap();
    let b = model.generate(&prompt, 20, 1.0, Some(10), 7).unwrap();
    let c = model.generate(&prompt, 20, 1.0, None, 8).unwrap();
    assert_eq!(a.len(), 20);
    assert_eq!(a, b);
    assert_ne!(a, c, "different seeds should give different samples");
    assert!(a.iter().chain(&c).all(|&t| (0..64).contains(&t)));
    // Greedy ignores the seed; a prompt longer than the context is cropped.
    let long: Vec<i64> = (0..40).map(|i| i % 64).collect();
    let g1 = model.generate(&long, 5, 0.0, None, 1).unwrap();
    let g2 = model.generate(&long, 5, 0.0, None, 2).unwrap();
    assert_eq!(g1, g2);
    assert_eq!(g1, model.generate(&long[24..], 5, 0.0, None, 3).unwrap());
    // top_k = 1 is greedy too.
    assert_eq!(model.generate(&long, 5, 0.8, Some(1), 4).unwrap(), g1);
    assert!(model.generate(&prompt, 0, 1.0, None, 1).unwrap().is_empty());
    // User mistakes are errors.
    assert!(model.generate(&[], 5, 1.0, None, 1).is_err());
    assert!(model.generate(&[64], 5, 1.0, None, 1).is_err());
    assert!(model.generate(&[-1], 5, 1.0, None, 1).is_err());
    assert!(model.generate(&prompt, 5, -1.0, None, 1).is_err());
    assert!(model.generate(&prompt, 5, f64::NAN, None, 1).is_err());
}

#[test]
fn dropout_only_in_training() {
    let model = Gpt::new(&GptConfig { dropout: 0.5, ..tiny() }, Device::Cpu, 71).unwrap();
    let (x, _) = batch(72, 2, 16, 64);
    assert!(model.forward(&x, false).equal(&model.forward(&x, false)));
    assert!(!model.forward(&x, true).equal(&model.forward(&x, true)));
}

#[test]
fn model_and_optimizer_can_move_to_the_trainer_thread() {
    fn is_send<T: Send>() {}
    is_send::<Gpt>();
    is_send::<AdamW>();
    let model = Gpt::new(&tiny(), Device::Cpu, 1).unwrap();
    let n = std::thread::spawn(move || model.num_params()).join().unwrap();
    assert_eq!(n, Gpt::new(&tiny(), Device::Cpu, 1).unwrap().num_params());
}

/// The KV cache gives the logits a full recomputation gives, for several sequences of
/// different lengths decoded together, including after a slot is refilled.
#[test]
fn kv_cache_decoding_matches_recomputing_the_whole_context() {
    let cfg = tiny();
    let model = Gpt::new(&cfg, Device::Cpu, 5).unwrap();
    let mut cache = model.kv_cache(3).unwrap();
    let vocab = cfg.vocab_size as i64;
    let mut contexts: Vec<Vec<i64>> = vec![vec![1, 2, 3], vec![4], vec![5, 6, 7, 8, 9]];
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    for (slot, c) in contexts.iter().enumerate() {
        let cached = model.prefill(&mut cache, slot, c).unwrap();
        let full = model.next_token_logits(&[c.as_slice()]).unwrap();
        assert!(max_diff(&cached, &full[0]) < 1e-4, "prefill of slot {slot}");
    }
    // Decode until the longest sequence fills the context, all three in one batch.
    let mut step = 0i64;
    while contexts.iter().all(|c| c.len() < cfg.block_size) {
        let tokens: Vec<i64> = contexts.iter().enumerate().map(|(i, _)| (step * 7 + i as i64 * 3) % vocab).collect();
        for (c, t) in contexts.iter_mut().zip(&tokens) {
            c.push(*t);
        }
        let cached = model.decode(&mut cache, &[0, 1, 2], &tokens).unwrap();
        let views: Vec<&[i64]> = contexts.iter().map(|c| c.as_slice()).collect();
        let full = model.next_token_logits(&views).unwrap();
        for i in 0..3 {
            assert!(max_diff(&cached[i], &full[i]) < 1e-4, "step {step}, sequence {i}: {}", max_diff(&cached[i], &full[i]));
        }
        step += 1;
    }
    // A full slot refuses another position; a refill starts it over.
    let full_slot = contexts.iter().position(|c| c.len() == cfg.block_size).unwrap();
    assert!(model.decode(&mut cache, &[full_slot], &[1]).is_err());
    let fresh = vec![3, 1, 4];
    let cached = model.prefill(&mut cache, full_slot, &fresh).unwrap();
    assert!(max_diff(&cached, &model.next_token_logits(&[fresh.as_slice()]).unwrap()[0]) < 1e-4);
    assert_eq!(cache.filled(full_slot), 3);
    assert!(model.decode(&mut cache, &[0], &[vocab]).is_err(), "a token outside the vocabulary is an error");
}

/// The loss mask of chat data is honoured: two streams that differ only in targets the mask
/// leaves out give the same batch and the same gradients; a difference in a trained target
/// changes them.
#[test]
fn targets_outside_the_loss_mask_do_not_reach_the_gradients() {
    use crate::data::{load_batch, TokenDtype, TokenFile};
    let dir = crate::data::corpus::tests::scratch_dir("loss-mask");
    let cfg = tiny();
    let block = cfg.block_size;
    let write = |name: &str, ids: &[u32]| {
        let mut bytes = Vec::new();
        for &id in ids {
            TokenDtype::U16.push(id, &mut bytes);
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    // Two samples; the mask trains positions 5..12 of each window and nothing else.
    let n = 2 * block + 1;
    let base: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 64).collect();
    let mask: Vec<u32> = (0..n).map(|i| u32::from((5..12).contains(&(i % block)))).collect();
    // Sample 1's window ends at 2·block: a token that is only a target there, and not trained.
    assert_eq!(mask[2 * block], 0);
    let mut outside = base.clone();
    outside[2 * block] = (outside[2 * block] + 1) % 64;
    let mut inside = base.clone();
    inside[block + 6] = (inside[block + 6] + 1) % 64;
    let stream = |ids: &[u32], name: &str| {
        TokenFile::open(&write(name, ids)).unwrap().with_mask(TokenFile::open(&write(&format!("{name}-mask"), &mask)).unwrap()).unwrap()
    };
    let grads = |tokens: &TokenFile| -> (Vec<i64>, Vec<f32>) {
        let (x, y) = load_batch(tokens, block, &[0, 1]).unwrap();
        let model = Gpt::new(&cfg, Device::Cpu, 11).unwrap();
        let xs = Tensor::from_slice(&x).view([2, block as i64]);
        let ys = Tensor::from_slice(&y).view([2, block as i64]);
        model.loss(&xs, &ys, false).backward();
        (y, crate::model::flat_grads(&model.parameter_tensors()))
    };
    let (y_base, g_base) = grads(&stream(&base, "base"));
    assert!(y_base.iter().filter(|&&t| t >= 0).count() == 2 * 7 && y_base.contains(&-1), "{y_base:?}");
    let (_, g_outside) = grads(&stream(&outside, "outside"));
    assert!(g_base == g_outside, "a masked-out target changed the gradients");
    let (_, g_inside) = grads(&stream(&inside, "inside"));
    assert!(g_base != g_inside, "a trained target must change the gradients");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fused optimizer (whole-buffer operations over the flat parameters) against the
/// per-parameter one, on the tiny GPT's parameters with random gradients, 20 steps along the
/// learning-rate schedule: with weight decay on the matrices only, on every parameter, on
/// none, and with a weight decay of 0; in one run over the whole buffer, in runs of 1,000
/// elements (boundaries inside parameters), and with the GPU's decay mask. Required within
/// 1e-6; it is in fact bit for bit.
#[test]
fn the_fused_optimizer_matches_the_per_parameter_one() {
    let train = train_config();
    let model = Gpt::new(&tiny(), Device::Cpu, 5).unwrap();
    let shapes: Vec<Vec<i64>> = model.param_shapes();
    let numels = model.param_numels();
    let matrices: Vec<bool> = shapes.iter().map(|s| s.len() >= 2).collect();
    let cases = [
        ("matrices decay", matrices.clone(), 0.1),
        ("every parameter decays", vec![true; shapes.len()], 0.1),
        ("no parameter decays", vec![false; shapes.len()], 0.1),
        ("weight decay 0", matrices, 0.0),
    ];
    let variants = [("one run", None, false), ("runs of 1000", Some(1000), false), ("decay mask", None, true)];
    for ((what, decay, weight_decay), (how, chunk, mask)) in cases.iter().flat_map(|c| variants.iter().map(move |v| (c.clone(), *v))) {
        let what = format!("{what}, {how}");
        let cfg = AdamWConfig { weight_decay, ..AdamWConfig::from_train_config(&train) };
        let params: Vec<Tensor> = model.parameter_tensors().iter().map(|p| p.detach().copy().set_requires_grad(true)).collect();
        let flat = Tensor::from_slice(&flatten(&params));
        let segments = parameter_segments(&numels, &decay);
        let mut per_parameter = AdamW::with_decay(&params, cfg, decay.clone());
        let mut fused = FlatAdamW::new(cfg, flat.numel(), &segments, Device::Cpu);
        if let Some(chunk) = chunk {
            fused.set_chunk(chunk);
        }
        if mask {
            fused.decay_by_mask(&segments);
        }
        let mut rng = Rng::new(77);
        for step in 0..20u64 {
            let grads: Vec<f32> = (0..flat.numel()).map(|_| (rng.next_f64() as f32 - 0.5) * 0.2).collect();
            set_flat_grads(&params, &grads).unwrap();
            let lr = lr_at(step, &train);
            per_parameter.step(&params, lr);
            fused.step(&flat, &Tensor::from_slice(&grads), lr);
        }
        let (a, b) = (flatten(&params), flatten(std::slice::from_ref(&flat)));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let (m, v) = per_parameter.moments();
        let moments_equal = flatten(&m) == flatten(std::slice::from_ref(fused.moments().0))
            && flatten(&v) == flatten(std::slice::from_ref(fused.moments().1));
        println!("{what}: max |fused - per-parameter| after 20 steps {diff:e} (bit for bit: {})", a == b && moments_equal);
        assert!(diff <= 1e-6, "{what}: {diff}");
        assert!(moments_equal, "{what}: the moments differ");
    }
}
