"""The model handle: processor + model loaded once per process and shared by every session.

Knows hub ids, devices, dtypes, quantization and the offline fallback to the bundled tiny
checkpoint. Knows nothing of gradio.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .reuse import ReuseCache
from .settings import Settings

log = logging.getLogger(__name__)

HUB_7B = "deepseek-community/deepseek-vl-7b-chat"
HUB_1_3B = "deepseek-community/deepseek-vl-1.3b-chat"
TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-dsvl-hybrid"
TINY_LABEL = "bundled tiny demo checkpoint (not DeepSeek-VL)"
SUPPORTED_MODEL_TYPES = {
    "deepseek_vl_hybrid": "DeepSeek-VL-Hybrid (e.g. deepseek-vl-7b-chat)",
    "deepseek_vl": "DeepSeek-VL (e.g. deepseek-vl-1.3b-chat)",
}
HUB_PROBE_TIMEOUT_S = 3.0
CACHE_SHARE_CPU = 0.25  # of the RAM available once the model is loaded (prefill activations need the rest)
CACHE_SHARE_CUDA = 0.30  # of the device memory free once the model is loaded


class ModelLoadError(RuntimeError):
    """The requested model cannot be loaded; the message says why and what to do."""


@dataclass
class ModelHandle:
    """A loaded processor + model and what the UI needs to know about them."""

    model: torch.nn.Module
    processor: object
    source: str  # hub id or local path that was loaded
    label: str  # human-readable name for the banner
    model_type: str
    device: torch.device
    dtype: torch.dtype
    context_tokens: int
    offline_fallback: bool = False
    fallback_reason: str | None = None
    quantized: str | None = None
    reuse: ReuseCache = field(default_factory=lambda: ReuseCache(0))  # off unless load_model sizes it
    kv_budget_bytes: int = 2**30  # keys/values of the replies being written + the reuse cache (one device)
    dtype_reason: str = ""  # why this dtype, for the banner
    cache_reason: str = ""  # how the memory budget was chosen, for the banner

    @property
    def is_tiny(self) -> bool:
        return Path(self.source).resolve() == TINY_DIR

    @property
    def has_high_res(self) -> bool:
        """Whether the model has the SAM high-res (1024) branch (7B hybrid) or low-res only (1.3B)."""
        return self.model_type == "deepseek_vl_hybrid"

    def describe(self) -> str:
        """One line for logs and the banner: which weights, on which device, in which dtype."""
        dtype = str(self.dtype).removeprefix("torch.")
        quant = f", {self.quantized} weights" if self.quantized else ""
        return f"{self.label} on {self.device} ({dtype}{quant})"

    def describe_cache(self) -> str:
        """One line on the keys/values memory: its cap, how it was chosen, and whether turns are reused."""
        budget = f"{self.kv_budget_bytes / 2**20:,.0f} MB ({self.cache_reason})"
        if not self.reuse.enabled:
            return f"off; replies being written may use {budget}"
        return f"up to {budget}, shared with the replies being written (they come first)"


# ---------------------------------------------------------------- device, dtype, model choice


def resolve_device(requested: str, cuda_available: bool | None = None) -> torch.device:
    """'auto' → cuda when available, else cpu; an explicit CUDA device without CUDA is an error."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        return torch.device("cuda" if cuda else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not cuda:
        raise ModelLoadError(f"--device {requested} was asked for but CUDA is not available on this machine.")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX-512 BF16 or AMX; Arm's BF16 extension)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("Features") and " bf16" in line for line in info)  # aarch64
    except OSError:
        return False


def resolve_dtype(requested: str, device: torch.device, bf16_supported: bool | None = None,
                  stored: torch.dtype | None = None, cpu_bf16: bool | None = None) -> tuple[torch.dtype, str]:
    """The dtype to run in, and why.

    'auto' → bf16 on CUDA (fp16 where bf16 is unsupported). On CPU, bf16 where the CPU has native bf16
    *and* the checkpoint stores 16-bit weights (the hub checkpoints store bf16): measured on the 1.3B
    architecture it prefills about 3× faster than float32 (README, Speed). Weights stored in float32
    (the bundled tiny checkpoint, trained and measured in float32) stay float32, and CPUs without bf16
    hardware emulate it slowly, so they get float32.
    """
    if requested != "auto":
        return getattr(torch, requested), "as asked (--dtype)"
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        return (torch.bfloat16, "CUDA with bf16") if bf16 else (torch.float16, "this GPU has no bf16")
    native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
    if not native:
        return torch.float32, "this CPU has no native bf16"
    if stored not in (torch.bfloat16, torch.float16):
        return torch.float32, "the checkpoint stores float32 weights"
    return torch.bfloat16, "this CPU has native bf16"


def resolve_model_id(requested: str, device: torch.device) -> str:
    """'auto' → the 7B on CUDA, the 1.3B on CPU; 'tiny' → the bundled checkpoint; else as given."""
    if requested == "auto":
        return HUB_7B if device.type == "cuda" else HUB_1_3B
    if requested == "tiny":
        return str(TINY_DIR)
    return requested


# ---------------------------------------------------------------- hub access and fallback


def hub_offline_requested() -> bool:
    """Whether HF_HUB_OFFLINE is set (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A quick probe of the hub endpoint: any HTTP answer counts as reachable."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot of a hub repo from the HF cache, or None when it was never downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss (not cached, invalid id) means "not available offline"
        return None


@dataclass(frozen=True)
class Source:
    """Where the weights come from, and whether that is the offline fallback."""

    path_or_id: str
    label: str
    offline_fallback: bool = False
    fallback_reason: str | None = None


def resolve_source(model_id: str) -> Source:
    """Local path, hub id (or its cached copy when offline), or the tiny fallback when the hub is unreachable."""
    if Path(model_id).is_dir():
        resolved = Path(model_id).resolve()
        return Source(str(resolved), TINY_LABEL if resolved == TINY_DIR else str(resolved))
    if hub_offline_requested():
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        reason = "the Hugging Face Hub cannot be reached"
    else:
        return Source(model_id, model_id)
    cached = cached_snapshot(model_id)
    if cached:
        log.info("%s; using the cached copy of %s", reason, model_id)
        return Source(cached, model_id)
    message = f"{reason} and {model_id} is not in the local cache; serving the {TINY_LABEL} instead"
    log.warning(message)
    return Source(str(TINY_DIR), TINY_LABEL, offline_fallback=True, fallback_reason=message)


# ---------------------------------------------------------------- loading


def _quantization_config(quantize: str | None, device: torch.device):
    if quantize is None:
        return None
    if quantize != "int4":
        raise ModelLoadError(f"Unknown quantization {quantize!r}; only 'int4' is supported.")
    if device.type != "cuda":
        raise ModelLoadError("int4 quantization needs a CUDA GPU (torchao int4 kernels); run without --quantize on CPU.")
    try:
        from torchao.quantization import Int4WeightOnlyConfig
    except ImportError as exc:
        raise ModelLoadError("int4 quantization needs torchao: pip install torchao") from exc
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=128))


def check_model_type(path_or_id: str) -> tuple[str, torch.dtype | None]:
    """The checkpoint's model_type and stored dtype, or a clear error when dsvl-chat cannot serve it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read the model config of {path_or_id!r}: {exc}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = "; ".join(f"{k} — {v}" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ModelLoadError(f"Model type {model_type!r} of {path_or_id!r} is not supported. Supported: {supported}.")
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return model_type, stored if isinstance(stored, torch.dtype) else None


def default_cache_bytes(device: torch.device) -> tuple[int, str]:
    """A share of the memory left once the model is loaded, and a sentence saying so."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CACHE_SHARE_CUDA), f"{CACHE_SHARE_CUDA:.0%} of the GPU memory free after loading"
    import psutil  # a dependency of accelerate

    available = psutil.virtual_memory().available
    return int(available * CACHE_SHARE_CPU), f"{CACHE_SHARE_CPU:.0%} of the RAM available after loading"


def memory_budget(settings: Settings, device: torch.device) -> tuple[int, str]:
    """Bytes for keys/values — the replies being written and the turns kept for reuse — and how it was chosen."""
    if settings.cache_mb:
        return int(settings.cache_mb * 2**20), "as asked (--cache-mb)"
    return default_cache_bytes(device)


def reuse_cache(settings: Settings, budget: int) -> tuple[ReuseCache, str | None]:
    """The reuse cache the settings ask for, within the budget (--cache-mb 0 turns it off; off by default on
    ZeroGPU), and why it is off when it is."""
    if settings.cache_mb == 0:
        return ReuseCache(0, idle_s=settings.cache_idle_s), "turned off (--cache-mb 0)"
    if settings.zero_gpu and settings.cache_mb is None:
        # ZeroGPU lends the GPU per call; device memory kept between calls is not ours to hold.
        return ReuseCache(0, idle_s=settings.cache_idle_s), "off on ZeroGPU (set --cache-mb to turn it on)"
    return ReuseCache(budget, idle_s=settings.cache_idle_s), None


def load_model(settings: Settings) -> ModelHandle:
    """Load processor + model as the settings ask (no caching; see get_model)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(settings.device)
    source = resolve_source(resolve_model_id(settings.model, device))
    quantization = _quantization_config(settings.quantize, device)
    model_type, stored = check_model_type(source.path_or_id)
    dtype, dtype_reason = resolve_dtype(settings.dtype, device, stored=stored)

    kwargs: dict = {"dtype": dtype, "attn_implementation": settings.attn_implementation}
    if device.type == "cuda":
        # accelerate places the weights; "auto" spreads a model over several GPUs when one is too small.
        kwargs["device_map"] = "auto" if device.index is None else {"": device.index}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        processor = AutoProcessor.from_pretrained(source.path_or_id)
        model = AutoModelForImageTextToText.from_pretrained(source.path_or_id, **kwargs)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"Out of memory loading {source.label} in {dtype}: try --quantize int4, a smaller model "
            f"(--model {HUB_1_3B}) or a GPU with more memory."
        ) from exc
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"Cannot load {source.label!r}: {exc}") from exc
    if device.type != "cuda":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    text_config = model.config.get_text_config()
    handle = ModelHandle(
        model=model,
        processor=processor,
        source=source.path_or_id,
        label=source.label,
        model_type=model_type,
        device=model.device,
        dtype=model.dtype,
        context_tokens=settings.limits.context_tokens or int(text_config.max_position_embeddings),
        offline_fallback=source.offline_fallback,
        fallback_reason=source.fallback_reason,
        quantized=settings.quantize,
        dtype_reason=dtype_reason,
    )
    handle.kv_budget_bytes, handle.cache_reason = memory_budget(settings, handle.device)
    handle.reuse, off_reason = reuse_cache(settings, handle.kv_budget_bytes)
    if off_reason:
        handle.cache_reason += f"; reuse across turns {off_reason}"
    log.info("loaded %s; dtype %s", handle.describe(), dtype_reason)
    log.info("keys/values memory (reuse across turns): %s", handle.describe_cache())
    return handle


# ---------------------------------------------------------------- the one shared handle

_handle: ModelHandle | None = None
_handle_key: tuple | None = None
_handle_lock = threading.Lock()


def _key(settings: Settings) -> tuple:
    return (settings.model, settings.device, settings.dtype, settings.attn_implementation, settings.quantize, settings.limits,
            settings.cache_mb, settings.cache_idle_s, settings.zero_gpu)


def get_model(settings: Settings) -> ModelHandle:
    """The process-wide handle, loaded on first use (thread-safe) and shared by every caller."""
    global _handle, _handle_key
    key = _key(settings)
    with _handle_lock:
        if _handle is None or _handle_key != key:
            _handle = load_model(settings)
            _handle_key = key
        return _handle
