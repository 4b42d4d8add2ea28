"""The launch-path check's cases (launch_paths.py): one Spec per kernel launch path of
csrc/cuda/launch_common.cuh, a shape chosen for it, and the cases a set takes of it (variants,
dtypes, storage offsets, plain or residual epilogue). Add a spec when a path is added.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common import DTYPES, VARIANTS

OFFSETS = (0, 1, 2, 4)
SMALL_OFFSETS = (0, 1)


@dataclass(frozen=True)
class Spec:
    path: str  # the launch path the shape is chosen for
    shape: tuple[int, int, int, int]  # (B, C, H, W)
    groups: int
    variants: tuple[str, ...] = VARIANTS  # the first one alone in the small set
    small: tuple[str, ...] = ()  # dtypes of this spec in the small set (none: not in it)
    channels_last: bool = False  # x and grad_out channels_last (the NHWC kernels)


PLANE = VARIANTS  # plane kernels (sa_layer); shuffle_attention sees the same N/offsets
GROUP = ("shuffle_attention",)
# Per-channel variant (plane_* kernels): warp team N <= 256, block team N <= 4096, streamed above;
# packs when the plane pointers are aligned and N is a multiple of the pack, else scalar accesses.
# 1x1-conv variant (group_* kernels): tiles of group_tile_pixels(m) pixels (1024 for m <= 2, 512
# for m = 4, ..., 64 for m = 32, 32 for m >= 48); dynamic shared memory above 48 KiB (opt-in) for
# the fp32 backward from m = 32 and the fp64 one from m = 16; one spec with N below and one above
# the tile per m.
SPECS: list[Spec] = [
    Spec("warp N=1", (2, 16, 1, 1), 4),
    Spec("warp N=63 odd", (2, 16, 7, 9), 2, PLANE, ("fp32", "bf16")),
    Spec("warp N=30 even", (2, 16, 5, 6), 4),
    Spec("warp N=64 x8", (3, 16, 8, 8), 2, PLANE, ("fp32", "bf16")),
    Spec("warp N=256 12 planes", (1, 12, 16, 16), 3),
    Spec("block N=272 x8", (1, 8, 16, 17), 2),
    Spec("block N=899 odd", (1, 8, 31, 29), 2, PLANE, ("fp32", "fp16")),
    Spec("block N=930 even", (2, 8, 30, 31), 2),
    Spec("block N=4096 x8", (1, 8, 64, 64), 2, PLANE, ("fp32", "bf16")),
    Spec("streamed N=4225 odd", (1, 4, 65, 65), 1, PLANE, ("fp32",)),
    Spec("streamed N=4608 x8", (1, 4, 64, 72), 1, PLANE, ("fp32", "bf16")),
    Spec("streamed N=4422 even", (2, 4, 66, 67), 1),
    Spec("small B*C=2 N=16384", (1, 2, 128, 128), 1, PLANE, ("fp32",)),
    Spec("small B*C=2 N=32761 odd", (1, 2, 181, 181), 1),
    Spec("small B*C=4 N=81", (2, 2, 9, 9), 1),
    Spec("group m=1 N<tile", (2, 2, 15, 17), 1, GROUP),
    Spec("group m=1 N>tile", (1, 2, 33, 37), 1, GROUP, ("fp32", "bf16")),
    Spec("group m=2 N<tile", (1, 4, 10, 11), 1, GROUP),
    Spec("group m=2 N>tile", (1, 8, 35, 35), 2, GROUP),
    Spec("group m=3 N<tile", (2, 6, 9, 9), 1, GROUP),
    Spec("group m=3 N>tile", (1, 6, 29, 29), 1, GROUP),
    Spec("group m=4 N<tile", (1, 8, 7, 7), 1, GROUP),
    Spec("group m=4 N>tile", (1, 16, 24, 25), 2, GROUP),
    Spec("group m=8 N<tile", (2, 16, 8, 8), 1, GROUP),
    Spec("group m=8 N>tile", (1, 16, 20, 20), 1, GROUP, ("fp32", "fp16")),
    Spec("group m=16 N<tile", (1, 32, 7, 9), 1, GROUP),
    Spec("group m=16 N>tile", (2, 32, 14, 14), 1, GROUP, ("fp64",)),
    Spec("group m=24 N<tile", (1, 48, 5, 5), 1, GROUP),
    Spec("group m=24 N>tile", (1, 48, 9, 11), 1, GROUP),
    Spec("group m=31 N<tile", (1, 62, 3, 7), 1, GROUP),
    Spec("group m=31 N>tile", (1, 62, 10, 10), 1, GROUP),
    Spec("group m=32 N<tile", (1, 64, 5, 6), 1, GROUP),
    Spec("group m=32 N>tile", (1, 64, 11, 13), 1, GROUP, ("fp32",)),
    Spec("group m=48 N<tile", (1, 96, 4, 5), 1, GROUP),
    Spec("group m=48 N>tile", (1, 96, 7, 7), 1, GROUP),
    Spec("group m=64 N<tile", (1, 128, 3, 5), 1, GROUP),
    Spec("group m=64 N>tile", (1, 128, 8, 9), 1, GROUP, ("fp32", "fp64")),
    Spec("group m=64 G=8", (1, 1024, 7, 7), 8, GROUP),
    # channels_last: the NHWC kernels (csrc/cuda/nhwc_tiles.cuh: statistics and SALayer in tiles
    # of 32 lanes of a channel, or of a pack of 4 (2 fp64) where the grid keeps enough blocks, by
    # chunks of 256 pixels (SALayer's backward: 64 on small grids); nhwc_windows.cuh:
    # ShuffleAttention's windows of whole branches, walked in staged tiles of pixels)
    Spec("nhwc 32+8 ch, 2/6 chunks", (2, 40, 17, 19), 5, PLANE, ("fp32", "bf16"), True),
    Spec("nhwc 8 ch, 4/15 chunks", (1, 8, 30, 30), 2, PLANE, (), True),
    Spec("nhwc 256 ch, 28x28", (2, 256, 28, 28), 32, PLANE, ("fp32",), True),
    # packs: the forward's 64 * 2 chunks * 2 tiles = 256 blocks (>= 256), the backward's 64 * 5
    # chunks of 64 pixels * 2 tiles = 640 (>= 512)
    Spec("nhwc packs 256 ch, 17x17", (64, 256, 17, 17), 32, PLANE, ("fp32",), True),
    # packs straddle the branches; forward 64 * 5 tiles = 320 blocks, backward 640
    Spec("nhwc packs m=5, 9x9", (64, 520, 9, 9), 52, PLANE, (), True),
    Spec("nhwc win 16+4 m=4", (2, 40, 17, 19), 5, GROUP, ("fp32", "bf16"), True),
    Spec("nhwc win 17x2 m=17", (1, 68, 5, 7), 2, GROUP, ("fp32",), True),
    # 200 KB of shared memory in the fp64 backward (opt-in above 48 KiB)
    Spec("nhwc win 64 m=64", (1, 128, 8, 9), 1, GROUP, ("fp64",), True),
    Spec("nhwc win 16 m=8 28x28", (2, 512, 28, 28), 32, GROUP, (), True),
]


# The ops a case runs: the plain forward and backward, or the residual epilogue's (relu(SA(x) +
# identity), whose backward masks grad_out as its kernels read it: csrc/cuda/sa_grad.cuh).
EPILOGUES = ("plain", "residual")


@dataclass(frozen=True)
class Case:
    spec: Spec
    variant: str
    dtype: str
    offsets: tuple[int, ...]  # one case per offset; they share the reference computations
    epilogue: str = "plain"

    @property
    def residual(self) -> bool:
        return self.epilogue == "residual"

    @property
    def label(self) -> str:
        spec = self.spec
        return (
            f"{self.variant:<17} {self.epilogue:<8} {spec.path:<24} {str(spec.shape):<17} "
            f"G={spec.groups}"
        )


def cases(
    which: str,
    dtypes: list[str] | None,
    offsets: list[int] | None,
    pattern: str | None,
    epilogues: tuple[str, ...] = EPILOGUES,
) -> list[Case]:
    out = []
    for spec in SPECS:
        if which == "small":
            if not spec.small:
                continue
            variants, spec_dtypes, spec_offsets = spec.variants[:1], spec.small, SMALL_OFFSETS
        else:
            variants, spec_dtypes, spec_offsets = spec.variants, tuple(DTYPES), OFFSETS
        spec_dtypes = [d for d in spec_dtypes if dtypes is None or d in dtypes]
        spec_offsets = tuple(o for o in spec_offsets if offsets is None or o in offsets)
        for variant in variants:
            for dtype in spec_dtypes:
                for epilogue in epilogues:
                    case = Case(spec, variant, dtype, spec_offsets, epilogue)
                    if spec_offsets and (pattern is None or re.search(pattern, case.label)):
                        out.append(case)
    return out
