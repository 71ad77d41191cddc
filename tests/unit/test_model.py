import http.server
import shutil
import sys
import threading
import time

import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from transformers import LlamaConfig, pipeline

from dsvl_app import model as model_mod
from dsvl_app.model import (
    HUB_1_3B,
    HUB_7B,
    TINY_DIR,
    ModelLoadError,
    get_model,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_id,
    resolve_source,
)
from dsvl_app.settings import parse_settings
from tests.conftest import loopback_http


def test_defaults_per_device():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_device("auto", cuda_available=True) == cuda
    assert resolve_device("auto", cuda_available=False) == cpu
    assert resolve_model_id("auto", cuda) == HUB_7B and resolve_model_id("auto", cpu) == HUB_1_3B
    assert resolve_dtype("auto", cuda, bf16_supported=True)[0] == torch.bfloat16
    assert resolve_dtype("auto", cuda, bf16_supported=False)[0] == torch.float16
    assert resolve_dtype("float16", cpu)[0] == torch.float16
    assert resolve_model_id("tiny", cpu) == str(TINY_DIR)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda:0", cuda_available=False)


def test_auto_dtype_on_cpu_is_bf16_only_with_native_bf16_and_16_bit_weights():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, stored=torch.bfloat16, cpu_bf16=True) == (torch.bfloat16, "this CPU has native bf16")
    assert resolve_dtype("auto", cpu, stored=torch.bfloat16, cpu_bf16=False)[0] == torch.float32
    dtype, why = resolve_dtype("auto", cpu, stored=torch.float32, cpu_bf16=True)
    assert dtype == torch.float32 and "float32 weights" in why
    assert resolve_dtype("auto", cpu, stored=None, cpu_bf16=True)[0] == torch.float32
    assert resolve_dtype("float32", cpu, stored=torch.bfloat16, cpu_bf16=True)[0] == torch.float32


def test_handle_loads_once_and_is_shared_across_threads(monkeypatch, settings):
    monkeypatch.setattr(model_mod, "_handle", None)
    monkeypatch.setattr(model_mod, "_handle_key", None)
    loads = []
    real = model_mod.load_model
    monkeypatch.setattr(model_mod, "load_model", lambda s: loads.append(s) or real(s))
    seen = []
    threads = [threading.Thread(target=lambda: seen.extend(get_model(settings) for _ in range(5))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(loads) == 1 and len(seen) == 40 and all(h is seen[0] for h in seen)


def test_tiny_handle_facts(handle):
    assert handle.is_tiny and handle.has_high_res and handle.model_type == "deepseek_vl_hybrid"
    assert handle.processor.num_image_tokens == 576 and handle.context_tokens == 4096
    assert not handle.model.training and not any(p.requires_grad for p in handle.model.parameters())
    assert "tiny demo checkpoint" in handle.describe() and "float32" in handle.describe()
    assert not handle.offline_fallback


def test_keys_values_memory_is_sized_as_asked_or_from_free_memory(settings):
    from dataclasses import replace

    from dsvl_app.model import default_cache_bytes, memory_budget, reuse_cache

    cpu = torch.device("cpu")
    budget, why = memory_budget(replace(settings, cache_mb=64), cpu)
    assert budget == 64 * 2**20 and "as asked" in why
    cache, off = reuse_cache(replace(settings, cache_mb=64), budget)
    assert cache.capacity_bytes == budget and off is None  # reuse lives in the same budget as running replies
    import psutil

    share, why = default_cache_bytes(cpu)
    assert 0 < share <= psutil.virtual_memory().available and "RAM" in why
    budget, why = memory_budget(replace(settings, cache_mb=0), cpu)
    assert budget > 0 and "RAM" in why  # reuse off: running replies still get the default share
    cache, off = reuse_cache(replace(settings, cache_mb=0), budget)
    assert not cache.enabled and "--cache-mb 0" in off
    cache, off = reuse_cache(replace(settings, zero_gpu=True), budget)
    assert not cache.enabled and "ZeroGPU" in off
    handle = load_model(replace(settings, cache_mb=32))
    assert handle.reuse.capacity_bytes == handle.kv_budget_bytes == 32 * 2**20
    assert "32 MB" in handle.describe_cache() and "replies being written" in handle.describe_cache()
    handle = load_model(replace(settings, cache_mb=0))
    assert not handle.reuse.enabled and "turned off" in handle.describe_cache()


def test_tiny_checkpoint_loads_fast(settings):
    t0 = time.perf_counter()
    load_model(settings)
    assert time.perf_counter() - t0 < 2.0  # "well under a second" on a quiet machine; CI is shared


def test_unsupported_model_type_is_named(tmp_path):
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'llama'.*not supported.*deepseek_vl_hybrid.*deepseek_vl"):
        load_model(parse_settings(["--model", str(tmp_path)], environ={}))


def test_int4_needs_cuda_and_torchao(monkeypatch):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_model(parse_settings(["--model", "tiny", "--quantize", "int4"], environ={}))
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ModelLoadError, match="pip install torchao"):
        model_mod._quantization_config("int4", torch.device("cuda"))


# ------------------------------------------------------------------ offline fallback


@pytest.fixture
def closed_hub(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def open_hub(monkeypatch):
    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    with loopback_http(Hub) as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield


def test_fallback_engages_quickly_when_hub_unreachable(closed_hub, monkeypatch):
    monkeypatch.setattr(model_mod, "_handle", None)
    monkeypatch.setattr(model_mod, "_handle_key", None)
    t0 = time.perf_counter()
    handle = get_model(parse_settings(["--model", "someone/not-cached-model"], environ={}))
    assert time.perf_counter() - t0 < 10
    assert handle.offline_fallback and handle.is_tiny
    assert "cannot be reached" in handle.fallback_reason and "someone/not-cached-model" in handle.fallback_reason


def test_fallback_honours_hf_hub_offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    source = resolve_source(HUB_7B)
    assert source.offline_fallback and "HF_HUB_OFFLINE" in source.fallback_reason


def test_no_fallback_when_hub_reachable(open_hub):
    source = resolve_source(HUB_7B)
    assert source == model_mod.Source(HUB_7B, HUB_7B) and not source.offline_fallback


def test_no_fallback_for_local_paths(closed_hub):
    assert not resolve_source(str(TINY_DIR)).offline_fallback


def test_offline_uses_the_cached_snapshot_instead_of_falling_back(monkeypatch, tmp_path):
    repo = tmp_path / "models--deepseek-community--deepseek-vl-7b-chat"
    commit = "0" * 40
    shutil.copytree(TINY_DIR, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = resolve_source(HUB_7B)
    assert not source.offline_fallback and source.label == HUB_7B and source.path_or_id.endswith(commit)


def test_image_text_to_text_pipeline_runs_on_the_bundled_checkpoint():
    pipe = pipeline("image-text-to-text", model=str(TINY_DIR), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64), "red")},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    out = pipe(text=messages, max_new_tokens=5, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
