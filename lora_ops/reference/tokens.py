"""Token-major views shared by every backend's Python entry point."""
import math

from torch import Tensor


def tokens_2d(x: Tensor) -> Tensor:
    """x [..., K] as [tokens, K]. The row count is spelled out: `reshape(-1, K)` cannot infer it
    when K is 0 (x [..., 0] has no elements, whatever its leading dims)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
