"""One typed, frozen settings object built from CLI flags and environment variables.

Every option has a flag and an environment variable (the flag wins). Settings are parsed once in
`app.py` and passed down; nothing below reads `os.environ` for these options again.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MODEL_CHOICES_HELP = "'auto' (7B on CUDA, 1.3B on CPU), 'tiny' (bundled demo checkpoint), a hub id or a local path"
DTYPES = ("auto", "bfloat16", "float16", "float32")
BATCH_DECODE = ("auto", "together", "rows")
# The engine decodes each reply at its own position with a per-row 4D mask: implementations that take one.
ATTENTION = ("sdpa", "eager")
QUANTIZE = ("none", "int4")


@dataclass(frozen=True)
class Limits:
    """Input and generation limits, enforced server-side."""

    images_per_message: int = 4
    images_per_conversation: int = 8
    upload_bytes: int = 20 * 1024 * 1024
    pixels_per_image: int = 40_000_000
    max_new_tokens: int = 2048
    context_tokens: int | None = None  # None: the model's own context size
    token_timeout_s: float = 120.0  # longest time without progress before a reply counts as stalled


@dataclass(frozen=True)
class Settings:
    """Everything the app is configured with."""

    model: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    quantize: str | None = None
    limits: Limits = field(default_factory=Limits)
    host: str | None = None  # None: 127.0.0.1 locally, 0.0.0.0 on a Space
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    queue_size: int = 32  # requests waiting for the model (beyond those being answered) before new ones are refused
    batch: int | None = None  # replies decoded together; None: 8 on CUDA, 4 on CPU
    batch_decode: str = "auto"  # auto | together | rows (see scheduler.DecodePolicy)
    cache_mb: float | None = None  # reuse cache cap; None: a share of free memory, 0: reuse off
    replicas: int | None = None  # engine replicas on Ray Serve; None: the engine runs in this process
    ray_address: str | None = None  # join this Ray cluster instead of starting a local one
    cache_idle_s: float = 1800.0
    api_keys: tuple[str, ...] = ()  # bearer keys for /v1 (the OpenAI-compatible API)
    allow_remote_images: bool = False  # may /v1 fetch http(s) image URLs
    mcp: bool = False  # serve /chat as an MCP tool
    store_dir: str | None = None  # saved conversations' images; None: under the user's cache directory
    store_mb: float = 1024.0
    state_secret: str | None = None  # encrypts the browser's saved conversations; None: one kept in store_dir
    feedback_file: str | None = None  # like/dislike records (JSON lines); None: no like buttons
    on_space: bool = False
    zero_gpu: bool = False  # a ZeroGPU Space: the GPU is attached per call

    @property
    def exposed(self) -> bool:
        """Reachable by others: a share link, a password (so meant for others), or a non-loopback address."""
        return self.share or self.auth is not None or self.server_name not in ("127.0.0.1", "localhost", "::1")

    @property
    def server_name(self) -> str:
        """The address to bind: explicit host, else 0.0.0.0 on a Space, else loopback."""
        if self.host:
            return self.host
        return "0.0.0.0" if self.on_space else "127.0.0.1"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return user, password


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_mb(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a size in MB (0 turns it off), got {text}")
    return value


def _positive_mb(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size in MB, got {text}")
    return value


def _megabytes(text: str) -> int:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size in MB, got {text}")
    return int(value * 1024 * 1024)


def _keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise argparse.ArgumentTypeError("expected one or more keys, separated by commas")
    if any(len(k) < 8 for k in keys):
        raise argparse.ArgumentTypeError("API keys must be at least 8 characters long")
    return keys


def _quantize(text: str) -> str | None:
    value = text.strip().lower()
    if value not in QUANTIZE:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(QUANTIZE)}, got {text!r}")
    return None if value == "none" else value


# (flag, environment variable, destination, type, default, help) — the one table of options.
_OPTIONS: tuple[tuple[str, str, str, object, object, str], ...] = (
    ("--model", "DSVL_MODEL", "model", str, "auto", MODEL_CHOICES_HELP),
    ("--device", "DSVL_DEVICE", "device", str, "auto", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("--dtype", "DSVL_DTYPE", "dtype", str, "auto",
     "auto (bf16/fp16 on CUDA; on CPU bf16 where the CPU has native bf16 and the weights are 16-bit, else float32) or "
     + ", ".join(DTYPES[1:])),
    ("--attn", "DSVL_ATTN", "attn_implementation", str, "sdpa", "attention implementation: " + ", ".join(ATTENTION)),
    ("--quantize", "DSVL_QUANTIZE", "quantize", _quantize, "none", "'int4': torchao int4 weight-only (CUDA only)"),
    ("--host", "DSVL_HOST", "host", str, None, "address to bind (default 127.0.0.1; 0.0.0.0 on a Space)"),
    ("--port", "DSVL_PORT", "port", int, 7860, "port to serve on"),
    ("--share", "DSVL_SHARE", "share", _bool, False, "create a public gradio share link (pair it with --auth)"),
    ("--auth", "DSVL_AUTH", "auth", _auth, None, "USER:PASSWORD required to open the app"),
    ("--batch", "DSVL_BATCH", "batch", _positive_int, None,
     "replies decoded together, from the UI, /chat and /v1 alike (default: 8 on CUDA, 4 on CPU; 1: one at a time)"),
    ("--batch-decode", "DSVL_BATCH_DECODE", "batch_decode", str, "auto",
     "auto (measure), together (one forward for all replies) or rows (one forward per reply; exact as alone)"),
    ("--replicas", "DSVL_REPLICAS", "replicas", _positive_int, None,
     "run the engine as N Ray Serve replicas (one GPU each on CUDA, a share of the CPUs on CPU) behind this "
     "UI and /v1; a conversation's turns stay on one replica (default: the engine runs in this process)"),
    ("--ray-address", "DSVL_RAY_ADDRESS", "ray_address", str, None,
     "join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local Ray instance; "
     "implies --replicas 1 unless set"),
    ("--queue-size", "DSVL_QUEUE_SIZE", "queue_size", _positive_int, 32,
     "requests waiting for the model at most (beyond those being answered) before new ones are refused"),
    ("--max-images", "DSVL_MAX_IMAGES", "images_per_message", _positive_int, 4, "images per message"),
    ("--max-images-total", "DSVL_MAX_IMAGES_TOTAL", "images_per_conversation", _positive_int, 8, "images per conversation"),
    ("--max-upload-mb", "DSVL_MAX_UPLOAD_MB", "upload_bytes", _megabytes, 20 * 1024 * 1024, "largest upload in MB"),
    ("--max-pixels", "DSVL_MAX_PIXELS", "pixels_per_image", _positive_int, 40_000_000, "largest image in pixels (decompression-bomb guard)"),
    ("--max-new-tokens", "DSVL_MAX_NEW_TOKENS", "max_new_tokens", _positive_int, 2048, "cap on new tokens per reply"),
    ("--context-tokens", "DSVL_CONTEXT_TOKENS", "context_tokens", _positive_int, None, "context budget (default: the model's own)"),
    ("--token-timeout", "DSVL_TOKEN_TIMEOUT", "token_timeout_s", float, 120.0,
     "seconds without any progress (no token, no step of reading the prompt) before a reply counts as stalled"),
    ("--cache-mb", "DSVL_CACHE_MB", "cache_mb", _non_negative_mb, None,
     "memory in MB for keys/values: the replies being written first, earlier turns kept for reuse (and image "
     "features) in the rest; 0 turns reuse off (default: a share of the memory free after loading)"),
    ("--cache-idle-s", "DSVL_CACHE_IDLE_S", "cache_idle_s", float, 1800.0, "seconds before an unused cache entry is dropped"),
    ("--api-key", "DSVL_API_KEY", "api_keys", _keys, (),
     "key(s) for the OpenAI-compatible /v1 API, comma-separated; clients send 'Authorization: Bearer KEY'"),
    ("--allow-remote-images", "DSVL_ALLOW_REMOTE_IMAGES", "allow_remote_images", _bool, False,
     "let /v1 fetch http(s) image URLs (public addresses only, size-capped, no redirects)"),
    ("--mcp", "DSVL_MCP", "mcp", _bool, False, "serve /chat as a Model Context Protocol tool"),
    ("--store-dir", "DSVL_STORE_DIR", "store_dir", str, None,
     "folder for saved conversations' images (default: ~/.cache/dsvl-chat)"),
    ("--store-mb", "DSVL_STORE_MB", "store_mb", _positive_mb, 1024.0,
     "largest size of that image store in MB; the least recently used images go first"),
    ("--state-secret", "DSVL_STATE_SECRET", "state_secret", str, None,
     "secret that encrypts conversations saved in browsers (default: one generated once in --store-dir); "
     "set the same value on every server that must read them"),
    ("--feedback-file", "DSVL_FEEDBACK_FILE", "feedback_file", str, None,
     "append like/dislike feedback with the conversation to this JSON-lines file (off by default)"),
)
# Old names of --batch, kept so that existing command lines and environments still work.
_ALIASES = {"--batch": (("--generations", "DSVL_GENERATIONS"), ("--concurrency", "DSVL_CONCURRENCY"))}
_LIMIT_FIELDS = {f for f in Limits.__dataclass_fields__}


def _zero_gpu(env: Mapping[str, str]) -> bool:
    return env.get("SPACES_ZERO_GPU", "").strip().lower() in {"1", "true", "yes"}


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser; each default comes from the matching environment variable when set."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="dsvl-chat: chat with DeepSeek-VL about images (Gradio web app).",
        epilog="Every option can also be set by the environment variable shown in brackets.",
    )
    for flag, var, dest, kind, default, help_text in _OPTIONS:
        aliases = _ALIASES.get(flag, ())
        for name in [var, *(alias_var for _, alias_var in aliases)]:
            if name in env:
                try:
                    default = kind(env[name])  # type: ignore[operator]
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    parser.error(f"environment variable {name}={env[name]!r}: {exc}")
                break
        extra: dict = {"nargs": "?", "const": True} if kind is _bool else {}  # `--share` alone means true
        metavar = flag.removeprefix("--").replace("-", "_").upper()
        if aliases:
            help_text += f" (old names: {', '.join(f'{a} [{v}]' for a, v in aliases)})"
        parser.add_argument(
            flag, *(alias for alias, _ in aliases), dest=dest, type=kind, default=default, metavar=metavar,
            help=f"{help_text} [{var}]", **extra  # type: ignore[arg-type]
        )
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build the Settings from CLI arguments and the environment."""
    env = os.environ if environ is None else environ
    parser = build_parser(env)
    args = vars(parser.parse_args(argv))
    if args["dtype"] not in DTYPES:
        parser.error(f"--dtype must be one of {', '.join(DTYPES)}")
    if args["attn_implementation"].startswith("flash_attention"):
        parser.error(f"--attn {args['attn_implementation']} cannot take the per-row attention mask with which replies "
                     f"are decoded together at their own positions; use one of {', '.join(ATTENTION)} (sdpa, the "
                     "default, uses fused attention kernels on a GPU too)")
    if args["attn_implementation"] not in ATTENTION:
        parser.error(f"--attn must be one of {', '.join(ATTENTION)}")
    if args["batch_decode"] not in BATCH_DECODE:
        parser.error(f"--batch-decode must be one of {', '.join(BATCH_DECODE)}")
    if args["replicas"] is not None and _zero_gpu(env):
        parser.error("--replicas cannot run on ZeroGPU (it lends one GPU to one call at a time)")
    if args["ray_address"] and args["replicas"] is None:
        args["replicas"] = 1
    limits = Limits(**{k: args.pop(k) for k in list(args) if k in _LIMIT_FIELDS})
    return Settings(**args, limits=limits, on_space=bool(env.get("SPACE_ID")), zero_gpu=_zero_gpu(env))
