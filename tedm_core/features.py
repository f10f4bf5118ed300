"""Multi-timestep decoder features of a pretrained DDPM UNet.

For each image and each timestep t in S: draw eps (deterministically), form x_t, run the UNet,
keep every tapped decoder level's output at its native resolution. The |S| noisy copies of
an image go through the UNet as one batch, and the forward pass stops as soon as the last
tapped level is reached (the rest of the decoder and the output convolution never run).
Upsampling to the image size is left to the head (see ``heads.PixelMLP``), which applies its
first, linear layer at native resolution: the same logits at a fraction of the memory.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Hashable, List, Optional, Sequence

import torch
from monai.networks.nets import DiffusionModelUNet

from .errors import Cancelled
from .model.diffusion import NoiseSchedule
from .runtime import module_on, resolve_inference_precision

TEDM_TIMESTEPS = (1, 10, 25, 50, 200, 400, 600, 800)
LEDM_TIMESTEPS = (50, 150, 250)
INFERENCE_SEED = 0

# Level features: one tensor per tapped decoder level, shape (N, S, C_l, h_l, w_l), deepest first.
LevelFeatures = List[torch.Tensor]


class _StopForward(Exception):
    """Raised by the last tap's hook: the decoder work after it is not needed."""


def _cancel_hook(cancel: Callable[[], bool]) -> Callable[..., None]:
    def check(_module: torch.nn.Module, _args: object) -> None:
        if cancel():
            raise Cancelled("cancelled")

    return check


def timestep_noise(shape: Sequence[int], timesteps: Sequence[int], seed: int, draw: int = 0) -> torch.Tensor:
    """eps of shape ``(S, *shape)``: a function of (seed, draw, t) only.

    So a slice's features do not depend on which other slices share its batch, nor on the
    order of slices: segmenting a volume in any batch size gives identical results.
    """
    noise = []
    for t in timesteps:
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(draw) * 10_007 + int(t))
        noise.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(noise)


def weights_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s weights: what a pass of it computes in outside autocast."""
    return next(module.parameters()).dtype


def unet_for_passes(unet: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The UNet that runs gradient-free passes in ``precision``: ``unet`` itself for fp32, for bf16
    a copy with bf16 weights (``unet``, shared, is never cast), which runs without autocast
    (:func:`in_weights_precision`).

    Why not autocast over the fp32 weights: autocast casts every weight at every call and
    converts the activations around the operations it keeps in fp32. With bf16 weights (and
    SDPA, which beat the explicit attention here, where it lost under autocast) the pipeline's
    passes ran 1.07-1.10x faster than autocast with explicit attention in three full runs of
    ``benchmarks/benchmark.py`` (``unet`` against ``unet_bf16_autocast``: e.g. 340.9 against
    319.5 GFLOP/s, AMX CPU, one thread, session 21), with the same agreement with fp32 (Dice
    0.998-0.999). Normalisation keeps fp32 accumulation in bf16 (PyTorch's CPU and CUDA kernels
    compute their statistics in float)."""
    if precision != "bf16":
        return unet
    return module_on(unet, next(unet.parameters()).device, torch.bfloat16)


def in_weights_precision(unet: torch.nn.Module, device: torch.device) -> ContextManager[None]:
    """A pass of ``unet`` in its weights' own precision: autocast off for bf16 weights (see
    :func:`unet_for_passes`), the caller's autocast (if any) kept for fp32 ones."""
    if weights_dtype(unet) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def module_shape(module: torch.nn.Module) -> Hashable:
    """What decides a module's speed, not its values: its class and its parameters' shapes."""
    return (type(module).__name__,) + tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def measured_pass_precision(
    unet: torch.nn.Module,
    run: Callable[[torch.nn.Module, torch.Tensor], object],
    precision: str,
    device: torch.device,
    image_size: int,
    memory_format: torch.memory_format = torch.contiguous_format,
    key: Hashable = (),
) -> str:
    """:func:`runtime.resolve_inference_precision` for gradient-free passes of ``unet``: ``auto``
    on a CPU with native bf16 times ``run(unet_for_passes(unet, p), images)`` on one blank
    ``image_size`` slice in fp32 and bf16, once per process for this model shape, layout and ``key``."""
    images = torch.zeros(1, unet.in_channels, image_size, image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    unets: Dict[str, torch.nn.Module] = {}

    @torch.no_grad()
    def one_pass(pass_precision: str) -> None:
        if pass_precision not in unets:
            unets[pass_precision] = unet_for_passes(unet, pass_precision)
        run(unets[pass_precision], images)

    full_key = (module_shape(unet), images.shape, str(memory_format), key)
    return resolve_inference_precision(precision, device, one_pass, full_key)


class DecoderFeatureExtractor(torch.nn.Module):
    """Taps the outputs of a ``DiffusionModelUNet``'s decoder levels, before their upsampling.

    Args:
        unet: a pretrained noise-predicting UNet (left unchanged: its hooks live for one pass).
        schedule: its noise schedule.
        levels: indices of the decoder levels to tap (0 = deepest); default all.
    """

    def __init__(
        self, unet: DiffusionModelUNet, schedule: NoiseSchedule, levels: Optional[Sequence[int]] = None
    ) -> None:
        super().__init__()
        self.unet = unet.eval()
        self.schedule = schedule
        n_levels = len(unet.up_blocks)
        self.levels = tuple(range(n_levels)) if levels is None else tuple(sorted({int(i) for i in levels}))
        if not self.levels or min(self.levels) < 0 or max(self.levels) >= n_levels:
            raise ValueError(f"decoder levels must be within 0..{n_levels - 1}, got {levels}")
        self._captured: Dict[int, torch.Tensor] = {}

    def _register_tap(self, level: int) -> torch.utils.hooks.RemovableHandle:
        block = self.unet.up_blocks[level]
        last = level == self.levels[-1]

        def keep(tensor: torch.Tensor) -> None:
            self._captured[level] = tensor
            if last:
                raise _StopForward

        if getattr(block, "upsampler", None) is not None:
            # The level's own resolution is the upsampler's input.
            return block.upsampler.register_forward_pre_hook(lambda _m, args: keep(args[0]))
        return block.register_forward_hook(lambda _m, _args, output: keep(output))

    def _blocks(self) -> List[torch.nn.Module]:
        return [*self.unet.down_blocks, self.unet.middle_block, *self.unet.up_blocks]

    @property
    def level_channels(self) -> List[int]:
        return [int(self.unet.block_out_channels[::-1][i]) for i in self.levels]

    def in_precision(self, precision: str) -> DecoderFeatureExtractor:
        """This extractor with the UNet that runs ``precision``'s passes (:func:`unet_for_passes`)."""
        unet = unet_for_passes(self.unet, precision)
        return self if unet is self.unet else DecoderFeatureExtractor(unet, self.schedule, self.levels)

    def pass_precision(
        self,
        precision: str,
        device: torch.device,
        image_size: int,
        timesteps: Sequence[int],
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> str:
        """The precision of this extractor's passes: :func:`measured_pass_precision` of one
        slice x ``timesteps``."""
        return measured_pass_precision(
            self.unet,
            lambda unet, images: DecoderFeatureExtractor(unet, self.schedule, self.levels)(images, timesteps),
            precision,
            device,
            image_size,
            memory_format,
            key=(self.levels, len(timesteps)),
        )

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        timesteps: Sequence[int],
        seed: int = INFERENCE_SEED,
        draw: int = 0,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> LevelFeatures:
        """``images`` (N, C, H, W) in [-1, 1] -> per level (N, S, C_l, h_l, w_l).

        ``cancel`` is asked before every UNet block and raises :class:`Cancelled` when it says
        so: a batch of slices x timesteps takes seconds on a CPU, a block a few milliseconds,
        which is what lets a worker stop a job within a second of the user's Cancel.
        """
        self.schedule.validate_timesteps(timesteps)
        n, s = images.shape[0], len(timesteps)
        eps = timestep_noise(images.shape[1:], timesteps, seed, draw).to(images.device, images.dtype)
        x0 = images.float().repeat_interleave(s, dim=0)  # (N*S, C, H, W), image-major
        t = torch.as_tensor(list(timesteps), device=images.device, dtype=torch.long).repeat(n)
        # In the weights' dtype: bf16 weights run without autocast (in_weights_precision).
        x_t = self.schedule.add_noise(x0, eps.repeat(n, 1, 1, 1), t).to(weights_dtype(self.unet))
        self._captured.clear()
        # Hooks are attached for this pass only, so several extractors (or a Slicer session
        # holding one while a batch job builds another) can share one UNet safely.
        handles = [self._register_tap(i) for i in self.levels]
        if cancel is not None:
            handles += [block.register_forward_pre_hook(_cancel_hook(cancel)) for block in self._blocks()]
        try:
            with in_weights_precision(self.unet, images.device):
                self.unet(x_t, t)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        features = [self._captured[i] for i in self.levels]
        self._captured.clear()
        return [f.reshape(n, s, *f.shape[1:]) for f in features]
