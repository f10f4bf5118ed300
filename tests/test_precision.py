"""The precision of gradient-free UNet passes: measured on the CPU, not assumed, and agreeing with fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_disc_images

from tedm_core import runtime
from tedm_core.bundle import load_bundle
from tedm_core.pipelines.evaluate import dice_precision_recall
from tedm_core.pipelines.segment import Segmenter


class FakeClock:
    """Stands in for ``time.perf_counter``: a pass advances it by what its precision costs."""

    def __init__(self, fp32_seconds: float, bf16_seconds: float) -> None:
        self.now, self.cost = 0.0, {"fp32": fp32_seconds, "bf16": bf16_seconds}
        self.passes = 0

    def __call__(self) -> float:
        return self.now

    def run_pass(self) -> None:
        self.passes += 1
        self.now += self.cost["bf16" if torch.is_autocast_enabled("cpu") else "fp32"]


@pytest.fixture
def clock(monkeypatch):
    def make(fp32_seconds: float, bf16_seconds: float, native_bf16: bool = True) -> FakeClock:
        fake = FakeClock(fp32_seconds, bf16_seconds)
        monkeypatch.setattr(runtime.time, "perf_counter", fake)
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
        monkeypatch.setattr(runtime, "_MEASURED_PRECISION", {})
        return fake

    return make


CPU = torch.device("cpu")


def test_bf16_is_chosen_only_when_measured_clearly_faster(clock):
    fast = clock(fp32_seconds=2.0, bf16_seconds=1.0)
    assert runtime.resolve_inference_precision("auto", CPU, fast.run_pass, key="a") == "bf16"
    assert fast.passes == 8  # warm-up and 3 timed passes per precision
    # A tie (within BF16_MIN_GAIN) keeps fp32: its outputs are the reference.
    tie = clock(fp32_seconds=1.1, bf16_seconds=1.0)
    assert runtime.resolve_inference_precision("auto", CPU, tie.run_pass, key="a") == "fp32"
    slow = clock(fp32_seconds=1.0, bf16_seconds=1.3)
    assert runtime.resolve_inference_precision("auto", CPU, slow.run_pass, key="a") == "fp32"


def test_the_measurement_is_made_once_per_key(clock):
    fake = clock(fp32_seconds=2.0, bf16_seconds=1.0)
    for _ in range(3):
        assert runtime.resolve_inference_precision("auto", CPU, fake.run_pass, key="model A") == "bf16"
    assert fake.passes == 8
    runtime.resolve_inference_precision("auto", CPU, fake.run_pass, key="model B")
    assert fake.passes == 16


def test_no_measurement_where_bf16_is_emulated_or_the_precision_is_given(clock):
    emulated = clock(fp32_seconds=2.0, bf16_seconds=1.0, native_bf16=False)
    assert runtime.resolve_inference_precision("auto", CPU, emulated.run_pass, key="a") == "fp32"
    for given in ("fp32", "bf16"):
        assert runtime.resolve_inference_precision(given, CPU, emulated.run_pass, key="a") == given
    assert emulated.passes == 0


def test_a_bf16_segmenter_agrees_with_fp32(tiny_bundle_dir):
    """What the measured choice may switch on: labels within Dice 0.99 of fp32's, recorded."""
    bundle = load_bundle(tiny_bundle_dir)
    images, _ = synthetic_disc_images(4, size=32, seed=5)
    outputs = {}
    for precision in ("fp32", "bf16"):
        segmenter = Segmenter(bundle, device="cpu", precision=precision)
        assert segmenter.provenance()["precision"] == precision
        outputs[precision] = segmenter.predict(images)
    fp32, bf16 = outputs["fp32"], outputs["bf16"]
    assert fp32.labels.any()
    for a, b in zip(bf16.labels, fp32.labels):
        assert dice_precision_recall(a == 1, b == 1)[0] >= 0.99
    assert np.abs(bf16.probabilities - fp32.probabilities).max() < 0.05
    assert bf16.probabilities.dtype == np.float32


def test_the_baseline_measures_its_own_pass(clock, monkeypatch, tiny_backbone_dir):
    """The supervised baseline has no feature extractor: its full UNet pass is what is timed
    (each real pass also advances the fake clock by its precision's cost)."""
    import tedm_core.features as features
    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines.fit import fit_bundle

    images, masks = synthetic_disc_images(2, size=32, seed=3)
    bundle = fit_bundle(
        load_backbone(tiny_backbone_dir), images, masks, "baseline", ["background", "disc"], [0, 1],
        steps=5, device="cpu", show_progress=False,
    )  # fmt: skip
    fake = clock(fp32_seconds=2.0, bf16_seconds=1.0)
    measure = runtime.resolve_inference_precision
    monkeypatch.setattr(
        features,
        "resolve_inference_precision",
        lambda precision, device, timed_pass, key: measure(
            precision, device, lambda: (timed_pass(), fake.run_pass()), key
        ),
    )
    segmenter = Segmenter(bundle, device="cpu")
    assert segmenter.precision == "bf16" and fake.passes == 8
    assert segmenter.predict(images).labels.shape == (2, 32, 32)


def test_bf16_passes_on_the_cpu_use_explicit_attention_and_leave_the_unet_as_it_was():
    """Under CPU bf16 autocast the extractor's pass runs MONAI's explicit attention (measured
    faster there), in fp32 SDPA; either way the same features, and the shared UNet's flags are
    restored after the pass, even when the pass stops early at the last tapped level."""
    from tedm_core.features import TEDM_TIMESTEPS, DecoderFeatureExtractor
    from tedm_core.model.backbone import PRESETS, build_unet, explicit_attention
    from tedm_core.model.diffusion import NoiseSchedule

    torch.manual_seed(0)
    unet = build_unet(PRESETS["small"]).eval()
    attention = [m for m in unet.modules() if hasattr(m, "use_flash_attention")]
    assert attention and all(m.use_flash_attention for m in attention)
    seen = []
    attention[0].register_forward_pre_hook(lambda module, _args: seen.append(module.use_flash_attention))
    extractor = DecoderFeatureExtractor(unet, NoiseSchedule())
    images = torch.rand(1, 1, 64, 64) * 2 - 1
    cpu = torch.device("cpu")

    assert not runtime.explicit_attention_pays(cpu)
    fp32 = extractor(images, TEDM_TIMESTEPS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert runtime.explicit_attention_pays(cpu)
        bf16 = extractor(images, TEDM_TIMESTEPS[:2])
    assert seen == [True, False]
    assert all(m.use_flash_attention for m in attention)
    for a, b in zip(bf16, fp32):
        assert ((a.float() - b).norm() / b.norm()) < 0.02

    with explicit_attention(unet):
        explicit = extractor(images, TEDM_TIMESTEPS[:2])
    assert all(m.use_flash_attention for m in attention)
    for a, b in zip(explicit, fp32):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_precision_on_cuda_asks_the_chosen_card_for_native_bf16(monkeypatch):
    """bf16 only on compute capability 8.0+, of the card chosen (cuda:1), not the current one.

    ``torch.cuda.is_bf16_supported()`` says yes on sm 7.x cards (emulated bf16, no tensor cores)
    and asks the current device: mocked to say yes, it must not decide."""
    capability = {0: (7, 5), 1: (8, 0)}  # cuda:0 a T4, cuda:1 an A100
    asked = []

    def get_device_capability(device=None):
        index = device.index if isinstance(device, torch.device) else device
        index = 0 if index is None else index  # torch.device("cuda"): the current device, 0 here
        asked.append(index)
        return capability[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert runtime.resolve_precision("auto", torch.device("cuda:0")) == "fp32"
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert runtime.resolve_precision("auto", torch.device("cuda:1")) == "bf16"
    assert runtime.resolve_inference_precision("auto", torch.device("cuda:1"), lambda: None, "k") == "bf16"
    assert runtime.resolve_inference_precision("auto", torch.device("cuda:0"), lambda: None, "k") == "fp32"
    assert 1 in asked
    assert runtime.resolve_precision("bf16", torch.device("cuda:0")) == "bf16"  # asked for: as given
