"""VGG19's geometry as data: layer names, channels and strides. No torch, so the configuration
and the command line's help can use it without loading the network's library."""

from __future__ import annotations

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


def layer_stride(name: str) -> int:
    """How many times smaller than the input a layer's output is (2 per pooling before it)."""
    return 2 ** sum(1 for n in LAYER_NAMES[: LAYER_INDEX[name] + 1] if n.startswith("pool"))
