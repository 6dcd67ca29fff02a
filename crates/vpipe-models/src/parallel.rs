//! Collectives between the ranks of a multi-device forward, and an in-process communicator
//! whose ranks are threads of one process.
//!
//! The DiT's sequence parallelism (Ulysses: [`crate::wan::WanModel::forward_sharded`]) and its
//! guidance parallelism (the conditional and unconditional passes on two ranks:
//! [`crate::wan::WanModel::forward_guided_parallel`]) need two collectives, both in NCCL's
//! terms so that an NCCL backend implements [`Communicator`] call for call:
//!
//! - [`Communicator::all_to_all`]: each rank cuts its tensor into `world` equal chunks along
//!   one dimension, sends chunk `j` to rank `j`, and concatenates what it receives along
//!   another dimension, in rank order. NCCL: `ncclSend`/`ncclRecv` of each contiguous chunk to
//!   and from every peer between `ncclGroupStart` and `ncclGroupEnd`.
//! - [`Communicator::all_gather`]: every rank's tensor, of one shape on every rank,
//!   concatenated along one dimension in rank order. NCCL: `ncclAllGather` (which needs equal
//!   counts on every rank: the DiT pads its token shards to equal lengths rather than sharding
//!   unevenly).
//!
//! A group of ranks is one communicator per rank; several groups over the same ranks (the
//! sequence ranks that share one guidance branch, the guidance ranks that share one token
//! shard) are separate communicators, as `ncclCommSplit` makes them.
//!
//! This lives in `vpipe-models` rather than its own crate because its only callers are the
//! model's forwards, and the NCCL backend will need what this crate already builds for CUDA
//! (cudarc, with its `nccl` feature added next to `cudnn`).

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

use candle_core::Tensor;

/// Errors of a collective.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer's end of the group is gone: its thread ended, returned early or panicked.
    #[error(
        "rank {rank} of {world}: rank {peer} left the group (its thread ended, returned early \
         or panicked) before its part of {op} call {call} arrived"
    )]
    PeerGone {
        /// The rank that noticed.
        rank: usize,
        /// The rank that left.
        peer: usize,
        /// The group's size.
        world: usize,
        /// The collective (`all_to_all`, `all_gather`).
        op: &'static str,
        /// The collective's index among this rank's calls, from 0.
        call: u64,
    },

    /// A peer sent nothing for the group's timeout: it stopped, or it is stuck elsewhere.
    #[error(
        "rank {rank} of {world}: rank {peer} sent nothing for {op} call {call} within \
         {timeout:?}; it stopped or is stuck outside the collective"
    )]
    Timeout {
        /// The rank that waited.
        rank: usize,
        /// The rank it waited for.
        peer: usize,
        /// The group's size.
        world: usize,
        /// The collective.
        op: &'static str,
        /// The collective's index among this rank's calls.
        call: u64,
        /// How long it waited.
        timeout: Duration,
    },

    /// Two ranks called different collectives at the same point of their sequences: the
    /// ranks' code took different paths.
    #[error(
        "rank {rank}: its {op} call {call} got rank {peer}'s {their_op} call {their_call}; \
         every rank must call the same collectives in the same order"
    )]
    Mismatch {
        /// The rank that noticed.
        rank: usize,
        /// The rank whose message did not match.
        peer: usize,
        /// This rank's collective.
        op: &'static str,
        /// This rank's call index.
        call: u64,
        /// The peer's collective.
        their_op: &'static str,
        /// The peer's call index.
        their_call: u64,
    },

    /// The tensor cannot be cut or joined as asked (a dimension out of range, or one that
    /// does not divide among the ranks).
    #[error("{op} on rank {rank}: {reason}")]
    Shape {
        /// The collective.
        op: &'static str,
        /// The rank.
        rank: usize,
        /// What does not fit.
        reason: String,
    },

    /// A tensor operation of the collective failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A failed collective as the crate's error: candle's wrapped error with the collective's
/// message (a tensor operation's own error stays candle's). Built directly rather than by
/// `candle_core::Error::wrap`, which adds a backtrace to the message under `RUST_BACKTRACE`.
impl From<CommError> for crate::Error {
    fn from(e: CommError) -> Self {
        match e {
            CommError::Candle(e) => Self::Candle(e),
            other => Self::Candle(candle_core::Error::Wrapped(Box::new(other))),
        }
    }
}

/// The collectives of one rank of a group. Every rank of a group calls the same collectives in
/// the same order; a call returns once this rank has its result (others may still be working).
///
/// Implementations: [`InProcessCommunicator`] (threads of one process; the CPU tests). An
/// NCCL backend (one communicator per GPU) maps each call onto NCCL as the module
/// documentation says.
pub trait Communicator: Send + Sync {
    /// This rank's index in the group, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Cuts `x` into `world_size()` equal chunks along `split_dim`, sends chunk `j` to rank
    /// `j`, and concatenates the chunks it receives (its own included) along `concat_dim`
    /// in rank order. The result is contiguous, on `x`'s device.
    ///
    /// # Shapes
    /// - `x`: any, with `x.dim(split_dim)` a multiple of the world size N, and the same shape
    ///   on every rank.
    /// - output: `x`'s shape with `split_dim` divided by N and `concat_dim` multiplied by N
    ///   (for `split_dim == concat_dim`, `x`'s shape).
    fn all_to_all(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
    ) -> Result<Tensor, CommError>;

    /// Every rank's `x` concatenated along `dim` in rank order, contiguous, on `x`'s device.
    ///
    /// # Shapes
    /// - `x`: the same shape on every rank; output: `x`'s with `dim` multiplied by N.
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor, CommError>;
}

/// What one rank sends another: one chunk of one collective.
struct Message {
    op: &'static str,
    call: u64,
    tensor: Tensor,
}

/// One rank of a group whose ranks are threads of one process, exchanging tensors through
/// channels (one per ordered pair of ranks). Tensors travel as they are and are moved to the
/// receiver's device on arrival, so ranks on different devices of one process work too
/// (through the host).
///
/// A receive waits at most the group's timeout. A rank whose communicator is dropped (its
/// thread ended, returned early or panicked) makes its peers' next receive from it fail at
/// once ([`CommError::PeerGone`]); a rank that stops calling makes them fail after the timeout
/// ([`CommError::Timeout`]). Neither hangs the group.
pub struct InProcessCommunicator {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// To each rank (this rank's own slot unused).
    senders: Vec<Sender<Message>>,
    /// From each rank (this rank's own slot unused). Behind a mutex only so that the
    /// communicator is `Sync`; one rank's calls are sequential.
    receivers: Vec<Mutex<Receiver<Message>>>,
    /// The index of this rank's next collective.
    calls: Mutex<u64>,
}

impl InProcessCommunicator {
    /// The `world` communicators of a new group, rank `i` at index `i`, each receive waiting
    /// at most `timeout`. Hand one to each rank's thread.
    ///
    /// # Panics
    /// If `world` is 0.
    pub fn group(world: usize, timeout: Duration) -> Vec<Self> {
        assert!(world > 0, "a group needs at least one rank");
        // channels[src][dst]
        let mut senders: Vec<Vec<Sender<Message>>> = (0..world).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Mutex<Receiver<Message>>>> =
            (0..world).map(|_| Vec::new()).collect();
        for src_senders in senders.iter_mut() {
            for dst_receivers in receivers.iter_mut() {
                let (tx, rx) = channel();
                src_senders.push(tx);
                dst_receivers.push(Mutex::new(rx));
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (senders, receivers))| Self {
                rank,
                world,
                timeout,
                senders,
                receivers,
                calls: Mutex::new(0),
            })
            .collect()
    }

    fn next_call(&self) -> u64 {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let call = *calls;
        *calls += 1;
        call
    }

    fn send(
        &self,
        peer: usize,
        op: &'static str,
        call: u64,
        tensor: Tensor,
    ) -> Result<(), CommError> {
        self.senders[peer]
            .send(Message { op, call, tensor })
            .map_err(|_| CommError::PeerGone {
                rank: self.rank,
                peer,
                world: self.world,
                op,
                call,
            })
    }

    fn receive(&self, peer: usize, op: &'static str, call: u64) -> Result<Tensor, CommError> {
        let receiver = self.receivers[peer]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let message = receiver.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => CommError::Timeout {
                rank: self.rank,
                peer,
                world: self.world,
                op,
                call,
                timeout: self.timeout,
            },
            RecvTimeoutError::Disconnected => CommError::PeerGone {
                rank: self.rank,
                peer,
                world: self.world,
                op,
                call,
            },
        })?;
        if message.op != op || message.call != call {
            return Err(CommError::Mismatch {
                rank: self.rank,
                peer,
                op,
                call,
                their_op: message.op,
                their_call: message.call,
            });
        }
        Ok(message.tensor)
    }

    fn shape_error(&self, op: &'static str, reason: String) -> CommError {
        CommError::Shape {
            op,
            rank: self.rank,
            reason,
        }
    }

    fn check_dim(&self, op: &'static str, x: &Tensor, dim: usize) -> Result<(), CommError> {
        if dim >= x.rank() {
            return Err(self.shape_error(
                op,
                format!("dimension {dim} of a tensor of shape {:?}", x.dims()),
            ));
        }
        Ok(())
    }
}

impl Communicator for InProcessCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_to_all(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
    ) -> Result<Tensor, CommError> {
        const OP: &str = "all_to_all";
        self.check_dim(OP, x, split_dim)?;
        self.check_dim(OP, x, concat_dim)?;
        let n = x.dim(split_dim)?;
        if !n.is_multiple_of(self.world) {
            return Err(self.shape_error(
                OP,
                format!(
                    "dimension {split_dim} of shape {:?} does not divide among {} ranks",
                    x.dims(),
                    self.world
                ),
            ));
        }
        let call = self.next_call();
        let chunk = n / self.world;
        // Every chunk is sent before any is awaited: the channels buffer, so no order of the
        // ranks' calls deadlocks.
        for peer in (0..self.world).filter(|&p| p != self.rank) {
            let part = x.narrow(split_dim, peer * chunk, chunk)?.contiguous()?;
            self.send(peer, OP, call, part)?;
        }
        let parts = (0..self.world)
            .map(|peer| {
                if peer == self.rank {
                    Ok(x.narrow(split_dim, peer * chunk, chunk)?.contiguous()?)
                } else {
                    Ok(self.receive(peer, OP, call)?.to_device(x.device())?)
                }
            })
            .collect::<Result<Vec<_>, CommError>>()?;
        // candle concatenates contiguous parts into a contiguous tensor.
        Ok(Tensor::cat(&parts, concat_dim)?.contiguous()?)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        const OP: &str = "all_gather";
        self.check_dim(OP, x, dim)?;
        let call = self.next_call();
        for peer in (0..self.world).filter(|&p| p != self.rank) {
            self.send(peer, OP, call, x.clone())?;
        }
        let parts = (0..self.world)
            .map(|peer| {
                if peer == self.rank {
                    return Ok(x.contiguous()?);
                }
                let part = self.receive(peer, OP, call)?;
                if part.dims() != x.dims() {
                    return Err(self.shape_error(
                        OP,
                        format!(
                            "rank {peer} gave shape {:?}, this rank {:?}; all_gather needs one \
                             shape on every rank",
                            part.dims(),
                            x.dims()
                        ),
                    ));
                }
                Ok(part.to_device(x.device())?)
            })
            .collect::<Result<Vec<_>, CommError>>()?;
        Ok(Tensor::cat(&parts, dim)?.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::time::Instant;

    /// Runs `f` on each rank of a new group in its own thread; the results in rank order.
    fn on_ranks<T: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(InProcessCommunicator) -> T + Sync,
    ) -> Vec<T> {
        let comms = InProcessCommunicator::group(world, timeout);
        std::thread::scope(|s| {
            let handles: Vec<_> = comms.into_iter().map(|comm| s.spawn(|| f(comm))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Rank r's tensor [2, 4, 3]: 100·r + its index, so every element says where it came from.
    fn ranked(rank: usize) -> Tensor {
        Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .affine(1.0, 100.0 * rank as f64)
            .unwrap()
            .reshape((2, 4, 3))
            .unwrap()
    }

    #[test]
    fn all_to_all_swaps_dimensions_and_back() {
        let world = 2;
        let results = on_ranks(world, Duration::from_secs(10), |comm| {
            let x = ranked(comm.rank());
            let swapped = comm.all_to_all(&x, 1, 2).unwrap();
            let back = comm.all_to_all(&swapped, 2, 1).unwrap();
            (x, swapped, back)
        });
        for (rank, (x, swapped, back)) in results.iter().enumerate() {
            assert_eq!(swapped.dims(), &[2, 2, 6]);
            // Rank r keeps rows r·2..r·2+2 of dimension 1 of every rank, ranks side by side.
            for peer in 0..world {
                let expected = ranked(peer).narrow(1, rank * 2, 2).unwrap();
                let got = swapped.narrow(2, peer * 3, 3).unwrap();
                let diff = (expected - got).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
            }
            let diff = (x - back).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn all_gather_concatenates_in_rank_order() {
        let results = on_ranks(3, Duration::from_secs(10), |comm| {
            comm.all_gather(&ranked(comm.rank()), 0).unwrap()
        });
        let expected = Tensor::cat(&[ranked(0), ranked(1), ranked(2)], 0).unwrap();
        for got in results {
            let diff = (&expected - got).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_its_peers_at_once() {
        let results = on_ranks(3, Duration::from_secs(30), |comm| {
            if comm.rank() == 2 {
                return None; // drops its communicator without a call
            }
            let start = Instant::now();
            let err = comm.all_gather(&ranked(comm.rank()), 0).unwrap_err();
            Some((err, start.elapsed()))
        });
        // A rank may first see another that already failed on rank 2 and ended in turn.
        for (err, elapsed) in results.into_iter().flatten() {
            assert!(matches!(err, CommError::PeerGone { .. }), "{err}");
            assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        }
    }

    #[test]
    fn a_rank_that_stops_times_its_peers_out() {
        let timeout = Duration::from_millis(200);
        let results = on_ranks(2, timeout, |comm| {
            if comm.rank() == 1 {
                // Holds its communicator but never calls.
                std::thread::sleep(timeout * 5);
                return None;
            }
            let start = Instant::now();
            let err = comm.all_to_all(&ranked(0), 1, 1).unwrap_err();
            Some((err, start.elapsed()))
        });
        let (err, elapsed) = results[0].as_ref().unwrap();
        assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{err}");
        assert!(*elapsed >= timeout && *elapsed < timeout * 4, "{elapsed:?}");
    }

    #[test]
    fn different_collectives_are_an_error() {
        let results = on_ranks(2, Duration::from_secs(10), |comm| {
            let x = ranked(comm.rank());
            match comm.rank() {
                0 => comm.all_gather(&x, 0).err(),
                _ => comm.all_to_all(&x, 1, 1).err(),
            }
        });
        assert!(
            results
                .iter()
                .flatten()
                .any(|e| matches!(e, CommError::Mismatch { .. })),
            "{results:?}"
        );
    }

    #[test]
    fn indivisible_split_is_a_shape_error() {
        let comm = InProcessCommunicator::group(1, Duration::from_secs(1)).remove(0);
        let x = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(comm.all_to_all(&x, 1, 0).unwrap().dims(), &[3, 5]);
        let comms = InProcessCommunicator::group(2, Duration::from_secs(1));
        let err = comms[0].all_to_all(&x, 1, 0).unwrap_err();
        assert!(matches!(err, CommError::Shape { .. }), "{err}");
        let err = comms[0].all_gather(&x, 2).unwrap_err();
        assert!(matches!(err, CommError::Shape { .. }), "{err}");
    }
}
