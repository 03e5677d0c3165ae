"""The network: adapters built from a config (or from a file's layouts), and the kohya protocol."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import blocks
from . import presets
from . import targets as tg
from . import weights as wio
from .algos import ALGORITHMS, Adapter
from .algos.base import storable_alpha
from .config import ConfigError, NetworkConfig, validate
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
        forced = [a.lora_name for a in self.loras if getattr(a, "forced_full", False)]
        if forced:
            logger.warning(f"lycoris_kohya: LoKr rank is too large for the factor of {len(forced)} modules "
                           f"(e.g. {forced[0]}); their large factor lokr_w2 is a full matrix")
        if specs is None and any(a.algo == "lokr" and a.layout.tucker for a in self.loras):
            logger.warning("lycoris_kohya: LoKr with use_tucker writes lokr_t2, which ComfyUI does not apply "
                           "(it fails silently); A1111 and this plugin do")
        denoiser = f"{self.family.title} DiT" if self.family.is_dit else "U-Net"
        logger.info(f"lycoris_kohya: {config.algo} network with {len(self.text_encoder_loras)} text encoder "
                    f"and {len(self.unet_loras)} {denoiser} modules")

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
        cls, _ = ALGORITHMS[spec.algo]
        cfg = self.config
        dropout, rank_dropout, module_dropout = spec.dropouts or (cfg.dropout, cfg.rank_dropout, cfg.module_dropout)
        try:
            return cls(
                target.name, target.layer, rank=spec.rank, alpha=alpha, multiplier=self.multiplier,
                dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
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
                    f"{len(self.unet_loras)} U-Net layers")

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
    def _groups(self, adapters: Sequence[Adapter], lr: Optional[float], ratio: Optional[float], label: str):
        plain, plus = [], []
        for a in adapters:
            plus_names = set(a.plus_suffixes)
            for pname, p in a.named_parameters():
                (plus if ratio is not None and pname in plus_names else plain).append(p)
        groups, descriptions = [], []
        for params, desc, factor in ((plain, label, 1.0), (plus, f"{label} plus", ratio)):
            if not params:
                continue
            group = {"params": params}
            if lr is not None:
                group["lr"] = lr * factor
                if group["lr"] == 0:
                    logger.info(f"lycoris_kohya: {desc} has learning rate 0; left out of the optimizer")
                    continue
            groups.append(group)
            descriptions.append(desc)
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        if isinstance(text_encoder_lr, (list, tuple)):
            return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)
        return self.prepare_optimizer_params_with_multiple_te_lrs(
            None if text_encoder_lr is None else [text_encoder_lr], unet_lr, default_lr)

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr=None, default_lr=None):
        """One group per text encoder and one for the U-Net/DiT, each split in two when a LoRA+ ratio is set.
        Text encoder i gets the list's entry i (i: its place in the trainer's list, e.g. Flux CLIP-L 0,
        T5-XXL 1; SD3 CLIP-L 0, CLIP-G 1, T5-XXL 2), or the last entry if the list is shorter, as sd-scripts'
        own LoRA does."""
        self.requires_grad_(True)
        if isinstance(text_encoder_lr, (int, float)):
            text_encoder_lr = [text_encoder_lr]
        te_lrs = list(text_encoder_lr or [])
        groups, descriptions = [], []

        by_prefix: Dict[str, List[Adapter]] = {}
        for a in self.text_encoder_loras:
            by_prefix.setdefault(tg.te_prefix_of(a.lora_name), []).append(a)
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        order = self.family.te_prefixes or sorted(by_prefix)
        for i, (prefix, adapters) in enumerate(sorted(by_prefix.items())):
            at = order.index(prefix) if prefix in order else i
            lr = te_lrs[at] if at < len(te_lrs) else (te_lrs[-1] if te_lrs else default_lr)
            label = "textencoder" if len(by_prefix) == 1 else f"textencoder {i + 1}"
            g, d = self._groups(adapters, lr, te_ratio, label)
            groups += g
            descriptions += d
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        lr = unet_lr if unet_lr is not None else default_lr
        if self.unet_loras and self.block_lr_weight is None:
            g, d = self._groups(self.unet_loras, lr, unet_ratio, "unet")
            groups += g
            descriptions += d
        elif self.unet_loras:  # one group per block, lr x the block's weight (kohya's block lr)
            by_block: Dict[int, List[Adapter]] = {}
            for a in self.unet_loras:
                by_block.setdefault(blocks.block_index(a.lora_name, self.is_sdxl), []).append(a)
            for idx, adapters in sorted(by_block.items()):
                weight = self.block_lr_weight[idx] if idx >= 0 else 1.0
                g, d = self._groups(adapters, None if lr is None else lr * weight, unet_ratio, f"unet_block{idx}")
                groups += g
                descriptions += d
        return groups, descriptions

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def enable_gradient_checkpointing(self):
        pass  # adapters hold no activations of their own worth checkpointing

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def on_step_start(self, *args, **kwargs):
        pass

    def get_trainable_params(self):
        return [p for p in self.parameters() if p.requires_grad]

    # ----- --scale_weight_norms ------------------------------------------------------------------
    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device=None) -> Tuple[int, float, float]:
        """For every module, n = ||g*dW||_F (multiplier 1, no dropout). Where n > max_norm_value the
        module's factors are rescaled so that n == max_norm_value. Returns (modules rescaled, mean
        norm, max norm) over all modules after rescaling, as Python numbers."""
        limit = float(max_norm_value)
        self.check_finite()
        norms: List[float] = []
        keys_scaled = 0
        for a in self.loras:
            n = self._delta_norm(a)
            if n > limit:
                a.rescale_delta(limit / n)
                n = a.delta_norm()
                keys_scaled += 1
            norms.append(n)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # ----- norms sd-scripts logs without --scale_weight_norms (norm/avg_key_norm, ...) ----------------
    # train_network.py, per optimizer step: backward -> update_grad_norms() -> update_norms() ->
    # optimizer.step() -> zero_grad(set_to_none) -> weight_norms(), grad_norms(), combined_weight_norms()
    # (the last three on every micro-step), each a tensor or None of which it logs .mean()/.max().
    @torch.no_grad()
    def update_grad_norms(self) -> None:
        """Per module, the norm of the gradient of all its trainable tensors, taken while the
        gradients exist (sd-scripts zeroes them before asking for grad_norms)."""
        norms = []
        for a in self.loras:
            grads = [p.grad for p in a.parameters() if p.grad is not None]
            if grads:
                norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        self._grad_norms = torch.stack([n.cpu() for n in norms]) if norms else None

    @torch.no_grad()
    def update_norms(self) -> None:
        """Per module ||g*dW||_F (multiplier 1, no dropout): the quantity --scale_weight_norms bounds,
        from each adapter's delta_norm() (no dense delta where a factor identity exists). Checks
        every tensor first, as max-norm does (a NaN/Inf stops training, naming it)."""
        self.check_finite()
        self._weight_norms = torch.tensor([self._delta_norm(a) for a in self.loras], dtype=torch.float32)

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

    # ----- gen_img.py regional prompting ---------------------------------------------------------
    def set_region(self, sub_prompt_index, is_last_network, mask):
        raise NotImplementedError(_REGIONAL)

    def set_current_generation(self, batch_size, num_sub_prompts, width, height, shared, ds_ratio=None):
        raise NotImplementedError(_REGIONAL)

    def check_finite(self) -> None:
        """Raise FloatingPointError naming every adapter tensor that holds a NaN or an Inf.

        Called every step by the norm methods: a non-finite factor never recovers (every later
        output is NaN), max-norm cannot rescale it (and would zero a module whose norm is Inf), and
        save_weights refuses to write it; stopping at the step it appears keeps the last good file
        and says where training diverged."""
        named = {f"{a.lora_name}.{k}": t for a in self.loras for k, t in a.named_parameters()}
        bad = wio.non_finite(named)
        if bad:
            more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})" \
                if len(bad) > 1 else ""
            raise FloatingPointError(
                f"lycoris_kohya: {bad[0]} holds NaN or Inf{more}: training diverged. Files saved before "
                "this step are intact; lower the learning rate, or check --mixed_precision / --full_fp16")

    @staticmethod
    def _delta_norm(a: Adapter) -> float:
        n = a.delta_norm()
        if not math.isfinite(n):  # finite tensors (checked) whose ||g*dW|| overflows the dtype
            raise FloatingPointError(f"lycoris_kohya: {a.lora_name}: ||g*dW|| = {n} although its tensors are finite: "
                                     "the update overflows its dtype")
        return n

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
        from . import __version__

        groups: Dict[str, Dict[str, object]] = {}
        prefixes: Dict[str, int] = {}
        for a in self.loras:
            info = dict(ALGORITHMS[a.algo][1].layout(a.export_tensors(), a.geometry))
            flags = {}
            for k, v in info.items():  # the booleans of the layout (Tucker, low-rank factors), not sizes
                v = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else {k: v}
                flags.update({kk: vv for kk, vv in v.items() if isinstance(vv, bool) and kk != "use_alpha"})
            g = a.geometry
            entry = {"algo": a.algo, "layer": "linear" if not g.is_conv else "conv" + "x".join(map(str, g.kernel)),
                     "rank": int(info["rank"]), "alpha": float(a.alpha), "dora_axis": a.dora_axis, **flags}
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
    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None):
        """Merge every module into its base layer in place: W <- merged weight at this network's
        multiplier. Computed in fp32 on ``device`` (default: the layer's), rounded to ``dtype``
        (default: the layer's), stored back in the layer's own dtype and device, as kohya does."""
        if weights_sd is not None:
            self.load_state_dict(weights_sd, strict=True)
        keys = list(weights_sd if weights_sd is not None else self.state_dict())
        adapters = []
        if any(k.startswith(tg.TE_PREFIX) for k in keys):
            adapters += self.text_encoder_loras
        if any(k.startswith(tg.UNET_PREFIX) for k in keys):
            adapters += self.unet_loras
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
