"""The network: adapters built from a config (or from a file's layouts), and the kohya protocol."""
from __future__ import annotations

import json
import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import blocks
from . import ddp
from . import norms
from . import presets
from . import targets as tg
from . import weights as wio
from ._version import __version__
from .algos import ALGORITHMS, Adapter, foreign
from .algos.geometry import storable_alpha
from .config import ConfigError, NetworkConfig, validate
from .param_groups import param_groups
from .specs import ModuleSpec

logger = logging.getLogger(__name__)

#: the metadata key under which every saved file describes itself (JSON); never an ss_* key, so
#: sd-scripts' metadata and the sshs hashes (over ss_* only) are untouched
METADATA_KEY = "lycoris_kohya"

_REGIONAL = (
    "lycoris_kohya does not implement gen_img.py's regional prompting (a --mask_path image used as "
    "per-network regions, --network_regional_mask_max_color_codes): networks.lora's regional forward "
    "masks each module's output and rearranges the sub-prompt batch in attn2, which this plugin's "
    "adapters do not do. Generate without --mask_path, or merge this network into the model "
    "(list it first and pass --network_merge_n_models) so that only networks.lora networks get regions.")

SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # what sd-scripts' sdxl_train_network.py writes


def spec_from_config(cfg: NetworkConfig, target: tg.Target) -> Optional[ModuleSpec]:
    """The adapter a target gets under the config, or None (e.g. conv_dim=0 for kxk convs)."""
    if target.is_kxk_conv:
        rank, alpha = cfg.effective_conv_dim, cfg.effective_conv_alpha
    else:
        rank, alpha = cfg.dim, cfg.alpha
    if rank <= 0:
        return None
    if alpha == 0:
        alpha = rank  # kohya's rule: alpha 0 means no scaling (g = 1)
    if cfg.rs_lora:
        # rank-stabilised scale alpha/sqrt(r), stored as an alpha every reader turns into that scale
        alpha = alpha * math.sqrt(rank)
    options: Dict[str, object] = {"use_tucker": cfg.use_tucker, "use_scalar": cfg.use_scalar}
    if cfg.algo == "lokr":
        options.update(factor=cfg.factor, decompose_both=cfg.decompose_both, full_matrix=cfg.full_matrix,
                       unbalanced_factorization=cfg.unbalanced_factorization)
    return ModuleSpec(cfg.algo, rank, alpha, options, cfg.dora_axis,
                      (cfg.dropout, cfg.rank_dropout, cfg.module_dropout))


class LycorisNetwork(nn.Module):
    """A set of adapters over a UNet and text encoder(s), speaking sd-scripts' network protocol."""

    def __init__(
        self,
        text_encoder,
        unet: Optional[nn.Module],
        config: NetworkConfig,
        multiplier: float = 1.0,
        specs: Optional[Mapping[str, ModuleSpec]] = None,
        train_t5xxl: bool = False,
    ):
        super().__init__()
        self.config = config
        self.multiplier = float(multiplier)
        self.loraplus_lr_ratio = config.loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = config.loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = config.loraplus_text_encoder_lr_ratio

        self.family = tg.detect_family(unet)
        if self.family.is_dit:
            blocks.refuse_on_dit(config, self.family.title)
        if train_t5xxl and self.family.t5_index is None:
            raise ConfigError(f"network_arg train_t5xxl=True: {self.family.title} models have no T5-XXL text encoder "
                              "(train_t5xxl applies to Flux and SD3)")
        self.preset = presets.load(config.preset, self.family.name)
        self._checked_overrides: set = set()
        if specs is None:
            te_targets, unet_targets = tg.select(text_encoder, unet, self.preset, self.family, train_t5xxl)
            self.is_sdxl = blocks.is_sdxl_layout(t.name for t in unet_targets)
            blocks.check_lengths(config, self.is_sdxl)
            self.block_lr_weight = blocks.lr_weights(config, self.is_sdxl)
            chosen = [(t, self._spec(t)) for t in te_targets + unet_targets]
        else:
            layers = tg.every_layer(text_encoder, unet, self.family)  # specs come from specs.infer_specs on these
            chosen = [(t, specs[n]) for n, t in layers.items() if n in specs]  # the model's order
            self.is_sdxl = blocks.is_sdxl_layout(specs)
            self.block_lr_weight = blocks.lr_weights(config, self.is_sdxl)

        self.text_encoder_loras: List[Adapter] = []
        self.unet_loras: List[Adapter] = []
        self._dropped: set = set()  # modules apply_to left out (e.g. --network_train_unet_only)
        rounded = []
        for target, spec in chosen:
            if spec is None:
                continue
            alpha = storable_alpha(spec.alpha) if specs is None else spec.alpha
            if alpha != spec.alpha:
                rounded.append((spec.alpha, alpha))
            adapter = self._make(target, spec, alpha)
            (self.text_encoder_loras if target.is_text_encoder else self.unet_loras).append(adapter)
            self.add_module(adapter.lora_name, adapter)
        if rounded:
            a, b = rounded[0]
            logger.warning(f"lycoris_kohya: alpha {a:g} is stored as {b:g} (the nearest value bf16/fp16 files hold "
                           f"exactly); training uses {b:g} so that every reader computes the same scale")
        if not self.text_encoder_loras and not self.unet_loras:
            raise ValueError(f"the network has no modules: preset {self.preset.name!r} matches no layer of this model")
        #: sd-scripts' flux/sd3 trainers read this: True when T5-XXL has adapters (then it is trained, not cached)
        self.train_t5xxl = any(tg.te_prefix_of(a.lora_name) == self.family.t5_prefix for a in self.text_encoder_loras)
        if train_t5xxl and not self.train_t5xxl:
            logger.warning(f"lycoris_kohya: train_t5xxl=True, but preset {self.preset.name!r} matches no layer of the "
                           "T5-XXL text encoder (or none was given); T5-XXL is not trained")
        if any(a.dora_axis == "output" for a in self.loras):
            logger.warning("lycoris_kohya: DoRA on the output axis (wd_on_output=True): ComfyUI and A1111 do not yet "
                           "apply this axis the way it was trained (ComfyUI divides by ||W0||, A1111 only knows the "
                           "input axis); the default input axis behaves identically everywhere")
        planned: Dict[str, List[str]] = {}
        for a in self.loras:
            if a.plan_note:
                planned.setdefault(a.plan_note, []).append(a.lora_name)
        for note, names in planned.items():
            logger.info(f"lycoris_kohya: {note}: {len(names)} of {len(self.loras)} modules (e.g. {names[0]})")
        if specs is None:
            self._warn_without_effect()
        if specs is None and any(a.algo == "lokr" and a.layout.tucker for a in self.loras):
            logger.warning("lycoris_kohya: LoKr with use_tucker writes lokr_t2, which ComfyUI does not apply "
                           "(it fails silently); A1111 and this plugin do")
        logger.info(f"lycoris_kohya: {self.summary()}")

    @property
    def denoiser(self) -> str:
        return f"{self.family.title} DiT" if self.family.is_dit else "U-Net"

    def summary(self) -> str:
        """One line a user can check: algorithm(s), rank/alpha, conv rank/alpha, DoRA and its axis,
        preset, and the modules per part, read from the adapters built."""
        def ranks(adapters) -> str:
            kinds = sorted({f"rank {a.rank} alpha {float(a.alpha):g}" if a.layout.use_alpha
                            else "full factors (alpha unused)" for a in adapters})
            return ", ".join(kinds[:3]) + (", ..." if len(kinds) > 3 else "")

        convs = [a for a in self.loras if a.geometry.is_kxk]
        others = [a for a in self.loras if not a.geometry.is_kxk]
        algos = "/".join(sorted({a.algo for a in self.loras}))
        axes = sorted({a.dora_axis for a in self.loras if a.dora_axis is not None})
        dora = f"DoRA on the {'/'.join(axes)} axis" if axes else "no DoRA"
        parts: Dict[str, int] = {}
        for a in self.text_encoder_loras:
            parts[tg.te_prefix_of(a.lora_name)] = parts.get(tg.te_prefix_of(a.lora_name), 0) + 1
        te = f"{len(self.text_encoder_loras)} text encoder modules" + \
            (f" ({', '.join(f'{p} {n}' for p, n in sorted(parts.items()))})" if parts else "")
        line = f"{algos} network, {ranks(others)}"
        if convs:
            line += f", kxk convolutions {ranks(convs)}"
        return (f"{line}, {dora}, preset {self.preset.name}: {te}, "
                f"{len(self.unet_loras)} {self.denoiser} modules")

    def _warn_without_effect(self) -> None:
        """A warning, once, for each option the user set that changes nothing on this model."""
        cfg, no_kxk = self.config, not any(a.geometry.is_kxk for a in self.loras)
        where = f"the {self.denoiser}'s adapted layers" + (" and text encoders'" if self.text_encoder_loras else "")
        if no_kxk:
            for key in ("conv_dim", "conv_alpha"):
                if getattr(cfg, key) is not None:
                    logger.warning(f"lycoris_kohya: network_arg {key}={getattr(cfg, key):g} has no effect: {where} "
                                   "include no kxk convolution (conv_dim/conv_alpha apply to those only)")
            if cfg.use_tucker:
                logger.warning(f"lycoris_kohya: network_arg use_tucker has no effect: {where} include no kxk "
                               "convolution (Tucker applies to those only)")
        lokr = [a for a in self.loras if a.algo == "lokr"]
        if cfg.decompose_both and lokr and not any(a.layout.w1_lowrank for a in lokr):
            logger.warning(f"lycoris_kohya: network_arg decompose_both has no effect at rank {cfg.dim}: lokr_w1 is "
                           "factorised only where the rank is below half of its larger side, which no module's is")

    def _block(self, target: tg.Target) -> int:
        return -1 if target.is_text_encoder else blocks.block_index(target.name, self.is_sdxl)

    def _spec(self, target: tg.Target) -> Optional[ModuleSpec]:
        """global options < block-wise dims < the preset's per-class < per-path overrides."""
        idx = self._block(target)
        if self.block_lr_weight is not None and idx >= 0 and self.block_lr_weight[idx] == 0:
            return None  # kohya leaves blocks with lr weight 0 out
        cfg = blocks.block_config(self.config, idx)
        # each matching override table in turn, checked as network_args are: its own keys against the
        # config in effect at its level (a later table may still change the algorithm, as an override
        # may change the network's)
        tables = list(self.preset.overrides(target.owner_class, target.path))
        for i, (where, values) in enumerate(tables):
            cfg = cfg.replace(**values)
            key = tuple(w for w, _ in tables[:i + 1])
            if key not in self._checked_overrides:  # once per combination of tables, not per layer
                self._checked_overrides.add(key)
                validate(cfg, given=set(values), where=f"preset {self.preset.name}: {where} (at {target.path})")
        return spec_from_config(cfg, target)

    def _make(self, target: tg.Target, spec: ModuleSpec, alpha: float) -> Adapter:
        cfg = self.config
        dropout, rank_dropout, module_dropout = spec.dropouts or (cfg.dropout, cfg.rank_dropout, cfg.module_dropout)
        try:
            return Adapter(
                target.name, target.layer, ALGORITHMS[spec.algo], rank=spec.rank, alpha=alpha, layout=spec.layout,
                multiplier=self.multiplier, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                dora_axis=spec.dora_axis, dora_detach_norm=cfg.dora_detach_norm, bypass=cfg.bypass_mode,
                forward_path=cfg.forward_path,
                **spec.options,
            )
        except (ValueError, TypeError) as e:
            raise ValueError(f"{target.name}: {e}") from e

    # ----- the adapters ------------------------------------------------------------------------
    @property
    def loras(self) -> List[Adapter]:
        return self.text_encoder_loras + self.unet_loras

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for a in self.loras:
            a.apply_to()
        logger.info(f"lycoris_kohya: applied to {len(self.text_encoder_loras)} text encoder and "
                    f"{len(self.unet_loras)} {self.denoiser} layers")

    def _drop(self, adapters: Sequence[Adapter]) -> None:
        for a in adapters:
            a.remove()
            delattr(self, a.lora_name)
            self._dropped.add(a.lora_name)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for a in self.loras:
            a.multiplier = self.multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for a in self.loras:
            a.enabled = bool(is_enabled)

    # ----- optimizer ---------------------------------------------------------------------------
    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        if isinstance(text_encoder_lr, (list, tuple)):
            return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)
        return self.prepare_optimizer_params_with_multiple_te_lrs(
            None if text_encoder_lr is None else [text_encoder_lr], unet_lr, default_lr)

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr=None, default_lr=None):
        """(param_groups, descriptions): see ``param_groups``."""
        self.requires_grad_(True)
        if isinstance(text_encoder_lr, (int, float)):
            text_encoder_lr = [text_encoder_lr]
        return param_groups(
            self.text_encoder_loras, self.unet_loras, self.family.te_prefixes, list(text_encoder_lr or []),
            unet_lr, default_lr, self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio,
            self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, self.block_lr_weight, self.is_sdxl)

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def enable_gradient_checkpointing(self):
        pass  # adapters hold no activations of their own worth checkpointing

    # sd-scripts passes (text_encoder, unet), musubi-tuner (transformer) alone; neither model is used here
    def prepare_grad_etc(self, *models):
        self.requires_grad_(True)

    def on_epoch_start(self, *models):
        self.train()

    def on_step_start(self, *args, **kwargs):
        """Every step, before the forward (sd-scripts and musubi-tuner both call it): with
        module_dropout and several processes, check that they will skip the same modules."""
        if any(a.training and a.module_dropout is not None for a in self.loras):
            ddp.check_generators_agree()

    def get_trainable_params(self):
        return [p for p in self.parameters() if p.requires_grad]

    # ----- --scale_weight_norms, and the norms sd-scripts logs without it -----------------------
    def apply_max_norm_regularization(self, max_norm_value, device=None) -> Tuple[int, float, float]:
        """(modules rescaled, mean norm, max norm) as Python numbers: see ``norms.max_norm``."""
        return norms.max_norm(self.loras, max_norm_value)

    # train_network.py, per optimizer step: backward -> update_grad_norms() -> update_norms() ->
    # optimizer.step() -> zero_grad(set_to_none) -> weight_norms(), grad_norms(), combined_weight_norms()
    # (the last three on every micro-step), each a tensor or None of which it logs .mean()/.max().
    def update_grad_norms(self) -> None:
        """Taken while the gradients exist (sd-scripts zeroes them before asking for grad_norms)."""
        self._grad_norms = norms.grad_norms(self.loras)

    def update_norms(self) -> None:
        self._weight_norms = norms.weight_norms(self.loras)

    def weight_norms(self) -> Optional[torch.Tensor]:
        """The per-module norms of the last update_norms() (computed now if there was none)."""
        if getattr(self, "_weight_norms", None) is None:
            self.update_norms()
        return self._weight_norms

    def grad_norms(self) -> Optional[torch.Tensor]:
        return getattr(self, "_grad_norms", None)

    def combined_weight_norms(self) -> Optional[torch.Tensor]:
        """None (sd-scripts then logs nothing): networks.lora_flux logs a GGPO estimate
        sqrt(||W0||^2 + ||dW||^2) here, which is not the norm of W0 + g*dW; this network does not
        report a number it does not compute."""
        return None

    def check_finite(self) -> None:
        norms.check_finite(self.loras)

    # ----- gen_img.py regional prompting ---------------------------------------------------------
    def set_region(self, sub_prompt_index, is_last_network, mask):
        raise NotImplementedError(_REGIONAL)

    def set_current_generation(self, batch_size, num_sub_prompts, width, height, shared, ds_ratio=None):
        raise NotImplementedError(_REGIONAL)

    # ----- files -------------------------------------------------------------------------------
    def load_weights(self, file: str):
        """Load a file into this network (sd-scripts' --network_weights). A key the network does not
        have, or a shape that differs, is an error naming it; missing keys are reported."""
        sd = wio.load_state_dict(file)
        skipped = [k for k in sd if k.split(".", 1)[0] in self._dropped]
        if skipped:  # resuming a text encoder + U-Net file with --network_train_unet_only, say
            logger.warning(f"lycoris_kohya: {file}: {len(skipped)} tensors belong to modules this run does not "
                           f"train (e.g. {skipped[0]!r}); they are not loaded")
            sd = {k: v for k, v in sd.items() if k not in set(skipped)}
        try:
            info = self.load_state_dict(sd, strict=False)
        except ValueError as e:
            raise ValueError(f"{file}: {e}" if str(file) not in str(e) else str(e)) from e
        if info.missing_keys:
            logger.warning(f"lycoris_kohya: {file} lacks {len(info.missing_keys)} keys of this network, "
                           f"e.g. {info.missing_keys[0]!r}; those keep their initial values")
        return info

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = super().state_dict()
        for k, v in state_dict.items():
            if k not in own:
                raise ValueError(f"weights have key {k!r}, which this network does not have")
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"{k}: the file has shape {list(v.shape)}, the network {list(own[k].shape)}")
        return super().load_state_dict(state_dict, strict=strict)

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """What a file holds: every module's tensors under ``<name>.<suffix>`` (use_scalar folded in)."""
        return {f"{a.lora_name}.{k}": v for a in self.loras for k, v in a.export_tensors().items()}

    def save_weights(self, file: str, dtype=None, metadata: Optional[Dict[str, str]] = None) -> None:
        """Write the file atomically. sd-scripts' metadata (``ss_*``, modelspec) is kept as given and
        the plugin's own description is added under ``lycoris_kohya``; the caller's dict is not changed."""
        sd = {k: v.detach().to("cpu") for k, v in self.export_state_dict().items()}
        if self.is_sdxl and not (metadata or {}).get("ss_base_model_version"):
            # A1111 lists a file under SDXL models only when this says "sdxl_..."; sd-scripts passes its own
            metadata = {**(metadata or {}), "ss_base_model_version": SDXL_BASE_MODEL_VERSION}
        if dtype is not None:
            before = set(wio.non_finite(sd))
            sd = {k: v.to(dtype) for k, v in sd.items()}
            overflow = [k for k in wio.non_finite(sd) if k not in before]
            if overflow:
                raise ValueError(f"refusing to write {file}: {overflow[0]} is finite but overflows {dtype} "
                                 f"({len(overflow)} tensors); save in a wider dtype (--save_precision float/bf16)")
        meta = dict(metadata or {})
        meta[METADATA_KEY] = json.dumps(self.plugin_metadata(), sort_keys=True)
        wio.save_weights(file, sd, meta)

    def plugin_metadata(self) -> Dict[str, object]:
        """What the file is, for people and tools (sd-scripts' ss_network_args is None for a network
        made by create_network_from_weights): algorithms, DoRA axis, module counts per prefix, and a
        summary of the modules' layouts (algo, layer kind, rank, alpha, layout flags, DoRA axis),
        read from the tensors by each algorithm's own ``layout()``."""
        groups: Dict[str, Dict[str, object]] = {}
        prefixes: Dict[str, int] = {}
        for a in self.loras:
            layout = a.algorithm.layout(a.export_tensors(), a.geometry)  # as a reader of the file sees it
            g = a.geometry
            entry = {"algo": a.algo, "layer": "linear" if not g.is_conv else "conv" + "x".join(map(str, g.kernel)),
                     "rank": int(layout.rank), "alpha": float(a.alpha), "dora_axis": a.dora_axis, **layout.flags()}
            key = json.dumps(entry, sort_keys=True)
            groups.setdefault(key, dict(entry, modules=0))["modules"] += 1
            prefix = "_".join(a.lora_name.split("_")[:2])
            prefixes[prefix] = prefixes.get(prefix, 0) + 1
        axes = sorted({str(a.dora_axis) for a in self.loras if a.dora_axis is not None})
        return {
            "plugin_version": __version__,
            "algorithms": sorted({a.algo for a in self.loras}),
            "dora_axis": None if not axes else axes[0] if len(axes) == 1 else axes,
            "modules": prefixes,
            "layouts": sorted(groups.values(), key=lambda e: (-e["modules"], json.dumps(e, sort_keys=True))),
        }

    # ----- merging (--base_weights, merge scripts, gen_img) ------------------------------------
    def is_mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None, non_blocking=False):
        """Merge every module into its base layer in place: W <- merged weight at this network's
        multiplier. Computed in fp32 on ``device`` (default: the layer's), rounded to ``dtype``
        (default: the layer's), stored back in the layer's own dtype and device, as kohya does.
        ``non_blocking`` (musubi-tuner's merge and inference scripts pass it) is accepted; the copies
        here are synchronous, which gives the same weights."""
        if weights_sd is not None:
            self.load_state_dict(weights_sd, strict=True)
        keys = list(weights_sd if weights_sd is not None else self.state_dict())
        adapters = []
        if any(k.startswith(tg.TE_PREFIX) for k in keys):
            adapters += self.text_encoder_loras
        if any(k.startswith(tg.UNET_PREFIX) for k in keys):
            adapters += self.unet_loras
        scaled = [a.lora_name for a in adapters if foreign.is_fp8_scaled(a.layer)]
        if scaled:  # checked before any layer is written: a merge is whole or not at all
            raise foreign.cannot_merge_into_fp8_scaled(scaled)
        for a in adapters:
            w = a.layer.weight
            on = w.device if device is None else torch.device(device)
            merged = a.merged_weight(base=w.detach().to(on))
            w.copy_(merged.to(dtype or w.dtype))
        logger.info(f"lycoris_kohya: merged {len(adapters)} modules at multiplier {self.multiplier:g}")

    def backup_weights(self):
        for a in self.loras:
            a.backup_weight()

    def restore_weights(self):
        for a in self.loras:
            a.restore_weight()

    @torch.no_grad()
    def pre_calculation(self):
        for a in self.loras:
            a.merge_into_layer()
            a.enabled = False
