"""Reading an ArchSpec (the plain-JSON candidate `nas.space` samples and `nas.build` builds).

No torch here, so reports and tables can read specs cheaply.
"""

from __future__ import annotations


def norm_position(block: dict) -> str:
    """Where a block's norms sit: the plain position, or `residual:original` / `residual:preact`."""
    if block.get("type") == "residual":
        return f"residual:{block['residual']['order']}"
    return block["norm"].get("position", "post_conv")


def describe_norms(spec: dict) -> str:
    """One line for an ArchSpec's normalization layout: `batch @ post_conv`, or per stage when mixed."""

    def one(block: dict) -> str:
        norm = block["norm"]
        return "none" if norm["type"] == "none" else f"{norm['type']} @ {norm_position(block)}"

    stages = [[one(block) for block in stage["blocks"]] for stage in spec.get("stages", [])]
    kinds = {k for stage in stages for k in stage}
    if len(kinds) <= 1:
        return next(iter(kinds), "?")
    return "  ".join(f"s{i + 1}: {' | '.join(stage)}" for i, stage in enumerate(stages))
