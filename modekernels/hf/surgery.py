"""Instance-level surgery on Hugging Face transformer models: the patching core.

What this module knows about each supported family is where a block's feed-forward network (FFN)
lives and how its input and output flow:

=============  ==========================  =====================================================
family         blocks                      FFN of a block
=============  ==========================  =====================================================
``bert``       ``encoder.layer`` (BERT,    ``intermediate`` (x -> act(W1 x)) then ``output``
               RoBERTa)                    (LayerNorm(dropout(W2 h) + x)); the wrapper replaces
                                           ``output``, which sees both h and the FFN input x
``gpt2``       ``h``                       ``mlp``: dropout(c_proj(act(c_fc(x))))
``llama``      ``layers`` (Llama, Mistral, ``mlp``: down(act(gate(x)) * up(x))
               Qwen2, Qwen3, ...)
=============  ==========================  =====================================================

A wrapper (:class:`PatchedFFN`, :class:`PatchedBlock`) replaces one submodule of one instance.
It holds the original module outside the module tree and registers the original's children as
its own, so the backbone's parameter names do not change, even where experts replace a dense FFN
(:func:`~modekernels.hf.moefy`: the dense weights stay under their names, frozen and unused, so
that the checkpoint, :func:`unpatch` and surgeries that copy a block still find them; they keep
their memory). The added modules live under the wrapper's ``added`` dict. Classes are never
touched: a patched model gets instance attributes instead (its ``save_pretrained``, see
:func:`save_pretrained_with_modules`; MoDE's ``forward``), which :func:`unpatch` removes along
with putting every original module back and restoring which parameters were trainable.
A wrapped transformer block still honours ``gradient_checkpointing_enable``: the wrapper passes
the flag and the checkpointing function on to the original block.

Added FFN modules follow one protocol: ``forward(x, h) -> h`` where x is the FFN input and h the
FFN output so far (a parallel branch returns ``h + f(x)``, a post-FFN adapter ``h + f(h)``); a
module whose class sets ``replaces_ffn = True`` is called as ``forward(x) -> h`` instead of the
dense FFN (MoEBERT's experts).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = [
    "DenseFFN",
    "Family",
    "PatchedBlock",
    "PatchedFFN",
    "SurgeryReport",
    "added_modules",
    "detect_family",
    "patch_records",
    "unpatch",
]

STATE_ATTR = "_modekernels_surgery"


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class DenseFFN:
    """A block's dense FFN in neuron-major layout: neuron j is row j of ``w_in`` (and ``w_up``)
    and column j of ``w_out``. ``w_up`` is set for gated FFNs: act(w_in x) * (w_up x)."""

    w_in: torch.Tensor  # (d_ff, d)
    w_out: torch.Tensor  # (d, d_ff)
    b_in: Optional[torch.Tensor]  # (d_ff,)
    b_out: Optional[torch.Tensor]  # (d,)
    activation: str
    w_up: Optional[torch.Tensor] = None  # (d_ff, d)
    b_up: Optional[torch.Tensor] = None
    neuron_params: tuple = ()  # ((parameter, neuron dim), ...) for importance scores

    @property
    def d_ff(self) -> int:
        return self.w_in.shape[0]

    @property
    def gated(self) -> bool:
        return self.w_up is not None


class Family:
    """Where the blocks and FFNs of one model family live.

    ``ffn_attr`` names the submodule of a block that :class:`PatchedFFN` replaces; ``style``
    selects the wrapper's glue (``"bert"`` for ``BertOutput``'s (h, x) call, ``"mlp"`` for an
    x -> y module); ``attention_attr`` names the block's attention, which the block runs first
    and hands its keyword arguments.
    """

    def __init__(self, name: str, ffn_attr: str, style: str, attention_attr: str):
        self.name = name
        self.ffn_attr = ffn_attr
        self.style = style
        self.attention_attr = attention_attr

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    def dense_ffn(self, block: nn.Module) -> DenseFFN:
        """The dense FFN of ``block`` (a patched block or FFN is looked through)."""
        block = unwrap(block)
        if self.name == "bert":
            inner, outer = unwrap(block.intermediate), unwrap(getattr(block, self.ffn_attr))
            fc1, fc2 = inner.dense, outer.dense
            return DenseFFN(
                fc1.weight, fc2.weight, fc1.bias, fc2.bias, _activation_name(inner.intermediate_act_fn),
                neuron_params=((fc1.weight, 0), (fc2.weight, 1)),
            )
        mlp = unwrap(getattr(block, self.ffn_attr))
        if self.name == "gpt2":  # Conv1D: y = x @ W + b, W (in, out)
            return DenseFFN(
                mlp.c_fc.weight.t(), mlp.c_proj.weight.t(), mlp.c_fc.bias, mlp.c_proj.bias,
                _activation_name(mlp.act),
                neuron_params=((mlp.c_fc.weight, 1), (mlp.c_proj.weight, 0)),
            )
        return DenseFFN(
            mlp.gate_proj.weight, mlp.down_proj.weight, mlp.gate_proj.bias, mlp.down_proj.bias,
            _activation_name(mlp.act_fn), w_up=mlp.up_proj.weight, b_up=mlp.up_proj.bias,
            neuron_params=((mlp.gate_proj.weight, 0), (mlp.up_proj.weight, 0), (mlp.down_proj.weight, 1)),
        )


FAMILIES = {
    "bert": Family("bert", "output", "bert", "attention"),
    "gpt2": Family("gpt2", "mlp", "mlp", "attn"),
    "llama": Family("llama", "mlp", "mlp", "self_attn"),
}

_BLOCK_LISTS = ("encoder.layer", "h", "layers", "decoder.layers")


def _activation_name(fn: Callable) -> str:
    """The activation's name in modekernels' vocabulary (``gelu`` is erf GELU)."""
    name = type(fn).__name__
    table = {
        "GELUActivation": "gelu", "GELU": "gelu", "SiLU": "silu", "SiLUActivation": "silu",
        "ReLU": "relu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    }
    if name == "GELU" and getattr(fn, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if name in table:
        return table[name]
    if fn in (torch.nn.functional.gelu,):
        return "gelu"
    if fn in (torch.nn.functional.silu,):
        return "silu"
    if fn in (torch.nn.functional.relu, torch.relu):
        return "relu"
    raise ValueError(f"unsupported FFN activation {fn!r}")


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    base = getattr(model, "base_model", model)
    prefix = next((n for n, m in model.named_modules() if m is base), "")
    for path in _BLOCK_LISTS:
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return (f"{prefix}.{path}" if prefix else path), node
    raise ValueError(
        f"{type(model).__name__}: no transformer blocks found (looked for "
        f"{', '.join(_BLOCK_LISTS)} under the base model); supported families: BERT/RoBERTa, "
        "GPT-2, Llama-style (Llama, Mistral, Qwen2, Qwen3)"
    )


def detect_family(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``; raises ValueError naming the model when unsupported."""
    _, blocks = _block_list(model)
    block = unwrap(blocks[0])
    mlp = unwrap(getattr(block, "mlp", None))
    if hasattr(block, "intermediate") and hasattr(unwrap(getattr(block, "output", None)), "dense"):
        return FAMILIES["bert"]
    if mlp is not None and all(hasattr(mlp, a) for a in ("c_fc", "c_proj")):
        return FAMILIES["gpt2"]
    if mlp is not None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
        return FAMILIES["llama"]
    raise ValueError(
        f"{type(model).__name__}: unsupported block {type(block).__name__}; supported families: "
        "BERT/RoBERTa, GPT-2, Llama-style (Llama, Mistral, Qwen2, Qwen3)"
    )


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and the ModuleList of the transformer blocks of ``model``."""
    return _block_list(model)


def resolve_layers(
    model: nn.Module, layers: Optional[Iterable[int] | int], argument: str = "layers"
) -> list[int]:
    """Sorted block indices: all blocks when ``layers`` is None, one block for an int; negative
    indices count back. Errors name the caller's ``argument``."""
    _, block_list = _block_list(model)
    n = len(block_list)
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise ValueError(f"{argument} must be a block index or a list of them, got {layers!r}")
    out = set()
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
            raise ValueError(f"{argument}: {i!r} is not a block index of a model with {n} blocks")
        out.add(i % n)
    if not out:
        raise ValueError(f"{argument} must name at least one block")
    return sorted(out)


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise ValueError(f"{type(model).__name__}: config has no hidden_size")
    return int(size)


# --------------------------------------------------------------------------- wrappers


def unwrap(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The original module behind a wrapper (the module itself when it is not one)."""
    while isinstance(module, _Wrapper):
        module = module.original
    return module


def _on_original(name: str) -> property:
    """Attribute ``name`` read from and written to the wrapper's original module (absent when
    the original has none)."""

    def read(self):
        return getattr(self.original, name)

    def write(self, value):
        setattr(self.original, name, value)

    return property(read, write)


class _Wrapper(nn.Module):
    """Base of the wrappers: shares the original's children (same parameter names) and keeps
    the original itself outside the module tree, for :func:`unpatch`. transformers'
    ``gradient_checkpointing`` flag and ``_gradient_checkpointing_func`` live on the original
    (``gradient_checkpointing_enable`` finds them through the wrapper, which is in the tree)."""

    gradient_checkpointing = _on_original("gradient_checkpointing")
    _gradient_checkpointing_func = _on_original("_gradient_checkpointing_func")

    def __init__(self, original: nn.Module):
        super().__init__()
        own = [n for n, _ in original.named_parameters(recurse=False)]
        own += [n for n, _ in original.named_buffers(recurse=False)]
        if own:
            raise ValueError(
                f"cannot wrap {type(original).__name__}: it holds tensors directly ({own}), "
                "not in child modules"
            )
        self.__dict__["original"] = original
        for name, child in original.named_children():
            self.add_module(name, child)
        self.added = nn.ModuleDict()
        self.train(original.training)

    def train(self, mode: bool = True) -> "_Wrapper":
        """Set the training flag here and on the original (whose own forward may read it, as
        transformers' gradient checkpointing does)."""
        super().train(mode)
        self.original.train(mode)
        return self

    def _get_name(self) -> str:
        return f"{type(self).__name__}[{type(self.original).__name__}]"

    def extra_repr(self) -> str:
        if not len(self.added):
            return ""
        parts = [f"{n}: {sum(p.numel() for p in m.parameters()):,} params" for n, m in self.added.items()]
        return "added by modekernels: " + ", ".join(parts)


class PatchedFFN(_Wrapper):
    """Stands in for one block's FFN module and runs the modules added to it.

    ``mlp`` style (GPT-2, Llama): ``forward(x) -> y``. ``bert`` style (``BertOutput``):
    ``forward(h, x) -> LayerNorm(dropout(y) + x)`` with h = ``intermediate(x)``. y is the dense FFN
    output (or the experts' output after :func:`~modekernels.hf.moefy`) passed through each added
    module's ``forward(x, y)`` in the order they were added.
    """

    def __init__(self, original: nn.Module, family: Family):
        super().__init__(original)
        self.style = family.style

    def _core(self, x: torch.Tensor, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        for module in self.added.values():
            if getattr(module, "replaces_ffn", False):
                y = module(x)
                return self.dropout(y) if self.style == "mlp" and hasattr(self, "dropout") else y
        if self.style == "bert":
            return self.dense(hidden)
        return self.original(x)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        values = list(args) + list(kwargs.values())
        if self.style == "bert":
            hidden, x = values
        else:
            hidden, (x,) = None, values
        y = self._core(x, hidden)
        for module in self.added.values():
            if not getattr(module, "replaces_ffn", False):
                y = module(x, y)
        if self.style == "bert":
            return self.LayerNorm(self.dropout(y) + x)
        return y


class Bypass(_Wrapper):
    """Stands in for BERT's ``intermediate`` once experts replace the dense FFN: passes the FFN
    input through to the patched ``output``, which runs the experts on it (the dense layer stays
    registered, unused)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PatchedBlock(_Wrapper):
    """Stands in for one transformer block; ``added`` holds modules that see the block's input
    and output (``forward(x, y, **block_kwargs) -> y``), for instance MoDE's domain experts."""

    def forward(self, *args, **kwargs):
        y = self.original(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        for module in self.added.values():
            y = module(x, y, *args[1:], **kwargs)
        return y


def replace_child(parent: nn.Module, name: str, new: nn.Module) -> None:
    """Set ``parent.name = new``, also on the original behind ``parent`` when it is a wrapper
    (whose forward runs the original)."""
    setattr(parent, name, new)
    if isinstance(parent, _Wrapper):
        replace_child(parent.original, name, new)


def ffn_wrapper(model: nn.Module, layer: int, create: bool = True) -> Optional[PatchedFFN]:
    """The :class:`PatchedFFN` of block ``layer``, created on first use when ``create``."""
    family = detect_family(model)
    _, block_list = _block_list(model)
    block = block_list[layer]
    current = getattr(block, family.ffn_attr)
    if isinstance(current, PatchedFFN) or not create:
        return current if isinstance(current, PatchedFFN) else None
    wrapper = PatchedFFN(current, family)
    replace_child(block, family.ffn_attr, wrapper)
    return wrapper


def block_wrapper(model: nn.Module, layer: int, create: bool = True) -> Optional[PatchedBlock]:
    """The :class:`PatchedBlock` of block ``layer``, created on first use when ``create``."""
    _, block_list = _block_list(model)
    current = block_list[layer]
    if isinstance(current, PatchedBlock) or not create:
        return current if isinstance(current, PatchedBlock) else None
    wrapper = PatchedBlock(current)
    block_list[layer] = wrapper
    return wrapper


def _bypass_dense(model: nn.Module, layer: int) -> None:
    """Experts replace the dense FFN of block ``layer``: for BERT, pass the FFN input straight
    through ``intermediate`` (the other families' :class:`PatchedFFN` skips the dense FFN)."""
    _, block_list = _block_list(model)
    block = block_list[layer]
    intermediate = getattr(block, "intermediate", None)
    if detect_family(model).name == "bert" and not isinstance(intermediate, Bypass):
        replace_child(block, "intermediate", Bypass(intermediate))


def remove_added(model: nn.Module, layer: int, key: str) -> None:
    """Remove the module ``key`` added to block ``layer`` (FFN or block level); a wrapper left
    with nothing added is replaced by its original."""
    _, block_list = _block_list(model)
    family = detect_family(model)
    ffn = ffn_wrapper(model, layer, create=False)
    if ffn is not None and key in ffn.added:
        replaced = getattr(ffn.added[key], "replaces_ffn", False)
        del ffn.added[key]
        if not len(ffn.added):
            _restore_ffn(block_list[layer], family, ffn)
        elif replaced:  # back to the dense FFN
            intermediate = getattr(block_list[layer], "intermediate", None)
            if isinstance(intermediate, Bypass):
                replace_child(block_list[layer], "intermediate", intermediate.original)
    records = patch_records(model)
    if layer in records.get(key, {}):
        del records[key][layer]
        if not records[key]:
            del records[key]
    block = block_wrapper(model, layer, create=False)
    if block is not None and key in block.added:
        del block.added[key]
        if not len(block.added):
            block_list[layer] = block.original
            block.original.train(block.training)


def _restore_ffn(block: nn.Module, family: Family, ffn: PatchedFFN) -> None:
    ffn.original.train(ffn.training)
    replace_child(block, family.ffn_attr, ffn.original)
    intermediate = getattr(block, "intermediate", None)
    if isinstance(intermediate, Bypass):
        replace_child(block, "intermediate", intermediate.original)


# --------------------------------------------------------------------------- state and report


@dataclass
class SurgeryReport:
    """What one surgery added to a model.

    ``method``: the surgery's name; ``layers``: block indices it changed; ``modules``: dotted name
    -> description of each added module; ``added_parameters``; ``trainable_parameters`` and
    ``total_parameters`` of the model afterwards; ``options``: the settings that rebuild it (saved
    by :func:`~modekernels.hf.save_modules`).
    """

    method: str
    layers: list
    modules: dict
    added_parameters: int
    trainable_parameters: int
    total_parameters: int
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"{self.method}: {len(self.modules)} modules on blocks {self.layers}, "
            f"{self.added_parameters:,} parameters added "
            f"({self.added_parameters / max(self.total_parameters - self.added_parameters, 1):.2%} of the base); "
            f"trainable {self.trainable_parameters:,} of {self.total_parameters:,}"
        ]
        lines += [f"  {name}: {what}" for name, what in self.modules.items()]
        return "\n".join(lines)


def patch_records(model: nn.Module) -> dict:
    """The surgeries applied to ``model``: method -> {block index: options}."""
    state = model.__dict__.get(STATE_ATTR)
    return {} if state is None else state["records"]


def _state(model: nn.Module) -> dict:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        state = {
            "records": {},
            "hooks": {},
            "methods": set(),
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        }
        model.__dict__[STATE_ATTR] = state
        if hasattr(model, "save_pretrained"):
            set_instance_method(model, "save_pretrained", save_pretrained_with_modules)
    return state


def set_instance_method(model: nn.Module, name: str, function: Callable) -> None:
    """Make ``function`` (called as ``function(model, ...)``) the method ``name`` of this
    instance only, unless it already is; :func:`unpatch` removes it. The method is bound with
    ``types.MethodType``, so ``copy.deepcopy(model)`` binds it to the copy. Raises ValueError
    when the instance already has its own ``name`` from elsewhere."""
    current = model.__dict__.get(name)
    if isinstance(current, types.MethodType) and current.__func__ is function:
        return
    if current is not None:
        raise ValueError(
            f"{type(model).__name__} instance already has its own {name!r} (set by other code); "
            "modekernels needs to set it: patch the model before that code runs"
        )
    _state(model)["methods"].add(name)
    model.__dict__[name] = types.MethodType(function, model)


def save_pretrained_with_modules(model: nn.Module, save_directory, *args, **kwargs):
    """``save_pretrained`` of a patched model: the model's own checkpoint, added modules
    included (so Trainer's ``resume_from_checkpoint`` and ``load_best_model_at_end``, which load
    that file into the patched model, restore them), plus :func:`~modekernels.hf.save_modules`'
    files in the same directory. ``load_modules(type(model).from_pretrained(d), d)`` rebuilds the
    model from it; ``from_pretrained`` of the unpatched class lists the added tensors as
    unexpected keys and leaves them to ``load_modules``."""
    from modekernels.hf.modules_io import save_modules

    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True) and patch_records(model):
        save_modules(model, save_directory)
    return result


def ensure_forward_pre_hook(
    model: nn.Module, hook: Callable, *, module: Optional[nn.Module] = None, key=None
) -> None:
    """Register ``hook(module, args, kwargs)`` as a forward pre-hook of ``module`` (default:
    ``model``), keyword arguments included (a returned ``(args, kwargs)`` replaces them), once
    per ``key`` (default: the hook itself): a later call with the same key replaces the earlier
    hook. :func:`unpatch` removes it."""
    hooks = _state(model)["hooks"]
    key = hook if key is None else key
    if key in hooks:
        hooks.pop(key).remove()
    hooks[key] = (model if module is None else module).register_forward_pre_hook(hook, with_kwargs=True)


def added_modules(model: nn.Module, method: Optional[str] = None) -> dict:
    """Dotted name -> module for every module added by modekernels (of one ``method`` when
    given; an added module's key in its wrapper is its method name)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, _Wrapper):
            for key, added in module.added.items():
                if method is None or key == method:
                    out[f"{name}.added.{key}"] = added
    return out


def last_forward_terms(model: nn.Module, method: str, attributes: tuple[str, ...], what: str) -> list:
    """For each module ``method`` added to ``model``, the tensors its last forward stored under
    ``attributes`` (a loss term read after the forward, such as the neutral residues' ℓ1). Raises
    RuntimeError when there is no such module or no forward yet, and when, in training with grad
    enabled, a module with trainable parameters stored a term without autograd history: its
    forward ran without grad (reentrant gradient checkpointing, ``use_reentrant=True``, runs the
    first pass so), so a loss on it would silently train nothing."""
    modules = list(added_modules(model, method).values())
    if not modules:
        raise ValueError(f"the model has no {what}: patch it first")
    terms = []
    for module in modules:
        values = tuple(getattr(module, name) for name in attributes)
        if any(value is None for value in values):
            raise RuntimeError(f"run a forward pass before reading the {what}' losses")
        trainable = any(p.requires_grad for p in module.parameters())
        if model.training and torch.is_grad_enabled() and trainable and not all(
            value.requires_grad for value in values
        ):
            raise RuntimeError(
                f"the last forward of the {what} ran without autograd (under torch.no_grad, or "
                "in the first pass of reentrant gradient checkpointing), so a loss on it would "
                "train nothing: use gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}) or run the forward with grad enabled"
            )
        terms.append(values)
    return terms


def finish_surgery(
    model: nn.Module, method: str, layers: list, options: dict, freeze_base: Optional[bool]
) -> SurgeryReport:
    """Set what trains after a surgery on ``model`` and build its report. ``freeze_base``
    True: only added modules train; False: added modules train too; None: leave the flags."""
    mine = added_modules(model, method)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    if freeze_base is not None:
        for module in added_modules(model).values():
            module.requires_grad_(True)
    return SurgeryReport(
        method=method,
        layers=list(layers),
        modules={n: _describe(m) for n, m in mine.items()},
        added_parameters=sum(p.numel() for m in mine.values() for p in m.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
        options=dict(options),
    )


def _describe(module: nn.Module) -> str:
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in module.named_parameters())
    return f"{type(module).__name__}({shapes})"


def unpatch(model: nn.Module) -> nn.Module:
    """Undo every surgery on ``model``: put the original modules back, drop the added ones,
    and restore which parameters were trainable. Returns ``model``."""
    _, block_list = _block_list(model)
    family = detect_family(model)
    for i in range(len(block_list)):
        block = block_list[i]
        ffn = getattr(block, family.ffn_attr)
        if isinstance(ffn, PatchedFFN):
            _restore_ffn(block, family, ffn)
        if isinstance(block, PatchedBlock):
            block_list[i] = block.original
            block.original.train(block.training)
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is not None:
        for handle in state["hooks"].values():
            handle.remove()
        for name in state["methods"]:
            model.__dict__.pop(name, None)
        for name, p in model.named_parameters():
            if name in state["requires_grad"]:
                p.requires_grad_(state["requires_grad"][name])
    return model


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One kind of surgery, as :func:`apply` and the module I/O see it.

    ``build(model, layer, options)`` makes the module added at block ``layer`` (its key in the
    wrapper's ``added`` dict is ``name``); ``level`` is ``"ffn"`` (added to the block's
    :class:`PatchedFFN`) or ``"block"`` (to its :class:`PatchedBlock`). ``options`` is a JSON-able
    dict that rebuilds the same modules on any host (saved by ``save_modules``). ``restore(model,
    layer, options)``, when set, runs after ``load_modules`` / ``port_modules`` has filled the
    module at block ``layer`` and set what trains: it restores the state beyond the tensors that
    the saved ``options`` record (MoDE: which experts are active and train).
    """

    name: str
    level: str
    build: Callable[[nn.Module, int, dict], nn.Module]
    restore: Optional[Callable[[nn.Module, int, dict], None]] = None


METHODS: dict = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _host_tensor(model: nn.Module, layer: int) -> torch.Tensor:
    _, block_list = _block_list(model)
    return next(unwrap(block_list[layer]).parameters())


def attach(model: nn.Module, method: Method, layer: int, options: dict) -> nn.Module:
    """Build ``method``'s module for block ``layer`` on the host's device and dtype and add it;
    raises ValueError if that block already has one."""
    wrapper = (ffn_wrapper if method.level == "ffn" else block_wrapper)(model, layer)
    if method.name in wrapper.added:
        raise ValueError(f"block {layer} already has a {method.name} module; unpatch(model) first")
    module = method.build(model, layer, options)
    like = _host_tensor(model, layer)
    module.to(device=like.device, dtype=like.dtype)
    module.train(wrapper.training)
    wrapper.added[method.name] = module
    if getattr(module, "replaces_ffn", False):
        _bypass_dense(model, layer)
    _state(model)["records"].setdefault(method.name, {})[layer] = dict(options)
    return module


def module_at(model: nn.Module, method: Method, layer: int) -> Optional[nn.Module]:
    """``method``'s module at block ``layer``, or None."""
    wrapper = (ffn_wrapper if method.level == "ffn" else block_wrapper)(model, layer, create=False)
    return None if wrapper is None else wrapper.added[method.name] if method.name in wrapper.added else None


def apply(
    model: nn.Module,
    method: Method,
    layers: Optional[Iterable[int] | int],
    options: dict,
    freeze_base: bool,
    argument: str = "layers",
) -> SurgeryReport:
    """Add ``method``'s modules to the chosen blocks of ``model`` and report what was added;
    ``argument`` names ``layers`` in errors as the caller's signature does."""
    chosen = resolve_layers(model, layers, argument)
    if method.name in patch_records(model):
        raise ValueError(f"{method.name} is already applied to this model; unpatch(model) first")
    for layer in chosen:
        attach(model, method, layer, options)
    return finish_surgery(model, method.name, chosen, options, freeze_base)
