// Package gguf writes a PEFT LoRA adapter as a GGUF LoRA adapter that
// llama.cpp (and so ollama and llama-cpp-python) loads with --lora. It
// reads only the base model's config.json: the architecture, the layer and
// head counts, and whether the embeddings are tied.
//
// The file is what llama.cpp's convert_lora_to_gguf.py writes, with the
// scaling made exact: llama.cpp scales each pair by user_scale * alpha / r
// (r from B's shape), or by user_scale alone when adapter.lora.alpha is 0.
// The export writes alpha = 0 and multiplies each module's own PEFT scale
// (alpha/r, alpha/sqrt(r) with rsLoRA, rank_pattern and alpha_pattern
// applied) into B, so that every scaling rule loads with PEFT's numbers.
//
//   - arch.go: the supported architectures (llama.cpp's names, the module
//     name maps of gguf-py's tensor_mapping, the Q/K permutation rule).
//   - permute.go: llama.cpp's RoPE row permutation of Wq/Wk, onto B.
//   - q8.go: the Q8_0 quantizer, bit for bit ggml's reference.
//   - file.go: the GGUF v3 container (header, metadata, tensor infos, data).
//   - export.go: Export, an adapter directory to one .gguf file, atomically.
package gguf
