"""The DDPM: its UNet backbone (MONAI ``DiffusionModelUNet``) and its noise schedule."""

from .backbone import PRESETS, BackboneConfig, build_unet, count_parameters
from .diffusion import NoiseSchedule

__all__ = ["PRESETS", "BackboneConfig", "build_unet", "count_parameters", "NoiseSchedule"]
