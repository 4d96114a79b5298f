from .build import CAPTION_HEAD_REGISTRY
from .scene_memory import SceneContext, scene_context
from .text_decoder import MEMORY_KINDS, DenseCaptionHead
from .grounded_head import GroundedCaptionHead
from .tokenizer import (
    GroundedMarkupCodec,
    build_caption_tokenizer,
    caption_vocab_kwargs,
    decode,
    encode_captions,
)
