//! The batch queue (`vtp::train::feed::BatchQueue`): building each step's batch on a thread of its
//! own, one step ahead, hands every step exactly the batch and the data position that reading the
//! feed in the training thread gives, also across epochs and after a restart from a saved position.
use std::sync::Arc;
use vtp::data::stream::StreamOptions;
use vtp::data::Sample;
use vtp::train::feed::{BatchQueue, DataFeed};

/// 10 scenes: batches of 4 cross an epoch boundary every few steps.
const SPEC: &str = "synthetic:train?n=10&res=16";
const BATCH: usize = 4;

fn feed(position: Option<&vtp::train::feed::FeedPosition>) -> DataFeed {
    DataFeed::open(SPEC, StreamOptions { workers: 2, ..StreamOptions::default() }, position).unwrap()
}

/// The "batch" of a step: the step and its samples' keys.
fn keys(step: u64, samples: &[Sample]) -> (u64, Vec<String>) {
    (step, samples.iter().map(|s| s.key.clone()).collect())
}

#[test]
fn the_queue_hands_each_step_what_the_feed_gives_in_order_with_its_position() {
    let mut direct = feed(None);
    let mut queue = BatchQueue::new(feed(None), BATCH, Arc::new(keys));
    assert_eq!(queue.position(), &direct.position(), "before the first step");
    for step in 0..7 {
        let expected = keys(step, &direct.next_batch(BATCH).unwrap());
        let (batch, n) = queue.next(step).unwrap();
        assert_eq!((batch, n), (expected, BATCH), "step {step}");
        assert_eq!(queue.position(), &direct.position(), "position after step {step}, not after the one being built");
    }
    assert!(queue.next(9).is_err(), "a skipped step is refused");
}

#[test]
fn a_restarted_queue_continues_from_the_saved_position() {
    let mut whole = BatchQueue::new(feed(None), BATCH, Arc::new(keys));
    let all: Vec<(u64, Vec<String>)> = (0..6).map(|step| whole.next(step).unwrap().0).collect();
    let mut first = BatchQueue::new(feed(None), BATCH, Arc::new(keys));
    for step in 0..3 {
        first.next(step).unwrap();
    }
    let saved = first.position().clone();
    first.restart(feed(Some(&saved)));
    let resumed: Vec<(u64, Vec<String>)> = (3..6).map(|step| first.next(step).unwrap().0).collect();
    assert_eq!(resumed, all[3..]);
}

#[test]
fn the_batch_thread_runs_its_kernels_serially_and_the_training_thread_keeps_its_threads() {
    tch::set_num_threads(2);
    let threads_seen = |_step: u64, _samples: &[Sample]| tch::get_num_threads();
    let mut queue = BatchQueue::new(feed(None), BATCH, Arc::new(threads_seen));
    assert_eq!(queue.next(0).unwrap().0, 1, "the batch thread starts no OpenMP team of its own");
    let helper = std::thread::spawn(|| {
        vtp::kernels::serial_kernels_on_this_thread();
        tch::get_num_threads()
    });
    assert_eq!(helper.join().unwrap(), 1);
    assert_eq!(tch::get_num_threads(), 2, "only the calling thread's count changes");
}
