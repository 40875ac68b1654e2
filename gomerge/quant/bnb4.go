package quant

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	"gomerge/gomerge/parallel"
)

// Bnb4State is the quant_state of a bitsandbytes 4-bit tensor, stored as
// JSON bytes in the U8 tensor P.weight.quant_state.bitsandbytes__nf4 (or
// __fp4), as QuantState.as_dict(packed=True) writes it.
type Bnb4State struct {
	QuantType string `json:"quant_type"`
	Blocksize int    `json:"blocksize"`
	DType     string `json:"dtype"` // of the dequantized weight: bfloat16, float16, float32
	Shape     []int  `json:"shape"`
	// Nested (double quant): the absmax values are themselves 8-bit blockwise codes.
	NestedBlocksize int      `json:"nested_blocksize,omitempty"`
	NestedDType     string   `json:"nested_dtype,omitempty"`
	NestedOffset    *float64 `json:"nested_offset,omitempty"`
}

// ParseBnb4State decodes and validates a packed quant_state.
func ParseBnb4State(raw []byte) (Bnb4State, error) {
	var s Bnb4State
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&s); err != nil {
		return s, fmt.Errorf("quant_state is not the JSON object bitsandbytes writes: %v", err)
	}
	if s.QuantType != "nf4" && s.QuantType != "fp4" {
		return s, fmt.Errorf("quant_state: quant_type %q is not nf4 or fp4", s.QuantType)
	}
	if s.Blocksize <= 0 || s.Blocksize > 1<<20 {
		return s, fmt.Errorf("quant_state: blocksize %d is not a positive block size", s.Blocksize)
	}
	if len(s.Shape) == 0 {
		return s, fmt.Errorf("quant_state: no shape")
	}
	n := 1
	for _, d := range s.Shape {
		if d <= 0 || d > 1<<31 || n > (1<<40)/d {
			return s, fmt.Errorf("quant_state: shape %v is not a tensor shape", s.Shape)
		}
		n *= d
	}
	switch s.DType {
	case "bfloat16", "float16", "float32":
	default:
		return s, fmt.Errorf("quant_state: dtype %q is not bfloat16, float16 or float32", s.DType)
	}
	if s.Nested() {
		if s.NestedBlocksize <= 0 || s.NestedOffset == nil || math.IsNaN(*s.NestedOffset) || math.IsInf(*s.NestedOffset, 0) {
			return s, fmt.Errorf("quant_state: nested_blocksize %d and nested_offset must be given and finite", s.NestedBlocksize)
		}
	}
	return s, nil
}

// Nested is whether the absmax values are double-quantized.
func (s Bnb4State) Nested() bool { return s.NestedBlocksize != 0 || s.NestedOffset != nil }

// Numel is the number of weight elements.
func (s Bnb4State) Numel() int {
	n := 1
	for _, d := range s.Shape {
		n *= d
	}
	return n
}

// Blocks is the number of absmax values: ceil(numel / blocksize).
func (s Bnb4State) Blocks() int { return ceilDiv(s.Numel(), s.Blocksize) }

// PackedBytes is the size of the packed weight: ceil(numel / 2) bytes.
func (s Bnb4State) PackedBytes() int { return (s.Numel() + 1) / 2 }

// JSON is the state as bitsandbytes packs it (Python's json.dumps of the
// dict, keys in as_dict's order).
func (s Bnb4State) JSON() []byte {
	var b strings.Builder
	fmt.Fprintf(&b, `{"quant_type": %q, "blocksize": %d, "dtype": %q, "shape": [`, s.QuantType, s.Blocksize, s.DType)
	for i, d := range s.Shape {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(d))
	}
	b.WriteString("]")
	if s.Nested() {
		fmt.Fprintf(&b, `, "nested_blocksize": %d, "nested_dtype": %q, "nested_offset": %s`, s.NestedBlocksize, s.NestedDType, PyFloat(*s.NestedOffset))
	}
	b.WriteString("}")
	return []byte(b.String())
}

// PyFloat formats x as Python's repr does (shortest round trip, "1.0",
// "1e-05").
func PyFloat(x float64) string {
	switch {
	case math.IsNaN(x):
		return "NaN"
	case math.IsInf(x, 1):
		return "Infinity"
	case math.IsInf(x, -1):
		return "-Infinity"
	}
	a := math.Abs(x)
	if a != 0 && (a < 1e-4 || a >= 1e16) {
		s := strconv.FormatFloat(x, 'e', -1, 64) // 1e-05 in Python, 1e-05 here
		mant, exp, _ := strings.Cut(s, "e")
		sign := exp[0]
		exp = strings.TrimLeft(exp[1:], "0")
		if len(exp) < 2 {
			exp = strings.Repeat("0", 2-len(exp)) + exp
		}
		return mant + "e" + string(sign) + exp
	}
	s := strconv.FormatFloat(x, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}

// Bnb4 is one bitsandbytes 4-bit tensor: its state and its statistics
// (absmax, or with double quant its 8-bit codes and their own scales).
type Bnb4 struct {
	State          Bnb4State
	QuantMap       []float32 // the 16 values of the code (stored: the FP4 map is normalized)
	Absmax         []float32 // one per block (not nested)
	AbsmaxCodes    []byte    // one per block (nested)
	NestedAbsmax   []float32 // one per nested block
	NestedQuantMap []float32 // 256 (nested)
}

// Check validates the statistics against the state and the packed
// weight's byte count.
func (b *Bnb4) Check(packedBytes int) error {
	s := b.State
	if packedBytes != s.PackedBytes() {
		return fmt.Errorf("the packed weight has %d bytes; quant_state's shape %v needs %d", packedBytes, s.Shape, s.PackedBytes())
	}
	if len(b.QuantMap) != 16 {
		return fmt.Errorf("quant_map has %d values, not 16", len(b.QuantMap))
	}
	if err := finite("quant_map", b.QuantMap); err != nil {
		return err
	}
	nb := s.Blocks()
	if !s.Nested() {
		if len(b.Absmax) != nb {
			return fmt.Errorf("absmax has %d values; %d elements in blocks of %d need %d", len(b.Absmax), s.Numel(), s.Blocksize, nb)
		}
		return finite("absmax", b.Absmax)
	}
	if len(b.AbsmaxCodes) != nb {
		return fmt.Errorf("absmax has %d codes; %d elements in blocks of %d need %d", len(b.AbsmaxCodes), s.Numel(), s.Blocksize, nb)
	}
	if len(b.NestedQuantMap) != 256 {
		return fmt.Errorf("nested_quant_map has %d values, not 256", len(b.NestedQuantMap))
	}
	if want := ceilDiv(nb, s.NestedBlocksize); len(b.NestedAbsmax) != want {
		return fmt.Errorf("nested_absmax has %d values; %d blocks in nested blocks of %d need %d", len(b.NestedAbsmax), nb, s.NestedBlocksize, want)
	}
	if err := finite("nested_absmax", b.NestedAbsmax); err != nil {
		return err
	}
	return finite("nested_quant_map", b.NestedQuantMap)
}

func finite(what string, x []float32) error {
	for i, v := range x {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return fmt.Errorf("%s holds %v at index %d", what, v, i)
		}
	}
	return nil
}

// BlockAbsmax returns the absmax of every block: stored, or with double
// quant nested_quant_map[code] * nested_absmax[b / nested_blocksize] +
// nested_offset in float32, as bitsandbytes' dequantize_blockwise and its
// addition compute it.
func (b *Bnb4) BlockAbsmax() []float32 {
	if !b.State.Nested() {
		return b.Absmax
	}
	off := float32(*b.State.NestedOffset)
	out := make([]float32, len(b.AbsmaxCodes))
	for i, c := range b.AbsmaxCodes {
		out[i] = b.NestedQuantMap[c]*b.NestedAbsmax[i/b.State.NestedBlocksize] + off
	}
	return out
}

// DequantizeRange writes elements [lo, lo+len(dst)) of the weight, as
// Dequantize does, from the block absmax values (BlockAbsmax).
func (b *Bnb4) DequantizeRange(dst []float32, packed []byte, absmax []float32, lo int, round func(float32) float32) {
	bs := b.State.Blocksize
	for j := range dst {
		i := lo + j
		q := packed[i/2]
		if i%2 == 0 {
			q >>= 4
		}
		v := b.QuantMap[q&0xf] * absmax[i/bs]
		if round != nil {
			v = round(v)
		}
		dst[j] = v
	}
}

// Dequantize writes the weight (numel values) in float32: element 2j is
// the high nibble of byte j, 2j+1 the low one, times its block's absmax;
// round, when not nil, then rounds each value to the state's dtype, as
// dequantize_4bit returns it.
func (b *Bnb4) Dequantize(dst []float32, packed []byte, round func(float32) float32) {
	absmax := b.BlockAbsmax()
	parallel.For(b.State.Numel(), 1<<16, func(lo, hi int) { b.DequantizeRange(dst[lo:hi], packed, absmax, lo, round) })
}

// Quantize4 is bitsandbytes' quantize_4bit (its CPU kernel, the default
// torch one) on w: per block absmax = max |w|, scaled = clamp(w * (1 /
// max(absmax, 1e-38)), -1, 1) (the short last block divides instead:
// w / max(absmax, 1e-38)), and the code index is a bucketize on the
// midpoints of the sorted map (ties to the lower bucket). An odd count is
// padded with a scaled 0. packed receives ceil(len(w) / 2) bytes.
func Quantize4(packed []byte, absmax []float32, w []float32, quantMap []float32, blocksize int) {
	order := make([]int, len(quantMap))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(i, j int) bool { return quantMap[order[i]] < quantMap[order[j]] })
	bounds := make([]float32, len(order)-1)
	for i := range bounds {
		bounds[i] = (quantMap[order[i]] + quantMap[order[i+1]]) / 2
	}
	code := func(x float32) byte {
		// bucketize, right=False: the number of bounds strictly below x
		k := sort.Search(len(bounds), func(i int) bool { return !(bounds[i] < x) })
		return byte(order[k])
	}
	n := len(w)
	full := n - n%blocksize
	grain := max(1, (1<<16)/blocksize)
	if blocksize%2 == 1 {
		grain = n // a byte would hold two blocks' codes: one goroutine
	}
	parallel.For(ceilDiv(n, blocksize), grain, func(b0, b1 int) {
		for b := b0; b < b1; b++ {
			quantize4Block(packed, absmax, w, b, blocksize, full, code)
		}
	})
	if n%2 == 1 {
		packed[n/2] |= code(0)
	}
}

// quantize4Block quantizes block b of w (Quantize4).
func quantize4Block(packed []byte, absmax []float32, w []float32, b, blocksize, full int, code func(float32) byte) {
	n := len(w)
	{
		lo, hi := b*blocksize, min((b+1)*blocksize, n)
		am := float32(0)
		for _, v := range w[lo:hi] {
			am = max32(am, abs32(v))
		}
		absmax[b] = am
		d := max(am, 1e-38)
		inv := 1 / d
		for i := lo; i < hi; i++ {
			var s float32
			if lo < full {
				s = w[i] * inv
			} else {
				s = w[i] / d
			}
			q := code(clamp32(s, -1, 1))
			if i%2 == 0 {
				packed[i/2] = q << 4
			} else {
				packed[i/2] |= q
			}
		}
	}
}

// QuantizeBlockwise8 is bitsandbytes 0.50.2's CPU quantize_blockwise
// (csrc/cpu_ops.cpp, quantize_cpu_impl<float>, what double quant runs on
// absmax - offset), bit for bit: per block absmax = max |x| (0: every code
// 0), inv = 1 / absmax and s = clamp(x * inv, -1, 1) in float32, and the
// code index is a 65536-entry lookup table (Blockwise8LUT) read at
// uint16(trunc(fma((s + 1) * 0.5, 65535, 0.5))); the shipped x86-64 build
// fuses that multiply-add (vfmadd213ss); its aarch64 build computes
// (s + 1) * 32767.5 + 0.5 with two roundings (vmlaq_f32) instead, which can
// pick the next bin, so on ARM bitsandbytes may itself differ from this in
// rare codes. The table stands for the nearest
// value of the code only to within its 2 / 65535 bins, so a value near a
// midpoint of the code may get the neighbour of its nearest value.
func QuantizeBlockwise8(codes []byte, absmax []float32, x []float32, code []float32, blocksize int) {
	lut := Blockwise8LUT(code)
	for b := 0; b*blocksize < len(x); b++ {
		lo, hi := b*blocksize, min((b+1)*blocksize, len(x))
		am := float32(0)
		for _, v := range x[lo:hi] {
			am = max32(am, abs32(v))
		}
		absmax[b] = am
		if am == 0 {
			clear(codes[lo:hi])
			continue
		}
		inv := 1 / am
		for i := lo; i < hi; i++ {
			codes[i] = lut[blockwise8Index(float32(x[i]*inv))]
		}
	}
}

// blockwise8Index is the kernel's norm_to_lut_index: clamp s to [-1, 1],
// t = (s + 1) * 0.5 in float32, then fma(t, 65535, 0.5) rounded once to
// float32 and truncated. t * 65535 + 0.5 is exact in float64 whenever it
// can reach 1, so float32(math.FMA(...)) is the float32 fused result.
func blockwise8Index(s float32) uint16 {
	s = clamp32(s, -1, 1)
	t := float32(float32(s+1) * 0.5)
	return uint16(int32(float32(math.FMA(float64(t), 65535, 0.5))))
}

// Blockwise8LUT is the kernel's build_quantize_lut: midpoints m[i] =
// (code[i] + code[i+1]) * 0.5 in float32, and entry i of the table (for
// the value -1 + 2i / 65535 in float32) is the number of leading midpoints
// strictly below that value (the code as given, assumed sorted).
func Blockwise8LUT(code []float32) []byte {
	mid := make([]float32, len(code)-1)
	for i := range mid {
		mid[i] = float32(code[i]+code[i+1]) * 0.5
	}
	lut := make([]byte, 65536)
	k := 0
	for i := range lut {
		v := float32(float32(2*i)/65535) - 1
		for k < len(mid) && mid[k] < v {
			k++
		}
		lut[i] = byte(k)
	}
	return lut
}

// MeanFloat32 is the mean of x as float32: the sum in float64, divided
// and rounded once (within 2^-24 + (n+1) 2^-53 of the exact mean,
// relatively, for x >= 0).
// bitsandbytes' offset is absmax.mean() in torch, which on CPU sums float32
// in float32 in a cascade of vectorized partial sums whose order follows
// the CPU's vector width (AVX2, AVX-512, NEON) and then divides: not
// reproducible across CPUs, so this keeps the correctly rounded mean, which
// torch's lies within gamma_(n+1) * mean|x| of (u = 2^-24).
func MeanFloat32(x []float32) float32 {
	s := 0.0
	for _, v := range x {
		s += float64(v)
	}
	return float32(s / float64(len(x)))
}

// Requantize quantizes w (numel float32 values) into a new Bnb4 with the
// same state and maps: quantize_4bit, then with double quant offset =
// mean(absmax), the codes of absmax - offset in nested blocks, as
// bitsandbytes' quantize_4bit(compress_statistics=True) does.
func (b *Bnb4) Requantize(packed []byte, w []float32) *Bnb4 {
	s := b.State
	absmax := make([]float32, s.Blocks())
	Quantize4(packed, absmax, w, b.QuantMap, s.Blocksize)
	out := &Bnb4{State: s, QuantMap: b.QuantMap}
	if !s.Nested() {
		out.Absmax = absmax
		return out
	}
	off := MeanFloat32(absmax)
	return b.requantNested(out, absmax, off)
}

// RequantizeWithOffset is Requantize with the double quant offset given
// (the reference's float32 mean, for bit-exact comparisons).
func (b *Bnb4) RequantizeWithOffset(packed []byte, w []float32, off float32) *Bnb4 {
	s := b.State
	absmax := make([]float32, s.Blocks())
	Quantize4(packed, absmax, w, b.QuantMap, s.Blocksize)
	out := &Bnb4{State: s, QuantMap: b.QuantMap}
	return b.requantNested(out, absmax, off)
}

func (b *Bnb4) requantNested(out *Bnb4, absmax []float32, off float32) *Bnb4 {
	x := make([]float32, len(absmax))
	for i, v := range absmax {
		x[i] = v - off
	}
	nb := b.State.NestedBlocksize
	out.AbsmaxCodes = make([]byte, len(x))
	out.NestedAbsmax = make([]float32, ceilDiv(len(x), nb))
	QuantizeBlockwise8(out.AbsmaxCodes, out.NestedAbsmax, x, b.NestedQuantMap, nb)
	out.NestedQuantMap = b.NestedQuantMap
	o := float64(off)
	out.State.NestedOffset = &o
	return out
}
