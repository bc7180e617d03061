"""Installing a module's Python requirements inside 3D Slicer, only with the user's consent.

Shared by CMBDetect and CMBReview. Imports nothing but `packaging` (shipped with Slicer) at
module level, so it runs on a fresh Slicer before anything else of CMBDetectLib can import;
`slicer` and PyTorchUtils are imported where they are used. Never opens a dialog: the
question goes through the `confirm` callback the widget passes, and without one nothing is
ever installed.

torch comes through the PyTorch extension (the right CUDA build for the machine), the rest from
the module's Resources/requirements.txt: `slicer.packaging.pip_ensure` on Slicer >= 5.12,
`slicer.util.pip_install` on 5.10 and 5.11.
"""

from __future__ import annotations

import importlib
import subprocess
from collections.abc import Callable

from . import requirements
from .requirements import TORCH_REQUIREMENT


def missing(requirements_path: str, need_torch: bool = True, torch_requirement: str = TORCH_REQUIREMENT) -> list[str]:
    """What the module needs and this Slicer lacks (torch first); empty when all is there.
    Raises RuntimeError, saying how to upgrade, when torch is installed but too old."""
    try:
        if need_torch:
            return requirements.missing_requirements(requirements_path, torch_requirement)
        return requirements.missing_packages(requirements_path)
    except requirements.TorchTooOld as exc:
        raise RuntimeError(
            f"PyTorch {exc.installed} is installed; CMBDetect needs torch{torch_requirement}. Upgrade it in the "
            "PyTorch Utils module (Uninstall PyTorch, restart Slicer, then Install PyTorch), or run "
            f"slicer.util.pip_install('torch{torch_requirement}') in the Python console, then restart Slicer."
        ) from None


def setup(
    requirements_path: str,
    requester: str,
    confirm: Callable[[str], bool] | None = None,
    need_torch: bool = True,
    torch_requirement: str = TORCH_REQUIREMENT,
) -> None:
    """Install what is missing, only if `confirm(question)` returns True.

    Raises RuntimeError with a readable message when something is missing and no `confirm`
    was given, the user declined, or an install failed (pip's CalledProcessError included).
    """
    needed = missing(requirements_path, need_torch, torch_requirement)
    if not needed:
        return
    if confirm is None:
        raise RuntimeError(f"{requester}'s Python requirements are not installed: " + ", ".join(needed))
    question = (
        f"{requester} needs these Python packages, which will be downloaded and installed now (this can take minutes):"
        "\n\n" + "\n".join(needed)
    )
    if not confirm(question):
        raise RuntimeError("Not installed, so this cannot run yet: " + ", ".join(needed))
    try:
        if any(line.startswith("torch") for line in needed):
            install_torch(torch_requirement)
        install_requirements(requirements_path, requester)
    except subprocess.CalledProcessError as exc:
        command = exc.cmd if isinstance(exc.cmd, (list, tuple)) else [exc.cmd]
        raise RuntimeError(
            f"Installing {requester}'s Python packages failed (exit status {exc.returncode} of "
            f"{' '.join(str(a) for a in command)[:200]}). Check the network connection; the Python console "
            "shows pip's output. Nothing else was changed."
        ) from exc
    finally:
        importlib.invalidate_caches()
    still = missing(requirements_path, need_torch, torch_requirement)
    if still:
        raise RuntimeError("These Python packages are still missing after the install: " + ", ".join(still))


def install_torch(torch_requirement: str = TORCH_REQUIREMENT) -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("CMBDetect needs the PyTorch extension: install it from the Extensions Manager, then restart Slicer.") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=torch_requirement)
    if torch is None:
        raise RuntimeError("PyTorch is required and was not installed.")


def install_requirements(requirements_path: str, requester: str) -> None:
    import slicer

    try:
        import slicer.packaging  # Slicer >= 5.12; not imported by `import slicer`

        has_pip_ensure = hasattr(slicer.packaging, "pip_ensure")
    except ImportError:  # Slicer 5.10 and 5.11
        has_pip_ensure = False
    if has_pip_ensure:
        # The user agreed already (setup): no second question. Skipped under --testing, and
        # asks for a restart if an imported package was upgraded.
        slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirements_path), prompt_install=False, requester=requester)
    else:
        needed = requirements.missing_packages(requirements_path)
        if needed:
            slicer.util.pip_install(needed)
