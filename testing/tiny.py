"""Tiny random backbones built on the spot, for offline tests and the offline demo.

They go through the same ``save_pretrained`` / ``from_pretrained`` path as the real
``gpt2`` and CLIP checkpoints, so the loading code that runs here is the code that runs online.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    PreTrainedTokenizerFast,
)

END_OF_TEXT = "<|endoftext|>"
# Tiny sizes of other decoder-only LMs (each config's own field names), for tests of any LM.
TINY_LMS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
                max_position_embeddings=128),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128),
    "gemma2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   intermediate_size=64, max_position_embeddings=128, sliding_window=16),
    "phi": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=128),
}
# The LMs whose real tokenizers start every text with BOS (Llama's <|begin_of_text|>, OPT's </s>, Gemma's <bos>).
BOS_FIRST = {"llama", "opt", "gemma2"}


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 400) -> GPT2TokenizerFast:
    """A byte-level BPE tokenizer like GPT-2's: id 0 is "!", end-of-text is the last id."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    tok.add_special_tokens([END_OF_TEXT])
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                             unk_token=END_OF_TEXT)


def make_tiny_gpt2(out_dir: str | Path, corpus: Iterable[str], n_embd: int = 32, n_layer: int = 2,
                   n_head: int = 2, n_positions: int = 128, vocab_size: int = 400, dropout: float = 0.1,
                   seed: int = 0) -> Path:
    """Save a random GPT-2 and a tokenizer trained on ``corpus`` into ``out_dir``; returns it."""
    import torch

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus, vocab_size)
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=eos, eos_token_id=eos,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def lm_tokenizer(corpus: Iterable[str], bos_first: bool, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer for a tiny LM: ``<s>`` (BOS, id 0) and ``</s>`` (EOS, id 1), and with
    ``bos_first`` every text starts with BOS, as Llama's tokenizers do."""
    specials = ["<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    if bos_first:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def make_tiny_lm(out_dir: str | Path, model_type: str, corpus: Iterable[str], seed: int = 0, **overrides) -> Path:
    """Save a random decoder-only LM of ``model_type`` (one of :data:`TINY_LMS`) and a tokenizer trained on
    ``corpus`` into ``out_dir``; returns it. The tokenizer starts texts with BOS for :data:`BOS_FIRST`."""
    import torch

    out_dir = Path(out_dir)
    tokenizer = lm_tokenizer(corpus, model_type in BOS_FIRST)
    config = AutoConfig.for_model(model_type, **{**TINY_LMS[model_type], "vocab_size": len(tokenizer),
                                                 "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **overrides})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def clip_word_tokenizer(corpus: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer for the tiny CLIP's text tower: ids 0 and 1 are CLIP's start and
    end of text (the end token, 1, is the tower's eos and pad), unknown words share one id, and each
    text is wrapped in start ... end, as CLIP's tokenizer does."""
    specials = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(corpus), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[(t, tok.token_to_id(t)) for t in specials[:2]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[1], unk_token=specials[2], model_max_length=max_length)


def make_tiny_clip(out_dir: str | Path, image_size: int = 32, patch_size: int = 8, width: int = 32,
                   projection_dim: int = 16, seed: int = 0, initializer_factor: float = 1.0,
                   position_scale: float = 1.0, corpus: Iterable[str] | None = None) -> Path:
    """Save a random CLIP (both towers) and its image processor into ``out_dir``; returns it.

    With ``corpus``, also a word-level tokenizer of its words (:func:`clip_word_tokenizer`), for
    the text tower (CLIPScore).

    The processor resizes the shortest side to ``image_size`` and centre-crops, as OpenAI's does.
    At the default initialisation an untrained ViT's embedding hardly depends on the image or on
    where things are in it; ``initializer_factor`` (a CLIPConfig field) scales every initial weight
    and ``position_scale`` the position embeddings, so that the embeddings can tell images apart.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    out_dir = Path(out_dir)
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                 initializer_factor=float(initializer_factor))
    text = dict(tower, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(text_config=text,
                        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
                        projection_dim=projection_dim, initializer_factor=float(initializer_factor))
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.mul_(position_scale)
    model.save_pretrained(out_dir)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    if corpus is not None:
        clip_word_tokenizer(corpus, text["vocab_size"], text["max_position_embeddings"]).save_pretrained(out_dir)
    return out_dir


def make_tiny_siglip(out_dir: str | Path, image_size: int = 32, patch_size: int = 8, width: int = 32,
                     seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    """Save a random SigLIP (both towers) and its image processor into ``out_dir``; returns it.

    The processor is SigLIP's: the whole image resized to ``image_size`` square, no crop, mean =
    std = 0.5. With ``corpus``, also SigLIP's tokenizer class over a SentencePiece model trained on it
    (padding and end of text ``</s>``, id 1), for the text tower. At SigLIP's initialisation the
    embeddings already tell images apart.
    """
    import io

    import sentencepiece
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

    out_dir = Path(out_dir)
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tower, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = SiglipConfig(text_config=text, vision_config=dict(tower, image_size=image_size, patch_size=patch_size))
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(out_dir)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    if corpus is not None:
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(list(corpus)), model_writer=model,
                                                 vocab_size=text["vocab_size"] - 40, hard_vocab_limit=False, pad_id=0,
                                                 eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
        (out_dir / "spiece.model").write_bytes(model.getvalue())
        SiglipTokenizer(str(out_dir / "spiece.model"), model_max_length=text["max_position_embeddings"]
                        ).save_pretrained(out_dir)
    return out_dir


def make_tiny_resnet_clip(path: str | Path, image_size: int = 64, width: int = 8, output_dim: int = 24,
                          layers: tuple[int, int, int, int] = (1, 1, 1, 1), seed: int = 0) -> Path:
    """Save a random ResNet CLIP image tower as an OpenAI CLIP file (``visual.*`` weights and the
    three scalars OpenAI saves beside them) at ``path``; returns it.

    ``image_size`` must be a multiple of 32 (the tower's total stride); ``width`` an even number.
    The convolutions get He initialisation, so that activations keep their scale through the
    layers and the embedding depends on the image (at PyTorch's default it is nearly constant).
    """
    import torch

    from clipcap.files import atomic_write
    from clipcap.resnet_clip import ModifiedResNet

    torch.manual_seed(seed)
    tower = ModifiedResNet(layers, output_dim, width * 32 // 64, image_size, width)
    for module in tower.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    state.update(input_resolution=torch.tensor(image_size), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path
