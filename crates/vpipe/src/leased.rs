//! Models built from leased weights. A model made here holds clones of the lease's tensors:
//! drop it before the phase offloads the weights, or the offload's verification fails.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vpipe_mem::Lease;
use vpipe_models::wan::{DitConfig, WanModel, WanVae};

/// A `VarBuilder` over a lease's weights, handing them out in `dtype` unless a layer asks for
/// another (scaled-fp8 weights stay float8).
fn var_builder(lease: &Lease<'_>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let weights: HashMap<String, Tensor> = lease
        .iter()
        .map(|(name, t)| (name.to_owned(), t.clone()))
        .collect();
    VarBuilder::from_tensors(weights, dtype, device)
}

/// The Wan VAE over a lease's weights (either key layout; config from the shapes).
pub(crate) fn wan_vae(lease: &Lease<'_>, dtype: DType, device: &Device) -> anyhow::Result<WanVae> {
    Ok(WanVae::from_checkpoint(var_builder(lease, dtype, device))?)
}

/// The Wan DiT over a lease's weights (either key layout); `config` from a diffusers
/// `config.json`, else from the shapes.
pub(crate) fn wan_dit(
    lease: &Lease<'_>,
    config: Option<&DitConfig>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<WanModel> {
    Ok(WanModel::from_checkpoint(
        var_builder(lease, dtype, device),
        config,
    )?)
}
