"""The model runner: the layer hooks, the attention implementations it accepts, and the decode mask's form."""

import pytest
import torch

from dsvl_app.runner import UnsupportedAttention, check_attention, layer_owners
from dsvl_app.settings import parse_settings


def test_layer_hooks_are_installed_once_per_model(handle):
    owners = layer_owners(handle.model)
    layers = [layer for name, module in handle.model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") for layer in module]
    counts = [len(layer._forward_pre_hooks) for layer in layers]
    assert layer_owners(handle.model) is owners and [len(layer._forward_pre_hooks) for layer in layers] == counts
    assert len(layers) == 6  # the tiny checkpoint: 2 language, 2 SigLIP, 2 SAM layers — all hooked


def test_flash_attention_is_refused_at_start_with_what_to_use(handle, capsys):
    """flash_attention_2 takes no per-row 4D mask: rows decoded together at their own positions would be wrong."""
    with pytest.raises(SystemExit):
        parse_settings(["--attn", "flash_attention_2"], environ={})
    assert "per-row attention mask" in capsys.readouterr().err

    class Config:
        _attn_implementation = "flash_attention_2"

    class Model:
        config = Config()

    with pytest.raises(UnsupportedAttention, match="--attn sdpa"):
        check_attention(Model())
    assert check_attention(handle.model) == "sdpa"


def test_freed_memory_goes_back_after_requests_end_at_most_every_period():
    """Pokes while a trim waits out its period are folded into one; the thread ends once nothing pokes it."""
    import time

    from dsvl_app.runner import HeapTrimmer
    from tests.conftest import wait_until

    trimmer = HeapTrimmer(period_s=0.5, idle_exit_s=0.5)
    trimmer.poke()
    assert wait_until(lambda: trimmer.trims == 1, 2)
    for _ in range(5):
        trimmer.poke()  # during the period: one more trim after it, not five
    assert wait_until(lambda: trimmer.trims == 2, 2)
    time.sleep(0.6)
    assert trimmer.trims == 2
    assert wait_until(lambda: trimmer._thread is None, 3)  # idle: its thread has ended
    trimmer.poke()
    assert wait_until(lambda: trimmer.trims == 3, 2)  # and a new one starts on the next poke
