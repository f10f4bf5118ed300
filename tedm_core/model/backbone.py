"""The DDPM's noise-predicting UNet: MONAI's ``DiffusionModelUNet`` in three presets."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Tuple

import torch
from monai.networks.nets import DiffusionModelUNet

from ..choices import PRESET_NAMES
from ..errors import SettingError


@dataclass(frozen=True)
class BackboneConfig:
    """Everything needed to rebuild the UNet; stored as JSON beside its weights."""

    channels: Tuple[int, ...]
    attention_levels: Tuple[bool, ...]
    num_res_blocks: int
    norm_num_groups: int
    num_head_channels: int
    in_channels: int = 1
    image_size: int = 64
    preset: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels must have one entry per level")
        down = 2 ** (len(self.channels) - 1)
        if self.image_size < down or self.image_size % down:
            raise SettingError(
                "image_size",
                f"{self.image_size}: the UNet halves the grid {len(self.channels) - 1} times, "
                f"so the size must be a multiple of {down}",
            )

    @property
    def decoder_channels(self) -> Tuple[int, ...]:
        """Channels of each decoder level's output, deepest (lowest resolution) first."""
        return tuple(reversed(self.channels))

    @property
    def decoder_strides(self) -> Tuple[int, ...]:
        """Downsampling factor of each decoder level relative to the input, deepest first."""
        n = len(self.channels)
        return tuple(2 ** (n - 1 - i) for i in range(n))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["channels"], d["attention_levels"] = list(self.channels), list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> BackboneConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def with_(self, **changes: Any) -> BackboneConfig:
        return replace(self, **changes)


# Measured on this project's 2-core CPU machines (fp32, batch 16, one Adam step; the README's
# "method, as implemented"): tiny 0.33 s at 64 px; small 1.2 s at 64 px, 10.3 s at 128 px.
# 128 px is therefore a GPU resolution; `small` at 64 px trains ~3,000 steps an hour on 2 cores.
PRESETS: Dict[str, BackboneConfig] = {
    # Tests: a forward pass in milliseconds, pretraining on 20 images in seconds.
    "tiny": BackboneConfig((16, 32, 32), (False, False, False), 1, 8, 16, image_size=32, preset="tiny"),
    # The CPU default: 2.7 M parameters, attention at the 16 px level only.
    "small": BackboneConfig((32, 64, 128), (False, False, True), 1, 16, 32, image_size=64, preset="small"),
    # Four levels, as a separate implementation that held up better on other hospitals' framing
    # (issue 10): 32-64-128-128 (4.5 M parameters), attention at the two deepest levels (8 and
    # 16 px at 64 px input), so the deepest features see the whole chest.
    "small4": BackboneConfig((32, 64, 128, 128), (False, False, True, True), 1, 16, 32, image_size=64, preset="small4"),
    # The paper's capacity: base 64, multipliers (1, 2, 4, 8), 128 px. MONAI's decoder has
    # num_res_blocks + 1 blocks per level, so 1 here gives the authors' 2-down/2-up layout
    # (42.9 M parameters; theirs was 36 M with linear attention, which MONAI does not have,
    # so full attention sits at the deepest level only).
    "paper": BackboneConfig(
        (64, 128, 256, 512), (False, False, False, True), 1, 32, 64, image_size=128, preset="paper"
    ),
}
assert tuple(PRESETS) == PRESET_NAMES  # the torch-free names the faces offer (tedm_core.choices)


_UNET_PARAMETERS = inspect.signature(DiffusionModelUNet.__init__).parameters


def build_unet(config: BackboneConfig, out_channels: int | None = None) -> DiffusionModelUNet:
    """The UNet for ``config``; ``out_channels`` defaults to ``in_channels`` (eps prediction).

    Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (MONAI's
    ``use_flash_attention``): the same function of the same weights (features within 1.1e-6 of
    the explicit softmax(QK^T)V), without materialising the attention matrix, which measured
    1.3x faster for the `small` UNet's inference on the project's CPUs and needs less memory
    (``benchmarks/benchmark.py`` measures both), and in bf16 too (``features.unet_for_passes``).
    A flag of the modules, not of the weights: checkpoints are unchanged."""
    options = {"use_flash_attention": True} if "use_flash_attention" in _UNET_PARAMETERS else {}
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=config.in_channels,
        out_channels=config.in_channels if out_channels is None else out_channels,
        channels=config.channels,
        attention_levels=config.attention_levels,
        num_res_blocks=config.num_res_blocks,
        norm_num_groups=config.norm_num_groups,
        num_head_channels=config.num_head_channels,
        **options,
    )


def attention_modules(unet: torch.nn.Module) -> List[torch.nn.Module]:
    """MONAI's attention blocks of ``unet``: the modules with a ``use_flash_attention`` flag."""
    return [m for m in unet.modules() if hasattr(m, "use_flash_attention")]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
