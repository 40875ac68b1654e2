// Package torchrng reproduces torch's CPU generator (at::mt19937, the
// generator behind torch.manual_seed) and the draws that torch.bernoulli
// makes from it with a probability tensor, so that the PEFT drop-in draws
// PEFT's DARE masks bit for bit without torch's per-element dispatch.
//
// torch.bernoulli(p) on the CPU, for a float32, bfloat16 or float16 p,
// takes one 32-bit word per element, in memory order, and keeps the element
// when (word & 0xFFFFFF) * 2**-24 < float32(p) (ATen's
// bernoulli_distribution<float> over uniform_real_distribution<float>).
package torchrng
