from .build import CAPTION_HEAD_REGISTRY
from .text_decoder import DenseCaptionHead
from .tokenizer import build_caption_tokenizer, caption_vocab_kwargs, decode, encode_captions
