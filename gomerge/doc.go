// Package gomerge merges LoRA adapters the way Hugging Face PEFT's
// LoraModel.add_weighted_adapter does, working directly on PEFT adapter
// directories (adapter_config.json + adapter_model.safetensors).
//
// The package is organised one concept per file:
//
//   - errors.go:  typed errors that the Python layer maps to exception classes
//   - dtype.go:   F32 / BF16 / F16 conversion loops
//   - tensorio.go: safetensors reading and writing
//   - config.go, pattern.go: adapter_config.json and rank/alpha patterns
//   - adapter.go: an adapter directory as a set of LoRA modules
//   - combine.go: element-wise combination primitives (task arithmetic)
//   - lowrank.go: exact SVD of a sum of low-rank products (thin QRs + core SVD)
//   - merge_linear.go, merge_cat.go, merge_svd.go: one file per merge family
//   - merge.go:   validation, planning, parallel execution and output
//   - output.go:  atomic writing of the merged adapter directory
package gomerge
