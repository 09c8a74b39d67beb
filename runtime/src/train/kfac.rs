//! K-FAC's refreshes during training. A refreshing step's factors are read back, and their
//! running average and Cholesky factors are made on a worker thread while the following
//! steps run with the Cholesky factors in use. The new ones are fed before the next
//! refreshing step or at the epoch's end, whichever comes first: a fixed place in the step
//! sequence, so the noise does not depend on how fast the host is, and a checkpoint (written
//! at an epoch's end) holds the running factors of the Cholesky factors in use.

use std::thread::JoinHandle;

use fisherc_ir::kfac::KfacError;
use fisherc_ir::state::kfac::KfacState;
use fisherc_ir::tensor::Tensor;

use super::error::TrainError;
use crate::backend::Backend;
use crate::session::Session;

/// The factors in use and, after a refresh, the worker making the next ones.
pub struct Refreshes {
    in_use: KfacState,
    pending: Option<Pending>,
}

/// A worker's average and factorisation of the factors of run step `step` (from 0).
struct Pending {
    step: u64,
    worker: JoinHandle<Result<KfacState, KfacError>>,
}

impl Refreshes {
    /// Refreshes of `state`, whose Cholesky factors `session` is fed here.
    pub fn start<B: Backend>(
        state: KfacState,
        session: &mut Session<B>,
    ) -> Result<Refreshes, TrainError> {
        session.feed(&state.cholesky_feeds())?;
        Ok(Refreshes {
            in_use: state,
            pending: None,
        })
    }

    /// Before run step `step`: whether it refreshes the factors (after the pending Cholesky
    /// factors, if any, are fed), fed to `session`.
    pub fn before_step<B: Backend>(
        &mut self,
        session: &mut Session<B>,
        step: u64,
    ) -> Result<bool, TrainError> {
        if self.in_use.is_empty() {
            return Ok(false);
        }
        let refresh = self.in_use.refreshes(step);
        if refresh {
            self.apply(session)?;
        }
        session.feed(&self.in_use.refresh_feed(refresh))?;
        Ok(refresh)
    }

    /// After refreshing run step `step`: its factors read back and handed to a worker.
    pub fn after_refresh<B: Backend>(
        &mut self,
        session: &mut Session<B>,
        step: u64,
    ) -> Result<(), TrainError> {
        let factors = self
            .in_use
            .outputs()
            .iter()
            .map(|o| Ok(session.output(o)?.into_float()))
            .collect::<Result<Vec<_>, TrainError>>()?;
        let mut next = self.in_use.clone();
        let worker = std::thread::spawn(move || next.absorb(factors).map(|()| next));
        self.pending = Some(Pending { step, worker });
        Ok(())
    }

    /// The pending Cholesky factors, if any, waited for and fed (an epoch's end calls this
    /// before its checkpoint).
    pub fn apply<B: Backend>(&mut self, session: &mut Session<B>) -> Result<(), TrainError> {
        let Some(Pending { step, worker }) = self.pending.take() else {
            return Ok(());
        };
        let kfac_error = |error| TrainError::Kfac {
            run_step: step + 1,
            error,
        };
        let made = worker
            .join()
            .map_err(|_| kfac_error(KfacError::Refresh("the worker panicked".into())))?;
        self.in_use = made.map_err(kfac_error)?;
        session.feed(&self.in_use.cholesky_feeds())?;
        Ok(())
    }

    /// The factors in use (their Cholesky factors are the ones fed).
    pub fn in_use(&self) -> &KfacState {
        &self.in_use
    }

    /// The running factors in use, by name, for a checkpoint.
    pub fn tensors(&self) -> Vec<(String, Tensor<f32>)> {
        self.in_use
            .tensors()
            .into_iter()
            .map(|(name, t)| (name, t.clone()))
            .collect()
    }
}
