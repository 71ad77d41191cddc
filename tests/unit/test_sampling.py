"""Per-request sampling: generate's processors, each request's own draws, and every row sampled at once exactly
as each alone."""

import torch
from transformers import GenerationConfig

from dsvl_app.sampling import GenerationParams, Sampler, checkpoint_defaults, logits_processors, sample_rows


def test_processors_are_generates_own(handle):
    """Sampling gets generate's defaults too (top-k 50 from the generation config); greedy gets none."""
    names = [type(p).__name__ for p in logits_processors(handle.model, GenerationParams(temperature=0.7, top_p=0.9,
                                                                                       repetition_penalty=1.1), 10)]
    assert names == ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
                     "TopPLogitsWarper"]
    assert not logits_processors(handle.model, GenerationParams(), 10)


def test_a_requests_draws_do_not_depend_on_anything_else(handle):
    """Its own generator, seeded as torch.manual_seed seeds the default one: the same draws whoever else samples."""
    params = GenerationParams(temperature=1.0, top_p=1.0, seed=42)
    history, logits = torch.tensor([[1, 2, 3]]), torch.randn(1, 300)

    def choose(sampler):
        return int(sample_rows([sampler], [history], logits)[0])

    first = [choose(Sampler(handle.model, params, 3)) for _ in range(3)]
    sampler = Sampler(handle.model, params, 3)
    torch.manual_seed(0)
    mine = [choose(sampler) for _ in range(5)]
    torch.rand(1000)  # someone else draws from the default generator meanwhile
    other = Sampler(handle.model, params, 3)
    assert first == [mine[0]] * 3 and [choose(other) for _ in range(5)] == mine
    torch.manual_seed(42)  # what generate's users do; then generate draws from the default generator
    scores = logits_processors(handle.model, params, 3)(history, logits.clone())
    assert mine[0] == int(torch.multinomial(torch.softmax(scores, -1), 1))


def test_what_a_request_gets_for_the_sampling_it_leaves_out_is_the_checkpoints():
    """A checkpoint that does not sample (the bundled one) answers greedily; one that does gives its own settings;
    top-k is what generate would use (transformers' 50 where the checkpoint sets none)."""
    assert checkpoint_defaults(GenerationConfig()) == {"temperature": 0.0, "top_p": 1.0, "top_k": 50}
    sampling = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20)
    assert checkpoint_defaults(sampling) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert checkpoint_defaults(GenerationConfig(do_sample=True, temperature=0.7))["top_k"] == 50


MIXED = [GenerationParams(), GenerationParams(repetition_penalty=1.3),
         GenerationParams(temperature=0.7, top_p=0.9, seed=1), GenerationParams(temperature=1.0, seed=2, top_k=0),
         GenerationParams(temperature=1.3, top_k=5, seed=3, repetition_penalty=0.8),
         GenerationParams(temperature=0.9, min_p=0.05, top_p=0.5, seed=4),
         GenerationParams(temperature=0.5, seed=5, token_bias=((5, 10.0),)),  # logit_bias: its own path
         GenerationParams(temperature=1.0, top_k=40, top_p=0.3, min_p=0.2, repetition_penalty=1.1, seed=9),
         GenerationParams(token_bias=((7, -3.0),))]


def test_rows_sampled_together_pick_what_each_picks_alone(handle):
    """Every mix of greedy, seeded sampling, penalties, top-k/p, min-p and logit_bias: the batched path picks, row
    for row, the token that row's own generate processors and torch.multinomial pick — over several steps, so
    the per-row generators stay in step too."""
    torch.manual_seed(0)
    vocab = 500
    for trial in range(24):
        n = 1 + trial % len(MIXED)
        params = [MIXED[(trial + i) % len(MIXED)] for i in range(n)]
        together = [Sampler(handle.model, p, 5) for p in params]
        alone = [Sampler(handle.model, p, 5) for p in params]
        histories = [torch.randint(0, vocab, (1, 5 + 3 * i)) for i in range(n)]
        for _ in range(3):
            logits = torch.randn(n, vocab) * 4
            tokens, raw = sample_rows(together, histories, logits)
            assert torch.equal(raw, logits) and raw is not logits
            assert tokens.tolist() == [int(alone[i].own(histories[i], logits[i: i + 1].float())) for i in range(n)]
    assert together[0].spec is not None and Sampler(handle.model, MIXED[6], 5).spec is None
