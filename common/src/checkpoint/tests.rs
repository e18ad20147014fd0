//! Commit, verify, resume and retention against real folders, torn and corrupted ones included.

use super::*;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("troupe-ckpt-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// A committed checkpoint of a 10-scalar state over `world` ranks, values from `step`.
fn write_step_over(run: &Path, step: u64, world: u32) -> PathBuf {
    let tmp = tmp_dir(run, step, 1);
    fs::create_dir_all(&tmp).unwrap();
    let layout = ShardLayout::new(world, vec![6, 4]);
    let mut files = Vec::new();
    for rank in 0..world {
        let mut shard = ShardSnapshot {
            rank,
            step,
            params: vec![0.0; layout.shard_len()],
            exp_avg: vec![0.0; layout.shard_len()],
            exp_avg_sq: vec![0.0; layout.shard_len()],
        };
        for p in layout.owned(rank) {
            for (k, g) in p.global.clone().enumerate() {
                shard.params[p.local + k] = (step * 100 + g as u64) as f32;
                shard.exp_avg[p.local + k] = -(g as f32);
                shard.exp_avg_sq[p.local + k] = g as f32 * 0.5;
            }
        }
        files.push(write_shard(&tmp, &shard, &|| ()).unwrap());
    }
    let state = TrainState { step, cursor: 0, seed: 1, world_size: world, strategy: "zero1".into(), tokens_seen: 0, vocab_size: 8, layout };
    fs::write(tmp.join(STATE_FILE), serde_json::to_vec(&state).unwrap()).unwrap();
    files.push(digest_file(&tmp.join(STATE_FILE)).unwrap());
    commit(run, step, 1, world, &files).unwrap()
}

fn write_step(run: &Path, step: u64) -> PathBuf {
    write_step_over(run, step, 2)
}

#[test]
fn shards_read_back_any_range_whatever_wrote_them() {
    let run = scratch("reshard");
    for world in [1, 2, 3, 4] {
        let dir = write_step_over(&run, world as u64, world);
        let reader = ShardReader::open(&dir).unwrap();
        let all: Vec<f32> = (0..10).map(|g| (world as u64 * 100 + g) as f32).collect();
        assert_eq!(reader.read_all(ShardPart::Params).unwrap(), all);
        let mut part = vec![0f32; 5];
        reader.read(ShardPart::ExpAvgSq, 3..8, &mut part).unwrap();
        assert_eq!(part, vec![1.5, 2.0, 2.5, 3.0, 3.5]);
        assert!(reader.read(ShardPart::ExpAvg, 8..11, &mut [0.0; 3]).is_err());
    }
    // The files are valid safetensors for other readers too.
    let dir = final_dir(&run, 2);
    let bytes = fs::read(dir.join(shard_file(1))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("params").unwrap().shape(), &[5]);
}

#[test]
fn commit_then_resume_newest() {
    let run = scratch("newest");
    write_step(&run, 10);
    let dest = write_step(&run, 20);
    let point = find_resumable(&run).unwrap().unwrap();
    assert_eq!(point.dir, dest);
    assert_eq!(point.manifest.step, 20);
    assert_eq!(point.manifest.layout, ShardLayout::new(2, vec![6, 4]));
    assert_eq!(point.manifest.strategy, "zero1");
    assert!(point.skipped.is_empty());
}

#[test]
fn corrupted_or_torn_checkpoints_fall_back_and_say_why() {
    let run = scratch("fallback");
    write_step(&run, 10);
    let d20 = write_step(&run, 20);
    let d30 = write_step(&run, 30);
    // One flipped byte inside shard 1's parameters.
    let shard = d30.join(shard_file(1));
    let mut bytes = fs::read(&shard).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0x40;
    fs::write(&shard, bytes).unwrap();
    fs::remove_file(d20.join(shard_file(0))).unwrap(); // missing file
    fs::create_dir_all(final_dir(&run, 40)).unwrap(); // renamed but no MANIFEST
    let point = find_resumable(&run).unwrap().unwrap();
    assert_eq!(point.manifest.step, 10);
    assert_eq!(point.skipped.len(), 3);
    assert!(point.skipped[0].contains("MANIFEST"), "{:?}", point.skipped);
    assert!(point.skipped[1].contains("shard-00001.safetensors is corrupted"), "{:?}", point.skipped);
    assert!(point.skipped[2].contains("shard-00000.safetensors is missing"), "{:?}", point.skipped);
}

#[test]
fn commit_refuses_files_that_differ_from_the_report() {
    let run = scratch("refuse");
    let tmp = tmp_dir(&run, 5, 1);
    fs::create_dir_all(&tmp).unwrap();
    fs::write(tmp.join("a.bin"), b"abc").unwrap();
    let mut d = digest_file(&tmp.join("a.bin")).unwrap();
    d.size = 4;
    let err = commit(&run, 5, 1, 1, &[d]).unwrap_err().to_string();
    assert!(err.contains("reported 4"), "{err}");
    // A rank's shard missing from the reports: refused too.
    let d = digest_file(&tmp.join("a.bin")).unwrap();
    let err = commit(&run, 5, 1, 1, &[d]).unwrap_err().to_string();
    assert!(err.contains("state.json"), "{err}");
    assert!(find_resumable(&run).unwrap().is_none());
}

#[test]
fn retention_keeps_newest_and_best_and_clears_abandoned_writes() {
    let run = scratch("retention");
    for s in [1, 2, 3, 4, 5] {
        write_step(&run, s);
    }
    fs::write(final_dir(&run, 2).join("eval.json"), r#"{"step": 2, "val_loss": 1.5}"#).unwrap();
    fs::write(final_dir(&run, 3).join("eval.json"), r#"{"step": 3, "val_loss": 2.5}"#).unwrap();
    fs::create_dir_all(tmp_dir(&run, 4, 7)).unwrap(); // abandoned at step 4
    fs::create_dir_all(tmp_dir(&run, 6, 7)).unwrap(); // being written
    apply_retention(&run, 5, 2, &Default::default()).unwrap();
    let left: Vec<u64> = list_steps(&checkpoints_dir(&run)).unwrap().iter().map(|s| s.0).collect();
    assert_eq!(left, vec![2, 4, 5], "the best (2) and the newest two");
    assert!(!tmp_dir(&run, 4, 7).exists());
    assert!(tmp_dir(&run, 6, 7).exists());
}

#[test]
fn a_torn_checkpoint_does_not_count_towards_keep_last() {
    let run = scratch("retention-torn");
    for s in [1, 2, 3] {
        write_step(&run, s);
    }
    // Step 3's MANIFEST lists a shard that has since been cut short: it is not complete.
    let shard = final_dir(&run, 3).join(shard_file(0));
    let len = fs::metadata(&shard).unwrap().len();
    fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len / 2).unwrap();
    apply_retention(&run, 3, 1, &Default::default()).unwrap();
    let left: Vec<u64> = list_steps(&checkpoints_dir(&run)).unwrap().iter().map(|s| s.0).collect();
    assert_eq!(left, vec![2, 3], "keep_last = 1 keeps the newest complete one (2); the torn one is left to look at");
}

#[test]
fn a_commit_over_a_half_committed_step_replaces_it_without_deleting_it_first() {
    let run = scratch("recommit");
    write_step(&run, 1);
    // As if an earlier attempt had renamed its folder into place and died before the MANIFEST.
    fs::remove_file(final_dir(&run, 1).join(MANIFEST)).unwrap();
    let again = write_step(&run, 1);
    verify(&again).unwrap();
    let names: Vec<String> =
        fs::read_dir(checkpoints_dir(&run)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names, vec!["step-000001".to_string()], "nothing left aside: {names:?}");
}

#[test]
fn too_little_room_is_refused_before_writing_naming_the_disk() {
    let run = scratch("no-space");
    let e = check_free_space(&run, u64::MAX / 4).unwrap_err().to_string();
    assert!(e.contains("no room for a checkpoint in") && e.contains("the disk mounted at /") && e.contains("MiB free"), "{e}");
    check_free_space(&run, 1024).unwrap();
}
