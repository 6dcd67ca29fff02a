//! Wan 2.1 model components for vpipe (the VAE is being built).
