"""Random BLIP-2 models of a preset shape, built offline from configs (tests, benchmarks and the GPU
rehearsal: no download, no pretrained weights)."""
from __future__ import annotations

from dimkit.errors import ConfigError

#: BLIP-2 shapes: ``tiny`` for tests (~0.5 M parameters), ``small`` for CPU benchmarks, and
#: ``opt-2.7b`` = the shape of DIM's Salesforce/blip2-opt-2.7b (ViT-g, 32 queries, OPT-2.7B; 3.8 B
#: parameters: GPU only) for throughput numbers with random weights.
BLIP2_PRESETS: dict[str, dict] = {
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             patch_size=16),
                 qformer=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
                 text=dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
                           num_attention_heads=2),
                 vocab=1000, queries=8),
    "small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              patch_size=16),
                  qformer=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
                  text=dict(hidden_size=512, ffn_dim=2048, word_embed_proj_dim=512, num_hidden_layers=6,
                            num_attention_heads=8),
                  vocab=8000, queries=32),
    "opt-2.7b": dict(vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                 num_attention_heads=16, patch_size=14),
                     qformer=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072),
                     text=dict(hidden_size=2560, ffn_dim=10240, word_embed_proj_dim=2560, num_hidden_layers=32,
                               num_attention_heads=32),
                     vocab=50272, queries=32),
}


def random_blip2(preset: str = "tiny", *, seed: int = 0, sharpen: bool = True, dtype=None, device: str = "cpu"):
    """A random ``Blip2ForConditionalGeneration`` + ``Blip2Processor`` of a preset shape, built offline.

    The tokenizer is word-level (``<pad> <unk> </s> <image> w4 ...``); ``sharpen`` scales the language
    model's weights so that greedy answers differ between images (random init repeats one token).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessorPil, OPTConfig, PreTrainedTokenizerFast)

    if preset not in BLIP2_PRESETS:
        raise ConfigError(f"unknown BLIP-2 preset {preset!r}; choose from {', '.join(BLIP2_PRESETS)}")
    p = BLIP2_PRESETS[preset]
    words = ["<pad>", "<unk>", "</s>", "<image>"] + [f"w{i}" for i in range(4, p["vocab"])]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="</s>", bos_token="</s>")
    vision = Blip2VisionConfig(image_size=224, **p["vision"])
    qformer = Blip2QFormerConfig(vocab_size=p["vocab"], encoder_hidden_size=p["vision"]["hidden_size"],
                                 **p["qformer"])
    text = OPTConfig(vocab_size=p["vocab"], bos_token_id=2, eos_token_id=2, pad_token_id=1, **p["text"])
    # The processor adds <image> itself; the model must know its id (3 in this vocabulary).
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=p["queries"], image_token_index=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dtype is not None or device != "cpu":
            torch_dtype = dtype or torch.float32
            with torch.device(device):
                model = Blip2ForConditionalGeneration(cfg).to(torch_dtype)
        else:
            model = Blip2ForConditionalGeneration(cfg)
        model.eval()
        if sharpen:
            with torch.no_grad():
                for q in model.language_model.parameters():
                    q.mul_(30.0 if preset == "tiny" else 8.0)
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 224, "width": 224}),
                               tokenizer=tok, num_query_tokens=p["queries"])
    return model, processor
