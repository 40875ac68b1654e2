// Package adapter reads PEFT LoRA adapter directories: adapter_config.json
// and its rank and alpha patterns (config.go, pattern.go), the LoRA modules
// of adapter_model.safetensors (adapter.go, one loader for merges and
// fuses), an adapter's summary (inspect.go), and the per-adapter weights of
// a merge: a number, or module-name patterns with PEFT's first-match rule
// and gradients over the layers (weights.go).
package adapter
