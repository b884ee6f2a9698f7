"""Which adapter each token uses: the popularity distributions of the multi-adapter suite.

  distinct   every token its own adapter (needs U >= T)
  uniform    each token draws one of the U adapters uniformly
  zipf:S     adapter k (1-based) drawn with probability proportional to k**-S
  identical  every token uses adapter 0
  skewed     70% of the tokens on adapter 0, the rest uniform over the other U-1
Then a `none_frac` share of the tokens, chosen at random, is set to -1 (base model only).
Drawn on the CPU from a seeded generator, so every run and every peer sees the same batch.
"""
import torch

DISTRIBUTIONS = ("distinct", "uniform", "zipf:1.5", "identical", "skewed")
SKEWED_SHARE = 0.7


def check_distribution(dist: str, tokens: int, adapters: int) -> None:
    if dist.startswith("zipf:"):
        try:
            exponent = float(dist.split(":", 1)[1])
        except ValueError:
            exponent = 0.0
        if exponent <= 0.0:
            raise ValueError(f"bench: distribution '{dist}' needs a positive exponent, as zipf:1.5")
    elif dist not in DISTRIBUTIONS:
        raise ValueError(f"bench: distribution '{dist}' is not one of {', '.join(DISTRIBUTIONS)} "
                         f"(or zipf:S)")
    if dist == "distinct" and adapters < tokens:
        raise ValueError(f"bench: distribution 'distinct' needs U >= T, got T={tokens} U={adapters}")


def token_adapter(tokens: int, adapters: int, dist: str, none_frac: float,
                  seed: int = 0) -> torch.Tensor:
    """int32 [tokens] on the CPU, values in {-1, 0..adapters-1}."""
    check_distribution(dist, tokens, adapters)
    gen = torch.Generator().manual_seed(seed)
    if dist == "distinct":
        idx = torch.randperm(adapters, generator=gen)[:tokens]
    elif dist == "uniform":
        idx = torch.randint(0, adapters, (tokens,), generator=gen)
    elif dist == "identical":
        idx = torch.zeros(tokens, dtype=torch.int64)
    elif dist == "skewed":
        others = torch.randint(1, max(adapters, 2), (tokens,), generator=gen)
        hot = torch.rand(tokens, generator=gen) < SKEWED_SHARE
        idx = torch.where(hot | (adapters == 1), torch.zeros_like(others), others)
    else:
        exponent = float(dist.split(":", 1)[1])
        weights = torch.arange(1, adapters + 1, dtype=torch.float64) ** -exponent
        idx = torch.multinomial(weights, tokens, replacement=True, generator=gen)
    none_count = int(round(none_frac * tokens))
    if none_count:
        idx[torch.randperm(tokens, generator=gen)[:none_count]] = -1
    return idx.to(torch.int32)


def grouped_by_adapter(token_adapter_cpu: torch.Tensor) -> torch.Tensor:
    """The same batch with tokens reordered so each adapter's tokens are contiguous, as a
    prefill engine lays them out before calling the segment ("SGMV") form."""
    return torch.sort(token_adapter_cpu, stable=True).values
