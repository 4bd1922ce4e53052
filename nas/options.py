"""Names and defaults the commands take that their implementations also use, kept free of torch.

Every `--help` lists them, and a parser that imported the modules doing the work would load torch (2 s and more)
before it could print a line. The modules that act on these names import them from here.
"""

DATASET_NAMES = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "npz",
    "imagefolder",
    "csv",
    "breast_cancer",
    "wine",
    "digits_vectors",
)  # dataset.name: one loader each in nas.data.datasets.LOADERS, in this order

RUNTIMES = {"eager": "weights.pt", "onnx": "model.onnx", "ts": "model.ts", "pt2": "model.pt2"}  # runtime -> its file
CODE_RUNTIMES = ("ts", "pt2")  # their files are code: loaded only when asked for by name

SLIM_SCOPES = ("global", "layer")  # one threshold over the whole network (Liu et al.), or the same share of every layer

DEFAULT_THREADS = 1  # CPU inference threads of nas-bench and the latency_ms objective: the same on every machine
SPREAD_LIMIT = 1.5  # p90 / p10 of the timed calls above this: the machine was busy, the median is not a figure
