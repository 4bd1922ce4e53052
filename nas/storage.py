"""`nas.storage.request_stop(storage, study_name)`, kept where users first found it (it lives in `nas.study.schema`)."""

from nas.study.schema import request_stop

__all__ = ["request_stop"]
