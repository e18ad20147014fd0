//! The embedded default `troupe local` learns: its final validation loss ends well below the
//! unigram entropy of the token stream (the loss of the best model that ignores context).

mod common;

use common::*;
use std::time::Duration;
use troupe_core::events::RunEvent;

#[test]
fn the_default_run_beats_the_unigram_baseline_by_far() {
    let dir = scratch("learning");
    // The default config, as a user runs it: data and runs relative to the working folder.
    let mut cmd = troupe();
    cmd.current_dir(&dir).args(["local", "--sample-tokens", "40"]);
    let out = run(cmd, Duration::from_secs(900));
    assert_success(&out);
    let text = stdout(&out);
    assert!(text.contains("over HTTP (POST http://"), "the run ends with a completion from the served model: {text}");

    let meta = troupe_common::data::load_meta(&dir.join("data/shakespeare")).expect("meta.json");
    let events = events(&dir.join("runs/shakespeare"));
    let val_losses: Vec<(u64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Eval { step, val_loss, .. } => Some((*step, *val_loss)),
            _ => None,
        })
        .collect();
    let (last_step, final_val) = *val_losses.last().expect("evaluations ran");
    println!("unigram entropy {:.3} nats; validation loss by step {:?}", meta.unigram_entropy_nats, val_losses);
    assert_eq!(last_step, troupe_core::config::Config::default_config().train.steps);
    assert!(
        final_val < meta.unigram_entropy_nats - 1.0,
        "final validation loss {final_val:.3} is not well below the unigram entropy {:.3}",
        meta.unigram_entropy_nats
    );
    assert!(val_losses.windows(2).all(|w| w[1].1 < w[0].1), "validation loss falls at every evaluation");
}
