//! A `VarBuilder` backend that hands out LoRA-merged weights.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::Error;
use crate::plan::MergePlan;

/// Wraps another [`SimpleBackend`] and merges the [`MergePlan`]'s patches into every tensor it
/// hands out, so that a model built through a `VarBuilder` gets merged weights without knowing
/// about LoRA. Tensor names are looked up in the plan exactly as the model asks for them (the
/// full dotted path below the `VarBuilder` root), so the plan must be made with those names.
///
/// Each weight is merged when it is loaded: nothing beyond the merged copy is kept, and only
/// the weights the model really loads are touched.
pub struct LoraBackend<'a> {
    inner: Box<dyn SimpleBackend + 'a>,
    plan: Arc<MergePlan>,
}

impl<'a> LoraBackend<'a> {
    /// Merges `plan` into what `inner` returns.
    pub fn new(inner: Box<dyn SimpleBackend + 'a>, plan: Arc<MergePlan>) -> Self {
        Self { inner, plan }
    }

    /// Wraps a whole `VarBuilder` (same dtype and device). The names the returned builder is
    /// asked for are the plan's names; `vb` may itself rename them or sit under a prefix
    /// (`vb.pp("model.diffusion_model")`, a `rename_f` from original to diffusers names), which
    /// is how a loader that already answers to original Wan names gets LoRA on top:
    ///
    /// ```no_run
    /// # fn f(vb: candle_nn::VarBuilder, plan: vpipe_lora::MergePlan) -> vpipe_lora::Result<()> {
    /// let plan = std::sync::Arc::new(plan);
    /// let vb = vpipe_lora::LoraBackend::wrap(vb, plan.clone());
    /// // ... build the model from `vb` ...
    /// plan.ensure_all_applied()?; // every patched weight was really loaded
    /// # Ok(()) }
    /// ```
    pub fn wrap(vb: VarBuilder<'a>, plan: Arc<MergePlan>) -> VarBuilder<'a> {
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let inner: Box<dyn SimpleBackend + 'a> = Box::new(Builder(vb));
        VarBuilder::from_backend(Box::new(Self::new(inner, plan)), dtype, device)
    }

    /// The plan this backend applies.
    pub fn plan(&self) -> &Arc<MergePlan> {
        &self.plan
    }

    fn merge(&self, name: &str, weight: Tensor) -> candle_core::Result<Tensor> {
        self.plan.apply(name, &weight).map_err(|e| match e {
            Error::Candle(e) => *e,
            e => candle_core::Error::wrap(e),
        })
    }
}

impl SimpleBackend for LoraBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let weight = self.inner.get(s, name, h, dtype, dev)?;
        self.merge(name, weight)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let weight = self.inner.get_unchecked(name, dtype, dev)?;
        self.merge(name, weight)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A `VarBuilder` seen as a backend (names relative to its own path).
struct Builder<'a>(VarBuilder<'a>);

impl SimpleBackend for Builder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .get_with_hints_dtype(s, name, h, dtype)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked_dtype(name, dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}
