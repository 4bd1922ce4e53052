"""nas-compare: equal-budget factor comparisons, re-evaluated over seeds, with simultaneous intervals.

run     cells, their sub-studies and the re-evaluation
stats   paired tests over all pairs, Bonferroni-corrected
report  the comparison's table, markdown and plot
"""

from nas._lazy import public

__getattr__, __dir__, __all__ = public(
    __name__,
    {
        "run": ["run_comparison", "parse_factors"],
        "report": ["restat", "write"],
    },
)
