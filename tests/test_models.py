"""SA-ResNet with the official SA-Net layout: state_dict keys/shapes, strict loads, fused == eager."""

from __future__ import annotations

import pytest
import torch

from conftest import max_err, randomize_
from sa_cuda import SALayer, reference
from sa_cuda.models import convert_official_state_dict, sa_resnet50, sa_resnet101, sa_resnet152

# Key counts and parameter counts of the official models/sa_resnet.py (wofmanaf/SA-Net): 416 / 824 /
# 1232 state_dict entries; 25.56M / 44.55M / 60.2M parameters (the official README's numbers).
OFFICIAL = [(sa_resnet50, 416, 25.56e6), (sa_resnet101, 824, 44.55e6), (sa_resnet152, 1232, 60.2e6)]


@pytest.mark.parametrize("build,n_keys,n_params", OFFICIAL)
def test_official_key_set_and_shapes(build, n_keys, n_params):
    fused, eager = build(fused=True), build(fused=False)
    sd_fused, sd_eager = fused.state_dict(), eager.state_dict()
    assert len(sd_fused) == n_keys
    assert {k: tuple(v.shape) for k, v in sd_fused.items()} == {k: tuple(v.shape) for k, v in sd_eager.items()}
    assert abs(sum(p.numel() for p in fused.parameters()) - n_params) / n_params < 0.005
    # The SA layer after bn3 of a bottleneck, with G = 64 (m = 4 * planes / 128).
    assert tuple(sd_fused["layer1.0.sa.cweight"].shape) == (1, 2, 1, 1)
    assert tuple(sd_fused["layer4.2.sa.gn.weight"].shape) == (16,)
    assert "layer1.0.downsample.0.weight" in sd_fused and "fc.weight" in sd_fused
    assert sum(isinstance(m, SALayer) for m in fused.modules()) == sum(1 for k in sd_fused if k.endswith("sa.cweight"))
    eager.load_state_dict(sd_fused, strict=True)
    fused.load_state_dict(sd_eager, strict=True)


def test_official_checkpoint_format_loads():
    eager = sa_resnet50(fused=False)
    checkpoint = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in eager.state_dict().items()}}
    sa_resnet50(fused=True).load_state_dict(convert_official_state_dict(checkpoint), strict=True)


def test_fused_resnet_matches_eager():
    torch.manual_seed(0)
    eager = sa_resnet50(num_classes=10, fused=False).double().eval()
    for module in eager.modules():
        if isinstance(module, reference.SALayer):
            randomize_(module, seed=1)
    fused = sa_resnet50(num_classes=10, fused=True).double().eval()
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert max_err(fused(x), eager(x)) <= 1e-10
