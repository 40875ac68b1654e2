// Package safetensors reads and writes the safetensors files of LoRA
// adapters: a validated, streaming reader (Open: the header is checked
// against the file before anything is allocated, tensors are read on
// demand, converted to float32 and checked for NaN and Inf) and a writer
// (Create) whose tensors, all declared up front, arrive in any order from
// any goroutine, with the F32 / BF16 / F16 conversions (the loops are those
// of package kernels). Its errors are typed (package errs).
//
// The package is organised one concept per file:
//
//   - dtype.go: the storage types, their names, and the conversion to and from float32
//   - stfile.go: the reader (File) and the writer (Writer)
//   - tensorio.go: a tensor as stored (RawTensor), in memory or in an open file
package safetensors
