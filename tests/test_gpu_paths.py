"""CUDA code paths checked on the CPU: the device is a stand-in (``meta``, or mocks of torch.cuda and
torch.distributed) that enforces what CUDA enforces, so each test fails where a GPU run would."""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch
from conftest import synthetic_disc_images, write_disc_pngs

from tedm_core import cli
from tedm_core.bundle import ModelBundle
from tedm_core.errors import BundleError
from tedm_core.model.backbone import PRESETS
from tedm_core.model.checkpoint import Backbone
from tedm_core.pipelines import fit as fit_module
from tedm_core.pipelines import pretrain as pretrain_module
from tedm_core.pipelines import segment as segment_module
from tedm_core.pipelines.fit import fit_bundle
from tedm_core.pipelines.segment import Segmenter
from tedm_core.preprocessing.intensity import IntensityConfig
from tedm_core.serve.worker import error_event

CUDA_OOM = torch.cuda.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB of which 1.2 GiB\n"
    "is free. Of the allocated memory 13.1 GiB is allocated by PyTorch, and 0.4 GiB is reserved but unallocated."
)
# What torch's CPU allocator raises (a RuntimeError, not a MemoryError), word for word.
CPU_OOM = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    """A tiny TEDM bundle on an untrained backbone (seconds): what runs where is the question, not quality."""
    torch.manual_seed(0)
    backbone = Backbone.new(PRESETS["tiny"], intensity=IntensityConfig("percentile", 0.5, 99.5))
    images, masks = synthetic_disc_images(3, size=32, seed=2)
    return fit_bundle(
        backbone, images, masks, "tedm", ["background", "disc"], [0, 1], steps=5, device="cpu", show_progress=False
    )


@pytest.fixture
def own_bundle(bundle) -> ModelBundle:
    """A copy of ``bundle`` for a test that may move its modules (as the code under test did)."""
    return copy.deepcopy(bundle)


def devices_of(module: torch.nn.Module) -> set:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


# --- out of memory: one line for the user, not a traceback -------------------------------------------


@pytest.mark.parametrize(
    "error, expected",
    [
        (CUDA_OOM, "out of GPU memory (try a smaller --batch-size, or --device cpu)"),
        (CPU_OOM, "out of memory (try a smaller --batch-size, or fewer or smaller inputs)"),
    ],
    ids=["cuda", "cpu-allocator"],
)
def test_out_of_memory_in_a_command_is_one_line_exit_2(error, expected, tmp_path, capsys, monkeypatch):
    def run_out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(pretrain_module, "pretrain", run_out_of_memory)
    images = write_disc_pngs(tmp_path / "images", 2, 32)
    argv = ["pretrain", "--images", str(images), "--out", str(tmp_path / "bb"), "--preset", "tiny", "--steps", "1"]
    assert cli.main([*argv, "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"tedm pretrain: error: {expected}"]  # (the other lines: the progress bar)


def test_a_runtime_error_that_is_not_out_of_memory_still_raises(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(pretrain_module, "pretrain", broken)
    images = write_disc_pngs(tmp_path / "images", 2, 32)
    with pytest.raises(RuntimeError, match="shapes"):
        cli.main(["pretrain", "--images", str(images), "--out", str(tmp_path / "bb"), "--device", "cpu"])


def test_the_worker_reports_out_of_memory_as_a_one_line_user_error():
    gpu, cpu = error_event("7", CUDA_OOM), error_event("8", CPU_OOM)
    assert gpu["kind"] == cpu["kind"] == "user"
    assert gpu["details"] == cpu["details"] == ""  # no traceback shown
    assert gpu["message"].startswith("out of GPU memory (") and "cpu device" in gpu["message"]
    assert cpu["message"].startswith("out of memory (")
    assert error_event("9", RuntimeError("mat1 and mat2 shapes cannot be multiplied"))["kind"] == "internal"


def test_a_batch_halved_after_out_of_memory_is_kept_for_later_calls(bundle):
    images, _ = synthetic_disc_images(8, size=32, seed=5)
    segmenter = Segmenter(bundle, device="cpu", batch_size=8, test_time_flip=False)
    real, sizes = segmenter._predict_chunk, []

    def chunk_fitting_two(chunk, *args):
        sizes.append(len(chunk))
        if len(chunk) > 2:
            raise CUDA_OOM
        return real(chunk, *args)

    segmenter._predict_chunk = chunk_fitting_two
    segmenter.predict(images)
    assert sizes == [8, 4, 2, 2, 2, 2] and segmenter.batch_size == 2
    sizes.clear()
    segmenter.predict(images)  # the next volume: no failed pass at the planned size first
    assert sizes == [2, 2, 2, 2]
    cache = Segmenter(bundle, device="cpu", test_time_flip=False).predict(images, keep_features=True).features
    real_head = segmenter._head_predict

    def head_fitting_one(levels, transform, *rest):
        if levels[0].shape[0] > 1:
            raise CUDA_OOM
        return real_head(levels, transform, *rest)

    segmenter._head_predict = head_fitting_one
    segmenter.predict_from_features(cache)
    assert segmenter.batch_size == 1  # lowered by the head's chunks too, never raised


def test_out_of_memory_halves_the_chunk_that_failed_not_the_planned_size():
    """One radiograph under a GPU plan of 256 slices: the failed chunk is one slice, so there is
    nothing smaller to retry (the plan halved down to 1 reran that same slice eight times); three
    slices planned at 10 retry at 1. Python's MemoryError counts as out of memory too, and so does
    the driver's "CUDA error: out of memory", which is the GPU's."""
    from tedm_core.runtime import map_in_chunks, out_of_memory_on_gpu

    def sizes_tried(total, planned, fits, error=CUDA_OOM):
        tried = []

        def run(start, stop):
            tried.append(stop - start)
            if stop - start > fits:
                raise error
            return stop - start

        try:
            done = sum(map_in_chunks(run, total, planned))
        except Exception as raised:
            return tried, type(raised).__name__
        return tried, done

    assert sizes_tried(1, 256, fits=0) == ([1], "OutOfMemoryError")
    assert sizes_tried(3, 10, fits=1) == ([3, 1, 1, 1], 3)
    assert sizes_tried(3, 10, fits=1, error=MemoryError()) == ([3, 1, 1, 1], 3)
    driver = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    assert out_of_memory_on_gpu(driver) and out_of_memory_on_gpu(CUDA_OOM) and not out_of_memory_on_gpu(CPU_OOM)


# --- refine with anchors on a GPU ---------------------------------------------------------------------


class Reached(Exception):
    """Raised where the stand-in device can go no further (meta tensors have no values)."""


def test_refine_with_anchors_gives_the_head_its_anchor_on_the_device(own_bundle, monkeypatch):
    """The anchor's labels are made on the CPU, the rows chosen each step on the device: CUDA
    refuses such an index ("Expected all tensors to be on the same device"), which ``meta`` lets
    through, so index_select enforces it here. Stops at the loss (meta tensors hold no values)."""
    images, masks = synthetic_disc_images(6, size=32, seed=4)
    first = Segmenter(own_bundle, device="cpu").predict(images, keep_features=True)
    real_index_select = torch.Tensor.index_select

    def same_device_index_select(self, dim, index):
        if self.device != index.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, {index.device} and {self.device}")
        return real_index_select(self, dim, index)

    losses = []

    def loss_on_the_device(head, features, targets, weight, chunk):
        losses.append({t.device.type for t in [*features, targets]})
        if len(losses) == 2:  # the labelled slices' part, then the anchor's
            raise Reached
        return 0.0

    monkeypatch.setattr(fit_module, "resolve_device", lambda device: torch.device("meta"))
    monkeypatch.setattr(torch.Tensor, "index_select", same_device_index_select)
    monkeypatch.setattr(fit_module, "_accumulate_loss", loss_on_the_device)
    with pytest.raises(Reached):
        fit_module.refine_bundle(
            own_bundle,
            images[:2],
            masks[:2],
            steps=2,
            anchor_slices=images[2:],
            anchor_labels=first.labels[2:],
            anchor_features=first.features.select([2, 3, 4, 5]).levels,
            show_progress=False,
        )
    assert losses == [{"meta"}, {"meta"}]


# --- multi-GPU pretraining: each process on its own GPU ------------------------------------------------


@pytest.mark.parametrize("torch_takes_device_id", [True, False], ids=["torch>=2.3", "older torch"])
def test_torchrun_binds_each_process_to_its_gpu(torch_takes_device_id, tmp_path, monkeypatch):
    """Rank 1 of 2 on CUDA (mocked up to DistributedDataParallel): the process makes cuda:1 its
    current device before NCCL starts, binds the process group to it where torch can, and gives
    DDP that GPU alone. Unbound, every rank's barrier runs on cuda:0."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls = []

    def init_with_device_id(backend=None, init_method=None, device_id=None):
        calls.append(("init_process_group", backend, device_id))

    def init_without_device_id(backend=None, init_method=None):
        calls.append(("init_process_group", backend, None))

    def ddp(module, device_ids=None, **kwargs):
        calls.append(("DistributedDataParallel", device_ids))
        raise Reached

    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):  # the weights stay on the CPU: no GPU here
        cuda = args and isinstance(args[0], torch.device) and args[0].type == "cuda"
        return self if cuda else real_to(self, *args, **kwargs)

    monkeypatch.setattr(pretrain_module, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", init_with_device_id if torch_takes_device_id else init_without_device_id
    )
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    options = pretrain_module.PretrainOptions(steps=1, batch_size=2, device="cuda", show_progress=False)
    with pytest.raises(Reached):
        pretrain_module.pretrain(torch.zeros(4, 1, 32, 32), Backbone.new(PRESETS["tiny"]), tmp_path / "bb", options)
    gpu = torch.device("cuda", 1)
    assert calls == [
        ("set_device", gpu),
        ("init_process_group", "nccl", gpu if torch_takes_device_id else None),
        ("DistributedDataParallel", [1]),
    ]


# --- one pretraining run per checkpoint folder -----------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
@pytest.mark.parametrize("how", ["new", "--resume", "--overwrite"])
def test_a_second_pretraining_run_into_a_folder_in_use_is_refused(how, tmp_path, capsys):
    """Two runs into one folder both saved their checkpoints there, mixing two models. Another
    run's lock is taken here as that run would (a separate open file), the second is refused."""
    import fcntl

    images = write_disc_pngs(tmp_path / "images", 2, 32)
    out = tmp_path / "bb"
    argv = ["pretrain", "--images", str(images), "--out", str(out), "--preset", "tiny", "--image-size", "32"]
    argv += ["--steps", "1", "--batch-size", "2", "--device", "cpu"]
    if how != "new":
        assert cli.main(argv) == 0
        assert not (out / pretrain_module.LOCK_FILE).exists()  # the finished run let go of it
        argv[argv.index("--steps") + 1] = "2"
        argv.append(how)
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else []
    out.mkdir(exist_ok=True)
    other_run = os.open(out / pretrain_module.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        capsys.readouterr()
        assert cli.main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert errors == [
            f"tedm pretrain: error: {out}: is being written by another pretraining run; "
            "wait for it to end, or choose another folder"
        ]
        with pytest.raises(BundleError, match="another pretraining run"):
            pretrain_module.pretrain(
                torch.zeros(2, 1, 32, 32),
                Backbone.new(PRESETS["tiny"].with_(image_size=32)),
                out,
                pretrain_module.PretrainOptions(steps=2, batch_size=2, device="cpu", show_progress=False),
                resume=how == "--resume",
                overwrite=how == "--overwrite",
            )
        after = sorted(p.relative_to(out) for p in out.rglob("*") if p.name != pretrain_module.LOCK_FILE)
        assert after == before  # nothing of the other run's touched
    finally:
        os.close(other_run)


# --- a bundle's modules are shared: never moved to one user's device ------------------------------------


def test_a_segmenter_on_another_device_runs_its_own_copy_and_leaves_the_bundle_where_it_is(own_bundle, monkeypatch):
    """The worker caches one bundle for every session: a GPU session moved its UNet and head in
    place under a CPU session's segmenter ("meta" stands in for "cuda": it has no values)."""
    images, _ = synthetic_disc_images(2, size=32, seed=5)
    cpu = Segmenter(own_bundle, device="cpu")
    as_stored = Segmenter(own_bundle, device="cpu", memory_format="contiguous")  # the layout "auto" picks on CUDA
    expected = as_stored.predict(images).probabilities
    # On the CPU with the CPU bundle nothing is copied: the bundle's own modules (memory counts there).
    assert (
        cpu.head is own_bundle.head and as_stored.unet is own_bundle.backbone.unet and as_stored.head is own_bundle.head
    )
    real = segment_module.resolve_device
    monkeypatch.setattr(segment_module, "resolve_device", lambda d: torch.device("meta") if d == "cuda" else real(d))
    gpu = Segmenter(own_bundle, device="cuda")
    assert devices_of(gpu.unet) == devices_of(gpu.head) == {"meta"}
    assert devices_of(own_bundle.backbone.unet) == devices_of(own_bundle.head) == {"cpu"}
    np.testing.assert_array_equal(as_stored.predict(images).probabilities, expected)
    assert devices_of(cpu.head) == {"cpu"}
    gpu.close()  # lets go of its copies; the bundle's modules stay
    assert gpu.unet is None and gpu.head is None
    assert devices_of(own_bundle.backbone.unet) == devices_of(own_bundle.head) == {"cpu"}
    with pytest.raises(RuntimeError, match="closed"):
        gpu.predict(images)


@pytest.mark.parametrize("what", ["fit", "refine"])
def test_fitting_and_refining_on_another_device_leave_the_shared_unet_where_it_is(what, own_bundle, monkeypatch):
    """fit_bundle moved the backbone's UNet to the GPU and then to the CPU, whatever device its
    other users had it on (and left it on the GPU when the fit failed); refine_bundle left the
    bundle's UNet on the GPU."""
    images, masks = synthetic_disc_images(3, size=32, seed=2)
    backbone = own_bundle.backbone
    seen = []

    def features_then_stop(extractor, *args, **kwargs):
        seen.append(devices_of(extractor.unet))
        raise Reached

    monkeypatch.setattr(fit_module, "resolve_device", lambda device: torch.device("meta"))
    monkeypatch.setattr(fit_module, "resolve_precision", lambda precision, device: "fp32")
    monkeypatch.setattr(fit_module.DecoderFeatureExtractor, "pass_precision", lambda *args, **kwargs: "fp32")
    monkeypatch.setattr(fit_module, "extract_training_features", features_then_stop)
    with pytest.raises(Reached):
        if what == "fit":
            fit_module.fit_bundle(backbone, images, masks, steps=2, show_progress=False)
        else:
            fit_module.refine_bundle(own_bundle, images, masks, steps=2, show_progress=False)
    assert seen == [{"meta"}]  # the work ran on the device, on a copy
    assert devices_of(backbone.unet) == devices_of(own_bundle.head) == {"cpu"}


def test_fitting_on_the_modules_own_device_copies_nothing(bundle, monkeypatch):
    images, masks = synthetic_disc_images(3, size=32, seed=2)
    seen = []

    def features_then_stop(extractor, *args, **kwargs):
        seen.append(extractor.unet)
        raise Reached

    monkeypatch.setattr(fit_module, "extract_training_features", features_then_stop)
    # fp32 named: with `auto` the passes' precision is timed, and when bf16 wins on the tiny model
    # the extractor rightly runs a bf16 copy (it did on an idle machine in session 23).
    with pytest.raises(Reached):
        fit_module.fit_bundle(
            bundle.backbone, images, masks, steps=2, device="cpu", precision="fp32", show_progress=False
        )
    assert seen == [bundle.backbone.unet]
