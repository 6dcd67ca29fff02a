//! What a run's shape depends on in its models, decided once from the VAE and the DiT: the
//! latent space (channels, spatial factor), the frame rate of the video, the flow shift a
//! model is sampled at by default, and how image-to-video conditions the DiT.

use vpipe_models::wan::DitConfig;

use crate::error::{Error, Result};

/// Frames a latent frame stands for after the first (the VAEs' temporal factor).
const TEMPORAL_FACTOR: usize = vpipe_models::wan::vae::TEMPORAL_FACTOR;

/// The VAE as plans and runs see it: its latent space and its sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VaeSizes {
    /// Latent channels (16 for Wan 2.1, 48 for Wan 2.2).
    pub(crate) latent_channels: usize,
    /// Pixels per latent cell along each side (8 for Wan 2.1, 16 for Wan 2.2).
    pub(crate) spatial_factor: usize,
    /// Side of the patches the frames are folded into before the encoder (1; Wan 2.2: 2).
    pub(crate) patch: usize,
    /// Channels of the encoder's first and the decoder's last stage (Wan 2.1: 96 and 96, Wan
    /// 2.2: 160 and 256): what the VAE's activations scale with.
    pub(crate) encoder_base_dim: usize,
    pub(crate) decoder_base_dim: usize,
    /// Its weights once loaded.
    pub(crate) bytes: u64,
}

impl VaeSizes {
    /// The Wan 2.1 VAE (also Wan 2.2 A14B's): 126.9 M parameters of `elem` bytes.
    pub(crate) fn wan21(elem: u64) -> Self {
        Self::of_config(&vpipe_models::wan::vae::Config::wan21(), 126_900_000 * elem)
    }

    /// The Wan 2.2 VAE (TI2V-5B's): 704.7 M parameters of `elem` bytes.
    pub(crate) fn wan22(elem: u64) -> Self {
        Self::of_config(&vpipe_models::wan::vae::Config::wan22(), 704_700_000 * elem)
    }

    fn of_config(cfg: &vpipe_models::wan::vae::Config, bytes: u64) -> Self {
        Self {
            latent_channels: cfg.z_dim,
            spatial_factor: cfg.spatial_factor(),
            patch: cfg.patch(),
            encoder_base_dim: cfg.base_dim,
            decoder_base_dim: cfg.decoder_base_dim.unwrap_or(cfg.base_dim),
            bytes,
        }
    }

    /// The sizes of a VAE checkpoint of header `inspection` whose weights take `bytes` once
    /// loaded; `None` when the header holds no Wan VAE configuration.
    pub(crate) fn of_header(inspection: &vpipe_ckpt::Inspection, bytes: u64) -> Option<Self> {
        let Some(vpipe_ckpt::ModelConfig::Vae(c)) = &inspection.detection.config else {
            return None;
        };
        let patch = c.patch_size.unwrap_or(1).max(1);
        let stages = c.dim_mult.as_ref().map_or(4, Vec::len);
        Some(Self {
            latent_channels: c.z_dim,
            spatial_factor: (1usize << stages.saturating_sub(1).min(8)) * patch,
            patch,
            encoder_base_dim: c.base_dim,
            decoder_base_dim: c.decoder_base_dim.unwrap_or(c.base_dim),
            bytes,
        })
    }

    /// The latents of a video of `frames` × `height` × `width`: [1, C, 1 + (frames − 1)/4,
    /// height / f, width / f].
    pub(crate) fn latent_shape(&self, frames: usize, height: usize, width: usize) -> [usize; 5] {
        [
            1,
            self.latent_channels,
            1 + frames.saturating_sub(1) / TEMPORAL_FACTOR,
            height / self.spatial_factor,
            width / self.spatial_factor,
        ]
    }

    /// A name for messages: "Wan 2.2 VAE (48 latent channels, 16× per side)".
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} ({} latent channels, {}× per side)",
            if self.patch > 1 {
                "Wan 2.2 VAE"
            } else {
                "Wan 2.1 VAE"
            },
            self.latent_channels,
            self.spatial_factor
        )
    }
}

/// The model family of a run, as far as its output depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelFamily {
    /// Wan 2.1's models and Wan 2.2's A14B experts, on the Wan 2.1 VAE: 16 fps; image-to-video
    /// reads a mask and the conditioning frames' latents as extra input channels.
    Wan21Vae,
    /// Wan 2.2 TI2V-5B on the Wan 2.2 VAE: 24 fps (`wan_ti2v_5B.py`'s `sample_fps`), shift 5;
    /// image-to-video keeps the image's latent as the first latent frame, whose tokens get
    /// timestep 0 (`vpipe_models::wan::ti2v`).
    Ti2v,
}

impl ModelFamily {
    /// The family of a DiT of configuration `dit` on a VAE of `vae`, checked to fit each other:
    /// the DiT gives out the VAE's latent channels, and takes them (with the image channels
    /// of a Wan 2.1-style image-to-video model). `names` are the DiT's and the VAE's for
    /// messages.
    pub(crate) fn of(dit: &DitConfig, vae: &VaeSizes, names: (&str, &str)) -> Result<Self> {
        let c = vae.latent_channels;
        // Noise, a 4-channel frame mask and the conditioning latents.
        let image_channels = 2 * c + TEMPORAL_FACTOR;
        if dit.out_channels != c || (dit.in_channels != c && dit.in_channels != image_channels) {
            return Err(Error::BadInput(format!(
                "the DiT {} takes {} latent channels and gives out {}, but the VAE {} is a {}; \
                 a DiT and a VAE of one family go together (Wan 2.2 TI2V-5B with the Wan 2.2 \
                 VAE, every other Wan with the Wan 2.1 VAE)",
                names.0,
                dit.in_channels,
                dit.out_channels,
                names.1,
                vae.describe()
            )));
        }
        Ok(if vae.patch > 1 {
            Self::Ti2v
        } else {
            Self::Wan21Vae
        })
    }

    /// Frames per second of the video.
    pub(crate) fn fps(self) -> u32 {
        match self {
            Self::Wan21Vae => 16,
            Self::Ti2v => 24,
        }
    }

    /// The flow shift without `--shift` (`None`: the caller's default).
    pub(crate) fn default_shift(self) -> Option<f64> {
        match self {
            Self::Wan21Vae => None,
            Self::Ti2v => Some(5.0),
        }
    }

    /// Whether image-to-video keeps the image as the first latent frame (TI2V) rather than
    /// giving it to the DiT as extra channels.
    pub(crate) fn first_frame_conditioning(self) -> bool {
        self == Self::Ti2v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_follows_the_vae_and_a_mismatched_pair_is_bad_input() {
        let (wan21, wan22) = (VaeSizes::wan21(2), VaeSizes::wan22(2));
        assert_eq!(wan21.latent_shape(81, 480, 832), [1, 16, 21, 60, 104]);
        assert_eq!(wan22.latent_shape(121, 704, 1280), [1, 48, 31, 44, 80]);
        let ti2v = DitConfig::wan22_ti2v_5b();
        let names = ("--dit d.safetensors", "--vae v.safetensors");
        assert_eq!(
            ModelFamily::of(&ti2v, &wan22, names).unwrap(),
            ModelFamily::Ti2v
        );
        assert_eq!(ModelFamily::Ti2v.fps(), 24);
        for dit in [DitConfig::wan21_t2v_14b(), DitConfig::wan21_i2v_14b()] {
            let family = ModelFamily::of(&dit, &wan21, names).unwrap();
            assert_eq!((family, family.fps()), (ModelFamily::Wan21Vae, 16));
            let err = ModelFamily::of(&dit, &wan22, names)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("d.safetensors") && err.contains("v.safetensors"),
                "{err}"
            );
        }
        assert!(ModelFamily::of(&ti2v, &wan21, names).is_err());
    }
}
