"""VGG19's geometry as data: layer names, channels, strides, feature sizes, the deepest layer
and the smallest input it accepts. No torch, so the configuration
and the command line's help can use it without loading the network's library."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# torchvision's VGG19 ("E") `features`, as data: channel counts, "M" for a pooling layer.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


def _layer_table() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Names in torchvision's `features` order, and each conv's output channels (0 elsewhere)."""
    names: list[str] = []
    channels: list[int] = []
    block, conv = 1, 0
    for v in VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            channels.append(0)
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            channels += [int(v), int(v)]
    return tuple(names), tuple(channels)


LAYER_NAMES, _CHANNELS = _layer_table()
LAYER_INDEX: dict[str, int] = {name: i for i, name in enumerate(LAYER_NAMES)}
CONV_INDICES: tuple[int, ...] = tuple(i for i, n in enumerate(LAYER_NAMES) if n.startswith("conv"))


def layer_channels(name: str) -> int:
    """Channels of a layer's output (a pool keeps the channels of the conv before it)."""
    i = LAYER_INDEX[name]
    while _CHANNELS[i] == 0:
        i -= 1
    return _CHANNELS[i]


def _poolings_through(name: str) -> int:
    return sum(1 for n in LAYER_NAMES[: LAYER_INDEX[name] + 1] if n.startswith("pool"))


def layer_stride(name: str) -> int:
    """How many times smaller than the input a layer's output is (2 per pooling before it)."""
    return 2 ** _poolings_through(name)


def feature_hw(hw: Sequence[int], name: str) -> tuple[int, int]:
    """(h, w) of a layer's output for an (H, W) input: each 2x2 pooling floors a halving."""
    h, w = int(hw[0]), int(hw[1])
    for _ in range(_poolings_through(name)):
        h, w = h // 2, w // 2
    return h, w


def deepest_layer(names: Iterable[str]) -> str:
    """The layer furthest into the network: where a network that serves `names` can be cut."""
    return max(names, key=LAYER_INDEX.__getitem__)


def deepest_layer_within(side: int) -> str | None:
    """The deepest ReLU whose output keeps a pixel for an input `side` px across (None if none)."""
    fits = [n for n in LAYER_NAMES if n.startswith("relu") and layer_stride(n) <= side]
    return fits[-1] if fits else None


def min_input_size(names: Iterable[str]) -> int:
    """The smallest input edge that leaves at least one pixel at the deepest of `names`."""
    return layer_stride(deepest_layer(names))


def receptive_reach(name: str) -> int:
    """Input pixels a layer's output sees beyond its own stride cell, on each side.

    A 3x3 convolution (padding 1) widens the view by one cell of the current stride each side; a
    2x2 pooling only doubles the stride. So relu5_1 reaches 70 px each side, and its receptive
    field is 2 * 70 + 16 = 156 px (188 px at relu5_2).
    """
    reach, stride = 0, 1
    for n in LAYER_NAMES[: LAYER_INDEX[name] + 1]:
        if n.startswith("conv"):
            reach += stride
        elif n.startswith("pool"):
            stride *= 2
    return reach


def receptive_field(name: str) -> int:
    """Edge in input pixels of the window one output position of a layer depends on."""
    return 2 * receptive_reach(name) + layer_stride(name)


def tile_margins(names: Iterable[str]) -> dict[str, int]:
    """For a network cut after the deepest of `names`, run on a tile's crop: the pixels of context
    each layer's output must keep around the tile's own region so that every deeper layer still
    sees all it sees in the whole image. That is the reach of the convolutions still to come,
    rounded up to the deepest stride while a pooling is still to come (so pooling windows fall where
    they fall in the whole image). At the first layer it is the tile's halo; at the deepest, 0."""
    deepest = deepest_layer(names)
    chain = LAYER_NAMES[: LAYER_INDEX[deepest] + 1]
    deep = layer_stride(deepest)
    margins: dict[str, int] = {}
    for i, name in enumerate(chain):
        m = sum(layer_stride(n) for n in chain[i + 1 :] if n.startswith("conv"))
        margins[name] = -(-m // deep) * deep if layer_stride(name) < deep else m
    return margins
