"""A backbone split at a block boundary: the frozen prefix (the blocks below the lowest one that
trains), whose activations the cache holds, and the top that trains on them.

torch.fx traces the backbone's forward into a graph of module calls, parameter reads and
functions. A node belongs to the prefix when it reads a prefix block's parameters, to the top
when it reads a trained block's. The boundary is the latest node that depends on no top node and
alone carries what the output needs from the input: the graph from it to the output, with a
placeholder in its place and the rest of the prefix gone, is the top. When no single tensor does
(a skip connection or concatenation across the boundary) or tracing fails, there is no split.

Prefix and top call the backbone's own modules and parameters: training the top trains the
model. Modules whose Python code reads `self.training` (DropPath, stochastic depth) stay calls in
the graph, so they drop or not as their mode says when called, as in the model itself.
"""

from __future__ import annotations

import inspect
import operator
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import fx, nn

from transferkit.backbones.blocks import Block
from transferkit.errors import first_line


class NoPrefixSplit(Exception):
    """Why the backbone cannot be split at the boundary, as a clause ("tracing fails: ...")."""


@cache
def _reads_training_mode(cls: type) -> bool:
    """Whether a module class decides anything on `self.training` in Python (torch.nn's own
    modules are leaves of every trace anyway)."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn") or klass is object:
            continue
        try:
            if "self.training" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            continue
    return False


def _timm_registrations() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """timm's modules and functions that fx must not trace into (as timm's own fx helpers use
    them); nothing when timm is not loaded, so a torchvision model does not import it."""
    if "timm.layers" not in sys.modules:
        return (), ()
    from timm.layers import get_notrace_functions, get_notrace_modules

    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...], functions: tuple[Any, ...]) -> None:
        super().__init__(autowrap_functions=functions)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaves)
            or _reads_training_mode(type(m))
            or super().is_leaf_module(m, module_qualified_name)
        )


def _trace(backbone: nn.Module, training: bool) -> fx.Graph:
    """The backbone's graph with its root's own forward in `training` mode (the only mode that
    a trace bakes in: every module that reads its mode stays a call)."""
    leaves, functions = _timm_registrations()
    mode = backbone.training
    backbone.training = training
    try:
        return _Tracer(leaves, functions).trace(backbone)
    finally:
        backbone.training = mode


def _fetch(module: nn.Module, target: str) -> Any:
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _node_blocks(node: fx.Node, backbone: nn.Module, block_of: dict[int, int]) -> set[int]:
    """The blocks whose parameters the node reads."""
    if node.op == "call_module":
        params: Iterable[Any] = backbone.get_submodule(node.target).parameters()
    elif node.op == "get_attr":
        params = [_fetch(backbone, node.target)]
    else:
        return set()
    return {block_of[id(p)] for p in params if id(p) in block_of}


def _mutates(node: fx.Node) -> bool:
    """An in-place op or an assertion: kept even when nothing uses its result."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (
            node.target is operator.setitem
            or (name.endswith("_") and not name.endswith("__"))
            or (node.is_impure())
        )
    return False


def _closure(roots: Iterable[fx.Node], stop: fx.Node | None = None) -> set[fx.Node]:
    """The roots and every node they read, not looking past `stop`."""
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node is not stop:
            todo.extend(node.all_input_nodes)
    return seen


def _subgraph(
    graph: fx.Graph, keep: set[fx.Node], inputs: dict[fx.Node, str], output: fx.Node | None
) -> fx.Graph:
    """The nodes of `keep`, in order, with `inputs` as placeholders; the output is `output`'s
    value, or the graph's own output when None."""
    new = fx.Graph()
    env = {old: new.placeholder(name) for old, name in inputs.items()}
    for node in graph.nodes:
        if node in keep and node not in env and node.op != "output":
            env[node] = new.node_copy(node, env.__getitem__)
    if output is None:
        new.node_copy(next(n for n in reversed(graph.nodes) if n.op == "output"), env.__getitem__)
    else:
        new.output(env[output])
    new.lint()
    return new


def _split_graph(
    graph: fx.Graph, backbone: nn.Module, blocks: list[Block], index: int
) -> tuple[fx.Graph, fx.Graph, str]:
    """(prefix graph, top graph, boundary node name) of one trace."""
    params = dict(backbone.named_parameters())
    block_of = {id(params[name]): i for i, block in enumerate(blocks) for name in block.params}
    nodes = list(graph.nodes)
    owners = {node: _node_blocks(node, backbone, block_of) for node in nodes}
    below = {n for n in nodes if owners[n] and max(owners[n]) < index}
    above = {n for n in nodes if owners[n] and min(owners[n]) >= index}
    for node in nodes:
        if owners[node] and node not in below and node not in above:
            raise NoPrefixSplit(f"{node.target} holds parameters of blocks on both sides of the cut")
    # the images; other arguments of the forward (timm's attn_mask) keep their defaults
    images, *options = [n for n in nodes if n.op == "placeholder"]
    if any(not n.args for n in options):
        raise NoPrefixSplit("its forward takes more than the images")
    reaches_top: dict[fx.Node, bool] = {}
    from_input: dict[fx.Node, bool] = {}
    for node in nodes:
        reaches_top[node] = node in above or any(reaches_top[i] for i in node.all_input_nodes)
        from_input[node] = node is images or any(from_input[i] for i in node.all_input_nodes)
    output = next(n for n in reversed(nodes) if n.op == "output")
    mutating = [n for n in nodes if _mutates(n)]
    for boundary in reversed(nodes):
        if (
            boundary.op in ("output", "placeholder", "get_attr")
            or reaches_top[boundary]
            or not from_input[boundary]
        ):
            continue
        after = _closure_after(nodes, boundary)
        top_roots = [output, *(n for n in mutating if n in after or reaches_top[n])]
        top = _closure(top_roots, stop=boundary) - {boundary}
        if images in top or top & below:
            continue
        prefix_roots = [boundary, *(n for n in mutating if n not in top)]
        prefix = _closure(prefix_roots)
        if prefix & above or not prefix & below:
            continue
        top_graph = _subgraph(graph, top, {boundary: "boundary"}, None)
        return _subgraph(graph, prefix, {}, boundary), top_graph, boundary.name
    raise NoPrefixSplit(
        "no single tensor carries the lower blocks' output into the top (a skip or concatenation crosses it)"
    )


def _closure_after(nodes: list[fx.Node], start: fx.Node) -> set[fx.Node]:
    """`start` and every node that reads it, directly or not."""
    after = {start}
    for node in nodes[nodes.index(start) + 1 :]:
        if any(i in after for i in node.all_input_nodes):
            after.add(node)
    return after


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode, each sub-module's own mode restored after (frozen parts are held in
    eval while the rest trains: `train()` would undo that)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class PrefixSplit:
    """The backbone cut below block `index` (named `block`): `prefix()` computes the activations
    at the boundary, calling the split on them runs the top. Neither is an attribute of any
    module, so the model's state dict and module tree stay as they are."""

    def __init__(
        self,
        backbone: nn.Module,
        index: int,
        block: str,
        node: str,
        prefix: fx.Graph,
        tops: dict[bool, fx.Graph],
    ) -> None:
        self.backbone, self.index, self.block, self.node = backbone, index, block, node
        self.prefix_graph, self.top_graphs = prefix, tops
        self.activation_shape: tuple[int, ...] = ()
        self._tops: dict[tuple[bool, torch.device], fx.GraphModule] = {}

    @property
    def boundary(self) -> dict[str, Any]:
        """What names the cut in the cache key: the block index and name, the node, and the
        prefix's code (another architecture, another key)."""
        code = fx.GraphModule(self.backbone, self.prefix_graph).code
        return {"index": self.index, "block": self.block, "node": self.node, "code": code}

    def prefix(self) -> fx.GraphModule:
        """The frozen prefix as a module (its state dict: the prefix's weights, by their names in
        the backbone)."""
        return fx.GraphModule(self.backbone, self.prefix_graph, class_name="Prefix")

    def top(self) -> fx.GraphModule:
        """The top for the backbone's present mode and device (built once each: a module keeps
        the buffers it was built with, so one built on another device would be stale)."""
        training = self.backbone.training and True in self.top_graphs
        device = next(self.backbone.parameters()).device
        key = (training, device)
        if key not in self._tops:
            self._tops[key] = fx.GraphModule(self.backbone, self.top_graphs[training], class_name="Top")
        return self._tops[key]

    def __call__(self, activations: torch.Tensor) -> Any:
        return self.top()(activations)


def split_backbone(backbone: nn.Module, blocks: list[Block], index: int, image_size: int) -> PrefixSplit:
    """Split `backbone` below `blocks[index]`, checked on two random images in eval mode: the
    boundary is a batch of per-image tensors, and top(prefix(x)) gives backbone(x). Raises
    NoPrefixSplit with the reason when it cannot be split there."""
    if not 0 < index < len(blocks):
        raise NoPrefixSplit(f"block {index} of {len(blocks)} leaves no prefix and top")
    modes = [False, True] if _reads_training_mode(type(backbone)) else [False]
    splits = {}
    for training in modes:
        try:
            graph = _trace(backbone, training)
        except Exception as error:  # noqa: BLE001 - any untraceable forward means no split
            raise NoPrefixSplit(
                f"torch.fx cannot trace {type(backbone).__name__} ({first_line(error)})"
            ) from None
        splits[training] = _split_graph(graph, backbone, blocks, index)
    prefix, _, node = splits[False]
    if (
        len(splits) == 2
        and fx.GraphModule(backbone, splits[True][0]).code != fx.GraphModule(backbone, prefix).code
    ):
        raise NoPrefixSplit("its forward changes with training mode below the boundary")
    split = PrefixSplit(
        backbone, index, blocks[index].name, node, prefix, {m: s[1] for m, s in splits.items()}
    )
    _check(split, image_size)
    return split


def _check(split: PrefixSplit, image_size: int) -> None:
    """On two random images (one batch size, so the backends' kernels are set up once): the
    boundary is a batch of per-image activations, and the top on them gives the backbone's output."""
    backbone = split.backbone
    device = next(backbone.parameters()).device
    shape = (2, 3, image_size, image_size)
    images, other = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    other[0] = images[0]
    images, other = (x.contiguous(memory_format=torch.channels_last) for x in (images, other))
    with torch.no_grad(), eval_mode(backbone):
        prefix = split.prefix()
        activations = prefix(images)
        if not isinstance(activations, torch.Tensor) or activations.ndim < 2 or len(activations) != 2:
            raise NoPrefixSplit("the tensor at the boundary is not a batch of per-image activations")
        beside_another = prefix(other)[0]
        got, want = split(activations), backbone(images)
    scale = float(activations.abs().max()) or 1.0
    if not torch.allclose(beside_another, activations[0], rtol=1e-3, atol=1e-4 * scale):
        raise NoPrefixSplit("the activations at the boundary mix the images of a batch")
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise NoPrefixSplit("the top does not return the backbone's features")
    difference = float((got - want).abs().max())
    if difference > 1e-4 * (float(want.abs().max()) or 1.0):
        raise NoPrefixSplit(f"prefix and top differ from the backbone by {difference:.2g}")
    split.activation_shape = tuple(activations.shape[1:])
