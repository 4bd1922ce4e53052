"""A user's own networks, as a `model: {factory: "user_nets:NAME"}` search space names them (tests put this
folder on PYTHONPATH for the subprocesses they start)."""

from torch import nn


def small_cnn(num_classes, in_channels, input_shape, norm_layer=None, width=8):
    """conv -> norm -> relu twice, global pooling, a linear head; `norm_layer(channels)` as torchvision's."""
    norm_layer = norm_layer or nn.BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        norm_layer(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False),
        norm_layer(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def fixed_norms(num_classes, in_channels, input_shape):
    """A network whose constructor takes no norm_layer."""
    return small_cnn(num_classes, in_channels, input_shape)


def not_a_module(num_classes, in_channels, input_shape, norm_layer=None):
    return {"layers": 2}


def needs_16_pixels(num_classes, in_channels, input_shape, norm_layer=None):
    """A stem that takes no image smaller than 16x16 (a 16x16 unpadded conv)."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 16), nn.Flatten(), nn.LazyLinear(num_classes))


def group_norm_cnn(num_classes, in_channels, input_shape):
    """small_cnn with GroupNorm: no norm keeps running statistics."""
    return small_cnn(num_classes, in_channels, input_shape, norm_layer=lambda channels: nn.GroupNorm(2, channels))
