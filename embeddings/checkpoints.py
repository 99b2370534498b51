"""Loading real backbone weights: official DINOv2 state dicts, Hugging Face folders, lvd exports, TorchScript.

Every loader is strict: a missing, unexpected or mis-shaped key raises `CheckpointError` naming the
key, so a checkpoint never half-loads. Files are read with `torch.load(weights_only=True)`.
URLs (http/https or any fsspec scheme) are downloaded once into a cache folder ($LVD_CACHE or
~/.cache/lvd) and reused. An expected sha256 (the spec's `sha256`) is checked on the file before
anything reads it as a checkpoint; a mismatch is a `CheckpointError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvd.embeddings.layers import swiglu_hidden_features
from lvd.embeddings.vit import ARCHS, DinoVisionTransformer, build_vit
from lvd.schemas.tables import file_sha256

LVD_FORMAT = "lvd-backbone"
FORMATS = ("auto", "dinov2", "hf", "lvd", "torchscript")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the offending keys."""


# ---------------------------------------------------------------- fetching


def cache_dir() -> Path:
    return Path(os.environ.get("LVD_CACHE") or Path.home() / ".cache" / "lvd")


def check_sha256(path: Path, expected: str, uri: str) -> None:
    """Raise CheckpointError unless the file at `path` (fetched from `uri`) has sha256 `expected`."""
    if path.is_dir():
        raise CheckpointError(f"weights {uri}: sha256 is given but the weights are a folder (one file only)")
    got = file_sha256(path)
    if got != expected.lower():
        raise CheckpointError(
            f"weights {uri}: sha256 mismatch: the file has {got}, the spec's sha256 is {expected}"
        )


def fetch(uri: str, cache: str | Path | None = None, sha256: str | None = None) -> Path:
    """A local path for `uri`: local paths as they are, URLs downloaded once into the cache.

    With `sha256`, the file must have that hash: a cached copy that does not is downloaded again, and
    a download that does not is deleted and reported (CheckpointError naming the field)."""
    if uri.startswith("file://") or "://" not in uri:
        path = Path(urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if sha256:
            check_sha256(path, sha256, uri)
        return path
    cache = Path(cache) if cache is not None else cache_dir()
    name = Path(urllib.parse.urlparse(uri).path).name or "checkpoint"
    # The URL's hash keeps two files of the same name from different places apart.
    dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:12] / name
    if dest.exists():
        if not sha256 or file_sha256(dest) == sha256.lower():
            return dest
        dest.unlink()  # a stale or damaged copy: fetch it again, then check that
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        if uri.startswith(("http://", "https://")):
            with urllib.request.urlopen(uri) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        else:
            import fsspec

            with fsspec.open(uri, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        if sha256:
            check_sha256(tmp, sha256, uri)  # a bad download never takes the cache's name
        os.replace(tmp, dest)  # a killed download never looks finished
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def detect_format(path: str | Path) -> str:
    """'hf' for a folder with config.json, 'torchscript' for a TorchScript archive, else by contents."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        raise CheckpointError(f"{path} is a folder without config.json (not a Hugging Face model folder)")
    if path.suffix == ".safetensors":
        return "hf"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == LVD_FORMAT:
        return "lvd"
    return "dinov2"


def is_torch_save_file(path: Path) -> bool:
    """Whether a file starts as torch.save writes it: a zip archive, or (the legacy format) a pickle."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _torch_load(path: Path) -> Any:
    if not is_torch_save_file(path):
        raise CheckpointError(f"{path} is not a checkpoint (not a file torch.save wrote)")
    try:
        # mmap: tensors are paged in from the file when used, so checking a big checkpoint is cheap.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # legacy (pre-zip) files cannot be mapped: read them whole
            raise CheckpointError(f"cannot read checkpoint {path} with weights_only=True: {err}") from err
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read checkpoint {path} with weights_only=True: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read checkpoint {path} with weights_only=True: {err}") from err


# ---------------------------------------------------------------- strict loading


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """Load all keys or none: missing, unexpected and mis-shaped keys are errors naming them."""
    expected = model.state_dict()
    where = f" in {source}" if source else ""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"shape mismatch {shapes}")
    if problems:
        raise CheckpointError(f"checkpoint does not fit the model{where}: " + "; ".join(problems))
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:  # take the checkpoint's tensors as the parameters (as float32, like a fresh model's)
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=on_meta)


def _on_meta(build, *args, **kwargs):
    """Build a model without allocating or initialising weights: a checkpoint replaces them all."""
    with torch.device("meta"):
        return build(*args, **kwargs)


# ---------------------------------------------------------------- official DINOv2 state dicts


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The backbone state dict inside common wrappers ({"model": ...}, {"teacher": ...}, "backbone." prefix)."""
    for key in ("teacher", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint is not a state dict of tensors")
    for prefix in ("module.", "backbone."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def infer_vit_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """arch, patch_size, num_register_tokens, img_size and ffn_layer from an official-key state dict."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state_dict:
            raise CheckpointError(f"missing key {key!r}: not a DINOv2 ViT state dict")
    dim = state_dict["cls_token"].shape[-1]
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    ffn = "swiglu" if "blocks.0.mlp.w12.weight" in state_dict else "mlp"
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    # The feed-forward kind comes from the keys: an arch may be trained with either (ffn_layer option).
    archs = [name for name, a in ARCHS.items() if (a.embed_dim, a.depth) == (dim, depth)]
    if not archs:
        raise CheckpointError(f"no known arch is {dim} wide and {depth} deep")
    regs = state_dict.get("register_tokens")
    return {
        "arch": archs[0],
        "patch_size": patch,
        "num_register_tokens": 0 if regs is None else regs.shape[1],
        "img_size": grid * patch,
        "ffn_layer": ffn,
    }


def vit_from_state_dict(
    state_dict: dict[str, torch.Tensor], arch: str | None = None, source: str = ""
) -> DinoVisionTransformer:
    cfg = infer_vit_config(state_dict)
    if arch is not None and arch != cfg["arch"]:
        raise CheckpointError(
            f"checkpoint{' ' + source if source else ''} holds a {cfg['arch']}, not a {arch}"
        )
    # Official register models interpolate positions with antialiasing and no offset (DINOv2 hub).
    regs = cfg["num_register_tokens"] > 0
    model = _on_meta(
        build_vit,
        cfg["arch"],
        patch_size=cfg["patch_size"],
        num_register_tokens=cfg["num_register_tokens"],
        img_size=cfg["img_size"],
        ffn_layer=cfg["ffn_layer"],
        interpolate_offset=0.0 if regs else 0.1,
        interpolate_antialias=regs,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
    )
    load_state_dict_strict(model, state_dict, source)
    return model


def load_dinov2_checkpoint(path: str | Path, arch: str | None = None) -> DinoVisionTransformer:
    """An official `dinov2_vit*14*_pretrain.pth` state dict (or a local/URL copy of one)."""
    path = fetch(str(path))
    return vit_from_state_dict(_unwrap(_torch_load(path)), arch, str(path))


# ---------------------------------------------------------------- lvd exports


def _arch_name(model: DinoVisionTransformer) -> str:
    for name, a in ARCHS.items():
        if (a.embed_dim, a.depth, a.num_heads) == (model.embed_dim, model.n_blocks, model.num_heads):
            return name
    raise CheckpointError(f"model ({model.embed_dim} wide, {model.n_blocks} deep) matches no arch in ARCHS")


def save_lvd_backbone(model: DinoVisionTransformer, path: str | Path) -> Path:
    """Export a (teacher) backbone for embedding: arch + sizes + official-key state dict, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": LVD_FORMAT,
        "arch": _arch_name(model),
        "patch_size": model.patch_size,
        "num_register_tokens": model.num_register_tokens,
        "img_size": model.patch_embed.img_size,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_lvd_backbone(path: str | Path, arch: str | None = None) -> DinoVisionTransformer:
    path = fetch(str(path))
    obj = _torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != LVD_FORMAT:
        raise CheckpointError(f"{path} is not an lvd backbone export (format != {LVD_FORMAT!r})")
    for key in ("arch", "patch_size", "num_register_tokens", "img_size", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"lvd backbone export {path} lacks {key!r}")
    if arch is not None and arch != obj["arch"]:
        raise CheckpointError(f"{path} holds a {obj['arch']}, not a {arch}")
    sd = obj["state_dict"]
    model = _on_meta(
        build_vit,
        obj["arch"],
        patch_size=obj["patch_size"],
        num_register_tokens=obj["num_register_tokens"],
        img_size=obj["img_size"],
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        ffn_layer="swiglu" if "blocks.0.mlp.w12.weight" in sd else "mlp",
    )
    load_state_dict_strict(model, sd, str(path))
    return model


# ---------------------------------------------------------------- Hugging Face folders

_HF_LAYER = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",  # transformers >= 5 module naming
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
_HF_QKV = (
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
)
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def hf_to_dinov2_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `Dinov2Model` / `Dinov2WithRegistersModel` keys to official DINOv2 keys (q, k, v fused into qkv)."""
    hf = dict(hf)
    for prefix in ("dinov2.", "dinov2_with_registers.", "model."):
        if hf and all(k.startswith(prefix) for k in hf if not k.startswith("classifier.")):
            hf = {k.removeprefix(prefix): v for k, v in hf.items()}
    out: dict[str, torch.Tensor] = {}
    for hk, dk in _HF_TOP.items():
        if hk in hf:
            out[dk] = hf.pop(hk)
    if "mask_token" in out and out["mask_token"].ndim == 3:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    layers = sorted({int(m.group(1)) for k in hf if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for names in _HF_QKV:
            for p in ("weight", "bias"):
                keys = [f"{src}{n}.{p}" for n in names]
                if all(k in hf for k in keys):
                    out[f"{dst}attn.qkv.{p}"] = torch.cat([hf.pop(k) for k in keys], dim=0)
        for p in ("weight", "bias"):
            gate, up = f"{src}mlp.gate_proj.{p}", f"{src}mlp.up_proj.{p}"
            if gate in hf and up in hf:  # transformers >= 5 splits the fused SwiGLU input projection
                out[f"{dst}mlp.w12.{p}"] = torch.cat([hf.pop(gate), hf.pop(up)], dim=0)
        for hn, dn in _HF_LAYER.items():
            for p in ("weight", "bias", ""):
                hk = f"{src}{hn}.{p}" if p else f"{src}{hn}"
                if hk in hf:
                    out[f"{dst}{dn}.{p}" if p else f"{dst}{dn}"] = hf.pop(hk)
    leftover = sorted(k for k in hf if not k.startswith("classifier."))
    if leftover:
        raise CheckpointError(f"Hugging Face keys with no DINOv2 counterpart: {leftover}")
    return out


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(folder / f))
        return sd
    raise CheckpointError(f"{folder} holds no model.safetensors")


def load_hf_dinov2(folder: str | Path) -> DinoVisionTransformer:
    """A Hugging Face `facebook/dinov2-*` folder (config.json + model.safetensors); the config gives the shape."""
    folder = fetch(str(folder))
    if folder.is_file():
        folder = folder.parent
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        raise CheckpointError(f"{folder}/config.json: model_type {cfg.get('model_type')!r} is not a DINOv2")
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("layer_norm_eps", 1e-6) != 1e-6:
        raise CheckpointError(f"{folder}/config.json: only gelu and layer_norm_eps 1e-6 are supported")
    if not cfg.get("qkv_bias", True):
        raise CheckpointError(f"{folder}/config.json: qkv_bias false is not supported")
    dim, ratio = cfg["hidden_size"], cfg.get("mlp_ratio", 4)
    regs = cfg.get("num_register_tokens", 0) if cfg.get("model_type") == "dinov2_with_registers" else 0
    swiglu = bool(cfg.get("use_swiglu_ffn", False))
    model = _on_meta(
        DinoVisionTransformer,
        img_size=cfg.get("image_size", 518),
        patch_size=cfg.get("patch_size", 14),
        in_chans=cfg.get("num_channels", 3),
        embed_dim=dim,
        depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        mlp_ratio=ratio,
        ffn_layer="swiglu" if swiglu else "mlp",
        num_register_tokens=regs,
        # Match transformers' position interpolation: exact target size; registers model antialiases.
        interpolate_offset=0.0,
        interpolate_antialias=regs > 0,
    )
    if swiglu and model.blocks[0].mlp.w3.in_features != swiglu_hidden_features(dim, ratio):
        raise CheckpointError("unexpected SwiGLU width")
    sd = hf_to_dinov2_state_dict(_read_safetensors(folder))
    if "mask_token" not in sd:  # use_mask_token=False configs: the token is unused at inference
        sd["mask_token"] = torch.zeros(1, dim)
    load_state_dict_strict(model, sd, str(folder))
    return model


# ---------------------------------------------------------------- TorchScript (copy detection)


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """A TorchScript model (SSCD ships this way); it maps a normalised image batch to descriptors."""
    path = fetch(str(path))
    try:
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; SSCD still ships as it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot load TorchScript model {path}: {err}") from err


# ---------------------------------------------------------------- one entry point


def load_backbone(
    weights: str | Path, format: str = "auto", arch: str | None = None, sha256: str | None = None
) -> nn.Module:
    """Any supported checkpoint by format ('auto' detects it from the file type and contents); with
    `sha256`, the file is checked against it before anything reads it."""
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")
    path = fetch(str(weights), sha256=sha256)
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "torchscript":
        return load_torchscript(path)
    if fmt == "hf":
        model = load_hf_dinov2(path if path.is_dir() else path.parent)
        if arch is not None:
            got = infer_vit_config(model.state_dict())["arch"]
            if got != arch:
                raise CheckpointError(f"{path} holds a {got}, not a {arch}")
        return model
    if fmt == "lvd":
        return load_lvd_backbone(path, arch)
    return load_dinov2_checkpoint(path, arch)
