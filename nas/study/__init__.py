"""The Optuna study: storage, the stored schema, the contract, the search run, duplicates, workers, reports.

storage        opening any storage URL, one route for every command
storage_proxy  grpc:// clients of Optuna's storage proxy
schema         every name a study stores, and reading and writing them
contract       what every trial of a study shares, and its forced changes
opening        a study opened for a search: contract checked, sampler and pruner, config stored
objective      sample an ArchSpec, cross-validate it, store the score
pruning        what a pruning step is, and a trial's reports to its pruner
stopping       budget, stop requests, failures in a row
run            `run_search`: one process's run of the study to its budget
duplicates     repeated proposals kept from training and from the sampler
workers        live worker records, dead trials reclaimed
best_so_far    best CV loss against wall time (the anytime curve)
tables         the top trials or Pareto front nas-search prints
report         nas-report: plots and tables of a study
"""

from nas._lazy import public

__getattr__, __dir__, __all__ = public(
    __name__,
    {
        "run": ["run_search"],
        "tables": ["summary_table"],
        "storage": ["load_existing_study", "storage_of"],
        "schema": ["request_stop", "scored_trials"],
        "best_so_far": ["improvements", "best_at"],
        "report": ["write_report"],
    },
)
