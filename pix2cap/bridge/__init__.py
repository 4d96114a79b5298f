"""The language-model bridge: decoded instances -> PancapChain stages -> panoptic caption.

* :mod:`pix2cap.bridge.bridge` -- :class:`PanopticCaptionBridge` (decode, order, stages,
  content, writer) and the LM writers' training pairs.
* :mod:`pix2cap.bridge.stages` -- protocol strings (the four prompts, stage lists, merges).
* :mod:`pix2cap.bridge.content` -- structured content (entities, attributes, relations,
  global items) and its exchange dict; built from
* :mod:`pix2cap.bridge.geometry` -- relations read from the masks, and
* :mod:`pix2cap.bridge.phrases` -- attribute words and named objects read from the dense
  captions;
* :mod:`pix2cap.bridge.grounding` -- region captions restated to name decoded entities.
* :mod:`pix2cap.bridge.mention_grounding` -- a written caption's entity mentions tied to the
  decoded segments their boxes came from (``<ids:phrase>`` form).
* :mod:`pix2cap.bridge.prompt` -- :class:`PromptFormat`, the LM prompt form, saved beside a
  trained LM.
* :mod:`pix2cap.bridge.writers` -- the writer interface and the writers without an LM
  (``template``, ``concat``, ``concat_boxes``); registry in :mod:`pix2cap.bridge.build`.
* :mod:`pix2cap.bridge.lm_writers` -- the LM writers (``hf_causal_lm``, ``small_lm``) and
  constrained box decoding.
* :mod:`pix2cap.bridge.decoded_pairs` -- the LM's training pairs from a model's decoded
  segments (for captions without masks, e.g. SA-Pancap), with an on-disk cache of the
  model's outputs.
* :mod:`pix2cap.bridge.lm_training` -- training the small LM and LoRA adapters.
* :mod:`pix2cap.bridge.copy_lm` -- the small LM's model: GPT-2 with a pointer head that copies
  from the prompt (imported on use, as it imports transformers).
"""

from .bridge import (
    PanopticCaptionBridge,
    align_to_mentions,
    ground_truth_entities,
    make_training_pairs,
)
from .build import CAPTION_WRITER_REGISTRY, build_caption_writer
from .decoded_pairs import CachedDecoder, make_decoded_training_pairs, model_cache_key
from .content import (
    DecodedEntity,
    PanopticContent,
    build_content,
)
from .geometry import geometric_relations
from .grounding import grounded_caption
from .lm_training import finetune_lora, train_small_lm
from .lm_writers import GridBoxLogitsProcessor, HFCausalLMWriter, SmallLMWriter
from .mention_grounding import ground_mentions
from .phrases import caption_attributes
from .prompt import PromptFormat
from .stages import (
    STAGE1_PROMPT,
    STAGE2_PROMPT,
    STAGE3_PROMPT,
    STAGE4_PROMPT,
    PancapStages,
    StageItem,
    build_stages,
)
from .writers import (
    BoxedDenseCaptionConcatWriter,
    CaptionWriter,
    DenseCaptionConcatWriter,
    TemplateWriter,
)

__all__ = [k for k in globals() if not k.startswith("_")]
