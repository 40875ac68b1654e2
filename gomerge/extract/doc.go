// Package extract extracts a LoRA adapter from a fine-tuned model folder and
// its base: dW = W_ft - W_base per linear module, factorised by a seeded
// randomized SVD (B = U S, A = V^T), the modules that are not linear
// compared and saved whole (modules_to_save) when named or changed, and the
// adapter written atomically with its config and card (package card).
//
// It imports the packages below the commands (linalg, modelfolder,
// safetensors, adapter, ...), never gomerge itself.
package extract
