// Package gomerge merges LoRA adapters the way Hugging Face PEFT's
// LoraModel.add_weighted_adapter does, working directly on PEFT adapter
// directories (adapter_config.json + adapter_model.safetensors) or on
// tensors in memory, fuses adapters into the weights of their base
// model (PEFT's merge_and_unload, streaming over a model folder), and
// extracts adapters from fine-tuned models.
//
// The package holds the merge command, organised one concept per file; the
// other commands are packages beside it, and the merge methods they run are
// package methods:
//
//   - options.go, plan.go, merge.go: arguments, the merged adapter's tensors
//     and rank pattern, and running a merge on all cores
//   - memory.go: merges of tensors in a model's memory (the PEFT drop-in)
//   - torchmasks.go: the drop-in's DARE masks, drawn in Go from torch's generator state
//   - card.go: a merged adapter's config and model card (written with package card)
//   - limits.go: memory planning (workers within the available memory, from
//     each method's estimate)
//
// The other commands, which import nothing from this package:
//
//   - fuse (gomerge/gomerge/fuse): the fuse into a base model (options and result; mapping adapter
//     tensors to base tensors; W + s B A, DoRA, biases and replacements; writing the model folder
//     on all cores within a memory budget; its model card)
//   - extract (gomerge/gomerge/extract): a LoRA adapter extracted from a fine-tuned model folder and
//     its base, one file per step: plan (the folders compared), run, compare (modules saved whole),
//     factorize (dW = W_ft - W_base per linear module by the randomized SVD), write (tensors, config
//     and card)
//
// Packages below it, which import nothing from it:
//
//   - methods (gomerge/gomerge/methods): the method table (one row per method: its merge
//     function, parameters, memory estimate and rank rule), the parameter schema, the
//     combination arguments (Combine), the per-module job and its planning (modules paired
//     with the adapters that have them, the merged rank), PEFT's merge primitives (pruning,
//     TIES, task arithmetic), mergekit's pruning, one file per merge family and the span methods
//   - adapter (gomerge/gomerge/adapter): PEFT adapter directories (adapter_config.json, rank and
//     alpha patterns, the LoRA modules, one loader for merges and fuses, Inspect) and the
//     per-adapter weights (a number or module-name patterns and gradients over the layers,
//     checked against the adapters: CheckSources)
//   - linalg (gomerge/gomerge/linalg): the exact SVD of a sum of low-rank products, the
//     randomized SVD of dense updates, and the rank rules (svd_rank as a rank or the energy rule)
//   - parallel (gomerge/gomerge/parallel): parallel loops, the job runner and its Progress
//     counters, and GC headroom
//   - safetensors (gomerge/gomerge/safetensors): validated, streaming safetensors reading and
//     writing, and the F32 / BF16 / F16 storage types and their conversion
//   - kernels (gomerge/gomerge/kernels): the element-wise kernels in portable Go and in
//     AVX2 / AVX-512 vectors (built with GOEXPERIMENT=simd; bit-identical results), the
//     kernel set chosen once from the CPU (GOMERGE_KERNELS forces one), the magnitude
//     threshold selection, sign election and disjoint merge, the half conversions
//   - card (gomerge/gomerge/card): the one model-card writer (Hub metadata, title and
//     introduction, the sections each command fills, the rank table, the usage snippet) and Version
//   - errs: typed errors (ErrKind) that the Python layer maps to exception classes
//   - internal/pool: the float32 scratch buffer pools that they share
//   - internal/torchrng: torch's CPU generator (mt19937) and torch.bernoulli's draws from it,
//     with which an in-memory merge draws the drop-in's DARE masks as PEFT does (TorchMasks)
//   - internal/testutil: the helpers the tests share (test adapters, reference safetensors files)
//   - modelfolder: Hugging Face model folders (config, shards and index, validated against
//     hostile names and contents) and output model folders
//   - internal/atomicdir: the one output protocol of adapters and model folders: a folder
//     written beside its place and renamed into it; and the one "output is an input" rule
//     (CheckApart) of merge, fuse and extract
package gomerge
