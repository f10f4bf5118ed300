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

    def run_pass(self, precision: str) -> None:
        self.passes += 1
        self.now += self.cost[precision]


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
        # bf16 runs its own bf16 copy of the UNet; the bundle's, shared, stays fp32
        expected = torch.float32 if precision == "fp32" else torch.bfloat16
        assert next(segmenter.extractor.unet.parameters()).dtype == expected
        assert all(w.dtype == torch.float32 for w in bundle.backbone.unet.parameters())
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
            precision, device, lambda p: (timed_pass(p), fake.run_pass(p)), key
        ),
    )
    segmenter = Segmenter(bundle, device="cpu")
    assert segmenter.precision == "bf16" and fake.passes == 8
    assert next(segmenter.unet.parameters()).dtype == torch.bfloat16  # its own bf16 copy
    fp32 = Segmenter(bundle, device="cpu", precision="fp32").predict(images)
    bf16 = segmenter.predict(images)
    assert bf16.labels.shape == (2, 32, 32) and np.abs(bf16.probabilities - fp32.probabilities).max() < 0.05


def test_bf16_passes_run_a_bf16_copy_with_sdpa_and_leave_the_shared_unet_as_it_was(monkeypatch):
    """bf16 passes run a bf16 copy of the UNet without autocast (features.unet_for_passes), with
    SDPA attention, in the layout they were given; the shared UNet stays fp32 and untouched; the
    features stay close to fp32's; and the measurement behind ``auto`` times exactly those passes."""
    from tedm_core.features import TEDM_TIMESTEPS, DecoderFeatureExtractor, unet_for_passes
    from tedm_core.model.backbone import PRESETS, build_unet
    from tedm_core.model.diffusion import NoiseSchedule

    torch.manual_seed(0)
    unet = build_unet(PRESETS["small"]).eval().to(memory_format=torch.channels_last)
    before = {name: t.clone() for name, t in unet.state_dict().items()}
    extractor = DecoderFeatureExtractor(unet, NoiseSchedule())
    assert extractor.in_precision("fp32") is extractor and unet_for_passes(unet, "fp32") is unet
    bf16 = extractor.in_precision("bf16")
    assert bf16.unet is not unet and bf16.levels == extractor.levels
    weights = list(bf16.unet.parameters())
    assert all(w.dtype == torch.bfloat16 for w in weights)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights if w.ndim == 4)
    assert unet_for_passes(bf16.unet, "bf16") is bf16.unet  # already bf16: no second copy

    seen = []
    for module in bf16.unet.modules():
        if hasattr(module, "use_flash_attention"):
            module.register_forward_pre_hook(
                lambda m, _a: seen.append((m.use_flash_attention, torch.is_autocast_enabled("cpu")))
            )
    images = (torch.rand(1, 1, 64, 64) * 2 - 1).contiguous(memory_format=torch.channels_last)
    fp32 = extractor(images, TEDM_TIMESTEPS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the segmenter's autocast (for its head)
        low = bf16(images, TEDM_TIMESTEPS[:2])
    assert seen and all(flash and not autocast_on for flash, autocast_on in seen)
    for a, b in zip(low, fp32):
        assert a.dtype == torch.bfloat16
        assert ((a.float() - b).norm() / b.norm()) < 0.02
    for name, tensor in unet.state_dict().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name])

    timed = []
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(
        DecoderFeatureExtractor,
        "forward",
        lambda self, images, timesteps, **_: timed.append(next(self.unet.parameters()).dtype),
    )
    monkeypatch.setattr(runtime, "_MEASURED_PRECISION", {})
    extractor.pass_precision("auto", torch.device("cpu"), 64, TEDM_TIMESTEPS[:2], torch.channels_last)
    assert timed == [torch.float32] * 4 + [torch.bfloat16] * 4


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
    assert runtime.resolve_inference_precision("auto", torch.device("cuda:1"), lambda _p: None, "k") == "bf16"
    assert runtime.resolve_inference_precision("auto", torch.device("cuda:0"), lambda _p: None, "k") == "fp32"
    assert 1 in asked
    assert runtime.resolve_precision("bf16", torch.device("cuda:0")) == "bf16"  # asked for: as given
    # Pretraining stays fp32 (TF32 convolutions) on every card unless bf16 is asked for (session 27's H200).
    assert runtime.resolve_pretraining_precision("auto", torch.device("cuda:1")) == "fp32"
    assert runtime.resolve_pretraining_precision("bf16", torch.device("cuda:0")) == "bf16"
