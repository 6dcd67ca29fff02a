//! With the `cuda` feature, compiles the crate's own CUDA kernels to PTX with the toolkit's
//! nvcc (the same one candle-kernels uses: `CUDA_HOME` / `PATH`, `CUDA_COMPUTE_CAP`).

fn main() {
    const KERNELS: [&str; 5] = ["rms_channels", "dit", "attention", "vae", "fp8"];
    for name in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{name}.cu");
    }
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| std::path::PathBuf::from(home).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    for name in KERNELS {
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
            .arg(out.join(format!("{name}.ptx")))
            .arg(format!("kernels/{name}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on kernels/{name}.cu");
    }
}
