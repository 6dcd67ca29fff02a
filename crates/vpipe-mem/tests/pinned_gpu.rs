//! The CUDA host tier on a real device: weights copied into pinned memory as they are stored,
//! or converted on the way (dtype change), come back on the device equal to the file's values.
//! Built only with the `cuda` feature; run by `bench/gpu-pipeline.sh`.
#![cfg(feature = "cuda")]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use vpipe_mem::{Budget, MemorySession, Tier};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn weights_reach_the_device_equal_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let ramp = |n: usize, scale: f64| {
        Tensor::arange(0u32, n as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(scale, -1.0)
            .unwrap()
    };
    let tensors: HashMap<String, Tensor> = [
        (
            "a.weight",
            ramp(3 * 1000 * 7, 1e-4).to_dtype(DType::BF16).unwrap(),
        ),
        ("b.weight", ramp(17, 0.1).to_dtype(DType::F16).unwrap()),
        ("c.bias", ramp(5, 0.25)),
        ("d.weight", ramp(1 << 20, 1e-6)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();

    // As stored (every tensor read raw), and converted to bf16 (f32 and f16 ones converted).
    for load_dtype in [None, Some(DType::BF16)] {
        let mut session =
            MemorySession::new(Device::new_cuda(0).unwrap(), Budget::default()).unwrap();
        let model = session.register("m", &path, load_dtype).unwrap();
        session
            .phase("use", |p| -> Result<(), vpipe_mem::MemError> {
                p.make_resident(model)?;
                {
                    let lease = p.lease(model)?;
                    for (name, original) in &tensors {
                        let on_device = lease.get(name)?;
                        assert!(on_device.device().is_cuda());
                        let expected = match load_dtype {
                            Some(dtype)
                                if original.dims().len() > 1 || original.elem_count() > 1 =>
                            {
                                original.to_dtype(dtype).unwrap()
                            }
                            _ => original.clone(),
                        };
                        let back = on_device.to_device(&Device::Cpu).unwrap();
                        assert_eq!(back.dims(), original.dims(), "{name}");
                        let err = max_abs_diff(&back, &expected);
                        println!(
                            "{name} ({load_dtype:?}): {:?}, max abs {err:e}",
                            back.dtype()
                        );
                        assert_eq!(err, 0.0, "{name} with {load_dtype:?}");
                    }
                }
                p.offload(model, Tier::Disk)?;
                Ok(())
            })
            .unwrap();
    }
}
