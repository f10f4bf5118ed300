"""Installing what TEDMSlicer needs into Slicer's Python, at first use, after one confirmation.

What is needed:
- ``torch``: only ever through the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA or CPU
  build that fits the machine; a plain ``pip install torch`` would often fetch the wrong one);
- ``tedm_core``: shipped inside the extension by the CMake build, or installed with ``--no-deps``
  from the source tree when the module is used from a checkout (Application settings > Modules >
  Additional module paths);
- ``tedm_core``'s own requirements (:data:`REQUIREMENTS`), installed so that pip never replaces
  what Slicer ships: torch, numpy, SimpleITK and VTK (:data:`SLICER_PROVIDED`).

Qt-free: the Slicer calls are behind :class:`PackageInstaller`, so the planning is testable.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
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


def tedm_core_source(module_dir: Path) -> Optional[Path]:
    """The source tree holding ``tedm_core`` when the module runs from a checkout, else None."""
    root = Path(module_dir).resolve().parent
    if (root / "pyproject.toml").is_file() and (root / "tedm_core" / "__init__.py").is_file():
        return root
    return None


@dataclass
class DependencyPlan:
    """What is missing, so that one confirmation can list all of it."""

    torch_missing: bool
    missing_requirements: List[str] = field(default_factory=list)
    tedm_core_from: Optional[Path] = None  # a source tree to install tedm_core from (--no-deps)
    tedm_core_unavailable: bool = False  # not importable and no source to install it from

    @property
    def nothing_to_do(self) -> bool:
        return not (
            self.torch_missing or self.missing_requirements or self.tedm_core_from or self.tedm_core_unavailable
        )

    def describe(self) -> str:
        """The confirmation text: every package that will be installed, and what is left alone."""
        lines = ["TEDMSlicer needs these Python packages, which are not installed yet:", ""]
        if self.torch_missing:
            lines.append(
                f"  - torch {TORCH_REQUIREMENT} (through the PyTorch extension, which picks the CUDA or CPU build for this computer; ~1-3 GB)"
            )
        lines += [f"  - {requirement}" for requirement in self.missing_requirements]
        if self.tedm_core_from is not None:
            lines.append(f"  - tedm_core from {self.tedm_core_from} (without dependencies)")
        lines += [
            "",
            f"Slicer's own {', '.join(SLICER_PROVIDED)} will not be replaced.",
            "Installation can take several minutes. Install now?",
        ]
        return "\n".join(lines)


def plan_dependencies(module_dir: Path) -> DependencyPlan:
    """Check (without importing torch or tedm_core) what needs installing."""
    torch_missing = importlib.util.find_spec("torch") is None or not requirement_satisfied(f"torch{TORCH_REQUIREMENT}")
    missing = [r for r in REQUIREMENTS if not requirement_satisfied(r)]
    tedm_core_importable = importlib.util.find_spec("tedm_core") is not None
    source = None if tedm_core_importable else tedm_core_source(module_dir)
    return DependencyPlan(
        torch_missing, missing, source, tedm_core_unavailable=not tedm_core_importable and source is None
    )


class PackageInstaller(Protocol):
    """How packages get into Slicer's Python (the Slicer implementation is :class:`SlicerPackageInstaller`)."""

    def install_torch(self, requirement: str) -> None: ...

    def install_requirements(self, requirements: Sequence[str], never_replace: Sequence[str]) -> None: ...

    def install_without_dependencies(self, target: str) -> None: ...


def install_dependencies(
    plan: DependencyPlan, installer: PackageInstaller, log: Callable[[str], None] = lambda _m: None
) -> None:
    """Carry out ``plan`` (after the user confirmed ``plan.describe()``). Torch first: monai needs it."""
    if plan.tedm_core_unavailable:
        raise RuntimeError(
            "tedm_core is neither installed nor next to the module: install the TEDMSlicer extension, "
            "or add the TEDMSlicer folder of a complete source checkout to Slicer's module paths"
        )
    if plan.torch_missing:
        log("Installing PyTorch through the PyTorch extension...")
        installer.install_torch(TORCH_REQUIREMENT)
    if plan.missing_requirements:
        log(f"Installing {', '.join(plan.missing_requirements)}...")
        installer.install_requirements(plan.missing_requirements, SLICER_PROVIDED)
    if plan.tedm_core_from is not None:
        log(f"Installing tedm_core from {plan.tedm_core_from}...")
        installer.install_without_dependencies(str(plan.tedm_core_from))
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
                "TEDMSlicer needs the PyTorch extension: install 'PyTorch' from the Extensions Manager and restart Slicer"
            ) from None
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled():
            # Our own confirmation already listed torch: do not ask twice.
            torch = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=requirement)
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

    def install_without_dependencies(self, target: str) -> None:
        self.slicer.util.pip_install(f'--no-deps "{target}"')


def python_version_supported() -> bool:
    """Slicer 5.8 and older ship Python 3.9, newer ones 3.12; tedm_core needs 3.9+."""
    return sys.version_info >= (3, 9)
