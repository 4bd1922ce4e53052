"""The Optuna study: storage, the stored schema, the contract, the search run, duplicates, workers, reports.

storage        opening any storage URL
storage_proxy  grpc:// clients of Optuna's storage proxy
contract       what every trial of a study shares, and its forced changes
run            `run_search`: the study to its budget
duplicates     repeated proposals kept from training and from the sampler
workers        live worker records, dead trials reclaimed
best_so_far    best CV loss against wall time (the anytime curve)
report         nas-report: plots and tables of a study
"""

from nas._lazy import public

__getattr__, __dir__, __all__ = public(__name__, {
    'run': ['run_search', 'summary_table'],
    'storage': ['load_existing_study', 'request_stop', 'storage_of'],
    'best_so_far': ['improvements', 'best_at'],
    'report': ['write_report'],
})
