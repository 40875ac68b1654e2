package gomerge

import (
	"context"
	"sync"
	"unsafe"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/torchrng"
	"gomerge/gomerge/safetensors"
)

// TorchMasks asks an in-memory merge to draw DARE's keep-masks itself,
// exactly as torch.bernoulli draws them from torch's CPU generator (the
// drop-in's default, which reproduces PEFT under torch.manual_seed): the
// runs, one after another, fill the uint8 buffer Out from the generator's
// state, which is advanced in place. The sources' mask addresses point into
// Out. Python reads torch's state before the merge and sets it after.
//
// The masks are drawn in order while the modules whose masks are complete
// are merged (the generator is sequential; the merge is not).
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

// maskChunk is how many masks the drawing publishes at a time.
const maskChunk = 1 << 16

// maskStream draws a TorchMasks in the background; wait blocks until a
// prefix of the buffer is drawn.
type maskStream struct {
	mu     sync.Mutex
	cond   *sync.Cond
	filled int // masks drawn so far
	done   bool
	err    error
	pos    int // the generator's position once done
}

// check validates the runs and returns their total length.
func (m *TorchMasks) check() (int, error) {
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
	if err := (&torchrng.MT19937{Pos: m.Pos}).Check(); err != nil {
		return 0, errs.Value("torch_masks: %v", err)
	}
	return total, nil
}

// start checks the request and starts drawing the masks; it returns their
// total number.
func (m *TorchMasks) start(ctx context.Context) (*maskStream, int, error) {
	total, err := m.check()
	if err != nil {
		return nil, 0, err
	}
	s := &maskStream{}
	s.cond = sync.NewCond(&s.mu)
	g := &torchrng.MT19937{Pos: m.Pos}
	state := unsafe.Slice((*uint32)(unsafe.Pointer(&viewMemory(m.State, 4*torchrng.StateWords)[0])), torchrng.StateWords)
	copy(g.State[:], state)
	out := viewMemory(m.Out, total)
	go func() {
		err := m.draw(ctx, g, out, s)
		if err == nil {
			copy(state, g.State[:])
		}
		s.mu.Lock()
		s.done, s.err, s.pos = true, err, g.Pos
		s.cond.Broadcast()
		s.mu.Unlock()
	}()
	return s, total, nil
}

// draw fills out run by run, publishing every maskChunk masks.
func (m *TorchMasks) draw(ctx context.Context, g *torchrng.MT19937, out []byte, s *maskStream) error {
	off := 0
	for _, r := range m.Runs {
		for n := r.N; n > 0; {
			k := min(n, maskChunk)
			if err := g.Bernoulli(out[off:off+k], float32(r.P)); err != nil {
				return errs.Value("torch_masks: %v", err)
			}
			off, n = off+k, n-k
			if ctx.Err() != nil {
				return errs.ErrCancelled
			}
			s.mu.Lock()
			s.filled = off
			s.cond.Broadcast()
			s.mu.Unlock()
		}
	}
	return nil
}

// wait blocks until the first end masks are drawn (or the drawing failed).
func (s *maskStream) wait(end int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.filled < end && !s.done {
		s.cond.Wait()
	}
	if s.err != nil {
		return s.err
	}
	if s.filled < end {
		return errs.Value("torch_masks: a mask ends at %d, beyond the %d masks drawn", end, s.filled)
	}
	return nil
}

// finish waits for the whole drawing and returns the generator's position.
func (s *maskStream) finish() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for !s.done {
		s.cond.Wait()
	}
	return s.pos, s.err
}

// maskEnd is how far into the TorchMasks buffer at out (of total bytes) the
// masks of a module's sources reach (0 for masks elsewhere).
func maskEnd(mm MemModule, out uintptr, total int) int {
	end := 0
	for _, s := range mm.Sources {
		for _, m := range []struct {
			ptr uintptr
			n   int
		}{{s.MaskA, safetensors.Numel(s.AShape)}, {s.MaskB, safetensors.Numel(s.BShape)}} {
			if m.ptr >= out && m.ptr < out+uintptr(total) {
				end = max(end, int(m.ptr-out)+m.n)
			}
		}
	}
	return end
}
