//! Evaluator: turns a committed checkpoint and its validation loss into evaluation results.
//!
//! The validation loss itself is computed where the data is, sharded over the workers (the
//! core asks every rank for its share at each checkpoint step, so the model evaluated is the
//! one the checkpoint holds). The Evaluator adds what needs the model file: it loads the
//! checkpoint, continues the config's fixed prompts greedily, and writes `eval.json` next to
//! the checkpoint — on a blocking thread, so the coordinator's mailbox never waits on it.

use super::coordinator::CoordinatorMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::path::PathBuf;
use troupe_common::checkpoint;
use troupe_common::model::Sampling;
use troupe_common::registry::{EvalResults, Sample, EVAL_FILE};

pub struct Evaluator;

pub struct EvaluatorArgs {
    pub prompts: Vec<String>,
    pub sample_tokens: usize,
    pub coordinator: ActorRef<CoordinatorMsg>,
    /// The step of the job being handled (`super::IDLE` between jobs): after a crash, the
    /// supervisor knows which job it was.
    pub current: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// One checkpoint to evaluate.
#[derive(Debug, Clone)]
pub struct EvalJob {
    pub step: u64,
    pub checkpoint: PathBuf,
    pub val_loss: f64,
    pub sequences: u64,
}

pub enum EvaluatorMsg {
    Evaluate(EvalJob),
}

impl Actor for Evaluator {
    type Msg = EvaluatorMsg;
    type State = EvaluatorArgs;
    type Arguments = EvaluatorArgs;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, args: EvaluatorArgs) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let EvaluatorMsg::Evaluate(job) = msg;
        state.current.store(job.step, std::sync::atomic::Ordering::SeqCst);
        // Test hook: the Evaluator crashes on its first N jobs, however often restarted.
        static CRASHES: troupe_common::fault::FaultCount = troupe_common::fault::FaultCount::new("TROUPE_FAULT_EVALUATOR_CRASHES");
        if CRASHES.fires() {
            panic!("fault injection: the Evaluator crashes on the checkpoint of step {}", job.step);
        }
        let prompts = state.prompts.clone();
        let sample_tokens = state.sample_tokens;
        let for_thread = job.clone();
        let result = tokio::task::spawn_blocking(move || evaluate(&for_thread, &prompts, sample_tokens)).await?;
        let msg = match result {
            Ok(results) => CoordinatorMsg::Evaluated { job, results },
            Err(e) => CoordinatorMsg::EvaluationFailed { step: job.step, error: format!("{e:#}") },
        };
        state.coordinator.cast(msg)?;
        state.current.store(super::IDLE, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

fn evaluate(job: &EvalJob, prompts: &[String], sample_tokens: usize) -> anyhow::Result<EvalResults> {
    // A checkpoint whose loss is not finite is never recorded as evaluated, so it can be
    // neither the best one retention keeps nor a version the Deployer publishes.
    anyhow::ensure!(
        job.val_loss.is_finite(),
        "its validation loss is {}: not recorded and not published (see the run's skipped steps)",
        job.val_loss
    );
    let mut samples = Vec::new();
    if sample_tokens > 0 && !prompts.is_empty() {
        let (model, tokenizer) = troupe_common::model::load_for_inference(&job.checkpoint, tch::Device::Cpu)?;
        for prompt in prompts {
            let ids: Vec<i64> = tokenizer.encode(prompt)?.into_iter().map(i64::from).collect();
            let mut context = ids;
            context.truncate(model.config().block_size);
            if context.is_empty() {
                continue;
            }
            let text = troupe_common::model::continuation(&model, &tokenizer, &context, sample_tokens, Sampling::greedy(), 0)?;
            samples.push(Sample { prompt: prompt.clone(), text });
        }
    }
    let results = EvalResults { step: job.step, val_loss: job.val_loss, perplexity: job.val_loss.exp(), sequences: job.sequences, samples };
    let bytes = serde_json::to_vec_pretty(&results)?;
    checkpoint::write_atomic(&job.checkpoint.join(EVAL_FILE), &bytes)?;
    Ok(results)
}
