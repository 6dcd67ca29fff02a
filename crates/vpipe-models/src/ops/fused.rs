//! vpipe's own CUDA kernels (built to PTX by `build.rs` with the `cuda` feature).

// Device allocation and kernel launch are FFI; each unsafe block says what it relies on.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Storage, Tensor};

use crate::ops::attention::fused_kernel_applies;
use crate::ops::layout;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_channels.ptx"));

/// Whether 16-bit elements may go four at a time (8-byte accesses): every element offset the
/// kernel adds is divisible by 4.
fn vec4(dtype: DType, offsets: &[usize]) -> bool {
    dtype.size_in_bytes() == 2 && offsets.iter().all(|n| n.is_multiple_of(4))
}

/// `{base}_{dtype}` or `{base}_{dtype}_vec4`.
fn kernel_name(base: &str, dtype: DType, four: bool) -> candle_core::Result<String> {
    let vec = if four { "_vec4" } else { "" };
    Ok(format!("{base}_{}{vec}", suffix(dtype)?))
}

/// RMS norm over the channels of a clip, times `gamma` per channel, then SiLU if asked, in one
/// kernel; the output is channels-last ([`layout`]) and, given `front` frames, starts with a
/// copy of them: the input of a causal convolution whose cache (or zero padding) is `front`,
/// without concatenating the normed clip to it afterwards.
///
/// `x` is read in place when its channels are contiguous and the positions of a frame evenly
/// spaced (any channels-last clip, time slices included); anything else is copied first.
///
/// # Shapes
/// - `x`: [B, C, T, H, W]; `gamma`: C elements; `front`: [B, C, F, H, W].
/// - returns [B, C, F + T, H, W] (F = 0 without `front`).
pub fn rms_norm_channels_last(
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    silu: bool,
    front: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let mut rows = layout::physical(x)?;
    let st = rows.layout().stride();
    if st[4] != 1 || st[2] != w * st[3] {
        rows = rows.contiguous()?;
    }
    let st = rows.layout().stride().to_vec();
    let (x_batch, x_frame, x_position) = (st[0], st[1], st[3]);
    let f = match front {
        Some(front) => {
            let (fb, fc, f, fh, fw) = front.dims5()?;
            if (fb, fc, fh, fw) != (b, c, h, w) {
                candle_core::bail!(
                    "rms_norm_channels_last: front frames {:?} do not match the input {:?}",
                    front.dims(),
                    x.dims()
                );
            }
            f
        }
        None => 0,
    };
    let gamma = gamma.to_dtype(x.dtype())?.contiguous()?;
    if gamma.elem_count() != c {
        candle_core::bail!(
            "rms_norm_channels_last: {} gains for {c} channels",
            gamma.elem_count()
        );
    }
    let (out, op) = empty(x, &[b, f + t, h, w, c])?;
    let positions = h * w;
    let row_count = b * t * positions;
    let four = vec4(
        x.dtype(),
        &[
            c,
            x_batch,
            x_frame,
            x_position,
            rows.layout().start_offset(),
        ],
    );
    let func = x.device().as_cuda_device()?.get_or_load_custom_func(
        &kernel_name("rms_rows", x.dtype(), four)?,
        "vpipe_rms_channels",
        PTX,
    )?;
    let (xp, gp) = (layout_ptr(&rows)?, device_ptr(&gamma)?);
    let (ci, ti) = (c as i32, t as i32);
    let longs = [positions, row_count, x_batch, x_frame, x_position, f + t, f].map(|n| n as i64);
    let silu = silu as i32;
    let mut a = func.builder();
    a.arg(&xp);
    a.arg(&gp);
    a.arg(&op);
    a.arg(&ci);
    a.arg(&ti);
    for n in &longs {
        a.arg(n);
    }
    a.arg(&eps);
    a.arg(&silu);
    // Eight rows (warps) per block of 256 threads.
    let cfg = LaunchConfig {
        grid_dim: (row_count.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match `rms_rows_*` in kernels/rms_channels.cu; the kernel reads `x`
    // only through its own shape and strides, and writes every row of frames F.. of `out`
    // (frames ..F are written below).
    unsafe { a.launch(cfg) }.w()?;
    if let Some(front) = front {
        let front = layout::physical(&front.to_dtype(x.dtype())?)?.contiguous()?;
        out.slice_set(&front, 1, 0)?;
    }
    layout::logical(&out)
}

const VAE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/vae.ptx"));

/// Nearest ×2 spatial upsampling of every frame into a channels-last clip: one kernel, which
/// reads `x` through its strides, so neither a layout change nor the time upsampling's
/// interleave is copied first.
///
/// `x` is `[B, C, T, H, W]`, or `[B, C, T, R, H, W]` whose frame `t·R + r` is
/// `x[.., t, r, ..]` (the interleave), any strides.
///
/// # Shapes
/// - `x`: [B, C, T, H, W] or [B, C, T, R, H, W]; returns [B, C, T·R, 2H, 2W] channels-last.
pub fn upsample2x_channels_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let (d, st, r) = (x.dims(), x.layout().stride(), x.rank());
    if r != 5 && r != 6 {
        candle_core::bail!(
            "upsample2x_channels_last: expected rank 5 or 6, got {:?}",
            d
        );
    }
    let (b, c, h, w) = (d[0], d[1], d[r - 2], d[r - 1]);
    let (frames, s_outer, s_inner, inner) = if r == 6 {
        (d[2] * d[3], st[2], st[3], d[3])
    } else {
        (d[2], st[2], 0, 1)
    };
    let (out, op) = empty(x, &[b, frames, 2 * h, 2 * w, c])?;
    let four = st[1] == 1
        && vec4(
            x.dtype(),
            &[
                c,
                st[0],
                s_outer,
                s_inner,
                st[r - 2],
                st[r - 1],
                x.layout().start_offset(),
            ],
        );
    let total = (b * frames * h * w * c / if four { 4 } else { 1 }) as i64;
    let func = x.device().as_cuda_device()?.get_or_load_custom_func(
        &kernel_name("upsample2x_cl", x.dtype(), four)?,
        "vpipe_vae",
        VAE_PTX,
    )?;
    let xp = layout_ptr(x)?;
    let ints = [c, frames, h, w, inner].map(|n| n as i32);
    let strides = [st[0], st[1], s_outer, s_inner, st[r - 2], st[r - 1]].map(|n| n as i64);
    let mut a = func.builder();
    a.arg(&xp);
    a.arg(&op);
    for n in &ints {
        a.arg(n);
    }
    a.arg(&total);
    for n in &strides {
        a.arg(n);
    }
    // SAFETY: arguments match `upsample2x_cl_*` in kernels/vae.cu; the kernel reads `x` only
    // through its own shape and strides, and writes all of `out`.
    unsafe { a.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
    layout::logical(&out)
}

/// Shared memory a block may take without the function's explicit permission.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// A convolution filter in cuDNN's channels-last order, zero-padded to `k_total` output and
/// `c_total` input channels: one kernel that reads and writes contiguously (a permuted copy
/// reads the 2-byte weights `2·kt·kh·kw` bytes apart).
///
/// # Shapes
/// - `filter`: [K, C, kt, kh, kw]; returns [k_total, kt, kh, kw, c_total], contiguous.
pub fn filter_channels_last(
    filter: &Tensor,
    k_total: usize,
    c_total: usize,
) -> candle_core::Result<Tensor> {
    let (k, c, kt, kh, kw) = filter.dims5()?;
    let taps = kt * kh * kw;
    if k_total < k || c_total < c {
        candle_core::bail!(
            "filter_channels_last: {k_total} x {c_total} channels cannot hold [{k}, {c}]"
        );
    }
    let staged = c * taps * filter.dtype().size_in_bytes();
    if staged > DEFAULT_SHARED_BYTES {
        // Larger than any Wan VAE filter: a padded permuted copy.
        let w = filter
            .permute((0, 2, 3, 4, 1))?
            .pad_with_zeros(4, 0, c_total - c)?
            .pad_with_zeros(0, 0, k_total - k)?;
        return w.contiguous();
    }
    let filter = filter.contiguous()?;
    let (out, op) = empty(&filter, &[k_total, kt, kh, kw, c_total])?;
    let func = filter.device().as_cuda_device()?.get_or_load_custom_func(
        &format!("filter_channels_last_{}", suffix(filter.dtype())?),
        "vpipe_vae",
        VAE_PTX,
    )?;
    let wp = device_ptr(&filter)?;
    let ints = [k, c, taps, c_total].map(|n| n as i32);
    let mut a = func.builder();
    a.arg(&wp);
    a.arg(&op);
    for n in &ints {
        a.arg(n);
    }
    let cfg = LaunchConfig {
        grid_dim: (k_total as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: staged as u32,
    };
    // SAFETY: arguments match `filter_channels_last_*` in kernels/vae.cu; `filter` is a live
    // contiguous [K, C, taps] tensor, the staged slice fits the default shared memory, and
    // the kernel writes all k_total · taps · c_total elements of `out`.
    unsafe { a.launch(cfg) }.w()?;
    Ok(out)
}

/// `y ← y + bias + residual` **in place** (either may be absent), summed in f32 and rounded
/// once: a convolution's epilogue.
///
/// `y` must be a fresh packed channels-last output that nothing else shares.
///
/// # Shapes
/// - `y`: [..., C] contiguous; `bias`: C elements; `residual`: `y`'s shape, contiguous.
pub fn bias_residual_in_place(
    y: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> candle_core::Result<()> {
    if bias.is_none() && residual.is_none() {
        return Ok(());
    }
    let c = y.dim(candle_core::D::Minus1)?;
    let bias = bias
        .map(|b| b.to_dtype(y.dtype())?.contiguous())
        .transpose()?;
    if let Some(b) = &bias {
        if b.elem_count() != c {
            candle_core::bail!("bias_residual: {} biases for {c} channels", b.elem_count());
        }
    }
    if let Some(r) = residual {
        if r.dims() != y.dims() || r.dtype() != y.dtype() {
            candle_core::bail!(
                "bias_residual: residual {:?} {:?} does not match {:?} {:?}",
                r.dims(),
                r.dtype(),
                y.dims(),
                y.dtype()
            );
        }
    }
    let offsets: Vec<usize> = [Some(y), bias.as_ref(), residual]
        .into_iter()
        .flatten()
        .map(|t| t.layout().start_offset())
        .chain([c])
        .collect();
    let four = vec4(y.dtype(), &offsets);
    let yp = device_ptr(y)?;
    let bp = bias.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
    let rp = residual.map(device_ptr).transpose()?.unwrap_or(0);
    let total = (y.elem_count() / if four { 4 } else { 1 }) as i64;
    let ci = c as i32;
    let func = y.device().as_cuda_device()?.get_or_load_custom_func(
        &kernel_name("bias_residual", y.dtype(), four)?,
        "vpipe_vae",
        VAE_PTX,
    )?;
    let mut a = func.builder();
    a.arg(&yp);
    a.arg(&bp);
    a.arg(&rp);
    a.arg(&ci);
    a.arg(&total);
    // SAFETY: arguments match `bias_residual_*` in kernels/vae.cu; `y` and `residual` are
    // live contiguous tensors of `y`'s element count, `bias` holds C elements, and a null
    // pointer marks an absent operand.
    unsafe { a.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
    Ok(())
}

const DIT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dit.ptx"));

/// The kernel-name suffix of a dtype, and the check that the DiT kernels have it.
pub(crate) fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => candle_core::bail!("vpipe DiT kernels: no kernel for {other:?}"),
    }
}

/// A contiguous CUDA tensor's raw device pointer (the tensor must stay alive while it is used).
pub(crate) fn device_ptr(t: &Tensor) -> candle_core::Result<u64> {
    if !t.layout().is_contiguous() {
        candle_core::bail!("vpipe DiT kernels: tensors must be contiguous");
    }
    layout_ptr(t)
}

/// The raw device pointer of a CUDA tensor's first element, whatever its strides.
pub(crate) fn layout_ptr(t: &Tensor) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        candle_core::bail!("vpipe DiT kernels: tensors must be on the CUDA device")
    };
    let offset = (layout.start_offset() * t.dtype().size_in_bytes()) as u64;
    let stream = cuda.device.cuda_stream();
    let base = match &cuda.slice {
        candle_core::cuda_backend::CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        candle_core::cuda_backend::CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        candle_core::cuda_backend::CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        candle_core::cuda_backend::CudaStorageSlice::F8E4M3(s) => s.device_ptr(&stream).0,
        _ => candle_core::bail!("vpipe DiT kernels: unsupported dtype {:?}", t.dtype()),
    };
    Ok(base + offset)
}

/// An uninitialised CUDA tensor like `like` (device, dtype) of `shape`, and its device pointer;
/// the kernel that receives the pointer must write every element.
pub(crate) fn empty(like: &Tensor, shape: &[usize]) -> candle_core::Result<(Tensor, u64)> {
    empty_on(like.device().as_cuda_device()?, like.dtype(), shape)
}

/// An uninitialised tensor of `dtype` and `shape` on `device`, and its device pointer; the
/// kernel that receives the pointer must write every element.
pub(crate) fn empty_on(
    device: &candle_core::CudaDevice,
    dtype: DType,
    shape: &[usize],
) -> candle_core::Result<(Tensor, u64)> {
    let device = device.clone();
    let n: usize = shape.iter().product();
    let stream = device.cuda_stream();
    // SAFETY (all four): the caller's kernel writes every element.
    let storage = match dtype {
        DType::F32 => {
            CudaStorage::wrap_cuda_slice(unsafe { stream.alloc::<f32>(n) }.w()?, device.clone())
        }
        DType::BF16 => CudaStorage::wrap_cuda_slice(
            unsafe { stream.alloc::<half::bf16>(n) }.w()?,
            device.clone(),
        ),
        DType::F16 => CudaStorage::wrap_cuda_slice(
            unsafe { stream.alloc::<half::f16>(n) }.w()?,
            device.clone(),
        ),
        DType::F8E4M3 => CudaStorage::wrap_cuda_slice(
            unsafe { stream.alloc::<float8::F8E4M3>(n) }.w()?,
            device.clone(),
        ),
        other => candle_core::bail!("vpipe DiT kernels: no kernel for {other:?}"),
    };
    let out = Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false);
    let ptr = device_ptr(&out)?;
    Ok((out, ptr))
}

/// How a kernel of one row per block takes `rows` rows of `width` elements of `dtype` at the
/// device `addresses` it reads and writes: eight 16-bit elements a thread where the width is
/// a multiple of eight and every address 16-byte aligned, a thread per group of eight in
/// whole warps (at most `max_threads`); else one element a thread, 256 threads. Whether it
/// goes eight-wide, and the launch (with `shared` bytes of dynamic shared memory); an error
/// naming `what` where the rows are more than one launch covers.
fn row_launch(
    what: &str,
    dtype: DType,
    (rows, width): (usize, usize),
    addresses: &[u64],
    (max_threads, shared): (usize, u32),
) -> candle_core::Result<(bool, LaunchConfig)> {
    const VEC: usize = 8;
    let eight_wide = matches!(dtype, DType::BF16 | DType::F16)
        && width.is_multiple_of(VEC)
        && addresses.iter().all(|p| p.is_multiple_of(2 * VEC as u64));
    let threads = if eight_wide {
        ((width / VEC).div_ceil(32) * 32).min(max_threads)
    } else {
        256
    };
    let grid = u32::try_from(rows).map_err(|_| {
        candle_core::Error::Msg(format!("{what}: {rows} rows, more than one launch covers"))
    })?;
    Ok((
        eight_wide,
        LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: shared,
        },
    ))
}

/// Where a kernel of one token row per block that may quantise its rows writes
/// (kernels/common.cuh's `store_row_at`): its output, or float8 rows for a float8 product.
#[derive(Clone, Copy)]
enum RowsOut {
    /// The output's device address.
    Plain(u64),
    /// The float8 values' and scales' device addresses, and the rows they hold (those past
    /// the input's rows are padding).
    Fp8 {
        values: u64,
        scales: u64,
        padded: usize,
    },
}

impl RowsOut {
    /// Float8 rows of `width` for `rows` rows padded to `padded` on `device`: the values
    /// [padded, width] e4m3 and the scales [padded] f32 (uninitialised: the kernel writes
    /// every row), and where they are.
    fn fp8_on(
        device: &candle_core::CudaDevice,
        (rows, padded): (usize, usize),
        width: usize,
    ) -> candle_core::Result<(Tensor, Tensor, Self)> {
        let padded = padded.max(rows);
        let (values, vp) = empty_on(device, DType::F8E4M3, &[padded, width])?;
        let (scales, sp) = empty_on(device, DType::F32, &[padded])?;
        let out = Self::Fp8 {
            values: vp,
            scales: sp,
            padded,
        };
        Ok((values, scales, out))
    }

    /// The blocks to launch for `rows` rows (the padding rows too), and the address of the
    /// rows they write.
    fn grid_and_written(self, rows: usize) -> (usize, u64) {
        match self {
            Self::Plain(out) => (rows, out),
            Self::Fp8 { values, padded, .. } => (padded.max(rows), values),
        }
    }

    /// The kernel's `y`, `y8` and `y8_scales` addresses (0 for none).
    fn addresses(self) -> (u64, u64, u64) {
        match self {
            Self::Plain(out) => (out, 0, 0),
            Self::Fp8 { values, scales, .. } => (0, values, scales),
        }
    }
}

/// `LN(x) · mul[b] + add[b]`: layer norm without affine over the last dimension with f32
/// statistics, then a per-sample (or shared) f32 multiply-add, rounded once to `x`'s dtype.
///
/// # Shapes
/// - `x`: [B, L, D]; `mul`, `add`: [B, 1, D] or [1, 1, D], f32. Returns [B, L, D].
pub fn ln_modulate(
    x: &Tensor,
    mul: &Tensor,
    add: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    let (out, op) = empty(x, &[b, l, d])?;
    launch_ln_modulate(x, (mul, add, eps), RowsOut::Plain(op))?;
    Ok(out)
}

/// [`ln_modulate`] with its output quantised per row for a float8 product, as
/// `fp8::Fp8Rows::quantize` quantises, from the norm's f32 values (not rounded to `x`'s
/// dtype first): e4m3 values
/// [padded, D] and f32 scales [padded], the rows past B·L zeros with zero scales. `None`,
/// with nothing done, where the eight-wide kernel does not take `x` (a dtype other than bf16
/// and f16, rows not a multiple of eight wide, addresses not 16-byte aligned).
///
/// # Shapes
/// As [`ln_modulate`]; `padded` at least B·L.
pub fn ln_modulate_fp8(
    x: &Tensor,
    (mul, add, eps): (&Tensor, &Tensor, f32),
    padded: usize,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let (b, l, d) = x.dims3()?;
    let (values, scales, out) = RowsOut::fp8_on(x.device().as_cuda_device()?, (b * l, padded), d)?;
    Ok(launch_ln_modulate(x, (mul, add, eps), out)?.map(|()| (values, scales)))
}

/// Launches `ln_modulate_*` on `x` into `out`, or `ln_modulate_rows_x8_*` where eight-wide
/// (always for float8 rows); `None`, with nothing done, where float8 rows are asked and the
/// eight-wide kernel does not take `x`.
fn launch_ln_modulate(
    x: &Tensor,
    (mul, add, eps): (&Tensor, &Tensor, f32),
    out: RowsOut,
) -> candle_core::Result<Option<()>> {
    let (b, l, d) = x.dims3()?;
    let x = x.contiguous()?;
    let mod_batches = mul.dim(0)?;
    let stride = if mod_batches == 1 { 0i64 } else { d as i64 };
    let mul = mul.to_dtype(DType::F32)?.contiguous()?;
    let add = add.to_dtype(DType::F32)?.contiguous()?;
    let (xp, mp, ap) = (device_ptr(&x)?, device_ptr(&mul)?, device_ptr(&add)?);
    let (dim, rows_per_batch) = (d as i32, l as i64);
    let (grid, written) = out.grid_and_written(b * l);
    let (rows_x8, mut cfg) = row_launch(
        "ln_modulate",
        x.dtype(),
        (grid, d),
        &[xp, written, mp, ap],
        (1024, (d * 4) as u32),
    )?;
    if matches!(out, RowsOut::Fp8 { .. }) && !rows_x8 {
        return Ok(None);
    }
    // Rows of up to 8 192 elements (1 024 groups of eight) are held in registers, at most
    // eight groups a thread in blocks of at most 128 threads (`ln_modulate_rows_held{n}_*`):
    // several rows in flight on a multiprocessor; wider ones go through shared memory.
    let groups = d / 8;
    let held = rows_x8.then(|| groups.div_ceil(128)).filter(|&g| g <= 8);
    let kernel = match held {
        Some(per_thread) => {
            let threads = (groups.div_ceil(per_thread).div_ceil(32) * 32) as u32;
            cfg.block_dim = (threads, 1, 1);
            cfg.shared_mem_bytes = 0;
            format!("ln_modulate_rows_held{per_thread}_{}", suffix(x.dtype())?)
        }
        None if rows_x8 => format!("ln_modulate_rows_x8_{}", suffix(x.dtype())?),
        None => format!("ln_modulate_{}", suffix(x.dtype())?),
    };
    let func =
        x.device()
            .as_cuda_device()?
            .get_or_load_custom_func(&kernel, "vpipe_dit", DIT_PTX)?;
    let (yp, vp, sp) = out.addresses();
    let rows = (b * l) as i64;
    let mut a = func.builder();
    a.arg(&xp);
    a.arg(&mp);
    a.arg(&ap);
    a.arg(&yp);
    a.arg(&dim);
    a.arg(&rows_per_batch);
    a.arg(&stride);
    a.arg(&eps);
    if rows_x8 {
        a.arg(&vp);
        a.arg(&sp);
        a.arg(&rows);
    }
    // SAFETY: arguments match `ln_modulate_*` (or `ln_modulate_rows_x8_*`, or
    // `ln_modulate_rows_held{n}_*`, whose n groups of eight a thread cover the row) in
    // kernels/dit.cu;
    // `x`, `mul` and `add` are live contiguous tensors of the sizes the kernel reads; `out`
    // holds B·L·D elements of x's dtype, or float8 rows (`RowsOut::fp8_on`: the values
    // `grid`·D bytes and the scales `grid` f32), each row written whole by its block; 16-byte
    // aligned (`mul` and `add` too) with rows a multiple of eight 16-bit elements for the
    // eight-wide kernel.
    unsafe { a.launch(cfg) }.w()?;
    Ok(Some(()))
}

/// `x + r · gate[b]` in f32, rounded once to `x`'s dtype.
///
/// # Shapes
/// - `x`, `r`: [B, L, D] of one dtype; `gate`: [B, 1, D] f32. Returns [B, L, D].
pub fn gated_residual(x: &Tensor, r: &Tensor, gate: &Tensor) -> candle_core::Result<Tensor> {
    let (b, _, d) = x.dims3()?;
    let gate = gate
        .to_dtype(DType::F32)?
        .broadcast_as((b, 1, d))?
        .contiguous()?;
    residual_rows(x, r, Some(&gate))
}

/// `x + r` in f32, rounded once to `x`'s dtype (the cross-attention's residual, one pass
/// where candle's broadcasting add takes about four times as long).
///
/// # Shapes
/// - `x`, `r`: [B, L, D] of one dtype. Returns [B, L, D].
pub fn residual(x: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
    residual_rows(x, r, None)
}

/// `x + r · gate[b]` (or `x + r` without a gate), in f32, one block per row (eight 16-bit
/// elements a thread where the rows allow it).
fn residual_rows(x: &Tensor, r: &Tensor, gate: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    let x = x.contiguous()?;
    let r = r.to_dtype(x.dtype())?.contiguous()?;
    let (out, op) = empty(&x, &[b, l, d])?;
    if x.elem_count() == 0 {
        return Ok(out);
    }
    let (xp, rp) = (device_ptr(&x)?, device_ptr(&r)?);
    let gp = gate.map(device_ptr).transpose()?.unwrap_or(0);
    let (rows_x8, cfg) = row_launch(
        "residual",
        x.dtype(),
        (b * l, d),
        &[xp, rp, op, gp],
        (256, 0),
    )?;
    let width = if rows_x8 { "_x8" } else { "" };
    let func = x.device().as_cuda_device()?.get_or_load_custom_func(
        &format!("gated_residual_rows{width}_{}", suffix(x.dtype())?),
        "vpipe_dit",
        DIT_PTX,
    )?;
    let (dim, rows) = (d as i32, l as i64);
    let mut a = func.builder();
    a.arg(&xp);
    a.arg(&rp);
    a.arg(&gp);
    a.arg(&op);
    a.arg(&dim);
    a.arg(&rows);
    // SAFETY: `x`, `r` and `out` are contiguous [b, l, d] of one dtype (16-byte aligned with
    // d a multiple of eight for the eight-wide kernel, the gate too: `row_launch`); `gate`,
    // when given, is [b, 1, d] f32 (else null, which the kernel reads as no gate). One block
    // per row on their stream.
    unsafe { a.launch(cfg) }.w()?;
    Ok(out)
}

/// Rotary embedding of interleaved pairs (in f32) fused with the head split.
///
/// # Shapes
/// - `x`: [B, L, H·D] (token-major, straight from a linear layer); `cos`, `sin`: [L, D/2] f32.
/// - returns [B, H, L, D] in `x`'s dtype.
pub fn rope_heads(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    let d = hd / heads;
    let x = x.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let (xp, cp, sp) = (device_ptr(&x)?, device_ptr(&cos)?, device_ptr(&sin)?);
    let cfg = LaunchConfig::for_num_elems((b * l * hd / 2) as u32);
    let (bi, li, hi, di) = (b as i32, l as i32, heads as i32, d as i32);
    let (out, op) = empty(&x, &[b, heads, l, d])?;
    let func = x.device().as_cuda_device()?.get_or_load_custom_func(
        &format!("rope_heads_{}", suffix(x.dtype())?),
        "vpipe_dit",
        DIT_PTX,
    )?;
    let mut a = func.builder();
    a.arg(&xp);
    a.arg(&cp);
    a.arg(&sp);
    a.arg(&op);
    a.arg(&bi);
    a.arg(&li);
    a.arg(&hi);
    a.arg(&di);
    // SAFETY: as in `ln_modulate`, for `rope_heads_*`.
    unsafe { a.launch(cfg) }.w()?;
    Ok(out)
}

/// The q/k RMS norm across all heads (`x · rstd · weight`, rounded once to `x`'s dtype, as
/// candle's `rms_norm`) and [`rope_heads`] in one pass over the tokens, eight elements a
/// thread. `None`, with nothing written, where the kernel does not take these
/// operands (a dtype other than bf16 and f16, heads not a multiple of eight wide, addresses
/// not 16-byte aligned): the caller norms and rotates apart.
///
/// # Shapes
/// - `x`: [B, L, H·D]; `weight`: [H·D] in `x`'s dtype; `cos`, `sin`: [L, D/2] f32.
/// - returns [B, H, L, D] in `x`'s dtype.
pub fn rms_rope_heads(
    x: &Tensor,
    (weight, eps): (&Tensor, f32),
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
) -> candle_core::Result<Option<Tensor>> {
    const VEC: usize = 8;
    let (b, l, hd) = x.dims3()?;
    let d = hd / heads.max(1);
    if heads == 0
        || d * heads != hd
        || !d.is_multiple_of(VEC)
        || weight.dtype() != x.dtype()
        || weight.elem_count() != hd
        || cos.dims() != [l, d / 2]
        || sin.dims() != [l, d / 2]
        || b * l == 0
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let (xp, wp) = (device_ptr(&x)?, device_ptr(&weight)?);
    let (out, op) = empty(&x, &[b, heads, l, d])?;
    let (eight_wide, cfg) = row_launch(
        "rms_rope_heads",
        x.dtype(),
        (b * l, hd),
        &[xp, wp, op],
        (1024, 0),
    )?;
    if !eight_wide {
        return Ok(None);
    }
    let (cp, sp) = (device_ptr(&cos)?, device_ptr(&sin)?);
    let (li, hi, di) = (l as i32, heads as i32, d as i32);
    let func = x.device().as_cuda_device()?.get_or_load_custom_func(
        &format!("rms_rope_heads_x8_{}", suffix(x.dtype())?),
        "vpipe_dit",
        DIT_PTX,
    )?;
    let mut a = func.builder();
    a.arg(&xp);
    a.arg(&wp);
    a.arg(&cp);
    a.arg(&sp);
    a.arg(&op);
    a.arg(&li);
    a.arg(&hi);
    a.arg(&di);
    a.arg(&eps);
    // SAFETY: `x` is contiguous [b, l, heads·d] and `weight` [heads·d], both of one 16-bit
    // dtype and 16-byte aligned, d a multiple of eight (checked above); `cos` and `sin` are
    // [l, d/2] f32; `out` is a fresh [b, heads, l, d] buffer of x's dtype (the allocator's
    // alignment), every element of which one block per token writes. All on their stream.
    unsafe { a.launch(cfg) }.w()?;
    Ok(Some(out))
}

/// `float(w8) · scale` in `dtype`: a scaled float8 e4m3 weight made usable for a matmul (a
/// scale of exactly 1 gives a plain float8 weight's values exactly: every e4m3 value is exact
/// in f32, bf16 and f16).
///
/// # Shapes
/// - `weight`: any shape, float8 e4m3; `scale`: one element (any float dtype, moved to
///   `weight`'s device). Returns `weight`'s shape.
pub fn dequantize_fp8(
    weight: &Tensor,
    scale: &Tensor,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    if weight.dtype() != DType::F8E4M3 {
        candle_core::bail!(
            "dequantize_fp8: expected a float8 e4m3 weight, got {:?}",
            weight.dtype()
        );
    }
    if scale.elem_count() != 1 {
        // The kernel reads `scale[0]` whatever the tensor holds.
        candle_core::bail!(
            "dequantize_fp8: expected one scale, got shape {:?}",
            scale.dims()
        );
    }
    let like = Tensor::zeros((), dtype, weight.device())?;
    if weight.elem_count() == 0 {
        // A launch of no blocks is an error; there is nothing to convert.
        return like.broadcast_as(weight.dims())?.contiguous();
    }
    // One thread per element: the grid is sized from a u32.
    let n = match u32::try_from(weight.elem_count()) {
        Ok(n) => n,
        Err(_) => candle_core::bail!(
            "dequantize_fp8: {} elements, more than one launch covers ({})",
            weight.elem_count(),
            u32::MAX
        ),
    };
    let weight = weight.contiguous()?;
    let scale = scale
        .to_device(weight.device())?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .contiguous()?;
    let (wp, sp) = (device_ptr(&weight)?, device_ptr(&scale)?);
    let (out, op) = empty(&like, weight.dims())?;
    let func = weight.device().as_cuda_device()?.get_or_load_custom_func(
        &format!("dequant_fp8_{}", suffix(dtype)?),
        "vpipe_dit",
        DIT_PTX,
    )?;
    let mut a = func.builder();
    let elements = n as i64;
    a.arg(&wp);
    a.arg(&sp);
    a.arg(&op);
    a.arg(&elements);
    // SAFETY: as in `ln_modulate`, for `dequant_fp8_*`; `scale` holds the one f32 it reads.
    unsafe { a.launch(LaunchConfig::for_num_elems(n)) }.w()?;
    Ok(out)
}

/// The float8 attention's output back in `dtype`: `float(o8) · scale + mean[b]` per token
/// row (the values' mean over the keys, taken off before the attention), in one pass, eight
/// elements a thread. `None`, with nothing done, where that kernel does not take the operands
/// (a dtype other than bf16 and f16, rows not a multiple of eight wide, an unaligned address):
/// the caller dequantises and adds the mean apart.
///
/// # Shapes
/// - `o8`: [B, L, C] float8 e4m3; `scale`: one f32; `mean`: B·C f32 (row b's C channels
///   from b·C on). Returns [B, L, C] in `dtype`.
pub fn dequantize_rows_with_mean(
    o8: &Tensor,
    scale: &Tensor,
    mean: &Tensor,
    dtype: DType,
) -> candle_core::Result<Option<Tensor>> {
    let (b, l, c) = o8.dims3()?;
    let (out, op) = empty_on(o8.device().as_cuda_device()?, dtype, &[b, l, c])?;
    Ok(launch_dequant_rows_mean(o8, (scale, mean), dtype, RowsOut::Plain(op))?.map(|()| out))
}

/// [`dequantize_rows_with_mean`] quantised per row for a float8 product instead, as
/// `fp8::Fp8Rows::quantize` quantises, from the f32 values (not rounded to `dtype` first):
/// e4m3 values [padded, C] and f32 scales [padded], the rows past B·L zeros with zero scales.
/// `None`, with nothing done, where the kernel does not take the operands.
///
/// # Shapes
/// As [`dequantize_rows_with_mean`]; `padded` at least B·L.
pub fn dequantize_rows_with_mean_fp8(
    o8: &Tensor,
    (scale, mean): (&Tensor, &Tensor),
    dtype: DType,
    padded: usize,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let (b, l, c) = o8.dims3()?;
    let (values, scales, out) = RowsOut::fp8_on(o8.device().as_cuda_device()?, (b * l, padded), c)?;
    Ok(launch_dequant_rows_mean(o8, (scale, mean), dtype, out)?.map(|()| (values, scales)))
}

/// Launches `dequant_rows_mean_x8_*` on `o8` into `out` (a `dtype` output or float8 rows);
/// `None`, with nothing done, where the kernel does not take the operands.
fn launch_dequant_rows_mean(
    o8: &Tensor,
    (scale, mean): (&Tensor, &Tensor),
    dtype: DType,
    out: RowsOut,
) -> candle_core::Result<Option<()>> {
    let (b, l, c) = o8.dims3()?;
    if o8.dtype() != DType::F8E4M3
        || scale.dtype() != DType::F32
        || scale.elem_count() != 1
        || mean.dtype() != DType::F32
        || mean.elem_count() != b * c
        || b * l == 0
    {
        return Ok(None);
    }
    let (o8, mean) = (o8.contiguous()?, mean.contiguous()?);
    let (input, sp, mp) = (device_ptr(&o8)?, device_ptr(scale)?, device_ptr(&mean)?);
    let (grid, written) = out.grid_and_written(b * l);
    // The float8 rows are read as 8-byte words, the mean and the 16-bit output (or the
    // float8 one, 16-byte aligned as a fresh buffer) as 16-byte words; a thread a group of
    // eight, so that a row quantised for a product is computed once.
    let (eight_wide, cfg) = row_launch(
        "dequantize_rows_with_mean",
        dtype,
        (grid, c),
        &[written, mp],
        (1024, 0),
    )?;
    if !eight_wide || !input.is_multiple_of(8) {
        return Ok(None);
    }
    let func = o8.device().as_cuda_device()?.get_or_load_custom_func(
        &format!("dequant_rows_mean_x8_{}", suffix(dtype)?),
        "vpipe_dit",
        DIT_PTX,
    )?;
    let (yp, vp, scales_p) = out.addresses();
    let (dim, rows_per_batch, rows) = (c as i32, l as i64, (b * l) as i64);
    let mut a = func.builder();
    a.arg(&input);
    a.arg(&sp);
    a.arg(&mp);
    a.arg(&yp);
    a.arg(&dim);
    a.arg(&rows_per_batch);
    a.arg(&vp);
    a.arg(&scales_p);
    a.arg(&rows);
    // SAFETY: `o8` is contiguous [b, l, c] float8 (8-byte aligned, c a multiple of eight:
    // checked above and by `row_launch`), `scale` one f32, `mean` b·c f32 (16-byte aligned:
    // `row_launch`); `out` a fresh [b, l, c] buffer of `dtype`, or float8 rows
    // (`RowsOut::fp8_on`: the values `grid`·c bytes and the scales `grid` f32), 16-byte
    // aligned, each row written whole by its block. All on their stream.
    unsafe { a.launch(cfg) }.w()?;
    Ok(Some(()))
}

/// `y ← act(y + bias)` **in place**, act = identity or GELU(tanh), in f32 per element.
///
/// `y` must be a fresh tensor that nothing else shares (a matmul's output): its buffer is
/// overwritten, which saves the allocation and the second pass of a separate add and GELU.
///
/// # Shapes
/// - `y`: [..., D] contiguous; `bias`: [D] of `y`'s dtype.
pub fn bias_act_in_place(y: &Tensor, bias: &Tensor, gelu: bool) -> candle_core::Result<()> {
    let d = y.dim(candle_core::D::Minus1)?;
    let bias = bias.to_dtype(y.dtype())?.contiguous()?;
    let (yp, bp) = (device_ptr(y)?, device_ptr(&bias)?);
    let n = y.elem_count() as i64;
    let (dim, gelu) = (d as i32, gelu as i32);
    let func = y.device().as_cuda_device()?.get_or_load_custom_func(
        &format!("bias_act_{}", suffix(y.dtype())?),
        "vpipe_dit",
        DIT_PTX,
    )?;
    let mut a = func.builder();
    a.arg(&yp);
    a.arg(&bp);
    a.arg(&n);
    a.arg(&dim);
    a.arg(&gelu);
    // SAFETY: as in `ln_modulate`, for `bias_act_*`; `y` is contiguous with `n` elements.
    unsafe { a.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
    Ok(())
}

/// Whether [`flash_attention`] takes these operands: the device, dtype and head dim of
/// [`fused_kernel_applies`], the head dimension contiguous, every row 16-byte aligned (its
/// loads are 16 bytes wide), and batch × heads and the lengths within its launch grid and
/// 32-bit indices.
pub fn flash_attention_supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let (Ok((b, h, lq, head_dim)), Ok((_, _, lk, _))) = (q.dims4(), k.dims4()) else {
        return false;
    };
    let within_grid = b * h <= 65_535 && lq <= i32::MAX as usize && lk <= i32::MAX as usize;
    let aligned = |t: &Tensor| {
        let layout = t.layout();
        t.rank() == 4
            && t.dim(3).is_ok_and(|d| d == head_dim)
            && layout.stride()[3] == 1
            && layout.stride()[..3].iter().all(|s| s.is_multiple_of(8))
            && layout.start_offset().is_multiple_of(8)
    };
    within_grid
        && fused_kernel_applies(q.device().is_cuda(), q.dtype(), head_dim)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && [q, k, v].into_iter().all(aligned)
}

/// Query rows per block in kernels/attention.cu.
const FLASH_BLOCK_Q: usize = 128;
/// Its dynamic shared memory: q (128 rows), k and v (64 rows each), rows of 128 elements padded
/// to 272 bytes.
const FLASH_SHARED_BYTES: u32 = (128 + 2 * 64) * 272;
const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// `softmax(q·kᵀ / √D) · v` in one kernel (kernels/attention.cu): no score matrix exists, so
/// it needs no scratch beyond its output. The caller checks [`flash_attention_supports`].
///
/// The output is written token-major and returned as a [B, H, Lq, D] view of it, so that the
/// usual `transpose(1, 2)` back to [B, Lq, H, D] is free.
///
/// # Shapes
/// - `q`: [B, H, Lq, D], `k` and `v`: [B, H, Lk, D] (any strides with D contiguous), D = 128.
/// - returns [B, H, Lq, D].
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    if !flash_attention_supports(q, k, v) {
        candle_core::bail!(
            "flash_attention: unsupported operands q {:?} {:?}, k {:?}, v {:?}",
            q.dims(),
            q.dtype(),
            k.dims(),
            v.dims()
        );
    }
    let (b, h, lq, d) = q.dims4()?;
    let (kb, kh, lk, _) = k.dims4()?;
    if (kb, kh) != (b, h) || v.dims4()? != (b, h, lk, d) || k.dim(3)? != d {
        candle_core::bail!(
            "flash_attention: q {:?}, k {:?} and v {:?} must be [B, H, L, D] with equal B, H and D",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (token_major, op) = empty(q, &[b, lq, h, d])?;
    let out = token_major.transpose(1, 2)?;
    let ptrs = [layout_ptr(q)?, layout_ptr(k)?, layout_ptr(v)?, op];
    let layouts = [q.layout(), k.layout(), v.layout(), out.layout()];
    // SAFETY: q, k and v are live tensors; `op` is `token_major`'s fresh buffer, which the
    // kernel writes in full.
    unsafe {
        launch_flash(
            q.device().as_cuda_device()?,
            q.dtype(),
            ptrs,
            layouts,
            (b, h, lq, lk, d),
        )
    }?;
    Ok(out)
}

/// [`flash_attention`] that writes its output over `q` (same layout), so that no output
/// buffer exists next to q, k and v: each block of the kernel reads its query rows into shared
/// memory before any output row is written, and writes only those rows.
///
/// # Shapes
/// As [`flash_attention`]; `q` holds [B, H, Lq, D] of output afterwards.
///
/// # Errors
/// Operands [`flash_attention`] does not take, or `q` sharing its memory with `k` or `v`.
pub fn flash_attention_in_place(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
    if !flash_attention_supports(q, k, v) {
        candle_core::bail!(
            "flash_attention_in_place: unsupported operands q {:?} {:?}, k {:?}, v {:?}",
            q.dims(),
            q.dtype(),
            k.dims(),
            v.dims()
        );
    }
    q.inplace_op3(k, v, &FlashInPlace)
}

struct FlashInPlace;

impl candle_core::InplaceOp3 for FlashInPlace {
    fn name(&self) -> &'static str {
        "flash-attention-in-place"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("flash-attention-in-place runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &mut CudaStorage,
        ql: &candle_core::Layout,
        k: &CudaStorage,
        kl: &candle_core::Layout,
        v: &CudaStorage,
        vl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let dims = |l: &candle_core::Layout| -> candle_core::Result<(usize, usize, usize, usize)> {
            l.shape().dims4()
        };
        let (b, h, lq, d) = dims(ql)?;
        let (_, _, lk, _) = dims(kl)?;
        let ptrs = [
            storage_ptr(q, ql)?,
            storage_ptr(k, kl)?,
            storage_ptr(v, vl)?,
            storage_ptr(q, ql)?,
        ];
        // SAFETY: the storages are held (q written, k and v read) for the launch; the output
        // rows a block writes are the query rows it read first, of its own (batch, head).
        unsafe {
            launch_flash(
                &q.device,
                q.dtype(),
                ptrs,
                [ql, kl, vl, ql],
                (b, h, lq, lk, d),
            )
        }
    }
}

/// The device pointer of a storage's first element under `layout`.
fn storage_ptr(storage: &CudaStorage, layout: &candle_core::Layout) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = storage.device.cuda_stream();
    let base = match &storage.slice {
        candle_core::cuda_backend::CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        candle_core::cuda_backend::CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        _ => candle_core::bail!(
            "flash attention: bf16 or f16 only, got {:?}",
            storage.dtype()
        ),
    };
    Ok(base + (layout.start_offset() * storage.dtype().size_in_bytes()) as u64)
}

/// Launches `flash_attention_*` (kernels/attention.cu) on q, k, v and out given by device
/// pointer and layout ([B, H, L, D], head dimension contiguous).
///
/// # Safety
/// The pointers must address live buffers of `dtype` covering their layouts; out must be
/// writable and no other work may use it meanwhile.
unsafe fn launch_flash(
    device: &candle_core::CudaDevice,
    dtype: DType,
    [qp, kp, vp, op]: [u64; 4],
    layouts: [&candle_core::Layout; 4],
    (b, h, lq, lk, d): (usize, usize, usize, usize, usize),
) -> candle_core::Result<()> {
    let [qs, ks, vs, os] = layouts.map(|l| {
        let s = l.stride();
        [s[0] as i64, s[1] as i64, s[2] as i64]
    });
    let (heads, q_len, k_len) = (h as i32, lq as i32, lk as i32);
    let scale_log2 = (std::f64::consts::LOG2_E / (d as f64).sqrt()) as f32;
    let func = device.get_or_load_custom_func(
        &format!("flash_attention_{}", suffix(dtype)?),
        "vpipe_attention",
        ATTENTION_PTX,
    )?;
    // Over 48 KiB of shared memory per block needs the function's explicit permission.
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        FLASH_SHARED_BYTES as i32,
    )
    .w()?;
    let cfg = LaunchConfig {
        grid_dim: (lq.div_ceil(FLASH_BLOCK_Q) as u32, (b * h) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: FLASH_SHARED_BYTES,
    };
    let mut a = func.builder();
    a.arg(&qp);
    a.arg(&kp);
    a.arg(&vp);
    a.arg(&op);
    for s in [&qs, &ks, &vs, &os] {
        for x in s {
            a.arg(x);
        }
    }
    a.arg(&heads);
    a.arg(&q_len);
    a.arg(&k_len);
    a.arg(&scale_log2);
    // SAFETY: arguments match `flash_attention_*` in kernels/attention.cu; the caller vouches
    // for the buffers; the kernel reads q, k and v only below the lengths passed.
    unsafe { a.launch(cfg) }.w()?;
    Ok(())
}
