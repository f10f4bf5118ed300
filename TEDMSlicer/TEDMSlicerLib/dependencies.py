"""Installing what the TEDM worker needs into Slicer's Python, at first use, after one confirmation.

Only where the worker runs: Slicer's own process never imports torch (see ``worker_client``).
When the worker is Slicer's Python (the default), that Python needs:

- ``torch``: only ever through the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA or CPU
  build that fits the machine; a plain ``pip install torch`` would often fetch the wrong one).
  An installed torch older than :data:`TORCH_REQUIREMENT` is upgraded the same way, after the
  same confirmation;
- ``tedm_core``'s own requirements (:data:`REQUIREMENTS`), installed so that pip never replaces
  what Slicer ships: torch, numpy, SimpleITK and VTK (:data:`SLICER_PROVIDED`).

``tedm_core`` itself is not installed: the built extension ships it, and a source checkout has
it beside the module (``TEDMSlicerLib`` puts it on the path; the worker gets it on PYTHONPATH).
A worker in another Python, or a remote one, brings its own packages: nothing is installed.

Qt-free: the Slicer calls are behind :class:`PackageInstaller`, so the planning is testable.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

from .protocols import Protocol

# tedm_core's requirements (pyproject.toml [project].dependencies) minus what Slicer provides.
# tests/test_slicer_packaging.py checks that this list follows pyproject.toml.
REQUIREMENTS = [
    "monai>=1.4",
    "einops>=0.6",
    "scipy>=1.9",
    "nibabel>=5.0",
    "pillow>=9.0",
    "safetensors>=0.4",
    "tqdm>=4.60",
]
# Never installed or replaced by this module: Slicer's own builds, and torch from PyTorchUtils.
SLICER_PROVIDED = ["torch", "numpy", "SimpleITK", "vtk"]
TORCH_REQUIREMENT = ">=2.0"
REQUESTER = "TEDMSlicer"


def _distribution_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def requirement_satisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies ``requirement`` (e.g. ``monai>=1.4``)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging ships with Slicer; without it, presence is all we can check
        name = requirement.split(">")[0].split("=")[0].split("<")[0].strip()
        return _distribution_version(name) is not None
    parsed = Requirement(requirement)
    installed = _distribution_version(parsed.name)
    return installed is not None and (not parsed.specifier or parsed.specifier.contains(installed, prereleases=True))


@dataclass
class DependencyPlan:
    """What is missing in the worker's Python, so that one confirmation can list all of it."""

    torch_missing: bool
    missing_requirements: List[str] = field(default_factory=list)
    torch_installed_version: Optional[str] = None  # set when torch is installed but too old
    tedm_core_unavailable: bool = False  # not importable and not beside the module
    pytorch_extension_missing: bool = False  # torch must be installed but PyTorchUtils is absent

    @property
    def torch_outdated(self) -> bool:
        return self.torch_installed_version is not None

    @property
    def nothing_to_do(self) -> bool:
        return not (
            self.torch_missing or self.torch_outdated or self.missing_requirements or self.tedm_core_unavailable
        )

    def describe(self) -> str:
        """The confirmation text: every package that will be installed or upgraded, and what is left alone."""
        lines = ["The TEDM worker runs in Slicer's Python, which needs these packages:", ""]
        if self.torch_missing:
            lines.append(
                f"  - torch {TORCH_REQUIREMENT} (through the PyTorch extension, which picks the CUDA or CPU build "
                "for this computer; ~1-3 GB)"
            )
        if self.torch_outdated:
            lines.append(
                f"  - torch {self.torch_installed_version} is installed, TEDM needs torch {TORCH_REQUIREMENT}: it will "
                "be UPGRADED through the PyTorch extension. Other modules that use torch see the new version after "
                "Slicer restarts."
            )
        lines += [f"  - {requirement}" for requirement in self.missing_requirements]
        lines += [
            "",
            f"Slicer's own {', '.join(n for n in SLICER_PROVIDED if n != 'torch')} will not be replaced.",
            "Installation can take several minutes. Install now?",
        ]
        return "\n".join(lines)

    def why_not(self) -> Optional[str]:
        """Why the plan cannot be carried out here, or None."""
        if self.tedm_core_unavailable:
            return (
                "tedm_core is neither installed nor beside the module: install the TEDMSlicer extension, or add the "
                "TEDMSlicer folder of a complete source checkout to Slicer's module paths"
            )
        if (self.torch_missing or self.torch_outdated) and self.pytorch_extension_missing:
            have = f"torch {self.torch_installed_version} is too old" if self.torch_outdated else "torch is missing"
            return (
                f"{have} in Slicer's Python and TEDMSlicer installs torch only through the PyTorch extension (it picks "
                "the right CUDA/CPU build): install 'PyTorch' from the Extensions Manager and restart Slicer, or set "
                "Advanced > Worker to a Python that has torch and tedm-core"
            )
        return None


# What does not work when the user declines the installation (shown right after "Cancel").
DECLINED_CONSEQUENCE = (
    "Nothing was installed. Until the packages are installed, Segment, Fit, Refine, Next uncertain slice and "
    "Save model cannot run in Slicer's Python. Press any of them again to install, or run the worker elsewhere: "
    "Advanced > Worker takes a Python that already has torch and tedm-core, or a remote `tedm serve` endpoint."
)


def plan_dependencies(worker_in_slicer_python: bool = True) -> DependencyPlan:
    """Check (without importing torch or tedm_core) what the worker's Python lacks. A worker in
    another Python, or a remote worker, needs nothing installed here."""
    tedm_core_importable = importlib.util.find_spec("tedm_core") is not None
    if not worker_in_slicer_python:
        return DependencyPlan(False, [], tedm_core_unavailable=not tedm_core_importable)
    torch_version = _distribution_version("torch")
    torch_missing = torch_version is None
    outdated = None if torch_missing or requirement_satisfied(f"torch{TORCH_REQUIREMENT}") else torch_version
    missing = [r for r in REQUIREMENTS if not requirement_satisfied(r)]
    return DependencyPlan(
        torch_missing,
        missing,
        torch_installed_version=outdated,
        tedm_core_unavailable=not tedm_core_importable,
        pytorch_extension_missing=importlib.util.find_spec("PyTorchUtils") is None,
    )


class PackageInstaller(Protocol):
    """How packages get into Slicer's Python (the Slicer implementation is :class:`SlicerPackageInstaller`)."""

    def install_torch(self, requirement: str) -> None: ...

    def install_requirements(self, requirements: Sequence[str], never_replace: Sequence[str]) -> None: ...


def install_dependencies(
    plan: DependencyPlan, installer: PackageInstaller, log: Callable[[str], None] = lambda _m: None
) -> None:
    """Carry out ``plan`` (after the user confirmed ``plan.describe()``). Torch first: monai needs it."""
    problem = plan.why_not()
    if problem:
        raise RuntimeError(problem)
    if plan.torch_missing or plan.torch_outdated:
        log("Installing PyTorch through the PyTorch extension...")
        installer.install_torch(TORCH_REQUIREMENT)
    if plan.missing_requirements:
        log(f"Installing {', '.join(plan.missing_requirements)}...")
        installer.install_requirements(plan.missing_requirements, SLICER_PROVIDED)
    importlib.invalidate_caches()


class SlicerPackageInstaller:
    """:class:`PackageInstaller` inside Slicer: ``slicer.pydeps.pip_ensure`` (Slicer 5.11+; also
    looked for as ``slicer.packaging.pip_ensure``) with ``skip_packages``, else
    ``slicer.util.pip_install`` with a constraints file pinning Slicer's own packages."""

    def __init__(self, slicer_module: Any = None) -> None:
        if slicer_module is None:
            import slicer as slicer_module
        self.slicer = slicer_module

    def install_torch(self, requirement: str) -> None:
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
        except ImportError:
            raise RuntimeError(
                "TEDMSlicer needs the PyTorch extension: install 'PyTorch' from the Extensions Manager "
                "and restart Slicer"
            ) from None
        # Missing or too old: light-the-torch (behind installTorch) installs or upgrades to a build
        # satisfying the requirement. Our own confirmation already listed torch: do not ask twice.
        # installTorch imports the new torch once to report its version; the worker, a fresh
        # process, is what uses it.
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=requirement
        )
        if torch is None:
            raise RuntimeError("PyTorch was not installed")

    def _pip_ensure(self) -> Optional[Callable[..., Any]]:
        for module_name in ("pydeps", "packaging"):
            module = getattr(self.slicer, module_name, None)
            if module is None:
                try:
                    module = importlib.import_module(f"slicer.{module_name}")
                except ImportError:
                    continue
            ensure = getattr(module, "pip_ensure", None)
            if ensure is not None:
                return ensure
        return None

    def install_requirements(self, requirements: Sequence[str], never_replace: Sequence[str]) -> None:
        pip_ensure = self._pip_ensure()
        if pip_ensure is not None:
            from packaging.requirements import Requirement

            pip_ensure(
                [Requirement(r) for r in requirements],
                skip_packages=list(never_replace),
                prompt_install=False,
                requester=REQUESTER,
            )
            return
        # Older Slicer: pin whatever of Slicer's packages pip knows about, so that pip fails
        # rather than replacing them if a requirement ever asked for another version.
        pins = [
            f"{name}=={version}" for name, version in ((n, _distribution_version(n)) for n in never_replace) if version
        ]
        with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as handle:
            handle.write("\n".join(pins) + "\n")
            constraints = handle.name
        try:
            self.slicer.util.pip_install(" ".join([f'"{r}"' for r in requirements] + ["-c", f'"{constraints}"']))
        finally:
            os.unlink(constraints)


def python_version_supported() -> bool:
    """Slicer 5.8 and older ship Python 3.9, newer ones 3.12; tedm_core needs 3.9+."""
    return sys.version_info >= (3, 9)
