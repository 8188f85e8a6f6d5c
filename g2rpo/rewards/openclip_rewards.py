"""HPS-v2.1 and G2RPO's DFN5B CLIP score: plain cosines of OpenCLIP ViT-H-14 models.

Both are open_clip checkpoints run here as transformers ``CLIPModel``s after a one-off conversion with
``python -m g2rpo.rewards.weights.openclip`` (``open_clip_torch`` needs torchvision, which has no working
CPU build in this environment). Formulas, restated from their sources:

* **HPS-v2.1** (Wu et al. 2023, arXiv 2306.09341; ``tgxs002/HPSv2`` ``hpsv2/img_score.py``; the same in
  DanceGRPO ``fastvideo/train_grpo_flux.py`` and G2RPO ``fastvideo/train_g2rpo_hps_clip.py``):
  ``torch.diagonal(image_features @ text_features.T)`` with open_clip's L2-normalised features, i.e. the
  plain cosine, no ``logit_scale`` and no divisor (about 0.2 to 0.4 for FLUX images). Weights
  ``xswu/HPSv2`` ``HPS_v2.1_compressed.pt`` on open_clip ``ViT-H-14``.
* **CLIP score** (G2RPO, research brief ``g2rpo_dgpo.md`` §1.5; ``bcmi/Granular-GRPO``
  ``fastvideo/train_g2rpo_hps_clip.py``): ``normalize(encode_image) @ normalize(encode_text).T`` with
  ``apple/DFN5B-CLIP-ViT-H-14``, the same plain cosine (its prompts tokenised by the ``ViT-H-14``
  tokenizer). That model is open_clip's ``ViT-H-14-quickgelu``: convert it with ``--hidden-act quick_gelu``.

Preprocessing: the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (bicubic resize to 224, centre
crop, OpenAI mean/std; the OpenAI BPE tokenizer that open_clip's ``ViT-H-14`` tokenizer also is). HPSv2's
own inference transform instead resizes the longest side and zero-pads, and DFN5B's squashes to 224 x 224;
for the square images the policies generate all three are the same geometry (only the bicubic
implementations differ: PIL here, torchvision in open_clip). As for the other CLIP rewards,
images reach the processor as uint8 PIL images, as DanceGRPO's do (``VaeImageProcessor.postprocess``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPModel

from g2rpo.rewards.clip import ClipReward

_CONVERTER = "python -m g2rpo.rewards.weights.openclip"


class _OpenClipCosine(ClipReward):
    """``cos(image, prompt)`` of a converted open_clip model; subclasses name the checkpoint to convert.

    ``path``: the directory the converter wrote; ``processor_path``: a local copy of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s processor files (defaults to ``path``, which holds them when
    the converter's CONFIG_DIR did).
    """

    #: the open_clip checkpoint: Hub repository and file
    model_repo: str
    checkpoint_file: str
    #: extra converter arguments (the activation open_clip's config implies)
    converter_flags: str = ""
    processor_repo = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    @classmethod
    def how_to_convert(cls, target: str | None) -> str:
        """The commands that make the converted directory ``target`` (the missing-weights message)."""
        target = target or "<dir>"
        flags = f" {cls.converter_flags}" if cls.converter_flags else ""
        return (
            f"Make it once (open_clip checkpoint -> transformers CLIPModel):\n"
            f"  hf download {cls.model_repo} {cls.checkpoint_file} --local-dir <download>\n"
            f'  hf download {cls.processor_repo} --include "*.json" --include "*.txt" '
            "--local-dir <clip-config>\n"
            f"  {_CONVERTER} <download>/{cls.checkpoint_file} <clip-config> {target}{flags}\n"
            "and point the reward's path at it (or set G2RPO_WEIGHTS to the folder that holds it)."
        )

    def load_model(self, path: str | None) -> CLIPModel:
        name = type(self).__name__
        if path is None or not Path(path).is_dir():
            raise FileNotFoundError(
                f"{name}: no converted model directory {path!r}. " + self.how_to_convert(path)
            )
        try:
            return CLIPModel.from_pretrained(path, local_files_only=True)
        except OSError as error:
            raise FileNotFoundError(
                f"{name}: {path} holds no loadable weights ({error}). " + self.how_to_convert(path)
            ) from error

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{type(self).__name__}: {images.shape[0]} images but {len(prompts)} prompts")
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        return cosine.float().cpu()


class HPSv2(_OpenClipCosine):
    """HPS-v2.1 (about 0.2 to 0.4), the reward of DanceGRPO, MixGRPO and G2RPO."""

    model_repo = "xswu/HPSv2"
    checkpoint_file = "HPS_v2.1_compressed.pt"


class ClipCosine(_OpenClipCosine):
    """G2RPO's CLIP score: the plain cosine of DFN5B-CLIP ViT-H/14 (a quick-GELU open_clip model)."""

    model_repo = "apple/DFN5B-CLIP-ViT-H-14"
    checkpoint_file = "open_clip_pytorch_model.bin"
    converter_flags = "--hidden-act quick_gelu"
