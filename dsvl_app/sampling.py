"""How replies pick their tokens: parameters, generate's logits processors, and sampling every row at once.

Every request owns one `Sampler`: the logits processors `generate` would build from the checkpoint's
generation config and the request's parameters, and its own seeded random generator, so a reply never
depends on who else is decoded in the same step and a reply alone is token for token what
`model.generate` gives (tested).

`sample_rows` picks the next token of every row of a decode step together: repetition penalty,
temperature, top-k, top-p and min-p applied to all rows at once with per-row values as tensors, greedy
rows by one argmax, sampled rows by the draw `torch.multinomial` itself makes (one exponential draw per
row from that row's generator, then one argmax) — each row's result bit for bit what its own processors
and `multinomial` give (tested). A row with a processor that has no batched form (a `logit_bias`) takes
its own path. The tokens stay on the device: the caller reads them all with one transfer. No gradio,
no scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

if TYPE_CHECKING:
    from .grammar import AnswerFormat


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
    answer: AnswerFormat | None = None  # held to JSON or a schema (grammar.py); None: free text

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


# The processors with a batched form, in the order generate applies them.
BATCHED = (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
           MinPLogitsWarper)


@dataclass(frozen=True)
class RowSpec:
    """What one row's processors do, as numbers `sample_rows` applies to all rows at once (neutral values: off)."""

    penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    sample: bool = False


def row_spec(processors: LogitsProcessorList, sample: bool) -> RowSpec | None:
    """`processors` as a RowSpec, or None when one has no batched form here (a logit_bias, say) or they are
    not in generate's order: that row then takes its own path."""
    kinds = [type(p) for p in processors]
    if any(kind not in BATCHED for kind in kinds):
        return None
    order = [BATCHED.index(kind) for kind in kinds]
    if order != sorted(set(order)):
        return None
    values: dict[str, Any] = {"sample": sample}
    for p in processors:
        if isinstance(p, RepetitionPenaltyLogitsProcessor):
            if p.prompt_ignore_length is not None:
                return None
            values["penalty"] = float(p.penalty)
        elif isinstance(p, TemperatureLogitsWarper):
            values["temperature"] = float(p.temperature)
        else:
            if p.filter_value != -float("inf") or p.min_tokens_to_keep != 1:
                return None
            if isinstance(p, TopKLogitsWarper):
                values["top_k"] = int(p.top_k)
            elif isinstance(p, TopPLogitsWarper):
                values["top_p"] = float(p.top_p)
            else:
                values["min_p"] = float(p.min_p)
    return RowSpec(**values)


class Sampler:
    """One request's way of picking tokens: its own processors, its own random generator."""

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
        self.spec = row_spec(self.processors, sample=not params.greedy)
        self.matcher: Any = None  # its grammar's state when held to JSON (grammar.py): masks its logits each step

    def own(self, history: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """This row alone ([1] on the device): its processors on float32 logits `raw` ([1, V]), then argmax or a
        draw, exactly as generate does it."""
        scores = self.processors(history, raw) if self.processors else raw
        if self.generator is None:
            return torch.argmax(scores, dim=-1)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


def sample_rows(samplers: Sequence[Sampler], histories: Sequence[torch.Tensor],
                logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row ([n] on the device) and the float32 logits they were chosen from ([n, V]).

    `histories[i]` ([1, T_i]) is row i's prompt and reply so far (for its repetition penalty)."""
    raw = logits.to(copy=True, dtype=torch.float32)
    if any(sampler.matcher is not None for sampler in samplers):
        from .grammar import mask_rows

        mask_rows([sampler.matcher for sampler in samplers], raw)  # before any processor, as vLLM does
    specs = [sampler.spec for sampler in samplers]
    batched = [i for i, spec in enumerate(specs) if spec is not None]
    if len(batched) == len(samplers):
        return _sample_batched(samplers, specs, histories, raw), raw  # type: ignore[arg-type]
    tokens = torch.empty(len(samplers), dtype=torch.long, device=raw.device)
    if batched:
        index = on_device(batched, torch.long, raw.device)
        tokens[index] = _sample_batched([samplers[i] for i in batched], [specs[i] for i in batched],  # type: ignore[misc]
                                        [histories[i] for i in batched], raw[index])
    for i, spec in enumerate(specs):
        if spec is None:
            tokens[i: i + 1] = samplers[i].own(histories[i], raw[i: i + 1])
    return tokens, raw


def on_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on `device` without waiting for the device: a plain copy to a GPU waits for its
    stream to drain, one from pinned memory with non_blocking is queued like a kernel."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-row float32 values as an [n, 1] column."""
    return on_device([[v] for v in values], torch.float32, device)


def _divide(scores: torch.Tensor, divisors: Sequence[float]) -> torch.Tensor:
    """`scores / d` row by row, rounded as `scores / python_float` is where generate does it: on CUDA PyTorch
    multiplies by the float32 reciprocal of a scalar divisor, on the CPU it divides."""
    if scores.device.type == "cuda":
        return scores * _column([float(torch.tensor(1.0) / torch.tensor(d, dtype=torch.float32)) for d in divisors],
                                scores.device)
    return scores / _column(divisors, scores.device)


def _repetition_penalty(specs: Sequence[RowSpec], histories: Sequence[torch.Tensor],
                        scores: torch.Tensor) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor's computation for all rows: each row's own history (padded with its own
    first token, which changes nothing: a repeated index gathers and scatters the same value), its own penalty
    (1.0 leaves a row exactly as it is)."""
    vocab = scores.shape[-1]
    width = max(int(h.shape[-1]) for spec, h in zip(specs, histories, strict=True) if spec.penalty != 1.0)
    rows = []
    for spec, history in zip(specs, histories, strict=True):
        if spec.penalty == 1.0:
            rows.append(torch.zeros((1, width), dtype=torch.long, device=scores.device))
        else:
            rows.append(torch.cat([history, history[:, :1].expand(1, width - history.shape[-1])], dim=1))
    ids = torch.cat(rows).clamp(max=vocab)
    penalty = _column([spec.penalty for spec in specs], scores.device)
    padded = torch.nn.functional.pad(scores, (0, 1))
    score = torch.gather(padded, 1, ids)
    score = torch.where(score < 0, score * penalty, _divide(score, [spec.penalty for spec in specs]))
    return padded.scatter(1, ids, score)[..., :vocab]


def _sample_batched(samplers: Sequence[Sampler], specs: Sequence[RowSpec], histories: Sequence[torch.Tensor],
                    scores: torch.Tensor) -> torch.Tensor:
    """generate's processors and choice for rows that all have a RowSpec, as one computation (see sample_rows)."""
    device, vocab = scores.device, scores.shape[-1]
    inf = float("inf")
    if any(spec.penalty != 1.0 for spec in specs):
        scores = _repetition_penalty(specs, histories, scores)
    if any(spec.temperature != 1.0 for spec in specs):
        scores = _divide(scores, [spec.temperature for spec in specs])
    if any(spec.top_k for spec in specs):
        ks = [min(spec.top_k, vocab) for spec in specs]
        kth = torch.topk(scores, max(ks))[0].gather(1, on_device([[max(k, 1) - 1] for k in ks], torch.long, device))
        on = on_device([[k > 0] for k in ks], torch.bool, device)
        scores = scores.masked_fill(scores < torch.where(on, kth, -inf), -inf)
    if any(spec.top_p < 1.0 for spec in specs):
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # A row without top-p compares with -1: nothing is removed.
        remove = cumulative <= _column([1 - spec.top_p if spec.top_p < 1.0 else -1.0 for spec in specs], device)
        remove[..., -1:] = 0
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -inf)
    if any(spec.min_p > 0.0 for spec in specs):
        probs = torch.softmax(scores, dim=-1)
        remove = probs < _column([spec.min_p for spec in specs], device) * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        scores = scores.masked_fill(remove, -inf)
    greedy = torch.argmax(scores, dim=-1)
    sampled = [i for i, spec in enumerate(specs) if spec.sample]
    if not sampled:
        return greedy
    # torch.multinomial(p, 1) is argmax(p / q) with q ~ Exp(1) drawn from its generator (its one-sample path):
    # each sampled row draws its q from its own generator, then one division and one argmax serve all rows.
    probs = torch.nn.functional.softmax(scores, dim=-1)
    noise = torch.ones_like(probs)
    for i in sampled:
        noise[i].exponential_(1.0, generator=samplers[i].generator)
    drawn = (probs / noise).argmax(dim=-1)
    if len(sampled) == len(specs):
        return drawn
    return torch.where(on_device([spec.sample for spec in specs], torch.bool, device), drawn, greedy)
