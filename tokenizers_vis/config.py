"""Hydra config helpers shared by `train.py` and the evaluation entry points."""

from __future__ import annotations

import difflib
import inspect
import netrc
import os
import re
import types
import typing
from collections import abc
from pathlib import Path, PurePath
from typing import Any

import hydra
import hydra.errors
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict


def wandb_offline() -> bool:
    """True unless wandb credentials exist (WANDB_API_KEY or a netrc entry for api.wandb.ai)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("tv.wandb_offline"):
        OmegaConf.register_new_resolver("tv.wandb_offline", wandb_offline)


_ABSENT = object()  # "no such key" for OmegaConf.select, where null is a value


def _apply_stage(cfg: DictConfig, check_required: bool) -> DictConfig | None:
    """Merge the delta of `model.stage` from `model.stages` into the model config, drop both keys,
    check the delta's `required` keys, and return the delta's `smoke` block."""
    stages, stage = cfg.model.pop("stages"), str(cfg.model.pop("stage", None))
    if stage not in stages:
        raise ValueError(f"model.stage={stage} is not a stage of this recipe; choose one of {', '.join(stages)}")
    delta = stages[stage]
    with open_dict(delta):
        stage_smoke, required = delta.pop("smoke", None), delta.pop("required", None) or {}
    cfg.model = OmegaConf.merge(cfg.model, delta)
    for key, what in required.items() if check_required else ():
        if OmegaConf.select(cfg.model, key) is None:
            # Keys the delta defines exist on the command line only under model.stages.<stage>.
            in_delta = OmegaConf.select(delta, key, default=_ABSENT) is not _ABSENT
            name = f"model.stages.{stage}.{key}" if in_delta else f"model.{key}"
            raise ValueError(f"{name} is not set: stage {stage} of this recipe needs {what}. Set it on the "
                             f"command line ({name}=...); only debug=smoke runs without it")
    return stage_smoke


def prepare_config(cfg: DictConfig, cli_overrides: abc.Sequence[str] = ()) -> DictConfig:
    """Select the model's training stage, apply `smoke`, and drop the blocks that did it.

    Multi-stage recipes (TiTok's two stages) hold one delta over the model config per stage under
    `model.stages."<N>"` and pick one with `model.stage`. The delta is merged in here, after the
    command line, so stage-specific keys are overridden as `model.stages.<N>.<key>=...`. A delta
    may hold `smoke` (merged after the model's own `smoke` block) and `required`, {key: what it
    is}: keys that must not be null, except under smoke, which runs from no pretrained files.
    `model.*` keys set in `cli_overrides` (the command line) win over the smoke blocks, so
    `debug=smoke model.tokenizer.decoder_channels=64` runs a 64-channel decoder.
    """
    with open_dict(cfg):
        smoke = cfg.model.pop("smoke", None)
        stage_smoke = _apply_stage(cfg, check_required=not cfg.get("smoke")) if "stages" in cfg.model else None
        if cfg.get("smoke"):
            if smoke is None:
                raise ValueError("debug=smoke needs a `smoke` block in the model config (tiny sizes)")
            # Keys still present after the stage merge (not model.stages.*, which it consumed).
            given = {key: OmegaConf.select(cfg, key, default=_ABSENT) for key in _model_keys(cli_overrides)}
            cfg.model = OmegaConf.merge(cfg.model, smoke, stage_smoke or {})
            for key, value in given.items():
                if value is not _ABSENT:
                    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def _model_keys(overrides: abc.Sequence[str]) -> list[str]:
    """The `model.*` keys that command-line overrides set (`key=value`, `+key=`, `++key=`; not `~key`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed if not o.is_delete() and o.key_or_group.startswith("model.")]


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """"last" -> the newest complete checkpoint in <run>/checkpoints (a fresh start when there is
    none; see `find_resume_checkpoint`); a path must exist."""
    from tokenizers_vis.training.checkpoint import find_resume_checkpoint

    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        found = find_resume_checkpoint(run_dir / "checkpoints")
        return str(found) if found is not None else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return str(ckpt_path)


# -- checking a composed config before anything is built ----------------------------------------
_INSTANTIATE_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_UNREADABLE = object()


class ConfigError(ValueError, hydra.errors.CompactHydraException):
    """A composed config that cannot work; the message names every offending key. (Hydra prints
    a CompactHydraException as its message alone: `train.py` fails without a traceback.)"""


def check_config(cfg: DictConfig) -> None:
    """Check every node with a `_target_` against the signature of what it builds: each key must
    be a parameter (unless the target takes **kwargs), required parameters must be set, and
    values must fit simple annotations (int, float, bool, str, Literal, lists, dicts, unions of
    them; other annotations are not checked). Hydra rejects unknown keys on the command line
    already; this catches them in experiment files (and `+key=` overrides) and catches wrong
    types (`trainer.max_steps=abc`) before a run spends minutes building models and data.
    Then checks values against `VALUE_RULES` (ranges, and relations such as image_size and
    patch_size). Raises ConfigError listing every problem with its full key."""
    problems: list[str] = []
    _check_node(cfg, "", problems)
    _check_values(cfg, problems)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _child(node: DictConfig | ListConfig, key: Any) -> Any:
    try:
        return node[key]
    except Exception:  # an interpolation that only resolves later (e.g. inside Hydra's run)
        return _UNREADABLE


def _check_node(node: Any, path: str, problems: list[str]) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_target(node, path, problems)
        for key in node.keys():
            if path == "" and key == "hydra":
                continue
            if not OmegaConf.is_missing(node, key):
                _check_node(_child(node, key), f"{path}.{key}" if path else str(key), problems)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            _check_node(_child(node, i), f"{path}[{i}]", problems)


def _signature(target: Any) -> tuple[dict[str, tuple[Any, inspect.Parameter]], bool] | None:
    """({name: (function it belongs to, parameter)}, whether the target takes any other keyword).
    For a class taking **kwargs, its base classes' parameters are added (for their annotations:
    most such classes pass kwargs on to their base; whether that is all, cannot be known)."""
    classes = [c for c in target.__mro__ if c is not object] if inspect.isclass(target) else [target]
    params: dict[str, tuple[Any, inspect.Parameter]] = {}
    takes_kwargs = None
    for owner in classes:
        try:
            signature = inspect.signature(owner)
        except (TypeError, ValueError):
            return None
        forwards = False
        for name, param in signature.parameters.items():
            if param.kind == param.VAR_KEYWORD:
                forwards = True
            elif param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                params.setdefault(name, (owner, param))
        takes_kwargs = forwards if takes_kwargs is None else takes_kwargs
        if not forwards:
            break
    return params, bool(takes_kwargs)


def _annotation(target: Any, param: inspect.Parameter) -> Any:
    """The parameter's annotation as an object (string annotations are evaluated), or None."""
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        return None
    if not isinstance(annotation, str):
        return annotation
    function = inspect.unwrap(target.__init__ if inspect.isclass(target) else target)
    try:
        return eval(annotation, getattr(function, "__globals__", {}))  # noqa: S307 (annotations of our own imports)
    except Exception:
        return None


def _check_target(node: DictConfig, path: str, problems: list[str]) -> None:
    name = node.get("_target_")
    try:
        target = hydra.utils.get_object(name)
    except Exception as err:
        problems.append(f"{path}._target_={name}: cannot be imported ({err})")
        return
    found = _signature(target)
    if found is None:
        return
    named, takes_kwargs = found
    present = set(map(str, node.keys()))  # includes ??? keys, which `in node` does not
    for key in sorted(present - _INSTANTIATE_KEYS):
        full = f"{path}.{key}" if path else key
        if key not in named:
            if not takes_kwargs:
                close = difflib.get_close_matches(key, list(named), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                problems.append(f"{full}: unknown key, {name} takes no parameter {key!r}{hint}")
            continue
        if OmegaConf.is_missing(node, key):
            problems.append(f"{full}: must be set (it is ???)")
            continue
        value = _child(node, key)
        if value is _UNREADABLE or (isinstance(value, DictConfig) and "_target_" in value):
            continue
        annotation = _annotation(*named[key])
        if annotation is not None and not _fits(value, annotation):
            problems.append(f"{full}={value!r}: wrong type, {name} expects {_type_name(annotation)}")
    if not node.get("_partial_", False) and "_args_" not in node:
        # Only the target's own required parameters: a subclass may fill its bases' itself.
        own = target if not inspect.isclass(target) else target.__mro__[0]
        for key, (owner, param) in named.items():
            if owner is own and param.default is param.empty and key not in present:
                problems.append(f"{path}.{key}: missing, {name} requires it")


def _fits(value: Any, annotation: Any) -> bool:
    """Whether `value` fits `annotation`; True for annotations not checked here. null always fits
    (whether a parameter takes None is its own business)."""
    if value is None or annotation in (Any, object):
        return True
    if annotation is type(None):
        return False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str or (inspect.isclass(annotation) and issubclass(annotation, (PurePath, os.PathLike))):
        return isinstance(value, str)
    base = origin or annotation
    if base in (list, tuple, set, frozenset, abc.MutableSequence):
        return isinstance(value, (ListConfig, list, tuple))
    if base in (abc.Sequence, abc.Iterable, abc.Collection):
        return isinstance(value, (ListConfig, list, tuple, str))
    if base in (dict, abc.Mapping, abc.MutableMapping):
        return isinstance(value, (DictConfig, dict))
    return True


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


# -- value ranges ------------------------------------------------------------------------------------
class Rule(typing.NamedTuple):
    """The values a key may take: `test(value, *values of refs)` says whether `value` fits;
    `allowed` words them for the error (`{0}`, `{1}`: the keys in `refs`, shown with their
    values). `refs` are keys the value is compared with, a name without a dot being a sibling of
    the checked key; when one of them is absent or null there is nothing to compare with and the
    rule holds. `null`: whether null is allowed (for an option, null means "off" or "default")."""

    allowed: str
    test: typing.Callable[..., bool]
    refs: tuple[str, ...] = ()
    null: bool = False

    def problem(self, cfg: DictConfig, key: str, value: Any) -> str | None:
        """None if `value` (the value of `key` in `cfg`) fits, else the allowed values in words."""
        if value is None:
            return None if self.null else self.allowed
        refs = [ref if "." in ref else f"{key.rpartition('.')[0]}.{ref}".lstrip(".") for ref in self.refs]
        others = [_select(cfg, ref) for ref in refs]
        if any(other is None or other is _UNREADABLE for other in others) or self.test(value, *others):
            return None
        words = self.allowed.format(*(f"{ref} ({_show(other)})" for ref, other in zip(refs, others)))
        return f"{words}, or null" if self.null and not refs else words


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int, high: int | None = None, *, null: bool = False) -> Rule:
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(allowed, lambda v: _is_int(v) and v >= low and (high is None or v <= high), null=null)


def number(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False,
           null: bool = False) -> Rule:
    if high is None:
        allowed = f"a number {'>' if open_low else '>='} {low}"
    else:
        allowed = f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    def test(v: Any) -> bool:
        return (_is_number(v) and (v > low if open_low else v >= low)
                and (high is None or (v < high if open_high else v <= high)))

    return Rule(allowed, test, null=null)


def any_of(*rules: Rule, null: bool = False) -> Rule:
    return Rule(" or ".join(r.allowed for r in rules), lambda v: any(r.test(v) for r in rules), null=null)


def each(rule: Rule, *, null: bool = False) -> Rule:
    """A list whose every item fits `rule`."""
    return Rule(f"a list, every item {rule.allowed}",
                lambda v: isinstance(v, (list, ListConfig)) and all(rule.test(x) for x in v), null=null)


def one_of(*choices: Any) -> Rule:
    return Rule("one of " + ", ".join(map(repr, choices)), lambda v: v in choices)


def multiple_of(ref: str) -> Rule:
    # A non-positive `ref` is its own row's problem.
    return Rule("a multiple of {0}", lambda v, other: not (_is_int(other) and other > 0)
                or (_is_int(v) and v % other == 0), refs=(ref,), null=True)


def at_most(ref: str) -> Rule:
    return Rule("at most {0}", lambda v, other: not _is_number(other) or (_is_number(v) and v <= other),
                refs=(ref,), null=True)


def equal_to(ref: str, why: str = "") -> Rule:
    return Rule("equal to {0}" + why, lambda v, other: v == other, refs=(ref,), null=True)


PROBABILITY = number(0, 1)
POSITIVE = number(0, open_low=True)
NON_NEGATIVE = number(0)
CROP_SCALE = Rule("[lo, hi] with 0 < lo <= hi <= 1",
                  lambda v: isinstance(v, (list, ListConfig)) and len(v) == 2 and all(map(_is_number, v))
                  and 0 < v[0] <= v[1] <= 1, null=True)

# (key pattern, rule): every key of the composed config matching a pattern must fit its rule.
# In a pattern `*` stands for any part of one key name, `**.` for any number of parent keys, and
# `{a,b}` for either name. A key matching several rows must fit all of them (the first misfit is
# reported). A new model adds rows for its options here.
VALUE_RULES: list[tuple[str, Rule]] = [
    # data
    ("data.{batch_size,resolution}", integer(1)),
    ("data.val_batch_size", integer(1, null=True)),  # null: batch_size
    ("data.{num_workers,shuffle_buffer}", integer(0)),
    ("data.val_max_images", integer(1, null=True)),  # null: all
    ("data.crop_scale", CROP_SCALE),
    ("data.color_jitter.{brightness,contrast,saturation}", number(0, 1, open_high=True)),
    ("data.color_jitter.hue", number(0, 0.5)),
    # trainer and callbacks: steps and intervals
    ("trainer.max_steps", integer(1)),  # an infinite stream: a run ends by steps only
    ("trainer.val_check_interval", any_of(integer(1), number(0, 1, open_low=True), null=True)),
    ("trainer.limit_val_batches", any_of(integer(0), number(0, 1))),
    ("trainer.{log_every_n_steps,num_nodes}", integer(1)),
    ("trainer.num_sanity_val_steps", integer(-1)),
    ("callbacks.*.{every_n_train_steps,every_n_steps}", integer(0, null=True)),  # 0 / null: off
    ("callbacks.*.save_top_k", integer(-1)),
    ("callbacks.*.{num_images,window}", integer(1)),
    # optimization
    ("model.{optimizer,disc_optimizer}.lr", POSITIVE),
    ("model.{optimizer,disc_optimizer}.weight_decay", NON_NEGATIVE),
    ("model.{optimizer,disc_optimizer}.betas", each(number(0, 1, open_high=True))),
    ("model.schedule.name", one_of("cosine", "constant")),
    ("model.schedule.warmup_steps", integer(0)),
    ("model.schedule.warmup_steps", at_most("total_steps")),
    ("model.schedule.total_steps", integer(1, null=True)),  # null: trainer.max_steps
    ("model.schedule.min_lr_ratio", number(0, 1)),
    ("model.ema_decay", number(0, 1, open_low=True, open_high=True, null=True)),  # null: no EMA
    ("model.{grad_clip,disc_grad_clip}", number(0, open_low=True, null=True)),  # null: no clipping
    ("model.max_nonfinite_steps", integer(1)),
    ("model.codebook_log_every", integer(0)),  # 0: off
    # objectives
    ("model.objective.{pixel,lpips,convnext,aux,gan,lecam,distill,flow,repa}_weight", NON_NEGATIVE),
    ("model.objective.gan_start_step", integer(0)),
    ("model.objective.discriminator_kwargs.{base_channels,num_layers,num_groups}", integer(1)),
    ("model.objective.**.image_size", integer(1)),
    # tokenizers: sizes the model is built with
    ("model.tokenizer.{image_size,patch_size}", integer(1)),
    ("model.tokenizer.image_size", multiple_of("patch_size")),
    # The model is built for one input size; the data must deliver it.
    ("model.tokenizer.image_size", equal_to("data.resolution", ", the size the data delivers")),
    ("model.tokenizer.{num_latent_tokens,num_registers}", integer(1)),  # token counts
    ("model.tokenizer.{codebook_size,proxy_codebook_size,token_dim,semantic_code_dim,pixel_code_dim}", integer(1)),
    ("model.tokenizer.*_{width,depth,heads,channels,res_blocks}", integer(1, null=True)),  # null: the preset's
    ("model.tokenizer.encoder_width", multiple_of("encoder_heads")),
    ("model.tokenizer.decoder_width", multiple_of("decoder_heads")),
    ("model.tokenizer.semantic_decoder_width", multiple_of("semantic_decoder_heads")),
    ("model.tokenizer.**.{image_size,patch_size,heads,layers,width}", integer(1)),
    ("model.tokenizer.{semantic_decoder_grid,pixel_norm_groups,repa_dim,repa_hidden,semantic_out_dim}",
     integer(1, null=True)),
    ("model.tokenizer.levels", each(integer(2))),  # FSQ levels per channel
    ("model.tokenizer.{scales,*channel_mult}", each(integer(1), null=True)),
    ("model.tokenizer.{commitment,codebook,kl,pixel_distance}_weight", NON_NEGATIVE),
    ("model.tokenizer.dead_code_threshold", NON_NEGATIVE),
    ("model.tokenizer.mlp_ratio", POSITIVE),
    ("model.tokenizer.nested_dropout", one_of("none", "uniform", "pow2", "uniform_pow2")),
    ("**.{cond_dropout,drop_scale_prob}", PROBABILITY),  # probabilities
    ("model.tokenizer.sample_steps", integer(1)),
    ("model.tokenizer.{guidance_scale,register_init_std}", NON_NEGATIVE),
    ("model.tokenizer.t_std", POSITIVE),
]


def _pattern(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out, i = out + r"(?:[^.]+\.)*", i + 3
        elif pattern[i] == "*":
            out, i = out + r"[^.]*", i + 1
        elif pattern[i] == "{":
            end = pattern.index("}", i)
            out += "(?:" + "|".join(map(_pattern_part, pattern[i + 1:end].split(","))) + ")"
            i = end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _pattern_part(part: str) -> str:
    return _pattern(part).pattern


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=None)
    except Exception:  # an interpolation that only resolves later
        return _UNREADABLE


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value)


def _leaves(node: Any, path: str) -> abc.Iterator[tuple[str, Any]]:
    """(full key, value) of every option under `node`: scalars and lists; dicts in lists are walked."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            if (path == "" and key == "hydra") or key in _INSTANTIATE_KEYS or OmegaConf.is_missing(node, key):
                continue
            yield from _leaves(_child(node, key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        yield path, node
        for i in range(len(node)):
            item = _child(node, i)
            if isinstance(item, DictConfig):
                yield from _leaves(item, f"{path}[{i}]")
    elif node is not _UNREADABLE:
        yield path, node


def _check_values(cfg: DictConfig, problems: list[str]) -> None:
    rules = [(_pattern(pattern), rule) for pattern, rule in VALUE_RULES]
    reported = {re.match(r"[^=:]*", problem).group(0) for problem in problems}  # wrong types: said already
    for key, value in _leaves(cfg, ""):
        if key in reported:
            continue
        for pattern, rule in rules:
            allowed = rule.problem(cfg, key, value) if pattern.fullmatch(key) else None
            if allowed is not None:
                problems.append(f"{key}={_show(value)}: invalid value, must be {allowed}")
                break
