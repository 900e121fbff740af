"""Blocks in and out of moekit: ``from_hf``, ``to_hf``, ``replace_moe_blocks``, ``restore_moe_blocks``, ``restored``.

``replace_moe_blocks`` swaps every supported sparse-MoE block of a model for a ``MoEBlock`` and
keeps the original block as a skeleton on the meta device (its structure, settings and hooks,
no memory), so ``restore_moe_blocks`` can put blocks of the original classes back with moekit's
weights written into them: that is what ``save_pretrained`` must see for ``from_pretrained`` to
load the trained experts (with moekit's blocks in place the weight names differ and transformers
would initialise the experts afresh).

Router logits reach the model through transformers' output-capturing hooks (see
``moekit.hf.block``). A model installs those hooks lazily, once, on the modules present at the
time; a block restored after that would miss them, so ``restore_moe_blocks`` installs them on it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from moekit.hf._compat import require_attribute
from moekit.hf.block import MoEBlock
from moekit.hf.families import FAMILIES, family_of, qualified_name, supported_blocks
from moekit.layer import MoE

ROUTER_LOGITS = "router_logits"  # the output-capturing key of every supported family


def _install_hook(module: nn.Module, index: int) -> None:
    install = require_attribute("transformers.utils.output_capturing", "install_output_capuring_hook")
    install(module, ROUTER_LOGITS, index)


def _first_float(module: nn.Module) -> torch.Tensor:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t
    raise ValueError(f"{type(module).__name__} holds no floating-point weight")


def from_hf(block: nn.Module, *, routing_stats: bool = True) -> MoEBlock:
    """A moekit module computing exactly what the transformers sparse-MoE ``block`` computes.

    It is called like the block and returns what the block returns, so it can take the block's
    place in its model; the block itself is left untouched. Supported: the blocks of Mixtral,
    Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Llama 4 (text) and SwitchTransformers
    (``moekit.hf.supported_blocks()``); any other class gets a ``TypeError`` naming it.

    ``routing_stats=False`` builds the layer to serve (``moekit.MoE(routing_stats=False)``): in
    eval mode it keeps no statistics (``last_stats`` None) and computes no balancing losses, which
    transformers' own blocks do not compute either; the outputs are the same. Training keeps them.
    """
    family = family_of(block)
    options = family.options(block)
    for caveat in family.caveats(block):
        warnings.warn(caveat, stacklevel=2)
    weight = _first_float(block)
    if weight.is_meta:
        raise ValueError(f"{type(block).__name__}'s weights are on the meta device: nothing to convert")
    # Built on the meta device and filled from the block: no throw-away initialisation.
    moe = MoE(**options, routing_stats=routing_stats, device="meta", dtype=weight.dtype)
    moe.to_empty(device=weight.device)
    for buffer in moe.buffers():  # e.g. the router's load counter, which the block has no copy of
        buffer.zero_()
    with torch.no_grad():
        moe.load_state_dict(family.to_moekit(block), strict=True)
    module = MoEBlock(family, moe, options, qualified_name(type(block)), family.jitter(block))
    module.train(block.training)
    _install_hook(module.router_logits_tap, 0)
    return module


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


def to_hf(module: MoEBlock, block: nn.Module) -> nn.Module:
    """Write ``module``'s weights into ``block``, a block of the class it was made from; returns ``block``.

    The block must have the same settings (sizes, k, routing options); a block on the meta device
    is first materialised on the module's device.
    """
    if not isinstance(module, MoEBlock):
        raise TypeError(f"to_hf takes a moekit.hf.MoEBlock (from from_hf), got {type(module).__name__}")
    family = family_of(block)
    if family.name != module.family:
        raise ValueError(f"{type(block).__name__} is a {family.name} block; this module computes a {module.family} "
                         "block")
    options = family.options(block)
    if options != module.options:
        raise ValueError(f"{type(block).__name__} does not match the module ({_differences(options, module.options)})")
    if _first_float(block).is_meta:
        block.to_empty(device=_first_float(module.moe).device)
    with torch.no_grad():
        block.load_state_dict(family.to_block(module.moe), strict=True)
    return block


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _owner(model: nn.Module, name: str) -> nn.Module | None:
    """The innermost transformers ``PreTrainedModel`` on the path to ``name`` (whose hooks cover it)."""
    pretrained = require_attribute("transformers.modeling_utils", "PreTrainedModel")
    owner, module = None, model
    for part in ["", *name.split(".")]:
        module = module.get_submodule(part) if part else module
        if isinstance(module, pretrained):
            owner = module
    return owner


def _hooks_installed(owner: nn.Module | None) -> bool:
    return bool(owner is not None and getattr(owner, "_output_capturing_hooks_installed", False))


def _hook_router(owner: nn.Module, block: nn.Module) -> None:
    """Install the owner's router-logits capturing hook on ``block``'s router (as the model would have)."""
    recorders = (getattr(type(owner), "_can_record_outputs", None) or {}).get(ROUTER_LOGITS)
    for spec in recorders if isinstance(recorders, list) else [recorders]:
        target = spec if isinstance(spec, type) else getattr(spec, "target_class", None)
        if target is None:
            continue
        index = getattr(spec, "index", 1)  # a bare class records output[1], as transformers does
        for sub in block.modules():
            if isinstance(sub, target):
                _install_hook(sub, index)


def _candidates(model: nn.Module) -> list[str]:
    """Modules that look like MoE blocks (they hold ``experts``) but are of an unsupported class."""
    return [f"{type(m).__name__} at {name or '(root)'}" for name, m in model.named_modules()
            if hasattr(m, "experts") and not isinstance(m, MoEBlock | MoE) and qualified_name(type(m)) not in FAMILIES]


def replace_moe_blocks(model: nn.Module, *, routing_stats: bool = True) -> list[str]:
    """Replace, in place, every supported sparse-MoE block of ``model`` by its ``from_hf`` module.

    Returns the names of the replaced modules. The model's forward, ``generate``, its labels loss
    and ``output_router_logits=True`` keep working; each replacement's ``last_stats`` holds
    moekit's ``RoutingStats`` of its last forward. Dense layers (DeepSeek-V3's first layers, the
    dense layers of Qwen or Llama 4) are left alone. ``routing_stats=False`` builds every block to
    serve (see ``from_hf``): for generation, where nothing reads the statistics.
    """
    names = [name for name, m in model.named_modules() if qualified_name(type(m)) in FAMILIES]
    if not names:
        hint = _candidates(model)
        found = f"; modules with experts of unsupported classes: {', '.join(hint)}" if hint else ""
        raise ValueError(f"{type(model).__name__} holds no sparse-MoE block of a supported class "
                         f"({', '.join(supported_blocks())}){found}")
    for name in names:
        block = model.get_submodule(name)
        module = from_hf(block, routing_stats=routing_stats)
        # Not a submodule (its meta tensors stay out of state dicts): the skeleton restore fills.
        module.__dict__["_skeleton"] = block
        module.__dict__["_skeleton_hooked"] = _hooks_installed(_owner(model, name))
        _set_submodule(model, name, module)
        block.to("meta")
    return names


def _put_back(model: nn.Module) -> list[tuple[str, MoEBlock, nn.Module]]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEBlock)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no moekit.hf.MoEBlock to restore")
    orphans = [name for name, m in found if m.__dict__.get("_skeleton") is None]
    if orphans:
        raise ValueError(f"{', '.join(orphans)}: made by from_hf, not replace_moe_blocks, so there is no original "
                         "block to restore; use to_hf(module, block) with a block you build")
    done = []
    for name, module in found:
        block = module.__dict__["_skeleton"]
        weight = _first_float(module.moe)
        block.to_empty(device=weight.device)
        if _first_float(block).dtype != weight.dtype:  # the model was cast after the replacement
            block.to(dtype=weight.dtype)
        to_hf(module, block)
        block.train(module.training)
        owner = _owner(model, name)
        if owner is not None and _hooks_installed(owner) and not module.__dict__["_skeleton_hooked"]:
            _hook_router(owner, block)
            module.__dict__["_skeleton_hooked"] = True
        _set_submodule(model, name, block)
        done.append((name, module, block))
    return done


def restore_moe_blocks(model: nn.Module) -> list[str]:
    """Put blocks of the original classes back in place of ``replace_moe_blocks``' modules, with the
    modules' current weights; returns their names. ``save_pretrained`` then writes the trained
    weights in the model's own format."""
    return [name for name, _, _ in _put_back(model)]


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its original blocks (holding moekit's weights) for the duration of the block.

    ``with moekit.hf.restored(model): model.save_pretrained(path)``. On exit the same moekit
    modules go back in (an optimizer holding their parameters stays valid), with any change made to
    the blocks' weights inside the block copied into them.
    """
    swapped = _put_back(model)
    try:
        yield model
    finally:
        for name, module, block in swapped:
            with torch.no_grad():
                module.moe.load_state_dict(family_of(block).to_moekit(block), strict=True)
            _set_submodule(model, name, module)
            block.to("meta")
