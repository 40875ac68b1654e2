// Package fuse folds LoRA adapters into the weights of their base model, as
// PEFT's merge_and_unload does, streaming over a Hugging Face model folder:
//
//   - fuse.go: the options, the result and Fuse
//   - plan.go: mapping each adapter tensor to the base tensor it changes
//     (LoRA factors, DoRA magnitudes, biases, modules_to_save replacements,
//     tied embeddings), and the merge that runs first when several adapters
//     are combined by a method (methods.Combine)
//   - apply.go: W' = W + s B A summed in float64 (kernels.LowRankRows, the
//     vector kernels), DoRA's norm scaling, biases and replacements, one
//     rounding to each tensor's dtype
//   - write.go: the output model folder, written on all cores within a
//     memory budget and committed atomically
//   - stream.go: a tensor with one LoRA, read, fused and written a block of
//     rows at a time (the common case: the tensor is never whole in memory)
//   - buffers.go: the float32 tensors that are whole in memory, recycled
//   - card.go: the fused model's card (package card)
//
// It imports the packages below the commands (methods, adapter,
// modelfolder, safetensors, ...), never gomerge itself.
package fuse
