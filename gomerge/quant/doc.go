// Package quant reads and writes the quantized weight formats of Hugging
// Face model folders, without torch, bit for bit as their reference code
// computes them on CPU:
//
//   - bnb4.go: bitsandbytes NF4 and FP4 (quantize_4bit / dequantize_4bit),
//     with nested (double-quant) absmax and the packed quant_state JSON
//   - bnb8.go: bitsandbytes' 8-bit blockwise code (the nested absmax)
//   - int8.go: bitsandbytes LLM.int8 weights (int8 with a row scale, SCB)
//   - fp8.go: FP8 E4M3 / E5M2 values, blockwise weight_scale_inv
//     (DeepSeek-V3, transformers' fine-grained FP8) and per-tensor or
//     per-channel weight_scale (compressed-tensors)
//   - mxfp4.go: MXFP4 blocks and E8M0 scales (gpt-oss experts)
//
// Every decoder returns float32 values; every encoder takes float32 values
// and rounds as the reference does (its divisions, multiplications and
// tie rules in float32), so that a requantized tensor equals the
// reference quantizer's output on the same input.
package quant
