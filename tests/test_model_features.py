"""Backbone presets, decoder features (hooks, early stop, batching, determinism) and the factorised head."""

from __future__ import annotations

import pytest
import torch

from tedm_core.features import TEDM_TIMESTEPS, DecoderFeatureExtractor, timestep_noise
from tedm_core.heads import FeatureHead, HeadConfig, PixelMLP
from tedm_core.model.backbone import PRESETS, build_unet, count_parameters
from tedm_core.model.diffusion import NoiseSchedule


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_presets_build_and_predict_noise(name):
    config = PRESETS[name]
    unet = build_unet(config).eval()
    x = torch.randn(1, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        eps = unet(x, torch.tensor([500]))
    assert eps.shape == x.shape
    if name == "paper":
        # The paper's capacity: tens of millions of parameters (36 M in the authors' code).
        assert 30e6 < count_parameters(unet) < 50e6


def test_schedules_follow_the_forward_process():
    for name in ("cosine", "linear"):
        schedule = NoiseSchedule(name)
        abar = schedule.scheduler.alphas_cumprod
        assert abar.shape == (1000,) and abar[0] > 0.99 and abar[-1] < 0.01
        assert torch.all(abar[1:] <= abar[:-1])
        x0, eps = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
        xt = schedule.add_noise(x0, eps, torch.tensor([100]))
        torch.testing.assert_close(xt, torch.full_like(x0, float(abar[100].sqrt())))


def _extractor(levels=None):
    torch.manual_seed(0)
    unet = build_unet(PRESETS["tiny"])
    return DecoderFeatureExtractor(unet, NoiseSchedule("cosine"), levels)


def test_features_have_one_tensor_per_level_at_native_resolution():
    extractor = _extractor()
    features = extractor(torch.rand(2, 1, 32, 32) * 2 - 1, TEDM_TIMESTEPS)
    assert [tuple(f.shape) for f in features] == [(2, 8, 32, 8, 8), (2, 8, 32, 16, 16), (2, 8, 16, 32, 32)]
    assert extractor.level_channels == [32, 32, 16]


def test_decoder_work_after_the_last_tapped_level_is_skipped():
    extractor = _extractor(levels=[0, 1])
    calls = []
    extractor.unet.up_blocks[2].register_forward_pre_hook(lambda *_: calls.append("level2"))
    extractor.unet.out.register_forward_pre_hook(lambda *_: calls.append("out"))
    features = extractor(torch.zeros(1, 1, 32, 32), (1, 10))
    assert len(features) == 2 and calls == []
    full = _extractor()
    full.unet.out.register_forward_pre_hook(lambda *_: calls.append("out"))
    full(torch.zeros(1, 1, 32, 32), (1, 10))
    assert calls == []  # even with every level tapped, the output convolution never runs


def test_features_are_deterministic_and_independent_of_the_batch():
    extractor = _extractor()
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    batch = extractor(images, TEDM_TIMESTEPS)
    again = extractor(images, TEDM_TIMESTEPS)
    alone = extractor(images[1:2], TEDM_TIMESTEPS)
    for b, a, s in zip(batch, again, alone):
        assert torch.equal(b, a)
        torch.testing.assert_close(b[1:2], s, rtol=1e-4, atol=1e-5)
    other_draw = extractor(images, TEDM_TIMESTEPS, draw=1)
    assert not torch.equal(other_draw[-1], batch[-1])


def test_noise_depends_only_on_seed_draw_and_timestep():
    a = timestep_noise((1, 8, 8), (1, 25, 800), seed=0)
    b = timestep_noise((1, 8, 8), (25,), seed=0)
    torch.testing.assert_close(a[1], b[0])
    assert not torch.equal(a[0], a[1])


def test_factorised_first_layer_equals_upsample_concat_mlp():
    torch.manual_seed(0)
    levels = [torch.randn(4, 128, 8, 8), torch.randn(4, 64, 16, 16), torch.randn(4, 32, 32, 32)]
    for upsample in ("bilinear", "nearest"):
        mlp = PixelMLP([128, 64, 32], num_outputs=3, upsample=upsample).eval()
        with torch.no_grad():
            fast, dense = mlp(levels, (64, 64)), mlp.forward_dense(levels, (64, 64))
        torch.testing.assert_close(fast, dense, rtol=1e-4, atol=1e-5)


def test_tedm_head_averages_per_step_probabilities_and_reports_their_spread():
    torch.manual_seed(0)
    config = HeadConfig.for_method("tedm", [32, 32, 16], num_classes=2)
    head = FeatureHead(config).eval()
    features = _extractor()(torch.rand(2, 1, 32, 32) * 2 - 1, config.timesteps)
    with torch.no_grad():
        per_step = head.per_step_probabilities(features, (32, 32))
        mean, spread = head.predict(features, (32, 32))
    assert per_step.shape == (2, 8, 2, 32, 32)
    torch.testing.assert_close(mean, per_step.mean(1))
    torch.testing.assert_close(mean.sum(1), torch.ones(2, 32, 32))
    torch.testing.assert_close(spread, per_step[:, :, 1].std(1, unbiased=False))
    # Identical features at every step: no disagreement.
    same = [f[:, :1].expand_as(f).contiguous() for f in features]
    with torch.no_grad():
        assert head.predict(same, (32, 32))[1].abs().max() < 1e-6


def test_an_ensemble_head_averages_its_members_and_a_one_member_head_keeps_its_weight_names():
    """Members' per-step maps follow each other; the prediction is their mean over members and
    timesteps, the uncertainty their spread; a one-member head's weights are named as before
    ensembles existed (``mlp.*``), so its bundles stay readable by older versions."""
    torch.manual_seed(0)
    single = HeadConfig.for_method("tedm", [32, 32, 16], num_classes=2)
    assert single.members == 1 and all(k.startswith("mlp.") for k in FeatureHead(single).state_dict())
    members = [FeatureHead(single).eval() for _ in range(3)]
    for k, member in enumerate(members):  # distinct BatchNorm statistics too
        for norm in (m for m in member.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.running_mean.normal_(0, 0.1 * (k + 1))
    ensemble = FeatureHead(HeadConfig.for_method("tedm", [32, 32, 16], num_classes=2, members=3))
    ensemble.load_members(members).eval()
    features = _extractor()(torch.rand(2, 1, 32, 32) * 2 - 1, single.timesteps)
    with torch.no_grad():
        per_member = [m.per_step_probabilities(features, (32, 32)) for m in members]
        per_step = ensemble.per_step_probabilities(features, (32, 32))
        mean, spread = ensemble.predict(features, (32, 32))
    assert per_step.shape == (2, 3 * 8, 2, 32, 32)
    torch.testing.assert_close(per_step, torch.cat(per_member, dim=1))
    torch.testing.assert_close(mean, torch.stack([p.mean(1) for p in per_member]).mean(0))
    torch.testing.assert_close(spread, per_step[:, :, 1].std(1, unbiased=False))
    with pytest.raises(ValueError, match="2 heads for 3 members"):
        ensemble.load_members(members[:2])
    with pytest.raises(ValueError, match="members"):
        HeadConfig.for_method("tedm", [32], num_classes=2, members=0)
    # LEDM's one prediction per member
    ledm = FeatureHead(HeadConfig.for_method("ledm", [32, 32, 16], num_classes=2, members=2))
    assert ledm.logits([f[:, :3] for f in features], (32, 32)).shape == (2, 2, 1, 32, 32)


def test_ledm_concatenates_its_timesteps():
    config = HeadConfig.for_method("ledm", [32, 32, 16], num_classes=4)
    head = FeatureHead(config)
    assert config.timesteps == (50, 150, 250)
    assert [conv.in_channels for conv in head.mlp.first] == [96, 96, 48]
    features = [torch.randn(2, 3, c, s, s) for c, s in ((32, 8), (32, 16), (16, 32))]
    loss = head.loss(features, torch.randint(0, 4, (2, 32, 32)))
    loss.backward()
    assert torch.isfinite(loss)


def test_step_probe_is_logistic_regression():
    head = FeatureHead(HeadConfig.for_method("probe", [32, 32, 16], num_classes=2))
    assert head.config.timesteps == (25,)
    assert len(head.mlp.rest) == 0  # one linear layer: logistic regression on the features


def _with_non_trivial_batchnorm(mlp: PixelMLP) -> PixelMLP:
    """Random running statistics and affine parameters in every BatchNorm (fresh ones are identities)."""
    with torch.no_grad():
        for module in mlp.rest:
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return mlp


def test_fast_inference_equals_the_module_path():
    """Eval-mode inference (channels-last, a few maps at a time, BatchNorm folded into the next
    convolution) equals running the layers one by one, with non-trivial normalisation statistics."""
    torch.manual_seed(0)
    levels = [torch.randn(5, 128, 8, 8).half(), torch.randn(5, 64, 16, 16).half(), torch.randn(5, 32, 32, 32).half()]
    mlp = _with_non_trivial_batchnorm(PixelMLP([128, 64, 32], num_outputs=3).eval())
    with torch.no_grad():
        fast = mlp(levels, (32, 32))
    with torch.enable_grad():
        reference = mlp.rest(mlp._first_layer(levels, (32, 32)))
    assert fast.shape == (5, 3, 32, 32) and fast.is_contiguous()
    torch.testing.assert_close(fast, reference.detach().contiguous(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "level_shapes",
    [
        [(128, 8, 8), (64, 16, 16), (32, 32, 32)],  # the finest level at the output size: fused with the sum
        [(128, 8, 8), (64, 16, 16)],  # no level at the output size: every level upsampled
        [(32, 32, 32)],  # one level at the output size: its projection fused with the ReLU alone
    ],
)
def test_fused_cpu_prediction_equals_the_unfused_one(monkeypatch, level_shapes):
    """Prediction on the CPU fuses each 1x1 convolution with the sum, bias and ReLU after it
    (oneDNN): the same logits as the unfused layers, exactly up to float rounding in fp32 and to
    bf16 rounding under autocast; over a partial last chunk too (9 maps, chunks of 8)."""
    import tedm_core.heads as heads

    if not heads._fused_convolutions_available():
        pytest.skip("this PyTorch has no oneDNN fused convolutions; the unfused path is the only one")
    torch.manual_seed(0)
    mlp = _with_non_trivial_batchnorm(PixelMLP([shape[0] for shape in level_shapes], num_outputs=3).eval())
    levels = [torch.randn(9, *shape).contiguous(memory_format=torch.channels_last) for shape in level_shapes]
    fused_calls = []
    fused = heads.PixelMLP._fused_chunk_logits
    monkeypatch.setattr(
        heads.PixelMLP, "_fused_chunk_logits", lambda self, *a: fused_calls.append(1) or fused(self, *a)
    )
    results = {}
    for way in ("fused", "unfused"):
        monkeypatch.setattr(heads, "_fused_convolutions_available", lambda way=way: way == "fused")
        with torch.no_grad():
            results[way] = mlp(levels, (32, 32))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results[way + " bf16"] = mlp(levels, (32, 32))
    assert len(fused_calls) == 4  # two chunks, in fp32 and in bf16
    assert results["fused"].shape == (9, 3, 32, 32) and results["fused"].is_contiguous()
    torch.testing.assert_close(results["fused"], results["unfused"], rtol=1e-4, atol=1e-5)
    assert results["fused bf16"].dtype == results["unfused bf16"].dtype == torch.bfloat16
    scale = results["unfused"].abs().max()
    assert (results["fused bf16"].float() - results["unfused bf16"].float()).abs().max() < 0.02 * scale
    assert (results["fused bf16"].float() - results["fused"]).abs().max() < 0.03 * scale


@pytest.mark.parametrize(
    "level_shapes",
    [
        [(128, 8, 8), (64, 16, 16), (32, 32, 32)],  # the finest level at the output size
        [(128, 8, 8), (64, 13, 11)],  # no level at the output size, sizes no multiples of it
    ],
)
def test_a_head_in_a_window_gives_the_whole_grids_values_there(monkeypatch, level_shapes):
    """A window of the output grid (the part of a slice that holds anything) computes the
    outputs there alone: the same values as the whole grid's in that window, fused and unfused,
    in fp32 and bf16, in prediction, under autograd with frozen statistics and in training."""
    import tedm_core.heads as heads

    torch.manual_seed(0)
    mlp = _with_non_trivial_batchnorm(PixelMLP([shape[0] for shape in level_shapes], num_outputs=3).eval())
    levels = [torch.randn(9, *shape).contiguous(memory_format=torch.channels_last) for shape in level_shapes]
    top, bottom, left, right = window = (3, 29, 7, 20)
    for way in ("fused", "unfused"):
        monkeypatch.setattr(heads, "_fused_convolutions_available", lambda way=way: way == "fused")
        for precision in (None, torch.bfloat16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
                for grad in (False, True):
                    with torch.set_grad_enabled(grad):
                        whole, part = mlp(levels, (32, 32)), mlp(levels, (32, 32), window)
                    assert part.shape == (9, 3, bottom - top, right - left)
                    expected = whole[..., top:bottom, left:right].float()
                    tolerance = 1e-5 if precision is None else 0.01 * expected.abs().max().item()
                    assert (part.float() - expected).abs().max() <= tolerance, (way, precision, grad)
    mlp.train()  # training: batch statistics of the window's pixels, so only the shape to check
    assert mlp(levels, (32, 32), window).shape == (9, 3, bottom - top, right - left)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("batch", [1, 3])
def test_upsampled_sum_as_matrix_products_equals_interpolate_and_add(mode, batch):
    """The fused bf16 head upsamples and sums its coarse projections as matrix products: in
    float64 the same numbers as ``F.interpolate`` of each map and their sum, for sizes that are no
    multiples of each other, and channels-last strides as oneDNN's fused sum needs them; in a
    window of the output, the same numbers there."""
    import torch.nn.functional as F

    from tedm_core.heads import _upsampled_sum

    torch.manual_seed(0)
    maps = [
        torch.randn(batch, 6, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        for h, w in ((5, 7), (10, 3), (13, 11))
    ]
    options = {"align_corners": False} if mode == "bilinear" else {}
    expected = sum(F.interpolate(m, size=(13, 11), mode=mode, **options) for m in maps)
    summed = _upsampled_sum(maps, (13, 11), mode)
    torch.testing.assert_close(summed, expected, rtol=1e-12, atol=1e-12)
    assert summed.stride() == (13 * 11 * 6, 1, 11 * 6, 6)
    # a window of the output: the same numbers there, channels-last too
    windowed = _upsampled_sum(maps, (13, 11), mode, (2, 9, 4, 11))
    torch.testing.assert_close(windowed, expected[..., 2:9, 4:11], rtol=1e-12, atol=1e-12)
    assert windowed.stride() == (7 * 7 * 6, 1, 7 * 6, 6)


def test_a_probe_predicts_its_first_layer_as_logits_without_a_relu(monkeypatch):
    """A step-wise probe has no hidden layer: its first layer's output is the logits, negative
    ones included, whichever CPU path predicts."""
    import tedm_core.heads as heads

    torch.manual_seed(0)
    probe = PixelMLP([64, 16], num_outputs=3, hidden=()).eval()
    levels = [torch.randn(2, 64, 16, 16), torch.randn(2, 16, 32, 32)]
    with torch.no_grad():
        dense = probe.forward_dense(levels, (32, 32))
        for available in (True, False):
            monkeypatch.setattr(heads, "_fused_convolutions_available", lambda a=available: a)
            torch.testing.assert_close(probe(levels, (32, 32)), dense, rtol=1e-4, atol=1e-5)
    assert (dense < 0).any()


def test_fused_prediction_of_one_map_with_a_stacks_strides(monkeypatch):
    """One bf16 map whose memory is a stack's (H, W, N, C): ``is_contiguous`` calls it
    channels-last (the batch's stride does not count for one map) and oneDNN did not (it sent the
    sum to an ATen fallback without bf16, as a bf16 segmenter's one-slice prediction did)."""
    import tedm_core.heads as heads

    if not heads._fused_convolutions_available():
        pytest.skip("this PyTorch has no oneDNN fused convolutions; the unfused path is the only one")
    torch.manual_seed(0)
    mlp = _with_non_trivial_batchnorm(PixelMLP([64, 16], num_outputs=1).eval())
    levels = [torch.randn(s, s, 1, c).bfloat16().permute(2, 3, 0, 1) for c, s in ((64, 16), (16, 32))]
    assert levels[1].stride() == (16, 1, 32 * 16, 16) and levels[1].is_contiguous(memory_format=torch.channels_last)
    results = {}
    for way in ("fused", "unfused"):
        monkeypatch.setattr(heads, "_fused_convolutions_available", lambda way=way: way == "fused")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            results[way] = mlp(levels, (32, 32)).float()
    assert (results["fused"] - results["unfused"]).abs().max() < 0.02 * results["unfused"].abs().max()


def test_chunked_refine_steps_give_the_full_batch_gradient():
    """With frozen statistics a step's gradient, accumulated a few maps at a time, is the gradient of the
    whole batch's loss."""
    from tedm_core.pipelines.fit import _accumulate_loss

    torch.manual_seed(0)
    head = FeatureHead(HeadConfig.for_method("tedm", [32, 32, 16], num_classes=3)).eval()
    features = [torch.randn(3, 8, c, s, s) for c, s in ((32, 8), (32, 16), (16, 32))]
    targets = torch.randint(0, 3, (3, 32, 32))
    loss = 2.0 * head.loss(features, targets)
    expected = torch.autograd.grad(loss, list(head.parameters()))
    head.zero_grad()
    value = _accumulate_loss(head, features, targets, 2.0, chunk=2)
    assert abs(value - float(loss.detach())) < 1e-5
    for parameter, grad in zip(head.parameters(), expected):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-4, atol=1e-6)


def test_frozen_statistics_training_folds_batchnorm_with_the_same_gradients():
    """Eval mode with gradients (Refine) folds BatchNorm into the next convolution: the logits and
    every parameter's gradient (BatchNorm's weight and bias included) are those of the layers run
    one by one, with non-trivial running statistics."""
    torch.manual_seed(0)
    levels = [torch.randn(4, 128, 8, 8), torch.randn(4, 64, 16, 16), torch.randn(4, 32, 32, 32)]
    mlp = _with_non_trivial_batchnorm(PixelMLP([128, 64, 32], num_outputs=3).eval())
    target = torch.randn(4, 3, 32, 32)

    def logits_and_gradients(run):
        mlp.zero_grad()
        logits = run()
        (logits * target).sum().backward()
        return logits.detach(), [p.grad.clone() for p in mlp.parameters()]

    folded, folded_grads = logits_and_gradients(lambda: mlp(levels, (32, 32)))
    plain, plain_grads = logits_and_gradients(lambda: mlp.rest(mlp._first_layer(levels, (32, 32))))
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)
    assert len(folded_grads) == len(plain_grads) == len(list(mlp.parameters()))
    for mine, theirs in zip(folded_grads, plain_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    running = [m.running_mean.clone() for m in mlp.rest if isinstance(m, torch.nn.BatchNorm2d)]
    mlp(levels, (32, 32))
    assert all(
        torch.equal(a, m.running_mean)
        for a, m in zip(running, [m for m in mlp.rest if isinstance(m, torch.nn.BatchNorm2d)])
    )


def test_class_labels_are_the_argmax_over_classes_with_ties_to_the_lower_class():
    from tedm_core.heads import class_labels

    torch.manual_seed(0)
    for classes in (2, 3, 12):
        probabilities = torch.softmax(torch.randn(3, classes, 17, 9), dim=1)
        probabilities[0, :, 0, 0] = 1.0 / classes  # a tie of every class
        probabilities[1, 1:, 2, 3] = probabilities[1, 1:, 2, 3].max()  # a tie of the later classes
        labels = class_labels(probabilities)
        assert labels.dtype == torch.uint8 and labels.shape == (3, 17, 9)
        assert torch.equal(labels, probabilities.argmax(dim=1).to(torch.uint8))
        assert labels[0, 0, 0] == 0


def test_bf16_training_upsamples_by_products_and_follows_fp32s_gradients(monkeypatch):
    """Refine's bf16 training (autocast, frozen statistics) sums the coarse levels as matrix
    products, as bf16 prediction does, and autograd differentiates them: the weights' gradients
    are fp32's up to bf16 rounding. The interpolation matrices are cached; one first built by a
    prediction under inference mode must still serve autograd (it once raised here)."""
    import tedm_core.heads as heads

    torch.manual_seed(0)
    mlp = _with_non_trivial_batchnorm(PixelMLP([64, 32, 16], num_outputs=1).eval())
    levels = [torch.randn(4, c, s, s) for c, s in ((64, 8), (32, 16), (16, 32))]
    targets = (torch.rand(4, 32, 32) > 0.6).float()
    heads._interpolation_matrix.cache_clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(levels, (32, 32))  # builds the bf16 matrices under inference mode
    summed = []
    upsampled_sum = heads._upsampled_sum
    monkeypatch.setattr(heads, "_upsampled_sum", lambda *a: summed.append(1) or upsampled_sum(*a))

    def gradients(bf16: bool) -> list:
        mlp.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = mlp(levels, (32, 32))
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0].float(), targets).backward()
        return [p.grad.clone() for p in mlp.parameters() if p.grad is not None]

    fp32, bf16 = gradients(False), gradients(True)
    assert summed == [1]  # the bf16 training pass only
    assert len(fp32) == len(bf16) == 12  # 3 projections + 1 bias, 2 folded BatchNorms x 2, 2 layers after x 2
    for exact, rounded in zip(fp32, bf16):
        assert (rounded - exact).abs().max() <= 0.05 * exact.abs().max()
