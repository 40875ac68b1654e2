package gomerge

import (
	"unsafe"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/torchrng"
)

// TorchMasks asks an in-memory merge to draw DARE's keep-masks itself,
// exactly as torch.bernoulli draws them from torch's CPU generator (the
// drop-in's default, which reproduces PEFT under torch.manual_seed): the
// runs, one after another, fill the uint8 buffer Out from the generator's
// state, which is advanced in place. The sources' mask addresses point into
// Out. Python reads torch's state before the merge and sets it after.
type TorchMasks struct {
	State uintptr    `json:"state"` // the generator's 624 state words (uint32), read and advanced in place
	Pos   int        `json:"pos"`   // index of the next state word (624: twist first)
	Out   uintptr    `json:"out"`   // uint8 buffer of the runs' total length
	Runs  []TorchRun `json:"runs"`
}

// TorchRun is one run of masks drawn with the same probability: N elements
// of probability P (the float32 value of torch's probability tensor, of the
// factor's dtype: a bfloat16 0.2 is not a float32 0.2).
type TorchRun struct {
	N int     `json:"n"`
	P float64 `json:"p"`
}

// draw fills the masks and returns the generator's new position.
func (m *TorchMasks) draw() (int, error) {
	total := 0
	for i, r := range m.Runs {
		if r.N < 0 || !(r.P >= 0 && r.P <= 1) {
			return 0, errs.Value("torch_masks: run %d has %d elements of probability %v", i, r.N, r.P)
		}
		total += r.N
	}
	if m.State == 0 || (m.Out == 0 && total > 0) {
		return 0, errs.Value("torch_masks: missing state or output buffer")
	}
	g := torchrng.MT19937{Pos: m.Pos}
	if err := g.Check(); err != nil {
		return 0, errs.Value("torch_masks: %v", err)
	}
	state := unsafe.Slice((*uint32)(unsafe.Pointer(&viewMemory(m.State, 4*torchrng.StateWords)[0])), torchrng.StateWords)
	copy(g.State[:], state)
	out := viewMemory(m.Out, total)
	for _, r := range m.Runs {
		if err := g.Bernoulli(out[:r.N], float32(r.P)); err != nil {
			return 0, errs.Value("torch_masks: %v", err)
		}
		out = out[r.N:]
	}
	copy(state, g.State[:])
	return g.Pos, nil
}
