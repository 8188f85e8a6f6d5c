"""g2rpo: online RL post-training of flow-matching text-to-image models."""

import logging

# transformers announces, once per image-processor class, that it falls back to PIL without torchvision
# (no CPU build of torchvision exists for our torch pin); we use no transformers image processor.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage()
)

__version__ = "0.1.0"
