"""The language-model bridge: decoded instances -> PancapChain stages -> panoptic caption.

* :mod:`pix2cap.bridge.stages` -- protocol strings (prompts, ``<box>`` grid boxes, merges).
* :mod:`pix2cap.bridge.content` -- structured content (entities, attributes, relations from
  mask geometry and dense captions, global items), its exchange dict, and region captions
  grounded in the decoded entities.
* :mod:`pix2cap.bridge.writers` -- caption writers (``template``, ``hf_causal_lm``,
  ``small_lm``) and their training functions; registry in :mod:`pix2cap.bridge.build`.
* :mod:`pix2cap.bridge.copy_lm` -- the small LM's model: GPT-2 with a pointer head that copies
  from the prompt (imported on use, as it imports transformers).
* :mod:`pix2cap.bridge.bridge` -- :class:`PanopticCaptionBridge` and training pairs.
"""

from .bridge import (
    PanopticCaptionBridge,
    align_to_mentions,
    ground_truth_entities,
    make_training_pairs,
)
from .build import CAPTION_WRITER_REGISTRY, build_caption_writer
from .content import (
    DecodedEntity,
    PanopticContent,
    build_content,
    geometric_relations,
    grounded_caption,
)
from .stages import (
    GRID,
    STAGE1_PROMPT,
    STAGE2_PROMPT,
    STAGE3_PROMPT,
    STAGE4_PROMPT,
    PancapStages,
    StageItem,
    build_stages,
    find_grid_boxes,
    grid_text_to_pancap,
    normalized_box_to_grid,
    pancap_text_to_grid,
    pixel_box_to_grid,
)
from .writers import (
    GridBoxLogitsProcessor,
    HFCausalLMWriter,
    SmallLMWriter,
    TemplateWriter,
    VisualPrefixProjector,
    build_lm_prompt,
    finetune_lora,
    train_small_lm,
)

__all__ = [k for k in globals() if not k.startswith("_")]
