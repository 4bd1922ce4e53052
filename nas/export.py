"""`nas.export.load_exported(folder)`, kept where users first found it (it lives in `nas.deploy.export`)."""

from nas.deploy.export import Exported, load_exported

__all__ = ["Exported", "load_exported"]
