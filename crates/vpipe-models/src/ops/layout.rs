//! Where a clip's channels sit in memory.
//!
//! The VAE's code is written for logical `[B, C, T, H, W]` clips. On CUDA their memory is
//! channels-last (`[B, T, H, W, C]`, the logical clip being a permuted view of it): that is the
//! layout cuDNN's tensor-core convolutions compute in, so no convolution transposes its input
//! and output, frames are contiguous blocks (a cache slice or a concatenation in time is one
//! copy), and the per-position channel norm reads contiguous rows. On the CPU, clips stay
//! contiguous `[B, C, T, H, W]`. The helpers here keep each device's layout through the
//! operations on time that the feature cache needs.

use candle_core::{Result, Tensor};

/// Whether clips on `x`'s device are kept channels-last.
pub fn channels_last_device(x: &Tensor) -> bool {
    x.device().is_cuda()
}

/// The memory-order view of a logical `[B, C, rest…]` tensor: `[B, rest…, C]`.
pub fn physical(x: &Tensor) -> Result<Tensor> {
    let rank = x.rank();
    let order: Vec<usize> = [0].into_iter().chain(2..rank).chain([1]).collect();
    x.permute(order)
}

/// The logical `[B, C, rest…]` view of a memory-order `[B, rest…, C]` tensor.
pub fn logical(physical: &Tensor) -> Result<Tensor> {
    let rank = physical.rank();
    let order: Vec<usize> = [0, rank - 1].into_iter().chain(1..rank - 1).collect();
    physical.permute(order)
}

/// `x` with channels-last memory: itself when it already is, else a copy.
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    logical(&physical(x)?.contiguous()?)
}

/// Concatenation along time (dimension 2) in the device's layout.
pub fn cat_time(parts: &[&Tensor]) -> Result<Tensor> {
    match parts.first() {
        Some(first) if channels_last_device(first) => {
            let packed = parts
                .iter()
                .map(|p| physical(p)?.contiguous())
                .collect::<Result<Vec<_>>>()?;
            logical(&Tensor::cat(&packed, 1)?)
        }
        _ => Tensor::cat(parts, 2),
    }
}

/// `n` zero frames shaped like `x`'s, in the device's layout.
pub fn zero_frames(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, c, _, h, w) = x.dims5()?;
    if channels_last_device(x) {
        logical(&Tensor::zeros((b, n, h, w, c), x.dtype(), x.device())?)
    } else {
        Tensor::zeros((b, c, n, h, w), x.dtype(), x.device())
    }
}

/// Frames `start..start + len` of `x` in memory of their own (so that `x` can be freed), in the
/// device's layout.
pub fn copy_frames(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    if channels_last_device(x) {
        logical(&physical(x)?.narrow(1, start, len)?.force_contiguous()?)
    } else {
        x.narrow(2, start, len)?.force_contiguous()
    }
}

/// Every frame with one zero row below and one zero column on the right (the encoder's
/// downsampling pad), in the device's layout.
pub fn pad_bottom_right(x: &Tensor) -> Result<Tensor> {
    if channels_last_device(x) {
        let p = physical(x)?.contiguous()?;
        logical(&p.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)
    } else {
        x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(4, 0, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn physical_and_logical_are_inverse_views() -> Result<()> {
        let x = Tensor::arange(0f32, 120., &Device::Cpu)?.reshape((1, 2, 3, 4, 5))?;
        let p = physical(&x)?;
        assert_eq!(p.dims(), [1, 3, 4, 5, 2]);
        let back = logical(&p)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        let cl = channels_last(&x)?;
        assert!(physical(&cl)?.is_contiguous() && !physical(&x)?.is_contiguous());
        assert_eq!(
            cl.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn time_helpers_keep_values() -> Result<()> {
        let x = Tensor::arange(0f32, 120., &Device::Cpu)?.reshape((1, 2, 3, 4, 5))?;
        let z = zero_frames(&x, 2)?;
        assert_eq!(z.dims(), [1, 2, 2, 4, 5]);
        let cat = cat_time(&[&z, &x])?;
        assert_eq!(cat.dims(), [1, 2, 5, 4, 5]);
        let tail = copy_frames(&cat, 2, 3)?;
        assert_eq!(
            tail.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(z.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?, 0.0);
        Ok(())
    }
}
