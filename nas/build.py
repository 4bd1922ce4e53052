"""`nas.build.build(spec, input_shape, num_classes)`, kept where users first found it
(it lives in `nas.models.build`)."""

from nas.models.build import Net, build

__all__ = ["Net", "build"]
