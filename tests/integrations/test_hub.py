"""hubconf.py: torch.hub.load(<checkout>, "sa_resnet50", source="local") and its siblings."""

from __future__ import annotations

import os

import pytest
import torch

import sa_cuda
from sa_cuda.models import SAResNet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "name,blocks", [("sa_resnet50", 16), ("sa_resnet101", 33), ("sa_resnet152", 50)]
)
def test_hub_load_local(name, blocks):
    model = torch.hub.load(ROOT, name, source="local", num_classes=10)
    assert isinstance(model, SAResNet)
    layers = [m for m in model.modules() if isinstance(m, sa_cuda.reference.SALayer)]
    assert len(layers) == blocks and all(type(m) is sa_cuda.SALayer for m in layers)
    assert model.fc.out_features == 10
    if name == "sa_resnet50":  # the hub's model is the package's, weights and all
        torch.manual_seed(0)
        hub = torch.hub.load(ROOT, name, source="local", num_classes=10)
        torch.manual_seed(0)
        direct = sa_cuda.models.sa_resnet50(num_classes=10)
        assert hub.state_dict().keys() == direct.state_dict().keys()
        for key, value in direct.state_dict().items():
            torch.testing.assert_close(hub.state_dict()[key], value, rtol=0, atol=0)
        x = torch.randn(2, 3, 64, 64)
        hub.eval(), direct.eval()
        with torch.no_grad():
            torch.testing.assert_close(hub(x), direct(x), rtol=0, atol=0)


def test_hub_reference_layers_and_no_weights():
    model = torch.hub.load(ROOT, "sa_resnet50", source="local", fused=False)
    layers = [m for m in model.modules() if isinstance(m, sa_cuda.reference.SALayer)]
    assert len(layers) == 16 and all(type(m) is sa_cuda.reference.SALayer for m in layers)
    with pytest.raises(ValueError, match="no pretrained weights"):
        torch.hub.load(ROOT, "sa_resnet50", source="local", pretrained=True)
