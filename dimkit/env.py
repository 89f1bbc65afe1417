"""Stamp the environment: the first cell of every notebook prints this."""
from __future__ import annotations

import importlib
import os
import platform
import sys


#: Distribution names of the libraries whose versions the environment stamp shows.
_DISTRIBUTIONS = {"dimkit": "dimkit", "torch": "torch", "transformers": "transformers",
                  "open_clip": "open_clip_torch", "pandas": "pandas"}


def installed_version(module: str) -> str:
    """The installed version, read from package metadata: importing transformers or open_clip
    just to print their versions would cost seconds."""
    from importlib import metadata

    try:
        return metadata.version(_DISTRIBUTIONS.get(module, module))
    except metadata.PackageNotFoundError:
        try:
            return getattr(importlib.import_module(module), "__version__", "?")
        except Exception as exc:  # an optional library that fails to import is reported, not raised
            return f"not installed ({type(exc).__name__})"


#: The devices ``--device`` accepts (``cuda:N``: the GPU of that index).
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def pick_device(preference: str = "auto") -> str:
    """'cuda' if available, else 'mps', else 'cpu'; or the explicit preference, checked to exist here.

    A name torch does not know, or a GPU torch cannot see, raises a ConfigError saying what to use.
    """
    from .errors import ConfigError

    kind, sep, index = str(preference).partition(":")
    if not isinstance(preference, str) or kind not in DEVICES or (sep and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"unknown device {preference!r}: choose one of {', '.join(DEVICES)} "
                          "(N: a GPU index, e.g. cuda:1)")
    if kind == "cpu":
        return preference
    import torch
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {preference!r}: no CUDA GPU is visible to torch here "
                              "(torch.cuda.is_available() is False); use --device cpu or auto")
        n = torch.cuda.device_count()
        if sep and int(index) >= n:
            raise ConfigError(f"device {preference!r}: torch sees {n} CUDA GPU{'s' if n != 1 else ''} here "
                              f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}); use one of those, cpu or auto")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {preference!r}: no Apple MPS device is visible to torch here "
                              "(torch.backends.mps.is_available() is False); use --device cpu or auto")
    if kind != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def environment_info(feature_model: str | None = None, weights_real: bool | None = None) -> dict:
    """Versions of python, torch, transformers, open_clip, the device and the feature model."""
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "dimkit": installed_version("dimkit"),
        "torch": installed_version("torch"),
        "transformers": installed_version("transformers"),
        "open_clip": installed_version("open_clip"),
        "pandas": installed_version("pandas"),
        "device": pick_device(),
        "hf_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
    }
    if feature_model is not None:
        info["feature_model"] = feature_model
        if weights_real is not None:
            info["weights"] = ("pretrained" if weights_real
                               else "NOT pretrained (random or sample-trained): numbers are not comparable to the paper")
    return info


def print_environment(feature_model: str | None = None, weights_real: bool | None = None) -> None:
    """Print :func:`environment_info` as aligned lines."""
    for k, v in environment_info(feature_model, weights_real).items():
        print(f"{k:>14}: {v}")
