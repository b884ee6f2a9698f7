"""Checks of the hyper-parameters an adapter is made with (rank, alpha, dropout), shared by the
modules, model-wide injection and the adapter files, so all of them accept the same values."""
import math
import numbers


def check_rank(op: str, argument: str, r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{op}: {argument} must be a positive int, got {r!r}")


def check_alpha(op: str, argument: str, alpha) -> None:
    if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0
            or not math.isfinite(alpha)):
        raise ValueError(f"{op}: {argument} must be a positive number, got {alpha!r}")


def check_dropout(op: str, p) -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: lora_dropout must be a number in [0, 1), got {p!r}")
