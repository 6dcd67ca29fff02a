//! Causal 3D convolution built from candle's 2D convolution.
//!
//! candle 0.11 has no conv3d. A 3D convolution with kernel `(k_t, k_h, k_w)` is the sum over the
//! temporal taps `i` of a 2D convolution of the frames `t·s_t + i` with the kernel slice
//! `weight[:, :, i]`. Each tap is one candle `conv2d` over all output frames at once (frames are
//! folded into the batch dimension).
//!
//! "Causal" is Wan's `CausalConv3d`: all `2·p_t` temporal padding frames go in front and none
//! behind, so output frame `t` sees only input frames `≤ t`. Spatial padding is symmetric zeros.
//! Instead of zero frames, the caller may pass the last input frames of the previous chunk (the
//! feature cache); they replace that many of the front padding frames, which makes a chunked pass
//! equal to one pass over the whole clip.

use candle_core::{bail, DType, Result, Tensor};

use super::layout;

/// Stride and padding of a [`CausalConv3d`]. Kernel sizes come from the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dConfig {
    /// Stride `(s_t, s_h, s_w)`. candle's conv2d takes one spatial stride: `s_h` must equal `s_w`.
    pub stride: (usize, usize, usize),
    /// Padding `(p_t, p_h, p_w)` as given to torch's `nn.Conv3d`. The temporal part is applied
    /// causally: `2·p_t` frames in front, none behind.
    pub padding: (usize, usize, usize),
}

impl Default for Conv3dConfig {
    fn default() -> Self {
        Self {
            stride: (1, 1, 1),
            padding: (0, 0, 0),
        }
    }
}

impl Conv3dConfig {
    /// Stride 1 and the same padding `p` on all three axes (`nn.Conv3d(..., padding=p)`).
    pub fn padded(p: usize) -> Self {
        Self {
            stride: (1, 1, 1),
            padding: (p, p, p),
        }
    }
}

/// Wan's causal 3D convolution (`CausalConv3d` / diffusers `WanCausalConv3d`).
#[derive(Debug, Clone)]
pub struct CausalConv3d {
    /// shape [C_out, C_in, k_t, k_h, k_w]
    weight: Tensor,
    /// One 2D kernel per temporal tap, each shape [C_out, C_in, k_h, k_w] (contiguous).
    taps: Vec<Tensor>,
    /// shape [C_out]
    bias: Option<Tensor>,
    cfg: Conv3dConfig,
    span: tracing::Span,
}

impl CausalConv3d {
    /// Builds the convolution from its weight `[C_out, C_in, k_t, k_h, k_w]` and optional bias
    /// `[C_out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv3dConfig) -> Result<Self> {
        let (c_out, c_in, k_t, k_h, k_w) = weight.dims5()?;
        if weight.dims().contains(&0) {
            bail!(
                "conv3d: weight of shape {:?} is empty; every dimension must be at least 1",
                weight.dims()
            )
        }
        if cfg.stride.1 != cfg.stride.2 {
            bail!(
                "conv3d: spatial strides must be equal, got ({}, {})",
                cfg.stride.1,
                cfg.stride.2
            )
        }
        if cfg.stride.0 == 0 || cfg.stride.1 == 0 {
            bail!("conv3d: stride must be positive, got {:?}", cfg.stride)
        }
        if let Some(b) = &bias {
            if b.dims() != [c_out] {
                bail!(
                    "conv3d: bias shape {:?} does not match C_out {c_out}",
                    b.dims()
                )
            }
        }
        // The CPU path convolves one temporal tap at a time; on CUDA cuDNN takes the whole
        // kernel, and per-tap copies would only double the weights' memory.
        let taps = if weight.device().is_cuda() {
            Vec::new()
        } else {
            (0..k_t)
                .map(|i| weight.narrow(2, i, 1)?.squeeze(2)?.contiguous())
                .collect::<Result<Vec<_>>>()?
        };
        let span = tracing::trace_span!("conv3d", c_in, c_out, k_t, k_h, k_w);
        Ok(Self {
            weight,
            taps,
            bias,
            cfg,
            span,
        })
    }

    /// The weight, shape [C_out, C_in, k_t, k_h, k_w].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, shape [C_out].
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Stride and padding.
    pub fn config(&self) -> Conv3dConfig {
        self.cfg
    }

    /// Number of zero frames the causal padding puts in front of the input (`2·p_t`).
    pub fn front_padding(&self) -> usize {
        2 * self.cfg.padding.0
    }

    /// Applies the convolution.
    ///
    /// `cache` holds input frames that precede `x` in time (the previous chunk's last frames).
    /// When the convolution has temporal padding, they are put in front of `x` and the zero
    /// padding shrinks by their number (a cache longer than the padding is cut to its last
    /// `2·p_t` frames, as torch's negative `F.pad` does). A convolution without temporal padding
    /// ignores the cache, as the reference does.
    ///
    /// # Shapes
    /// - `x`: [B, C_in, T, H, W]
    /// - `cache`: [B, C_in, T_c, H, W]
    /// - output: [B, C_out, T_out, H_out, W_out] with `T_out = (T + 2·p_t − k_t)/s_t + 1` (the
    ///   cache replaces padding, it does not add frames; a convolution without temporal padding
    ///   ignores it) and `H_out = (H + 2·p_h − k_h)/s_h + 1`, likewise W.
    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Tensor> {
        match self.front_frames(x, cache)? {
            Some(front) => self.forward_padded(&layout::cat_time(&[&front, x])?, None),
            None => self.forward_padded(x, None),
        }
    }

    /// The [`Self::front_padding`] frames that go in front of `x`: the last frames of `cache`
    /// (cut to the padding, as torch's negative `F.pad` does) behind zeros for the rest, in the
    /// device's layout; `None` for a convolution without temporal padding.
    ///
    /// # Shapes
    /// - `x`: [B, C_in, T, H, W]; `cache`: [B, C_in, T_c, H, W]; returns [B, C_in, front, H, W].
    pub fn front_frames(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Option<Tensor>> {
        let front = self.front_padding();
        if front == 0 {
            return Ok(None);
        }
        let cached = match cache {
            Some(cache) if cache.dim(2)? > 0 => {
                let t_c = cache.dim(2)?;
                let used = t_c.min(front);
                Some(cache.narrow(2, t_c - used, used)?.to_dtype(x.dtype())?)
            }
            _ => None,
        };
        let used = cached.as_ref().map_or(Ok(0), |c| c.dim(2))?;
        if used == front {
            return Ok(cached);
        }
        let zeros = layout::zero_frames(x, front - used)?;
        Ok(Some(match cached {
            Some(cached) => layout::cat_time(&[&zeros, &cached])?,
            None => zeros,
        }))
    }

    /// [`Self::forward`] on an input that already carries its [`Self::front_padding`] frames
    /// (cache or zeros) in front: for producers that write them in place instead of having
    /// them concatenated, a copy of the whole input. `residual`, when given, is added to the
    /// output (on CUDA in the same pass as the bias).
    ///
    /// # Shapes
    /// - `x`: [B, C_in, front + T, H, W]; output as [`Self::forward`]'s for `T` frames, and
    ///   `residual` the output's shape.
    pub fn forward_padded(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b, c_in, t_pad, in_h, in_w) = x.dims5()?;
        let (c_out, c_in_k, k_t, k_h, k_w) = self.weight.dims5()?;
        if x.dims().contains(&0) {
            bail!(
                "conv3d: input of shape {:?} is empty; every dimension must be at least 1",
                x.dims()
            )
        }
        if c_in != c_in_k {
            bail!("conv3d: input has {c_in} channels, the kernel expects {c_in_k}")
        }
        let (s_t, s_hw) = (self.cfg.stride.0, self.cfg.stride.1);
        let (p_h, p_w) = (self.cfg.padding.1, self.cfg.padding.2);
        if t_pad < k_t {
            bail!("conv3d: {t_pad} frames (after padding) are fewer than the kernel's {k_t}")
        }
        let padded = |n: usize, p: usize| p.checked_mul(2).and_then(|p| p.checked_add(n));
        if padded(in_h, p_h).is_none_or(|h| h < k_h) || padded(in_w, p_w).is_none_or(|w| w < k_w) {
            bail!(
                "conv3d: a frame of {in_h}x{in_w} padded by ({p_h}, {p_w}) is smaller than the \
                 kernel's {k_h}x{k_w}"
            )
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return super::cudnn::conv3d(
                x,
                &self.weight,
                self.bias.as_ref(),
                residual,
                [0, p_h, p_w],
                [s_t, s_hw, s_hw],
            );
        }
        let t_out = (t_pad - k_t) / s_t + 1;
        // [B, T, C, H, W]: frames become rows of the 2D batch.
        let mut x = x.permute((0, 2, 1, 3, 4))?.contiguous()?;
        // candle's conv2d pads both spatial axes by the same amount.
        let p_2d = if p_h == p_w {
            p_h
        } else {
            x = x.pad_with_zeros(3, p_h, p_h)?.pad_with_zeros(4, p_w, p_w)?;
            0
        };
        let (_, _, _, h, w) = x.dims5()?;
        // Half-precision tap outputs are summed in f32.
        let acc_dtype = match x.dtype() {
            DType::BF16 | DType::F16 => DType::F32,
            dt => dt,
        };
        let mut acc: Option<Tensor> = None;
        for (i, tap) in self.taps.iter().enumerate() {
            let frames = if s_t == 1 {
                x.narrow(1, i, t_out)?
            } else {
                let ids: Vec<u32> = (0..t_out).map(|j| (i + j * s_t) as u32).collect();
                let ids = Tensor::new(ids.as_slice(), x.device())?;
                x.index_select(&ids, 1)?
            };
            let frames = frames.reshape((b * t_out, c_in, h, w))?;
            let y = conv2d_any_dtype(&frames, tap, None, p_2d, s_hw)?.to_dtype(acc_dtype)?;
            acc = Some(match acc {
                None => y,
                Some(a) => (a + y)?,
            });
        }
        let Some(mut y) = acc else {
            bail!("conv3d: kernel has no temporal taps")
        };
        if let Some(bias) = &self.bias {
            let bias = bias.to_dtype(acc_dtype)?.reshape((1, c_out, 1, 1))?;
            y = y.broadcast_add(&bias)?;
        }
        let (_, _, h_out, w_out) = y.dims4()?;
        let y = y
            .to_dtype(self.weight.dtype())?
            .reshape((b, t_out, c_out, h_out, w_out))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?;
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

/// `x.conv2d(kernel, padding, stride, 1, 1)` on the CPU, computed in f32 for bf16 (candle
/// 0.11's CPU backend has no bf16 matmul). The result has `x`'s dtype.
fn conv2d_any_dtype(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let y = if x.dtype() == DType::BF16 && x.device().is_cpu() {
        x.to_dtype(DType::F32)?
            .conv2d(&kernel.to_dtype(DType::F32)?, padding, stride, 1, 1)?
            .to_dtype(DType::BF16)?
    } else {
        x.conv2d(kernel, padding, stride, 1, 1)?
    };
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Direct 3D cross-correlation with torch `nn.Conv3d` semantics (symmetric zero padding on all
    /// three axes), one multiply-add at a time in f64.
    ///
    /// # Shapes
    /// - `x`: [B, C_in, T, H, W], `weight`: [C_out, C_in, k_t, k_h, k_w], `bias`: [C_out]
    /// - output: [B, C_out, T_out, H_out, W_out] (f64)
    fn naive_conv3d(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize, usize),
        padding: (usize, usize, usize),
    ) -> Result<Tensor> {
        let (b, c_in, t, h, w) = x.dims5()?;
        let (c_out, c_in_k, k_t, k_h, k_w) = weight.dims5()?;
        if c_in != c_in_k {
            bail!("naive_conv3d: channel mismatch {c_in} vs {c_in_k}")
        }
        let xv = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let wv = weight
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let bv = match bias {
            Some(bias) => bias.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            None => vec![0.0; c_out],
        };
        let out_len = |n: usize, k: usize, p: usize, s: usize| (n + 2 * p - k) / s + 1;
        let (t_o, h_o, w_o) = (
            out_len(t, k_t, padding.0, stride.0),
            out_len(h, k_h, padding.1, stride.1),
            out_len(w, k_w, padding.2, stride.2),
        );
        let mut out = vec![0f64; b * c_out * t_o * h_o * w_o];
        let x_at = |bi: usize, ci: usize, ti: isize, hi: isize, wi: isize| -> f64 {
            if ti < 0
                || hi < 0
                || wi < 0
                || ti >= t as isize
                || hi >= h as isize
                || wi >= w as isize
            {
                return 0.0;
            }
            let (ti, hi, wi) = (ti as usize, hi as usize, wi as usize);
            xv[(((bi * c_in + ci) * t + ti) * h + hi) * w + wi]
        };
        for bi in 0..b {
            for co in 0..c_out {
                for to in 0..t_o {
                    for ho in 0..h_o {
                        for wo in 0..w_o {
                            let mut s = bv[co];
                            for ci in 0..c_in {
                                for kt in 0..k_t {
                                    for kh in 0..k_h {
                                        for kw in 0..k_w {
                                            let ti =
                                                (to * stride.0 + kt) as isize - padding.0 as isize;
                                            let hi =
                                                (ho * stride.1 + kh) as isize - padding.1 as isize;
                                            let wi =
                                                (wo * stride.2 + kw) as isize - padding.2 as isize;
                                            let wgt = wv[(((co * c_in + ci) * k_t + kt) * k_h
                                                + kh)
                                                * k_w
                                                + kw];
                                            s += wgt * x_at(bi, ci, ti, hi, wi);
                                        }
                                    }
                                }
                            }
                            out[(((bi * c_out + co) * t_o + to) * h_o + ho) * w_o + wo] = s;
                        }
                    }
                }
            }
        }
        Tensor::from_vec(out, (b, c_out, t_o, h_o, w_o), x.device())
    }

    /// Deterministic values in [-1, 1) from a 64-bit LCG (Knuth's MMIX constants).
    fn lcg_tensor(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        crate::ops::max_abs_diff(a, b).unwrap()
    }

    /// The causal reference: zero-pad `2·p_t` frames in front, then a plain conv3d without
    /// temporal padding.
    fn causal_reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride: (usize, usize, usize),
        padding: (usize, usize, usize),
    ) -> Tensor {
        let x = x.pad_with_zeros(2, 2 * padding.0, 0).unwrap();
        naive_conv3d(&x, w, Some(b), stride, (0, padding.1, padding.2)).unwrap()
    }

    fn check(
        x_shape: &[usize],
        w_shape: &[usize],
        stride: (usize, usize, usize),
        padding: (usize, usize, usize),
    ) -> f64 {
        let x = lcg_tensor(x_shape, 1);
        let w = lcg_tensor(w_shape, 2);
        let b = lcg_tensor(&[w_shape[0]], 3);
        let conv = CausalConv3d::new(w.clone(), Some(b.clone()), Conv3dConfig { stride, padding })
            .unwrap();
        let got = conv.forward(&x, None).unwrap();
        let want = causal_reference(&x, &w, &b, stride, padding);
        max_abs(&got, &want)
    }

    #[test]
    fn causal_3x3x3_matches_direct_convolution() {
        let err = check(&[2, 3, 5, 7, 6], &[4, 3, 3, 3, 3], (1, 1, 1), (1, 1, 1));
        assert!(err < 1e-5, "max abs {err}");
    }

    #[test]
    fn temporal_stride_two_matches_direct_convolution() {
        // Wan's downsample `time_conv`: kernel (3, 1, 1), stride (2, 1, 1), no padding.
        let err = check(&[1, 4, 7, 3, 5], &[4, 4, 3, 1, 1], (2, 1, 1), (0, 0, 0));
        assert!(err < 1e-5, "max abs {err}");
    }

    #[test]
    fn unequal_spatial_padding_and_stride_match_direct_convolution() {
        let err = check(&[1, 2, 4, 9, 8], &[3, 2, 2, 3, 5], (1, 2, 2), (1, 1, 2));
        assert!(err < 1e-5, "max abs {err}");
    }

    #[test]
    fn pointwise_kernel_matches_direct_convolution() {
        let err = check(&[1, 5, 3, 4, 4], &[6, 5, 1, 1, 1], (1, 1, 1), (0, 0, 0));
        assert!(err < 1e-5, "max abs {err}");
    }

    #[test]
    fn chunks_with_cache_equal_one_pass() {
        // Frames 0, then 1..5, then 5..9, each chunk carrying the previous input's last two
        // frames (one frame of history after the first chunk), as the VAE's feature cache does.
        let x = lcg_tensor(&[1, 3, 9, 5, 4], 4);
        let w = lcg_tensor(&[2, 3, 3, 3, 3], 5);
        let b = lcg_tensor(&[2], 6);
        let conv = CausalConv3d::new(w, Some(b), Conv3dConfig::padded(1)).unwrap();
        let whole = conv.forward(&x, None).unwrap();
        let mut outs = vec![];
        let mut cache: Option<Tensor> = None;
        for (start, len) in [(0, 1), (1, 4), (5, 4)] {
            let chunk = x.narrow(2, start, len).unwrap();
            outs.push(conv.forward(&chunk, cache.as_ref()).unwrap());
            let keep = (start + len).min(2);
            cache = Some(x.narrow(2, start + len - keep, keep).unwrap());
        }
        let chunked = Tensor::cat(&outs, 2).unwrap();
        let err = max_abs(&whole, &chunked);
        assert!(err < 1e-6, "max abs {err}");
    }

    #[test]
    fn longer_cache_is_cut_to_the_padding() {
        let x = lcg_tensor(&[1, 2, 2, 3, 3], 7);
        let w = lcg_tensor(&[2, 2, 3, 3, 3], 8);
        let conv = CausalConv3d::new(w, None, Conv3dConfig::padded(1)).unwrap();
        let three = lcg_tensor(&[1, 2, 3, 3, 3], 9);
        let last_two = three.narrow(2, 1, 2).unwrap();
        let a = conv.forward(&x, Some(&three)).unwrap();
        let b = conv.forward(&x, Some(&last_two)).unwrap();
        assert_eq!(max_abs(&a, &b), 0.0);
    }

    #[test]
    fn half_precision_is_close_to_f32() {
        let x = lcg_tensor(&[1, 4, 3, 6, 6], 10);
        let w = (lcg_tensor(&[4, 4, 3, 3, 3], 11) * 0.2).unwrap();
        let b = lcg_tensor(&[4], 12);
        let cfg = Conv3dConfig::padded(1);
        let want = CausalConv3d::new(w.clone(), Some(b.clone()), cfg)
            .unwrap()
            .forward(&x, None)
            .unwrap();
        for dt in [DType::BF16, DType::F16] {
            let conv =
                CausalConv3d::new(w.to_dtype(dt).unwrap(), Some(b.to_dtype(dt).unwrap()), cfg)
                    .unwrap();
            let got = conv.forward(&x.to_dtype(dt).unwrap(), None).unwrap();
            assert_eq!(got.dtype(), dt);
            let err = max_abs(&got, &want);
            assert!(err < 0.05, "{dt:?}: max abs {err}");
        }
    }

    #[test]
    fn channel_mismatch_is_an_error() {
        let conv = CausalConv3d::new(
            lcg_tensor(&[2, 3, 1, 1, 1], 1),
            None,
            Conv3dConfig::default(),
        )
        .unwrap();
        assert!(conv
            .forward(&lcg_tensor(&[1, 4, 1, 2, 2], 2), None)
            .is_err());
    }

    /// Cases from torch: `tools/fixtures/make_vae_fixtures.py` (`conv3d_cases`, seed 21003,
    /// torch 2.15.0, diffusers 0.42.1) writes `x`, `weight`, `bias`, optional `cache` and the
    /// output `y` of torch `nn.Conv3d` applied to the causally padded input
    /// (`F.pad(x, (p_w, p_w, p_h, p_h, 2·p_t, 0))`), or of diffusers' `WanCausalConv3d(x, cache)`.
    #[test]
    fn matches_torch_conv3d_fixtures() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vae/conv3d_cases.safetensors"
        );
        let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let cases = [
            ("k333_p111", (1, 1, 1), (1, 1, 1)),
            ("k311_s211", (2, 1, 1), (0, 0, 0)),
            ("k235_s122_p112", (1, 2, 2), (1, 1, 2)),
            ("wan_cached", (1, 1, 1), (1, 1, 1)),
            ("wan_cached1", (1, 1, 1), (1, 1, 1)),
        ];
        for (name, stride, padding) in cases {
            let get = |k: &str| t.get(&format!("{name}.{k}")).cloned();
            let conv = CausalConv3d::new(
                get("weight").unwrap(),
                get("bias"),
                Conv3dConfig { stride, padding },
            )
            .unwrap();
            let got = conv
                .forward(&get("x").unwrap(), get("cache").as_ref())
                .unwrap();
            let err = max_abs(&got, &get("y").unwrap());
            assert!(err < 1e-5, "{name}: max abs {err}");
        }
    }
}
