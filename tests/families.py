"""Tiny configs, one per model family: the coverage matrix (tests/test_coverage.py, bench/coverage.py).

Each entry is a ``config.json`` as a dict, small enough that a training step
takes about a second on a laptop CPU, and one that transformers' own config
class accepts as it is (ids within the vocabulary, consistent head sizes).
:func:`available` leaves out the families the installed transformers lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

H: dict[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=256,
)
#: decoders with grouped-query attention (4 heads / 2 KV heads)
DEC: dict[str, Any] = dict(**H, num_key_value_heads=2)
#: special-token ids inside the tiny vocabulary (some configs default to ids of the real one)
IDS: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES: dict[str, dict[str, Any]] = {
    # causal LMs
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], **DEC),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], **DEC),
    "mixtral": dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=4,
        num_experts_per_tok=2,
        **DEC,
    ),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], **DEC),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16, **DEC),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        architectures=["Qwen2MoeForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        **DEC,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        head_dim=16,
        **DEC,
    ),
    "olmoe": dict(
        model_type="olmoe", architectures=["OlmoeForCausalLM"], num_experts=4, num_experts_per_tok=2, **DEC
    ),
    # multi-head latent attention: no grouped KV heads (the latent is shared); query and key
    # heads are nope + rope = 16 wide, values 16
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        **{**DEC, "num_key_value_heads": 4},
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    ),
    "gpt_oss": dict(
        model_type="gpt_oss",
        architectures=["GptOssForCausalLM"],
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        **DEC,
    ),
    "gemma": dict(model_type="gemma", architectures=["GemmaForCausalLM"], head_dim=16, **DEC),
    "gemma2": dict(
        model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16, sliding_window=32, **DEC
    ),
    "gemma3_text": dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16, sliding_window=32, **DEC
    ),
    # a heterogeneous config: head_dim and the like may vary by layer (per_layer_config)
    "gemma4_text": dict(
        model_type="gemma4_text", architectures=["Gemma4ForCausalLM"], head_dim=16, sliding_window=32, **DEC
    ),
    "phi": dict(model_type="phi", architectures=["PhiForCausalLM"], **DEC),
    # Phi3Config defaults pad_token_id to 32000, beyond the tiny vocabulary
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], **DEC, **IDS),
    "gpt2": dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        n_embd=64,
        n_head=4,
        n_layer=2,
        vocab_size=256,
        n_positions=256,
    ),
    "gptj": dict(
        model_type="gptj",
        architectures=["GPTJForCausalLM"],
        n_embd=64,
        n_head=4,
        n_layer=2,
        vocab_size=256,
        n_positions=256,
        rotary_dim=8,
    ),
    "gpt_neox": dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], **H),
    "falcon": dict(
        model_type="falcon",
        architectures=["FalconForCausalLM"],
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=256,
        max_position_embeddings=256,
    ),
    "opt": dict(
        model_type="opt",
        architectures=["OPTForCausalLM"],
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        ffn_dim=128,
        word_embed_proj_dim=64,
        vocab_size=256,
        max_position_embeddings=256,
    ),
    "bloom": dict(
        model_type="bloom",
        architectures=["BloomForCausalLM"],
        hidden_size=64,
        n_head=4,
        n_layer=2,
        vocab_size=256,
    ),
    "olmo2": dict(model_type="olmo2", architectures=["Olmo2ForCausalLM"], **DEC),
    "starcoder2": dict(model_type="starcoder2", architectures=["Starcoder2ForCausalLM"], **DEC),
    "granite": dict(model_type="granite", architectures=["GraniteForCausalLM"], **DEC),
    "cohere": dict(model_type="cohere", architectures=["CohereForCausalLM"], **DEC),
    # encoders
    "bert": dict(model_type="bert", architectures=["BertForMaskedLM"], **H),
    "roberta": dict(model_type="roberta", architectures=["RobertaForMaskedLM"], **H),
    "deberta_v2": dict(model_type="deberta-v2", architectures=["DebertaV2ForMaskedLM"], **H),
    "distilbert": dict(
        model_type="distilbert",
        architectures=["DistilBertForMaskedLM"],
        dim=64,
        n_heads=4,
        n_layers=2,
        hidden_dim=128,
        vocab_size=256,
        max_position_embeddings=256,
    ),
    "electra": dict(model_type="electra", architectures=["ElectraForMaskedLM"], embedding_size=64, **H),
    # encoder-decoders
    "t5": dict(
        model_type="t5",
        architectures=["T5ForConditionalGeneration"],
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        vocab_size=256,
    ),
    "bart": dict(
        model_type="bart",
        architectures=["BartForConditionalGeneration"],
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=256,
        max_position_embeddings=256,
    ),
    # WhisperConfig defaults its token ids to the real vocabulary's (50256, 50257)
    "whisper": dict(
        model_type="whisper",
        architectures=["WhisperForConditionalGeneration"],
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=256,
        num_mel_bins=16,
        max_source_positions=32,
        max_target_positions=64,
        **IDS,
        decoder_start_token_id=3,
        suppress_tokens=[],
        begin_suppress_tokens=[2],
    ),
    # vision
    "vit": dict(
        model_type="vit",
        architectures=["ViTForImageClassification"],
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    ),
    "swin": dict(
        model_type="swin",
        architectures=["SwinForImageClassification"],
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
    ),
    "convnext": dict(
        model_type="convnext",
        architectures=["ConvNextForImageClassification"],
        image_size=32,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_stages=2,
    ),
    # state spaces, hybrids
    "mamba": dict(
        model_type="mamba",
        architectures=["MambaForCausalLM"],
        hidden_size=64,
        num_hidden_layers=2,
        vocab_size=256,
        state_size=8,
    ),
    "jamba": dict(
        model_type="jamba",
        architectures=["JambaForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        **DEC,
    ),
    # multimodal
    "clip": dict(
        model_type="clip",
        architectures=["CLIPModel"],
        text_config=dict(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=128,
            vocab_size=256,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    ),
    "llava": dict(
        model_type="llava",
        architectures=["LlavaForConditionalGeneration"],
        text_config=dict(model_type="llama", **DEC),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=128,
            image_size=16,
            patch_size=8,
            projection_dim=32,
        ),
        image_token_index=255,
    ),
    "qwen2_vl": dict(
        model_type="qwen2_vl",
        architectures=["Qwen2VLForConditionalGeneration"],
        text_config=dict(
            model_type="qwen2_vl_text", **DEC, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}
        ),
        # the special tokens inside the tiny vocabulary (the defaults are Qwen's, ~151k)
        image_token_id=250,
        video_token_id=251,
        vision_start_token_id=252,
        vision_end_token_id=253,
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
    ),
}

#: families that fail in sim for a reason another branch is fixing now: name -> reason
PENDING: dict[str, str] = {}


def available() -> dict[str, dict[str, Any]]:
    """The families whose model type the installed transformers knows, in :data:`FAMILIES`' order."""
    from transformers import CONFIG_MAPPING

    return {name: cfg for name, cfg in FAMILIES.items() if cfg["model_type"] in CONFIG_MAPPING}


def missing() -> list[str]:
    """The families the installed transformers lacks."""
    return [name for name in FAMILIES if name not in available()]


#: the matrix's step shape: tiny, so ~40 families stay fast
BATCH_SIZE = 2
SEQ_LEN = 16
#: the sim with CPU semantics against the cpu engine: the bound, in percent of the cpu engine's peak
AGREEMENT_PCT = 1.0
#: what each variant runs: (engine, mode)
VARIANTS: dict[str, tuple[str, str]] = {
    "sim_train": ("sim", "train"),
    "sim_infer": ("sim", "infer"),
    "cpu_train": ("cpu", "train"),
    "sim_cpu_semantics_train": ("sim_cpu_semantics", "train"),
}


def engine(name: str) -> Any:
    """A fresh engine: ``sim`` (as shipped), ``cpu``, or ``sim_cpu_semantics`` (the trace-fidelity check)."""
    from memprof.engines.cpu import CpuEngine
    from memprof.engines.sim import SimEngine, cpu_semantics_sim

    makers = {"sim": SimEngine, "cpu": CpuEngine, "sim_cpu_semantics": cpu_semantics_sim}
    return makers[name]()


def run(rm: Any, variant: str) -> Any:
    """One variant of the matrix on a resolved model: its Profile (float32, eager attention, AdamW)."""
    from memprof.engines.base import Measure
    from memprof.workload import Workload

    eng, mode = VARIANTS[variant]
    wl = Workload(
        mode=mode, batch_size=BATCH_SIZE, seq_len=SEQ_LEN, dtype="float32", optimizer="adamw", attn="eager"
    )
    return engine(eng).run(rm, wl, track_modules=False, measure=Measure(timeline=False))


def write_config(name: str, folder: Path) -> Path:
    """Write family ``name``'s config as ``folder/name/config.json``; return its path."""
    path = folder / name / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(FAMILIES[name], indent=1))
    return path
