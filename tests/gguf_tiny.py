"""Tiny models for the GGUF export's checks with a real llama.cpp (tests/test_gguf_export.py and benchmark G1):
a base GGUF written from a transformers model with the `gguf` package (no vocabulary: token ids are passed
directly), llama-cpp-python's logits with exact settings, PEFT's logits, and random PEFT adapters."""

from __future__ import annotations

import gguf
import llama_cpp
import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2LMHeadModel, LlamaForCausalLM

IDS = [1, 5, 9, 13, 2, 40, 63, 7, 30, 11, 0, 22]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def permute(w: np.ndarray, n: int) -> np.ndarray:
    """llama.cpp's converter's Wq/Wk row order (LlamaModel.permute)."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_gguf(model: LlamaForCausalLM, path: str, arch: str = "llama") -> None:
    """A llama-like decoder as llama.cpp's converter writes it: `llama` (Wq/Wk rows permuted), `qwen2` (q/k/v
    biases) or `qwen3` (q/k norms, head_dim given)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")
    w.add_vocab_size(cfg.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    if arch == "qwen3":
        names |= {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, name in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            bias = sd.get(f"model.layers.{i}.{hf}.bias")
            if bias is not None:
                w.add_tensor(f"blk.{i}.{name}.bias", bias)
            if arch == "llama" and name == "attn_q":  # qwen2 / qwen3: NeoX RoPE, no permutation
                t = permute(t, cfg.num_attention_heads)
            elif arch == "llama" and name == "attn_k":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def phi3_gguf(model, path: str) -> None:
    """A Phi-3 as llama.cpp's converter writes it: fused qkv_proj (attn_qkv) and gate_up_proj (ffn_up), no
    permutation."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "phi3")
    w.add_context_length(c.max_position_embeddings)
    w.add_key_value(
        "phi3.rope.scaling.original_context_length", c.original_max_position_embeddings, gguf.GGUFValueType.UINT32
    )
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")
    w.add_vocab_size(c.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(c.num_hidden_layers):
        for hf, name in names.items():
            w.add_tensor(f"blk.{i}.{name}.weight", sd[f"model.layers.{i}.{hf}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gemma2_gguf(model, path: str) -> None:
    """A Gemma 2 as llama.cpp's converter writes it: norms + 1 (Gemma's RMSNorm scales by 1 + w), four norms per
    block, the soft-capping and sliding-window keys, no output tensor (tied), no permutation."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "gemma2")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")
    w.add_vocab_size(c.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"] + 1)
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(c.num_hidden_layers):
        for hf, name in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            w.add_tensor(f"blk.{i}.{name}.weight", t + 1 if name.endswith("norm") else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gpt2_gguf(model: GPT2LMHeadModel, path: str) -> None:
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")
    w.add_vocab_size(cfg.vocab_size)
    w.add_tensor("token_embd.weight", sd["transformer.wte.weight"])
    w.add_tensor("position_embd.weight", sd["transformer.wpe.weight"])
    w.add_tensor("output_norm.weight", sd["transformer.ln_f.weight"])
    w.add_tensor("output_norm.bias", sd["transformer.ln_f.bias"])
    w.add_tensor("output.weight", sd["transformer.wte.weight"])
    names = {"ln_1": "attn_norm", "ln_2": "ffn_norm"}
    conv = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for hf, name in names.items():
            w.add_tensor(f"blk.{i}.{name}.weight", sd[p + hf + ".weight"])
            w.add_tensor(f"blk.{i}.{name}.bias", sd[p + hf + ".bias"])
        for hf, name in conv.items():  # Conv1D stores (in, out): transposed, as llama.cpp's converter does
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(sd[p + hf + ".weight"].T))
            w.add_tensor(f"blk.{i}.{name}.bias", sd[p + hf + ".bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_logits(model_path: str, lora: str | None = None, scale: float = 1.0, ids: list[int] = IDS) -> np.ndarray:
    """llama.cpp's logits for every position: one thread, f32 KV cache, no flash attention."""
    kw = dict(lora_path=lora, lora_scale=scale) if lora else {}
    llm = llama_cpp.Llama(
        model_path,
        logits_all=True,
        n_threads=1,
        n_ctx=128,
        type_k=0,
        type_v=0,
        flash_attn=False,
        verbose=False,
        **kw,
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def peft_logits(model: torch.nn.Module, adapter: str | None, ids: list[int] = IDS) -> np.ndarray:
    m = PeftModel.from_pretrained(model, adapter) if adapter else model
    with torch.no_grad():
        out = m(torch.tensor([ids])).logits[0].double().numpy()
    if adapter:
        m.unload()  # leaves the base model as it was
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_adapter(model, path: str, seed: int, targets=LINEAR, **lora) -> str:
    """A PEFT adapter with random (nonzero) A and B, saved at path."""
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=lora.pop("r", 8),
        lora_alpha=lora.pop("lora_alpha", 16),
        target_modules=targets,
        init_lora_weights=False,
        **lora,
    )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # PEFT's random init gives B small values: scale it so the adapter moves the logits
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(20)
    pm.save_pretrained(path)
    pm.unload()
    return path
