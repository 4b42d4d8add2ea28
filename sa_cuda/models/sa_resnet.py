"""SA-ResNet-50/101/152: the layout of SA-Net's code release (github.com/wofmanaf/SA-Net,
``models/sa_resnet.py``), with SALayer either fused or the pure-PyTorch reference.

The module tree, attribute names and hence the state_dict keys are the release's:

    conv1, bn1, layer1..layer4 (nn.Sequential of SABottleneck), avgpool, fc
    SABottleneck: conv1, bn1, conv2, bn2, conv3, bn3, sa (after bn3), relu, downsample
    sa: cweight, cbias, sweight, sbias (1, m, 1, 1), gn.weight, gn.bias (m,), m = C / (2 * 64)
    downsample: nn.Sequential(conv1x1 as "0", BatchNorm2d as "1")

so the release's checkpoints load with ``strict=True`` (after ``convert_official_state_dict``,
which unwraps ``{"state_dict": ...}`` and strips DataParallel's ``module.`` prefix).

Differences from the released file, none of which touches the parameters or the math:
- ``fused`` selects ``sa_cuda.SALayer`` or ``sa_cuda.reference.SALayer`` (same parameter names).
  The fused bottleneck runs its whole tail, ``relu(sa(bn3(...)) + identity)``, as the fused op's
  residual epilogue: one pass that reads the SA input and the shortcut once and writes the block's
  output once (the reference bottleneck: the release's three steps).
- ``sa_groups`` (default 64, the release's value) is exposed.
- The released ``ResNet.__init__`` sets ``self._norm_layer`` only when ``norm_layer is None``
  (passing a norm layer raised AttributeError); here it is always set.
- The released ``sa_resnet101`` forgets ``return model``; here every builder returns the model.
- No ``pretrained`` download (the release's URLs are empty): load a checkpoint yourself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .. import reference
from ..modules import SALayer as FusedSALayer


def conv3x3(
    in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Conv2d:
    """3x3 convolution with padding, no bias: [B, in, H, W] -> [B, out, H/stride, W/stride]."""
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias: [B, in, H, W] -> [B, out, H/stride, W/stride]."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _sa_layer(channel: int, groups: int, fused: bool) -> nn.Module:
    """The SA layer over ``channel`` channels: fused (``sa_cuda.SALayer``) or the reference."""
    cls = FusedSALayer if fused else reference.SALayer
    return cls(channel, groups)


class SABottleneck(nn.Module):
    """ResNet bottleneck with an SA layer after bn3 (the release's ``SABottleneck``).

    x [B, inplanes, H, W] -> [B, planes * 4, H / stride, W / stride].
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[[int], nn.Module] | None = None,
        sa_groups: int = 64,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        # Both self.conv2 and self.downsample downsample the input when stride != 1.
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.sa = _sa_layer(planes * self.expansion, sa_groups, fused)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x [B, inplanes, H, W] -> [B, planes * 4, H', W']."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        if isinstance(self.sa, FusedSALayer):
            return self.sa(out, identity=identity)  # relu(sa(out) + identity), one pass
        return self.relu(self.sa(out) + identity)


class SAResNet(nn.Module):
    """SA-Net's ``ResNet``: images [B, 3, H, W] -> logits [B, num_classes].

    At 224x224 the SA layers see (C, H, W) = (256, 56, 56), (512, 28, 28), (1024, 14, 14),
    (2048, 7, 7) in layer1..layer4.
    """

    def __init__(
        self,
        block: type[SABottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        sa_groups: int = 64,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self._sa_groups = sa_groups
        self._fused = fused

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # each element says whether to replace the 2x2 stride with a dilated convolution
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group

        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(
            block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0]
        )
        self.layer3 = self._make_layer(
            block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1]
        )
        self.layer4 = self._make_layer(
            block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2]
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialise the last BN of each residual branch (arXiv:1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, SABottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(
        self,
        block: type[SABottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = [
            block(
                self.inplanes,
                planes,
                stride,
                downsample,
                self.groups,
                self.base_width,
                previous_dilation,
                norm_layer,
                sa_groups=self._sa_groups,
                fused=self._fused,
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                    sa_groups=self._sa_groups,
                    fused=self._fused,
                )
            )
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, 3, H, W] -> logits [B, num_classes]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def convert_official_state_dict(checkpoint: Mapping[str, object]) -> OrderedDict[str, Tensor]:
    """A checkpoint of SA-Net's code release (``torch.load`` of ``main.py``'s ``*.pth.tar``, i.e.
    ``{"state_dict": ..., "optimizer": ...}`` with DataParallel's ``module.`` prefix, or a bare
    state_dict) -> a state_dict for ``SAResNet.load_state_dict(..., strict=True)``."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():  # type: ignore[union-attr]
        out[key[len("module.") :] if key.startswith("module.") else key] = value
    return out


def _sa_resnet(layers: list[int], num_classes: int, fused: bool, **kwargs) -> SAResNet:
    return SAResNet(SABottleneck, layers, num_classes=num_classes, fused=fused, **kwargs)


def sa_resnet50(num_classes: int = 1000, fused: bool = True, **kwargs) -> SAResNet:
    """SA-ResNet-50 (layers 3, 4, 6, 3; 16 SA layers): [B, 3, H, W] -> [B, num_classes].

    fused: sa_cuda.SALayer (True) or sa_cuda.reference.SALayer (False). kwargs go to SAResNet
    (e.g. sa_groups, zero_init_residual, norm_layer).
    """
    return _sa_resnet([3, 4, 6, 3], num_classes, fused, **kwargs)


def sa_resnet101(num_classes: int = 1000, fused: bool = True, **kwargs) -> SAResNet:
    """SA-ResNet-101 (layers 3, 4, 23, 3): [B, 3, H, W] -> [B, num_classes]. See sa_resnet50."""
    return _sa_resnet([3, 4, 23, 3], num_classes, fused, **kwargs)


def sa_resnet152(num_classes: int = 1000, fused: bool = True, **kwargs) -> SAResNet:
    """SA-ResNet-152 (layers 3, 8, 36, 3): [B, 3, H, W] -> [B, num_classes]. See sa_resnet50."""
    return _sa_resnet([3, 8, 36, 3], num_classes, fused, **kwargs)
