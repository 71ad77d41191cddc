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
    generation_slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))

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


def resolve_dtype(requested: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """'auto' → bf16 on CUDA (fp16 where bf16 is unsupported), float32 on CPU."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type != "cuda":
        return torch.float32
    bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    return torch.bfloat16 if bf16 else torch.float16


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


def check_model_type(path_or_id: str) -> str:
    """The checkpoint's model_type, or a clear error when dsvl-chat cannot serve it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read the model config of {path_or_id!r}: {exc}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = "; ".join(f"{k} — {v}" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ModelLoadError(f"Model type {model_type!r} of {path_or_id!r} is not supported. Supported: {supported}.")
    return model_type


def load_model(settings: Settings) -> ModelHandle:
    """Load processor + model as the settings ask (no caching; see get_model)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    source = resolve_source(resolve_model_id(settings.model, device))
    quantization = _quantization_config(settings.quantize, device)
    model_type = check_model_type(source.path_or_id)

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
        generation_slots=threading.Semaphore(settings.limits.concurrent_generations),
    )
    log.info("loaded %s", handle.describe())
    return handle


# ---------------------------------------------------------------- the one shared handle

_handle: ModelHandle | None = None
_handle_key: tuple | None = None
_handle_lock = threading.Lock()


def _key(settings: Settings) -> tuple:
    return (settings.model, settings.device, settings.dtype, settings.attn_implementation, settings.quantize, settings.limits)


def get_model(settings: Settings) -> ModelHandle:
    """The process-wide handle, loaded on first use (thread-safe) and shared by every caller."""
    global _handle, _handle_key
    key = _key(settings)
    with _handle_lock:
        if _handle is None or _handle_key != key:
            _handle = load_model(settings)
            _handle_key = key
        return _handle
