"""SLIP (Mu et al., 2022) from its released checkpoint file, without its training code or timm.

The release (``slip_base_100ep.pt``, ``slip_large_100ep.pt``, ...) is a ``torch.save`` of
``{"state_dict": {"module.<key>": tensor}, "args": argparse.Namespace, ...}``: a timm ViT
image trunk (``visual.*``: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``; class-token pooling, no head), then
``image_projection``, and an OpenAI CLIP text tower (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N``, ``ln_final``, ``text_projection``), plus SLIP's SimCLR head
(``image_mlp.*``, unused here). :class:`SLIPModel` re-implements both towers with the same
parameter names, so the file loads with ``torch.load(weights_only=True)`` (the only class admitted
is ``argparse.Namespace``) and ``load_state_dict``. The tokenizer is OpenAI's CLIP BPE
(``bpe_simple_vocab_16e6.txt.gz``, shipped in the SLIP, OpenAI CLIP and open_clip repositories),
built as a transformers ``CLIPTokenizer``; images are resized to 224, centre-cropped and
normalised with the ImageNet mean and std, as SLIP's evaluation does.

Examples:
    >>> import torch
    >>> m = SLIPModel(vision_width=32, vision_layers=1, vision_heads=2, image_size=32, patch=16,
    ...               text_width=16, text_layers=1, text_heads=2, context=8, vocab=50, embed_dim=8)
    >>> m.encode_image(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 8])
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modalign.encoders.images import ImageInput, to_rgb
from modalign.encoders.tower import Tower
from modalign.errors import ModalignError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's heads for the trunks SLIP uses (vit_small_mocov3 384, vit_base 768, vit_large 1024).
VISION_HEADS = {384: 12, 768: 12, 1024: 16}


class _Attention(nn.Module):  # holds timm's parameter names: attn.qkv, attn.proj
    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)


class _Mlp(nn.Module):  # mlp.fc1, mlp.fc2
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)


class _PatchEmbed(nn.Module):  # patch_embed.proj
    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)


class _ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _Attention(width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _Mlp(width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.attn.proj(a.transpose(1, 2).reshape(b, n, d))
        h = self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))
        return x + h


class ViTTrunk(nn.Module):
    """A timm-layout ViT with class-token pooling and no head (timm ``num_classes=0``).

    It keeps timm's parameter names and the methods the inversion forward uses
    (``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``, ``forward_head``).
    """

    num_prefix_tokens = 1
    no_embed_class = False

    def __init__(self, width: int, layers: int, heads: int, image_size: int = 224,
                 patch: int = 16) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(width, patch)
        grid = image_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, width) * 0.02)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[_ViTBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def _pos_embed(self, x: Tensor) -> Tensor:
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)

    def forward_head(self, x: Tensor) -> Tensor:
        return x[:, 0]

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(self.norm_pre(self._pos_embed(x))))
        return self.forward_head(x)


class _FP32LayerNorm(nn.LayerNorm):
    """OpenAI CLIP's LayerNorm: computed in float32 whatever the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _TextBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = _FP32LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = _FP32LayerNorm(width)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:  # x: (L, N, D)
        h = self.ln_1(x)
        mask = None if attn_mask is None else attn_mask.to(x.dtype)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _TextTransformer(nn.Module):
    """Sequence-first residual blocks run under the mask they are given (open_clip's call)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([_TextBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class SLIPModel(nn.Module):
    """SLIP's image and text towers with the release's parameter names (see the module doc)."""

    def __init__(self, *, vision_width: int = 768, vision_layers: int = 12,
                 vision_heads: int = 12, image_size: int = 224, patch: int = 16,
                 text_width: int = 512, text_layers: int = 12, text_heads: int = 8,
                 context: int = 77, vocab: int = 49408, embed_dim: int = 512) -> None:
        super().__init__()
        self.visual = ViTTrunk(vision_width, vision_layers, vision_heads, image_size, patch)
        self.image_projection = nn.Parameter(torch.randn(vision_width, embed_dim)
                                             * vision_width ** -0.5)
        self.transformer = _TextTransformer(text_width, text_layers, text_heads)
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu_(1),
                             persistent=False)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context, text_width) * 0.01)
        self.ln_final = _FP32LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim)
                                            * text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.context_length = context
        self.image_size = image_size

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels) @ self.image_projection

    def encode_text(self, ids: Tensor) -> Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), attn_mask=self.attn_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


def load_slip_checkpoint(path: str | Path) -> SLIPModel:
    """Build :class:`SLIPModel` from a SLIP release file (architecture read from the weights).

    Only tensors, plain containers and ``argparse.Namespace`` are unpickled. SLIP's SimCLR head
    (``image_mlp.*``) is dropped; any other unknown or missing key is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ModalignError(f"slip: no checkpoint file {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModalignError(f"slip: {path} is not a loadable SLIP checkpoint ({e})") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "visual.cls_token" not in {
            k.removeprefix("module.") for k in state}:
        raise ModalignError(f"slip: {path} holds no SLIP state_dict (expected module.visual.*)")
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.removeprefix("module.").startswith("image_mlp.")}
    vwidth = int(state["visual.cls_token"].shape[-1])
    vlayers = len({k.split(".")[2] for k in state if k.startswith("visual.blocks.")})
    patch = int(state["visual.patch_embed.proj.weight"].shape[-1])
    grid = round((int(state["visual.pos_embed"].shape[1]) - 1) ** 0.5)
    twidth = int(state["token_embedding.weight"].shape[1])
    tlayers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    if vwidth not in VISION_HEADS:
        raise ModalignError(f"slip: vision width {vwidth} is not one of SLIP's "
                            f"({', '.join(map(str, VISION_HEADS))})")
    model = SLIPModel(vision_width=vwidth, vision_layers=vlayers,
                      vision_heads=VISION_HEADS[vwidth], image_size=grid * patch, patch=patch,
                      text_width=twidth, text_layers=tlayers, text_heads=twidth // 64,
                      context=int(state["positional_embedding"].shape[0]),
                      vocab=int(state["token_embedding.weight"].shape[0]),
                      embed_dim=int(state["image_projection"].shape[1]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModalignError(f"slip: {path} does not match SLIP's layout (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def clip_bpe_tokenizer(bpe_file: str | Path) -> Any:
    """A transformers ``CLIPTokenizer`` with OpenAI's vocabulary, from the BPE merges file
    (``bpe_simple_vocab_16e6.txt.gz``), built as OpenAI's ``SimpleTokenizer`` builds it."""
    from transformers import CLIPTokenizer

    with gzip.open(bpe_file) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges),
                               encoding="utf-8")
        return CLIPTokenizer(str(vocab), str(merges_file), pad_token="!")


def find_bpe_file(checkpoint: Path) -> Path:
    """The CLIP BPE file beside the checkpoint, or in an installed ``clip``/``open_clip``."""
    import importlib.util

    candidates = [checkpoint.parent / BPE_FILE]
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) / BPE_FILE for p in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            return c
    raise ModalignError(f"slip: no {BPE_FILE} beside {checkpoint} (copy it there from the SLIP "
                        "or OpenAI CLIP repository)")


class _SLIPTower(Tower):
    def __init__(self, model: SLIPModel, name: str, weights: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.family = "slip"
        self._weights = weights
        self.dim = int(model.image_projection.shape[1])

    def blocks(self) -> list[nn.Module]:
        return [self.model]

    def _identity(self, preprocessing: str) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "dim": self.dim,
                "architecture": "SLIP", "weights_hash": self._weights,
                "preprocessing": preprocessing}


class SLIPImageTower(_SLIPTower):
    """SLIP's image tower: resize 224, centre crop, ImageNet normalisation, ViT, projection."""

    modality = "image"

    def preprocess(self, inputs: Sequence[ImageInput]) -> Tensor:
        if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs:
            raise ModalignError("inputs must be a non-empty list of image paths or PIL images")
        size = self.model.image_size
        out = []
        for x in inputs:
            im = to_rgb(x)
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                           resample=3)  # bicubic
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = ((np.asarray(im, dtype=np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32))
                   / np.array(IMAGENET_STD, np.float32))
            out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
        return torch.stack(out)

    def encode(self, batch: Tensor) -> Tensor:
        return self.model.encode_image(batch)

    def identity(self) -> dict[str, Any]:
        return self._identity("resize 224 bicubic, centre crop, ImageNet mean/std")


class SLIPTextTower(_SLIPTower):
    """SLIP's text tower: CLIP BPE ids padded with 0 to 77, EOT pooling, projection."""

    modality = "text"

    def __init__(self, model: SLIPModel, tokenizer: Any, name: str, weights: str) -> None:
        super().__init__(model, name, weights)
        self.tokenizer = _PaddedIds(tokenizer, model.context_length)

    def preprocess(self, inputs: Sequence[str]) -> Tensor:
        if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs:
            raise ModalignError("inputs must be a non-empty list of strings")
        return torch.tensor([self.tokenizer(t)["input_ids"] for t in inputs])

    def encode(self, batch: Tensor) -> Tensor:
        return self.model.encode_text(batch)

    def identity(self) -> dict[str, Any]:
        return self._identity("CLIP BPE, padded with 0 to the context, truncated with EOT")


class _PaddedIds:
    """``text -> {"input_ids": ids}`` padded with 0 to the context, EOT kept when truncating."""

    def __init__(self, tokenizer: Any, context: int) -> None:
        self.tokenizer = tokenizer
        self.context = context

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids = list(self.tokenizer(text)["input_ids"])
        if len(ids) > self.context:
            ids = ids[: self.context - 1] + ids[-1:]
        return {"input_ids": ids + [0] * (self.context - len(ids))}


def load_slip_towers(path: str | Path) -> dict[str, Tower]:
    """``{"image": ..., "text": ...}`` of a SLIP release checkpoint (one shared model)."""
    path = Path(path).expanduser()
    model = load_slip_checkpoint(path)
    tokenizer = clip_bpe_tokenizer(find_bpe_file(path))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    name, weights = f"slip:{path}", digest.hexdigest()[:16]
    return {"image": SLIPImageTower(model, name, weights),
            "text": SLIPTextTower(model, tokenizer, name, weights)}
