"""torch.hub entry points: SA-ResNet-50/101/152 with fused Shuffle Attention, without weights (none
are published; SA-Net's own checkpoints load with sa_cuda.models.convert_official_state_dict).

    model = torch.hub.load("path/to/sa-cuda", "sa_resnet50", source="local", num_classes=10)

sa_cuda must be importable where torch.hub runs: installed, or built in place in that checkout
(torch.hub puts the checkout first on sys.path while it loads this file).
"""

dependencies = ["torch"]

from sa_cuda.models import sa_resnet as _sa_resnet  # noqa: E402


def _model(name: str, pretrained: bool, kwargs: dict):
    if pretrained:
        raise ValueError(
            f"sa_cuda hub: {name} has no pretrained weights (pretrained must be False); load SA-Net's "
            "checkpoints with sa_cuda.models.convert_official_state_dict"
        )
    return getattr(_sa_resnet, name)(**kwargs)


def sa_resnet50(pretrained: bool = False, **kwargs):
    """SA-ResNet-50, randomly initialized. kwargs: num_classes, fused (default True: the fused
    layers; False: the reference layers), and SAResNet's (sa_cuda.models.sa_resnet50)."""
    return _model("sa_resnet50", pretrained, kwargs)


def sa_resnet101(pretrained: bool = False, **kwargs):
    """SA-ResNet-101, randomly initialized; arguments as sa_resnet50."""
    return _model("sa_resnet101", pretrained, kwargs)


def sa_resnet152(pretrained: bool = False, **kwargs):
    """SA-ResNet-152, randomly initialized; arguments as sa_resnet50."""
    return _model("sa_resnet152", pretrained, kwargs)
