package fuse

import (
	"slices"
	"strings"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/quant"
)

// MXFP4 experts (gpt-oss's released format): a parameter such as
// model.layers.0.mlp.experts.gate_up_proj [E, in, out] is stored as
// gate_up_proj_blocks (U8 [E, out, in/32, 16]) and gate_up_proj_scales
// (U8 [E, out, in/32], E8M0), in the order before transformers'
// convert_moe_packed_tensors transposes it. The fuse works on the
// parameter as transformers' dequantizing loader makes it ([E, in, out],
// the model's dtype) and writes it under the parameter's name, or
// transposes the sum back and requantizes it (keep_format).

// findMXFP4 finds the base's MXFP4 expert tensors and checks their shapes.
func (q *quantPlan) findMXFP4(base *modelfolder.Folder) error {
	dt := configDType(base)
	for _, n := range base.Names() {
		dense, ok := strings.CutSuffix(n, "_blocks")
		if !ok {
			continue
		}
		file := stateFile(base, n)
		sn := dense + "_scales"
		info, _ := base.Info(n)
		sinfo, ok := base.Info(sn)
		if !ok {
			return errs.Value("%s: the MXFP4 blocks %s have no scales tensor %s", file, n, sn)
		}
		if info.RawDType != "U8" || len(info.Shape) != 4 || info.Shape[3] != 16 {
			return errs.Value("%s: tensor %s has dtype %s and shape %v; MXFP4 blocks are U8 [experts, rows, groups, 16]", file, n, info.RawDType, info.Shape)
		}
		if sinfo.RawDType != "U8" || !slices.Equal(sinfo.Shape, info.Shape[:3]) {
			return errs.Value("%s: tensor %s has dtype %s and shape %v; the blocks %s %v need U8 scales of shape %v",
				stateFile(base, sn), sn, sinfo.RawDType, sinfo.Shape, n, info.Shape, info.Shape[:3])
		}
		s := info.Shape
		qt := &quantTensor{format: qMXFP4, weight: n, dense: dense, shape: []int{s[0], s[2] * 32, s[1]}, dtype: dt, file: file,
			stats: map[string]string{"scales": sn}}
		if err := q.add(base, qt); err != nil {
			return err
		}
	}
	return nil
}

// readMXFP4Scales reads the E8M0 scales of an MXFP4 weight of nblocks
// bytes, refusing the NaN exponent (0xFF).
func (qt *quantTensor) readMXFP4Scales(base *modelfolder.Folder, nblocks int) ([]byte, error) {
	sn := qt.stats["scales"]
	sc, err := base.ReadRaw(sn, nil)
	if err != nil {
		return nil, err
	}
	if 16*len(sc) != nblocks {
		return nil, errs.Value("%s: tensor %s has %d scales for the %d bytes of %s (16 bytes a scale)", stateFile(base, sn), sn, len(sc), nblocks, qt.weight)
	}
	if i := slices.Index(sc, 0xFF); i >= 0 {
		return nil, errs.Value("%s: tensor %s holds the E8M0 NaN scale (0xFF) at element %d", stateFile(base, sn), sn, i)
	}
	return sc, nil
}

// mxfp4Dims are an MXFP4 weight's experts, stored rows (out) and columns
// (in).
func (qt *quantTensor) mxfp4Dims() (experts, rows, cols int) {
	return qt.shape[0], qt.shape[2], qt.shape[1]
}

// mxfp4Dequantize decodes whole experts into dst ([k, in, out], starting
// at element lo of the parameter) from the blocks and scales of all of
// them, unrounded.
func (qt *quantTensor) mxfp4Dequantize(dst []float32, blocks, scales []byte, lo int) {
	_, rows, cols := qt.mxfp4Dims()
	per := rows * cols
	e0 := lo / per
	g := cols / 32
	parallel.For(len(dst)/per, 1, func(a, b int) {
		tmp := make([]float32, per)
		for k := a; k < b; k++ {
			e := e0 + k
			quant.MXFP4Dequantize(tmp, blocks[e*rows*g*16:(e+1)*rows*g*16], scales[e*rows*g:(e+1)*rows*g])
			transposeInto(dst[k*per:(k+1)*per], tmp, rows, cols)
		}
	})
}

// mxfp4Quantize transposes x ([E, in, out]) back to the stored order and
// encodes it.
func (qt *quantTensor) mxfp4Quantize(x []float32) (blocks, scales []byte) {
	experts, rows, cols := qt.mxfp4Dims()
	per := rows * cols
	g := cols / 32
	blocks, scales = make([]byte, experts*rows*g*16), make([]byte, experts*rows*g)
	parallel.For(experts, 1, func(a, b int) {
		tmp := make([]float32, per)
		for e := a; e < b; e++ {
			transposeInto(tmp, x[e*per:(e+1)*per], cols, rows)
			quant.MXFP4Quantize(blocks[e*rows*g*16:(e+1)*rows*g*16], scales[e*rows*g:(e+1)*rows*g], tmp)
		}
	})
	return blocks, scales
}

// transposeInto writes src (r x c) transposed into dst (c x r).
func transposeInto(dst, src []float32, r, c int) {
	for i := range r {
		row := src[i*c : (i+1)*c]
		for j, v := range row {
			dst[j*r+i] = v
		}
	}
}

// mxfp4Param is the output tensor of an MXFP4 expert parameter (by its
// parameter name), or nil.
func (p *fusePlan) mxfp4Param(param string) *fuseTensor {
	if p.quant == nil {
		return nil
	}
	for _, n := range []string{param, param + "_blocks"} {
		if t := p.byName[n]; t != nil && t.quant != nil && t.quant.format == qMXFP4 {
			return t
		}
	}
	return nil
}

// renameOutput writes t under another name than its base tensor's.
func (p *fusePlan) renameOutput(t *fuseTensor, name string) {
	delete(p.byName, t.name)
	if p.renamed == nil {
		p.renamed = map[string]string{}
	}
	p.renamed[t.src] = name
	t.name = name
	p.byName[name] = t
}
