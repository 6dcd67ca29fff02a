//! Models built from leased weights. A model made here holds clones of the lease's tensors:
//! drop it before the phase offloads the weights, or the offload's verification fails.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vpipe_mem::Lease;
use vpipe_models::wan::WanVae;

/// The Wan VAE over a lease's weights (either key layout; config from the shapes).
pub(crate) fn wan_vae(lease: &Lease<'_>, dtype: DType, device: &Device) -> anyhow::Result<WanVae> {
    let weights: HashMap<String, Tensor> = lease
        .iter()
        .map(|(name, t)| (name.to_owned(), t.clone()))
        .collect();
    Ok(WanVae::from_checkpoint(VarBuilder::from_tensors(
        weights, dtype, device,
    ))?)
}
