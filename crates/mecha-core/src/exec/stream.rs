//! A merge streamed to a consumer instead of a file (`iterate()`): finished keys are handed over
//! in output order, and the executor waits while the consumer is slow.
//!
//! Work units are dispatched in plan order (`run::run_many` with an ordered sink), so every unit
//! of a key before the one the consumer waits for has been taken by a worker and is finishing.
//! A worker waits for room only before taking a unit of a key after that one, which is why a
//! full buffer cannot stall the key the consumer needs: memory stays at the buffer limit plus
//! the keys in flight (one per thread).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::dtype::DType;
use crate::error::{ErrorKind, MechaError, Result};
use crate::exec::plan::Plan;
use crate::exec::run::TensorSink;

/// One finished key, handed to the consumer.
#[derive(Debug)]
pub struct StreamedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

struct KeySlot {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    byte_len: usize,
    /// Allocated by the first piece written; moved out when the key is finished.
    data: Mutex<Option<Vec<u8>>>,
    /// A piece was not written (a method skipped the key).
    skipped: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Finished keys not yet taken, by plan index.
    ready: BTreeMap<usize, Vec<u8>>,
    /// The next key the consumer takes.
    next: usize,
    /// Bytes of keys being written or finished and not taken, and the most there were.
    buffered: u64,
    peak_buffered: u64,
    /// Set when the merge ends: `Ok` once every key was handed over, or why it stopped.
    end: Option<std::result::Result<(), MechaError>>,
    /// A key whose pieces did not all arrive (a method skipped it): never handed over.
    incomplete: Option<usize>,
}

/// The sink of a streamed merge, shared by the merge thread and the consumer.
pub struct StreamSink {
    /// Bytes of finished keys the consumer has not taken yet, above which workers wait.
    limit: u64,
    slots: OnceLock<Vec<KeySlot>>,
    state: Mutex<State>,
    changed: Condvar,
    cancel: AtomicBool,
}

impl StreamSink {
    pub fn new(limit: u64) -> StreamSink {
        StreamSink {
            limit: limit.max(1),
            slots: OnceLock::new(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
        }
    }

    /// Sizes the slots for the plan's keys (called once, when the merge has planned).
    pub(crate) fn start(&self, plan: &Plan) -> Result<()> {
        let slots = plan
            .keys
            .iter()
            .map(|k| KeySlot {
                name: k.name.clone(),
                dtype: k.dtype,
                shape: k.shape.clone(),
                byte_len: k.byte_len(),
                data: Mutex::new(None),
                skipped: AtomicBool::new(false),
            })
            .collect();
        self.slots.set(slots).map_err(|_| MechaError::new(ErrorKind::Internal, "a streamed merge was started twice"))
    }

    fn slots(&self) -> &[KeySlot] {
        self.slots.get().map_or(&[], Vec::as_slice)
    }

    /// Asks the merge to stop (the consumer is gone); workers see it through the merge's cancel flag.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Records how the merge ended; the consumer gets `Ok` as the end of the stream after the
    /// last key, an error at once.
    pub fn end(&self, result: std::result::Result<(), MechaError>) {
        self.state.lock().expect("stream lock").end = Some(result);
        self.changed.notify_all();
    }

    /// Waits for room before a worker takes a unit whose first key is `key`: the key the consumer
    /// waits for (and the ones before it) never wait.
    pub(crate) fn wait_for_room(&self, key: usize, cancel: &AtomicBool) {
        let mut state = self.state.lock().expect("stream lock");
        while state.buffered > self.limit && key > state.next {
            if cancel.load(Ordering::Relaxed) || self.cancelled() {
                return;
            }
            state = self.changed.wait_timeout(state, Duration::from_millis(20)).expect("stream lock").0;
        }
    }

    /// The most bytes the stream held at once (keys being written and finished, not yet taken).
    pub fn peak_buffered_bytes(&self) -> u64 {
        self.state.lock().expect("stream lock").peak_buffered
    }

    /// The next key in output order, waiting until it is finished; `None` after the last one.
    pub fn next(&self) -> Result<Option<StreamedTensor>> {
        let mut state = self.state.lock().expect("stream lock");
        loop {
            let next = state.next;
            if let Some(data) = state.ready.remove(&next) {
                state.next += 1;
                state.buffered -= data.len() as u64;
                drop(state);
                self.changed.notify_all();
                let slot = &self.slots()[next];
                return Ok(Some(StreamedTensor {
                    name: slot.name.clone(),
                    dtype: slot.dtype,
                    shape: slot.shape.clone(),
                    data,
                }));
            }
            let waiting_on_incomplete = state.incomplete == Some(next);
            match &state.end {
                Some(Err(e)) => return Err(e.clone()),
                Some(Ok(())) if next >= self.slots().len() => return Ok(None),
                Some(Ok(())) if waiting_on_incomplete => {
                    return Err(MechaError::new(
                        ErrorKind::Internal,
                        format!("key {next} of the stream was not computed"),
                    ))
                }
                _ => {}
            }
            state = self.changed.wait_timeout(state, Duration::from_millis(50)).expect("stream lock").0;
        }
    }
}

impl std::fmt::Debug for StreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamSink({} keys, limit {} bytes)", self.slots().len(), self.limit)
    }
}

impl TensorSink for StreamSink {
    fn write(&self, key: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        let slot = &self.slots()[key];
        let mut data = slot.data.lock().expect("stream slot lock");
        let buffer = data.get_or_insert_with(|| {
            let mut state = self.state.lock().expect("stream lock");
            state.buffered += slot.byte_len as u64;
            state.peak_buffered = state.peak_buffered.max(state.buffered);
            vec![0u8; slot.byte_len]
        });
        buffer[offset..offset + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn ordered(&self) -> bool {
        true
    }

    fn wait_for_room(&self, key: usize, cancel: &AtomicBool) {
        StreamSink::wait_for_room(self, key, cancel)
    }

    fn piece_skipped(&self, key: usize) {
        self.slots()[key].skipped.store(true, Ordering::SeqCst);
    }

    fn key_done(&self, key: usize) {
        let slot = &self.slots()[key];
        let complete = !slot.skipped.load(Ordering::SeqCst);
        let data = slot.data.lock().expect("stream slot lock").take();
        let mut state = self.state.lock().expect("stream lock");
        match data {
            Some(data) if complete => {
                state.ready.insert(key, data);
            }
            None if complete && slot.byte_len == 0 => {
                state.ready.insert(key, vec![]);
            }
            other => {
                state.buffered -= other.map_or(0, |d| d.len() as u64);
                state.incomplete.get_or_insert(key);
            }
        }
        drop(state);
        self.changed.notify_all();
    }
}
