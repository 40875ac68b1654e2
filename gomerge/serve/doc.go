// Package serve rewrites PEFT LoRA adapters into the form a serving engine
// loads with the same numbers (vLLM, SGLang, LoRAX, and a portable form
// that loads on all three), and says whether an adapter loads on each as
// it is.
//
// The rules of each target live in one table (targets.go), each with its
// source. The rewrite (Export) bakes every module's PEFT scale into B,
// writes lora_alpha = r and no rank_pattern / alpha_pattern, and gives
// every module one rank: zero-padded up to the smallest rank the target
// allows (exact), or, with MaxRank, truncated by an exact SVD of the
// module's update, whose discarded singular values are reported.
package serve
