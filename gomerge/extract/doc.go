// Package extract extracts a LoRA adapter from a fine-tuned model folder and
// its base: dW = W_ft - W_base per linear module, factorised by a seeded
// randomized SVD. Its files follow the steps:
//
//   - extract.go: the options, the result, Extract (the steps in order) and
//     the gathering of the jobs' outcomes into the result
//   - plan.go: the two folders checked against each other (same tensors,
//     shapes and float dtypes), their tensors grouped into jobs
//   - run.go: the jobs run on all cores, each reading its tensors from both
//     folders
//   - compare.go: the modules that are not factorised, compared byte for
//     byte and saved whole (modules_to_save) when named or changed
//   - factorize.go: each linear module's dW factorised at a fixed rank or by
//     the energy rule (B = U S, A = V^T)
//   - write.go: the adapter's tensors and adapter_config.json, committed
//     atomically with the card
//   - card.go: the extracted adapter's card (package card)
//
// It imports the packages below the commands (linalg, modelfolder,
// safetensors, adapter, ...), never gomerge itself.
package extract
