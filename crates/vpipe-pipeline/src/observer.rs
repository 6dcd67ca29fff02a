//! How a job tells its caller what it is doing, and how the caller stops it: the library
//! draws nothing and installs no signal handler; the caller's [`Observer`] does both.

use std::sync::atomic::AtomicBool;

use crate::error::{Error, Result};

/// What a job reports as it goes, and whether it should stop.
///
/// A job reports one long step at a time (loading the models, the denoising steps, the VAE's
/// tiles, writing the video): [`start`](Self::start), then [`advance`](Self::advance) once per
/// unit, then [`finish`](Self::finish), also when the step failed or was stopped.
pub trait Observer {
    /// A long step of `total` units begins, named `label` (`sample`: 30 steps).
    fn start(&mut self, label: &'static str, total: u64);
    /// One unit of the step is done; `detail` says what it was.
    fn advance(&mut self, detail: &str);
    /// The step is over.
    fn finish(&mut self);
    /// Something the user should know that is not an error (frames of the input clip that the
    /// run drops, a report that could not be written).
    fn notice(&mut self, message: &str);
    /// Whether the caller asked the job to stop: the job then ends at the next step, tile or
    /// phase boundary with [`Error::Interrupted`].
    fn should_stop(&self) -> bool;
    /// The flag behind [`should_stop`](Self::should_stop), for work that polls a flag itself
    /// (the video writer, before each frame); `None` when there is none.
    fn stop_flag(&self) -> Option<&'static AtomicBool> {
        None
    }
}

/// [`Error::Interrupted`] when the observer asked the job to stop.
pub(crate) fn stop_point(observer: &dyn Observer) -> Result<()> {
    if observer.should_stop() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// One long step, reported to the observer; its end is reported when it is dropped, so that an
/// error or a stop ends it too.
pub(crate) struct Step<'o> {
    observer: &'o mut dyn Observer,
}

impl<'o> Step<'o> {
    pub(crate) fn start(observer: &'o mut dyn Observer, label: &'static str, total: u64) -> Self {
        observer.start(label, total);
        Self { observer }
    }

    pub(crate) fn advance(&mut self, detail: &str) {
        self.observer.advance(detail);
    }

    pub(crate) fn observer(&self) -> &dyn Observer {
        &*self.observer
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        self.observer.finish();
    }
}
