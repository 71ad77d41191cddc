"""How one reply picks its tokens and turns them into text: parameters, sampling, detokenising, stop strings.

Every request owns one `Sampler` and one `TextStream`, so a reply never depends on who else is decoded
in the same step: its logits processors see only its own history, and its random draws come from its
own seeded generator. The processors are the ones `generate` would build from the checkpoint's
generation config, so a reply alone is token for token what `model.generate` gives (tested). No
gradio, no scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList


class GenerationError(RuntimeError):
    """A reply that failed or was refused; str() is the message for the user."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters of one reply (temperature 0 → greedy)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    top_k: int | None = None  # when sampling; None: the checkpoint's (transformers' 50), 0: off
    min_p: float | None = None  # when sampling; None: off
    token_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit): OpenAI's logit_bias

    def validate(self, max_new_tokens_cap: int, vocab_size: int | None = None) -> GenerationParams:
        """Refuse out-of-range values with a message naming the parameter."""
        if not 1 <= int(self.max_new_tokens) <= max_new_tokens_cap:
            raise GenerationError(f"max_new_tokens must be between 1 and {max_new_tokens_cap}, got {self.max_new_tokens}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise GenerationError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.5 <= float(self.repetition_penalty) <= 2.0:
            raise GenerationError(f"repetition_penalty must be between 0.5 and 2, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= int(self.seed) < 2**63:
            raise GenerationError(f"seed must be a non-negative integer, got {self.seed}")
        if self.top_k is not None and not 0 <= int(self.top_k) <= (vocab_size or 2**31):
            raise GenerationError(f"top_k must be between 0 (off) and the vocabulary size, got {self.top_k}")
        if self.min_p is not None and not 0.0 <= float(self.min_p) <= 1.0:
            raise GenerationError(f"min_p must be between 0 and 1, got {self.min_p}")
        for token, bias in self.token_bias:
            if vocab_size is not None and not 0 <= token < vocab_size:
                raise GenerationError(f"logit_bias names token {token}, outside the vocabulary (0-{vocab_size - 1})")
            if not -100 <= bias <= 100:
                raise GenerationError(f"logit_bias values must be between -100 and 100, got {bias} for token {token}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The same parameters as `model.generate` keywords (what the processors are built from)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "repetition_penalty": float(self.repetition_penalty),
        }
        if self.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p))
            if self.top_k is not None:
                kwargs["top_k"] = int(self.top_k)
            if self.min_p:
                kwargs["min_p"] = float(self.min_p)
        if self.token_bias:
            kwargs["sequence_bias"] = {(int(token),): float(bias) for token, bias in self.token_bias}
        return kwargs


def checkpoint_defaults(generation_config: Any) -> dict[str, Any]:
    """What a request that leaves sampling unset gets: the checkpoint's own generation config (as `generate`
    and vLLM do) — greedy unless it says `do_sample`, then its temperature and top-p; its top-k when sampling
    (where it sets none, what `generate` then uses: transformers' 50)."""
    top_k = getattr(generation_config, "top_k", None)
    if top_k is None:
        top_k = GenerationConfig._get_default_generation_params().get("top_k", 50)
    if not getattr(generation_config, "do_sample", False):
        return {"temperature": 0.0, "top_p": 1.0, "top_k": int(top_k)}
    return {"temperature": float(generation_config.temperature or 1.0), "top_p": float(generation_config.top_p or 1.0),
            "top_k": int(top_k)}


def logits_processors(model: Any, params: GenerationParams, prompt_tokens: int) -> LogitsProcessorList:
    """The processors `model.generate(**params.generate_kwargs())` would apply, in its order.

    Built by transformers itself from the checkpoint's generation config merged with the request's
    parameters (repetition penalty, temperature, top-k, top-p, ...), so nothing is re-implemented and a
    reply matches `generate` exactly — including its defaults (top-k 50 when sampling).
    """
    config, model_kwargs = model._prepare_generation_config(None, **params.generate_kwargs())
    return model._get_logits_processor(
        generation_config=config, input_ids_seq_length=prompt_tokens, encoder_input_ids=None,
        prefix_allowed_tokens_fn=None, logits_processor=None, device=str(model.device), model_kwargs=model_kwargs,
    )


class Sampler:
    """Picks one request's next token from its logits: its own processors, its own random generator."""

    def __init__(self, model: Any, params: GenerationParams, prompt_tokens: int):
        self.params = params
        self.processors = logits_processors(model, params, prompt_tokens)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            # A generator per request: one draw over a batch would make a reply depend on its neighbours.
            # Seeded as torch.manual_seed(seed) seeds the default one, so the draws are generate's.
            self.generator = torch.Generator(device=model.device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(int(params.seed))

    def choose(self, history: torch.Tensor, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(next token, the float32 logits it was chosen from) for `history` ([1, T]) and raw logits ([1, V])."""
        raw = logits.to(copy=True, dtype=torch.float32)
        scores = self.processors(history, raw) if self.processors else raw
        if self.generator is None:
            token = torch.argmax(scores, dim=-1)
        else:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
        return int(token), raw


class TextStream:
    """Token ids in, text increments out, exactly as transformers' streamer prints them: per token, special
    tokens skipped, half a multi-byte character held back until the rest arrives."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._tokens: list[int] = []
        self._printed = 0

    def put(self, token: int) -> str:
        self._tokens.append(token)
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # half of a multi-byte character: wait for the rest
        printable, self._printed = text[self._printed:], len(text)
        if text.endswith("\n"):
            self._tokens, self._printed = [], 0  # keep re-decoding bounded
        return printable

    def flush(self) -> str:
        """Whatever is held back, once the reply has ended."""
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True) if self._tokens else ""
        rest = text[self._printed:]
        self._tokens, self._printed = [], 0
        return rest


class StopText:
    """Cuts a streamed reply at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.text = ""  # everything emitted so far
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The part of `piece` that is certainly reply text (empty once stopped)."""
        if self.stopped:
            return ""
        if not self.stops:
            return self._emit(piece)
        buffer = self._pending + piece
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._pending = True, ""
            return self._emit(buffer[:cut])
        hold = max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if buffer.endswith(s[:k])), default=0)
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return self._emit(buffer[: len(buffer) - hold])

    def flush(self) -> str:
        """What was held back, once the reply ended without a stop string."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else self._emit(rest)

    def _emit(self, text: str) -> str:
        self.text += text
        return text
