package bindings

import (
	"fmt"

	"gomerge/gomerge/quant"
)

// QuantCodec runs one quantization codec (package quant) on the tensors of
// a safetensors file from a JSON request (the fields of
// quant.CodecRequest) and returns "{}" or {"error": {"kind": ...,
// "message": ...}}. The tests compare the codecs with the reference
// libraries through it.
func QuantCodec(request string) (out string) {
	defer func() {
		if p := recover(); p != nil {
			out = errorStatus(fmt.Errorf("internal error: %v", p))
		}
	}()
	var req quant.CodecRequest
	err := decodeRequest(request, &req)
	if err == nil {
		err = quant.RunCodec(req)
	}
	if err != nil {
		return errorStatus(err)
	}
	return "{}"
}
