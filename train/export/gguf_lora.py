"""Write a PEFT LoRA adapter folder as a llama.cpp LoRA adapter GGUF (`llama-server --lora FILE`).

Run as:
    python -m train.export.gguf_lora saves/demo --out demo.lora-f32.gguf [--base MODEL] [--type f16]

The file pairs with the base GGUF that `train.export.gguf_writer` writes for the same base checkpoint
(Llama/Mistral as `llama`, Qwen2 as `qwen2`): each targeted Linear's PEFT `lora_A` (r, in) and `lora_B`
(out, r) become `<base tensor>.lora_a` / `.lora_b` (blk.N.attn_q.weight.lora_a ...), with the rows of
q/k's lora_B permuted as the writer permutes the base q/k weights for `llama`. llama.cpp scales each
pair by alpha/rank with one alpha per file; `adapter.lora.alpha` is written so that alpha/rank equals
PEFT's scaling (lora_alpha/r, or lora_alpha/sqrt(r) with use_rslora). Where rank_pattern/alpha_pattern
make that ratio differ between modules, the remaining factor is folded into those modules' lora_B.

Everything llama.cpp or this mapping cannot express is refused before anything is written (DoRA, LoRA
biases, modules_to_save, trainable tokens, LoRA on embeddings or lm_head, aLoRA, layer replication,
modules other than q/k/v/o/gate/up/down, shapes that differ from the base): such adapters can still
be merged into the base with `llm-export`, whose merged GGUF carries them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from serve.artifacts.model_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FolderError,
    read_adapter_config,
)
from serve.cli_runner import UserError, run_cli
from train.export.gguf_writer import ARCHITECTURES, FILE_TYPES, GGUFExportError, read_config

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


class GgufLoraError(UserError, ValueError):
    """The adapter cannot be written as a llama.cpp LoRA GGUF; the message names the folder and what to do."""


@dataclass(frozen=True)
class LoraTensor:
    module: str  # the base model's module, e.g. model.layers.0.self_attn.q_proj
    keys: tuple[str, str]  # its lora_A and lora_B in adapter_model.safetensors
    gguf_name: str  # the base GGUF tensor it adapts, e.g. blk.0.attn_q.weight
    rank: int
    scaling: float  # PEFT's: lora_alpha/r, or lora_alpha/sqrt(r) with use_rslora
    permute: tuple[int, int] | None  # (heads, kv heads) when lora_B's rows follow the base's q/k permutation


@dataclass
class LoraGgufPlan:
    """What will be written, decided from adapter_config.json and safetensors headers alone."""

    adapter_dir: Path
    arch: str  # llama.cpp's general.architecture
    alpha: float  # adapter.lora.alpha
    tensors: list[LoraTensor]

    def b_factor(self, t: LoraTensor) -> float:
        """What lora_B is multiplied by so that llama.cpp's alpha/rank gives PEFT's scaling (1 unless patterns)."""
        return t.scaling * t.rank / self.alpha


def plan_lora_gguf(adapter_dir: Path, base_model_dir: Path) -> LoraGgufPlan:
    """Check the adapter against the base and llama.cpp's LoRA format; raises GgufLoraError, loads no weights."""
    import gguf

    adapter_dir, base_model_dir = Path(adapter_dir), Path(base_model_dir)
    cfg, raw = _read_adapter(adapter_dir)
    try:
        config = read_config(base_model_dir)
    except (GGUFExportError, OSError) as exc:
        raise GgufLoraError(
            f"adapter {adapter_dir}: base {base_model_dir} cannot have a llama.cpp LoRA GGUF here ({exc}); "
            + _merge_hint(adapter_dir)
        ) from exc
    arch = ARCHITECTURES[config["architectures"][0]]
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(model_arch, int(config["num_hidden_layers"]))
    base_shapes = _safetensors_shapes(sorted(base_model_dir.glob("*.safetensors")))
    if not base_shapes:
        raise GgufLoraError(
            f"base {base_model_dir} has no *.safetensors weights to check adapter {adapter_dir} against"
        )

    pairs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, shape in _safetensors_shapes([adapter_dir / ADAPTER_WEIGHTS]).items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise GgufLoraError(f"adapter {adapter_dir}: {_why_not_lora(key)}; " + _merge_hint(adapter_dir))
        pairs.setdefault(m["module"], {})[m["ab"]] = (key, shape)
    if not pairs:
        raise GgufLoraError(f"adapter {adapter_dir}: {adapter_dir / ADAPTER_WEIGHTS} holds no LoRA weights")

    tensors = []
    for module, ab in pairs.items():
        where = f"adapter {adapter_dir}: {module}"
        leaf = module.rpartition(".")[2]
        gguf_base = name_map.get_name(module)
        if leaf not in MODULES or gguf_base is None:
            raise GgufLoraError(
                f"{where} is not one of the projections llama.cpp LoRA export maps ({', '.join(MODULES)}); "
                + _merge_hint(adapter_dir)
            )
        if set(ab) != {"A", "B"}:
            raise GgufLoraError(
                f"{where} has lora_{''.join(ab)} but not its pair; the weights file is incomplete"
            )
        (key_a, (rank, n_in)), (key_b, (n_out, rank_b)) = ab["A"], ab["B"]
        base = base_shapes.get(f"{module}.weight")
        if base is None or tuple(base) != (n_out, n_in) or rank != rank_b:
            raise GgufLoraError(
                f"{where} is a ({n_out} x {n_in}) rank-{rank} LoRA but the base {base_model_dir} has "
                f"{'no such weight' if base is None else f'a {base[0]} x {base[1]} weight'}; "
                "the adapter was trained on another base model: pass the base it was trained on"
            )
        r_cfg = int(_pattern_value(raw.get("rank_pattern") or {}, module, cfg.rank))
        if r_cfg != rank:
            raise GgufLoraError(
                f"{where}: {adapter_dir / ADAPTER_CONFIG} gives rank {r_cfg} but the weights have rank {rank}"
            )
        alpha = float(_pattern_value(raw.get("alpha_pattern") or {}, module, cfg.alpha))
        scaling = alpha / (math.sqrt(rank) if cfg.use_rslora else rank)
        permute = None
        if arch == "llama" and leaf in ("q_proj", "k_proj"):
            permute = (heads, heads if leaf == "q_proj" else kv_heads)
        tensors.append(LoraTensor(module, (key_a, key_b), f"{gguf_base}.weight", rank, scaling, permute))

    # One alpha per file: the one most modules need as is; any other module's remainder goes into its lora_B.
    gguf_alpha = Counter(t.scaling * t.rank for t in tensors).most_common(1)[0][0]
    if gguf_alpha == 0:
        raise GgufLoraError(f"adapter {adapter_dir}: lora_alpha is 0, so the adapter changes nothing")
    return LoraGgufPlan(adapter_dir, arch, gguf_alpha, tensors)


def write_lora_gguf(
    adapter_dir: Path, base_model_dir: Path, out: Path, qtype: str = "f32", *, name: str | None = None
) -> None:
    """Write `adapter_dir` (a PEFT LoRA for `base_model_dir`) to `out` as a llama.cpp LoRA GGUF, atomically."""
    import gguf
    from safetensors import safe_open

    from serve.atomic import atomic_path
    from train.export.gguf_writer import _permute, _quantise

    if qtype not in FILE_TYPES:
        raise GgufLoraError(f"GGUF type {qtype!r} is not supported; choose one of {', '.join(FILE_TYPES)}")
    plan = plan_lora_gguf(adapter_dir, base_model_dir)
    with atomic_path(out) as tmp, safe_open(str(plan.adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        writer = gguf.GGUFWriter(tmp, plan.arch)
        writer.add_name(name or plan.adapter_dir.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
        writer.add_file_type(FILE_TYPES[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in plan.tensors:
            # safetensors' numpy view cannot hold bf16 (LLaMA-Factory's usual adapter dtype): go through torch.
            a, b = (f.get_tensor(key).float().numpy() for key in t.keys)
            factor = plan.b_factor(t)
            if not math.isclose(factor, 1.0, rel_tol=1e-9):
                b = b * factor
            if t.permute is not None:
                b = _permute(b, *t.permute)
            for suffix, data in (("lora_a", a), ("lora_b", b)):
                array, raw_type = _quantise(data, qtype)
                writer.add_tensor(f"{t.gguf_name}.{suffix}", array, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def lora_gguf_for(adapter_dir: Path, base_model_dir: Path, cache_dir: Path, qtype: str = "f32") -> Path:
    """`adapter_dir` as a llama.cpp LoRA GGUF in `cache_dir`, rewritten when the adapter's files change.

    The file name carries the adapter and base paths' digest and a stamp of the adapter's weights and
    config (mtime and size); a new stamp writes a new file and removes the stale one.
    """
    adapter_dir, base_model_dir = Path(adapter_dir).resolve(), Path(base_model_dir).resolve()
    where = _digest(str(adapter_dir), str(base_model_dir), qtype)
    stamp = _digest(
        *(
            f"{s.st_mtime_ns}:{s.st_size}"
            for s in ((adapter_dir / n).stat() for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
        )
    )
    stem = f"{adapter_dir.name}-{where}"
    out = Path(cache_dir) / f"{stem}-{stamp}.lora-{qtype}.gguf"
    if out.is_file():
        return out
    print(f"llama-cpp: writing {out}", flush=True)
    write_lora_gguf(adapter_dir, base_model_dir, out, qtype)
    for stale in out.parent.glob(f"{stem}-*.lora-{qtype}.gguf"):
        if stale != out:
            stale.unlink(missing_ok=True)
    return out


def _read_adapter(adapter_dir: Path):
    """(typed AdapterConfig, the raw JSON for the keys it does not carry), refusing what llama.cpp cannot apply."""
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise GgufLoraError(
            f"adapter {adapter_dir}: {ADAPTER_WEIGHTS} is missing; point at the folder llm-train or "
            "PEFT's save_pretrained(dir, safe_serialization=True) wrote"
        )
    try:
        cfg = read_adapter_config(adapter_dir)
    except FolderError as exc:
        raise GgufLoraError(f"adapter {adapter_dir}: {exc}") from exc
    raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    refusals = {
        f"peft_type is {cfg.peft_type!r}, not LORA": cfg.peft_type != "LORA",
        "it is a DoRA adapter (use_dora), which llama.cpp cannot apply": cfg.use_dora,
        f"it trains whole modules ({', '.join(cfg.modules_to_save)}: modules_to_save)": cfg.modules_to_save,
        "it trains token embeddings (trainable_token_indices)": cfg.trainable_token_indices,
        "it has LoRA biases (lora_bias)": raw.get("lora_bias"),
        "it is an activated LoRA (alora_invocation_tokens)": raw.get("alora_invocation_tokens"),
        "it replicates layers (layer_replication)": raw.get("layer_replication"),
        "it targets parameters, not modules (target_parameters)": raw.get("target_parameters"),
    }
    for why, refused in refusals.items():
        if refused:
            raise GgufLoraError(
                f"adapter {adapter_dir}: {why}, so it has no llama.cpp LoRA GGUF; " + _merge_hint(adapter_dir)
            )
    return cfg, raw


def _why_not_lora(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return f"{key} is a DoRA magnitude, which llama.cpp cannot apply"
    if "lora_embedding_" in key or "embed_tokens" in key:
        return f"{key} adapts the token embeddings, which this export does not map"
    if "lm_head" in key:
        return f"{key} adapts lm_head, which this export does not map"
    if key.endswith(".bias"):
        return f"{key} is a trained bias, which llama.cpp LoRA adapters cannot carry"
    return f"{key} is not a LoRA lora_A/lora_B weight (modules_to_save or trainable tokens?)"


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): first key matching the end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _merge_hint(adapter_dir: Path) -> str:
    return f"merge it into the base instead: llm-export --adapter {adapter_dir} --out DIR --gguf f32"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export.gguf_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", type=Path, help="PEFT LoRA adapter folder")
    p.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    p.add_argument("--base", help="base model (default: the base the adapter was trained on)")
    p.add_argument("--type", default="f32", choices=list(FILE_TYPES), help="tensor type (default f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)

    def body() -> int:
        from train.export.merge import load_specs, resolve_base

        if args.out.exists() and not args.overwrite:
            raise UserError(f"{args.out} exists; pass --overwrite to replace it")
        base = resolve_base(load_specs([str(args.adapter)]), args.base)
        write_lora_gguf(args.adapter, base.path, args.out, args.type)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) for base {base.path}")
        return 0

    return run_cli("gguf_lora", body)


if __name__ == "__main__":
    sys.exit(main())
