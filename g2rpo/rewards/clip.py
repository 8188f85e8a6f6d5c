"""CLIP-family rewards: PickScore, CLIP score and the LAION aesthetic predictor, on a shared :class:`ClipReward`
base (also that of :mod:`g2rpo.rewards.openclip_rewards`).

Thin adapters on transformers' ``CLIPModel`` and ``CLIPProcessor``; weights come from local directories
only (``local_files_only=True``), never from the network. Formulas, restated from their sources:

* **PickScore** (Kirstain et al. 2023, arXiv 2305.01569; ``yuvalkirstain/PickScore_v1`` with the processor
  of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``): ``logit_scale.exp() * cos(image, text)``. Flow-GRPO divides
  it by 26 to bring it to about [0, 1] (research brief ``flow_grpo_family.md`` §2.10; ``yifan123/flow_grpo``
  ``flow_grpo/pickscore_scorer.py``).
* **CLIP score**: Flow-GRPO's ``clipscore`` reward (brief §2.10: ``openai/clip-vit-large-patch14``, "CLIP
  similarity"; the scale is from ``flow_grpo/clip_scorer.py``): the diagonal of ``logits_per_image`` divided
  by 30, i.e. ``logit_scale.exp() * cos(image, text) / 30``. G2RPO uses the plain cosine of a DFN5B CLIP
  (``g2rpo_dgpo.md`` §1.5); ``logit_scale`` is a constant, so under group normalisation the two differ only
  through the advantage eps.
* **LAION aesthetic** (``christophschuhmann/improved-aesthetic-predictor`` ``simple_inference.py``; Flow-GRPO
  ``flow_grpo/aesthetic_scorer.py``; brief §2.10): the L2-normalised CLIP ViT-L/14 image embedding through
  an MLP 768-1024-128-64-16-1 with dropouts 0.2, 0.2, 0.1 (inactive at inference), head weights
  ``sac+logos+ava1-l14-linearMSE.pth``.

Images are quantised to uint8 and handed to the processor as PIL images, as Flow-GRPO's ``rewards.py`` does
for PickScore and the aesthetic scorer: the processors rescale by 1/255 themselves, so float images in
[0, 1] passed as they are would be scaled twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import CLIPModel, CLIPProcessor


def _local_dir(path: str | None, what: str, repo: str) -> Path:
    """The directory, or a FileNotFoundError that says how to get it (rewards never download)."""
    if path is None or not Path(path).is_dir():
        target = path or "<dir>"
        raise FileNotFoundError(
            f"{what}: no local directory {path!r}. Download it once with\n"
            f"  hf download {repo} --local-dir {target}\n"
            "and point the reward's path at it (or set G2RPO_WEIGHTS to the folder that holds it)."
        )
    return Path(path)


def load_clip(path: str | None, repo: str) -> CLIPModel:
    """A ``CLIPModel`` from a local directory saved by ``save_pretrained`` / ``hf download``."""
    directory = _local_dir(path, "CLIP model", repo)
    try:
        return CLIPModel.from_pretrained(directory, local_files_only=True)
    except OSError as error:
        raise FileNotFoundError(
            f"CLIP model: {directory} holds no loadable weights ({error}); re-run `hf download {repo} "
            f"--local-dir {directory}`"
        ) from error


def load_processor(path: str | None, repo: str) -> CLIPProcessor:
    """A ``CLIPProcessor`` (image processor and tokenizer) from a local directory."""
    directory = _local_dir(path, "CLIP processor", repo)
    try:
        return CLIPProcessor.from_pretrained(directory, local_files_only=True)
    except OSError as error:
        raise FileNotFoundError(
            f"CLIP processor: {directory} lacks the processor files ({error}); re-run `hf download {repo} "
            f"--local-dir {directory}`"
        ) from error


def _features(output: Tensor | Any) -> Tensor:
    """transformers 4 returns the projected embedding; 5 a ``ModelOutput`` holding it as ``pooler_output``."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _normalised(features: Tensor) -> Tensor:
    return features / features.norm(p=2, dim=-1, keepdim=True)


class ClipReward:
    """A frozen CLIP and its processor on ``device`` in ``dtype``; subclasses say what they score.

    ``model`` / ``processor`` take already-built objects (tests pass tiny random ones); otherwise they load
    from ``path`` (``processor_path`` for the processor, defaulting to ``path``).
    """

    #: the Hub repositories named in the missing-weights message
    model_repo: str
    processor_repo: str

    def __init__(
        self,
        path: str | None = None,
        processor_path: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        model: CLIPModel | None = None,
        processor: CLIPProcessor | None = None,
    ) -> None:
        if model is None:
            model = self.load_model(path)
        if processor is None:
            processor = load_processor(processor_path or path, self.processor_repo)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.processor = processor

    def load_model(self, path: str | None) -> CLIPModel:
        """The CLIP from ``path`` (a subclass whose weights need converting first says how)."""
        return load_clip(path, self.model_repo)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings of ``[B, 3, H, W]`` images in [0, 1]."""
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pil = [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]
        values = self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        values = values.to(device=self.device, dtype=self.dtype)
        return _normalised(_features(self.model.get_image_features(pixel_values=values)))

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings, prompts truncated to the text tower's length (77 for CLIP)."""
        tokens = self.processor.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return _normalised(_features(features))


class _ImageTextSimilarity(ClipReward):
    """``logit_scale.exp() * cos(image, prompt) / divisor``, one batched forward per tower."""

    divisor: float

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{type(self).__name__}: {images.shape[0]} images but {len(prompts)} prompts")
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        return (self.model.logit_scale.exp() * cosine / self.divisor).float().cpu()


class PickScore(_ImageTextSimilarity):
    """PickScore / 26, Flow-GRPO's ``pickscore`` reward (about 0 to 1; brief §2.10).

    ``path``: a local copy of ``yuvalkirstain/PickScore_v1``; ``processor_path``: of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (its processor files suffice), the processor PickScore was
    trained with.
    """

    model_repo = "yuvalkirstain/PickScore_v1"
    processor_repo = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    divisor = 26.0


class ClipScore(_ImageTextSimilarity):
    """Flow-GRPO's ``clipscore``: ``logit_scale.exp() * cos / 30`` with ``openai/clip-vit-large-patch14``.

    Flow-GRPO resizes float tensors with torchvision (bilinear); here the processor's own bicubic resize
    runs, as for the other CLIP rewards. Not torchmetrics' ``CLIPScore``: it returns the batch mean
    (per-sample scores only through a private function), clamps at 0 and uses a fixed 100 instead of the
    model's ``logit_scale``.
    """

    model_repo = "openai/clip-vit-large-patch14"
    processor_repo = "openai/clip-vit-large-patch14"
    divisor = 30.0


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's head (``simple_inference.py``); the key names match its weights.
    ImageReward's ``MLP(768)`` has the same layout, on the text encoder's width (``imagereward.py``)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: str | None) -> AestheticMLP:
    """The head from a ``.pth`` state dict (the original release) or a ``.safetensors`` file."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"LaionAesthetic: no aesthetic head weights at {path!r}. Download them once with\n"
            f"  wget -O {path or '<file>'} "
            "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
            "sac+logos+ava1-l14-linearMSE.pth\n"
            "and point head_path at the file (or set G2RPO_WEIGHTS to the folder that holds aesthetic/)."
        )
    if Path(path).suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    head = AestheticMLP()
    head.load_state_dict(state)
    return head


class LaionAesthetic(ClipReward):
    """The LAION improved aesthetic score (about 1 to 10) of each image; prompts are not used.

    ``path``: a local copy of ``openai/clip-vit-large-patch14`` (its ``projection_dim`` is the head's 768);
    ``head_path``: ``sac+logos+ava1-l14-linearMSE.pth`` or a safetensors copy; ``head`` takes a built head.
    The head runs in float32 whatever ``dtype`` the CLIP runs in: it is tiny, and fp16 would round the score.
    """

    model_repo = "openai/clip-vit-large-patch14"
    processor_repo = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        path: str | None = None,
        head_path: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        model: CLIPModel | None = None,
        processor: CLIPProcessor | None = None,
        head: AestheticMLP | None = None,
    ) -> None:
        super().__init__(path=path, device=device, dtype=dtype, model=model, processor=processor)
        if head is None:
            head = load_aesthetic_head(head_path)
        self.head = head.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str] = (), metadata: Sequence[dict] = ()) -> Tensor:
        return self.head(self.image_embeddings(images).float()).cpu()
