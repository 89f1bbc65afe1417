"""Device choice (dimkit.env.pick_device): a device torch cannot use here is refused by name, not by a
traceback from deep inside torch."""
from __future__ import annotations

import functools

import pytest
import torch

from dimkit import cli
from dimkit.env import pick_device
from dimkit.errors import ConfigError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees ``n`` CUDA GPUs and (``mps``) an Apple GPU."""
    def set_(n: int, mps: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        # wrapped like the original (an lru_cache), which torch's compiler looks up when it is imported
        monkeypatch.setattr(torch.backends.mps, "is_available",
                            functools.wraps(torch.backends.mps.is_available)(lambda: mps))
    return set_


def test_known_devices_that_exist_here_are_returned(gpus):
    gpus(2)
    assert [pick_device(d) for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:1")] == \
        ["cuda", "cpu", "cuda", "cuda:0", "cuda:1"]
    gpus(0, mps=True)
    assert pick_device("auto") == "mps" and pick_device("mps") == "mps"
    gpus(0)
    assert pick_device("auto") == "cpu" and pick_device() == "cpu"


@pytest.mark.parametrize("bad", ["banana", "gpu", "CUDA ", "cuda:", "cuda:x", "cuda:-1", "mps:0", ""])
def test_an_unknown_device_is_refused_naming_the_allowed_ones(gpus, bad):
    gpus(1)
    with pytest.raises(ConfigError) as err:
        pick_device(bad)
    assert repr(bad) in str(err.value) and "auto, cpu, cuda, cuda:N" in str(err.value) and "mps" in str(err.value)


def test_a_gpu_torch_cannot_see_is_refused_with_what_to_use_instead(gpus):
    gpus(0)
    for d in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=r"no CUDA GPU is visible to torch here \(torch\.cuda\.is_available\(\) "
                                              r"is False\); use --device cpu or auto"):
            pick_device(d)
    with pytest.raises(ConfigError, match=r"no Apple MPS device is visible to torch here.*use --device cpu or auto"):
        pick_device("mps")
    gpus(2)
    with pytest.raises(ConfigError, match=r"'cuda:2'.*torch sees 2 CUDA GPUs here \(cuda:0 to cuda:1\)"):
        pick_device("cuda:2")


def test_the_train_command_refuses_a_bad_device_without_a_traceback(kit_dirs, gpus, capsys):
    gpus(0)
    assert cli.main(["train", "sample", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "dimkit train: error:" in err and "no CUDA GPU is visible to torch here" in err
    assert "Traceback" not in err
    assert cli.main(["train", "sample", "--device", "banana"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'banana'" in err and "Traceback" not in err
    assert not any(kit_dirs["runs"].iterdir()), "nothing was started"
