package fuse

import (
	"context"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"time"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// fuseDelayEnv, for tests only, slows every output tensor down by that many
// milliseconds, so that a test can kill a fuse while it runs.
const fuseDelayEnv = "GOMERGE_TEST_FUSE_DELAY_MS"

// writeFused writes the planned output folder: every shard's header first,
// then the tensors on all cores (one tensor per worker at a time, each
// written at its place as soon as it is done), then the index, config,
// copied files and model card, and finally the rename into place.
func writeFused(ctx context.Context, opts *Options, p *fusePlan, base *modelfolder.Folder, progress *parallel.Progress) error {
	out, err := modelfolder.Create(opts.OutputDir, opts.Overwrite)
	if err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			out.Abort()
		}
	}()
	writerOf := map[string]*safetensors.Writer{}
	var writers []*safetensors.Writer
	closeAll := func() error {
		var first error
		for _, w := range writers {
			if err := w.Close(); err != nil && first == nil {
				first = err
			}
		}
		writers = nil
		return first
	}
	defer closeAll()
	for _, s := range p.shards {
		outs := make([]safetensors.OutTensor, len(s.Tensors))
		for i, n := range s.Tensors {
			t := p.byName[n]
			outs[i] = safetensors.OutTensor{Name: n, DType: t.dtype, Shape: t.storedShape(), RawDType: t.rawDType}
		}
		w, err := out.CreateShard(s.Name, outs)
		if err != nil {
			return err
		}
		writers = append(writers, w)
		for _, n := range s.Tensors {
			writerOf[n] = w
		}
	}
	if progress != nil {
		progress.Total.Store(int64(len(p.tensors)))
	}
	if p.quant != nil {
		p.quant.writers = writerOf
	}
	defer holdMemoryLimit(2*p.largestCost() + 256<<20)()
	if err := fuseTensors(ctx, opts, p, base, writerOf, progress); err != nil {
		return err
	}
	if err := closeAll(); err != nil {
		return err
	}
	if p.indexed {
		if err := out.WriteIndex(p.shards, p.totalSize); err != nil {
			return err
		}
	}
	var skip []string
	if p.untie || opts.DType != "" {
		cfg := base.CloneConfig()
		if p.untie {
			cfg["tie_word_embeddings"] = false
		}
		if p.quant != nil && !p.quant.keep {
			delete(cfg, "quantization_config") // written dequantized
		}
		if opts.DType != "" {
			dt, _ := safetensors.ParseDType(opts.DType)
			cfg["dtype"] = dt.TorchName()
			if _, ok := cfg["torch_dtype"]; ok {
				cfg["torch_dtype"] = dt.TorchName()
			}
		}
		if err := out.WriteJSON(modelfolder.ConfigFile, cfg); err != nil {
			return err
		}
		skip = append(skip, modelfolder.ConfigFile)
	}
	if err := out.CopyFiles(base, skip...); err != nil {
		return err
	}
	res := p.result(opts)
	if p.quant != nil {
		p.quant.finish(opts, res)
	}
	if err := out.WriteFile("README.md", []byte(ModelCard(opts, res))); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return errs.ErrCancelled
	}
	if err := out.Commit(); err != nil {
		return err
	}
	committed = true
	return nil
}

// fuseTensors computes and writes every output tensor on opts.Workers
// goroutines (twice the cores by default); the first error stops them all.
func fuseTensors(ctx context.Context, opts *Options, p *fusePlan, base *modelfolder.Folder,
	writerOf map[string]*safetensors.Writer, progress *parallel.Progress) error {
	delay := time.Duration(0)
	if ms, err := strconv.Atoi(os.Getenv(fuseDelayEnv)); err == nil && ms > 0 {
		delay = time.Duration(ms) * time.Millisecond
	}
	budget := newMemBudget(p.largestCost())
	workers := opts.Workers
	if workers <= 0 {
		// twice the cores: while some tensors wait on the disk (a read, a throttled write), others compute; the
		// memory budget bounds what they hold
		workers = 2 * runtime.GOMAXPROCS(0)
	}
	raws := make([][]byte, workers) // each worker's buffer for copies
	bufs := newTensorBuffers(budget.limit)
	return parallel.RunJobs(ctx, len(p.tensors), workers, progress, func(w, i int) (err error) {
		t := p.tensors[i]
		cost := t.memCost()
		budget.acquire(cost)
		raws[w], err = fuseOne(ctx, p, t, base, writerOf[t.name], raws[w], bufs)
		budget.release(cost)
		if err == nil && delay > 0 {
			time.Sleep(delay)
		}
		return err
	})
}

// fuseOne writes one output tensor: copied byte for byte when nothing
// changes it, else decoded to float32 (into a buffer of bufs), changed and
// rounded once. raw is a reusable buffer for copies; the grown buffer is
// returned.
func fuseOne(ctx context.Context, p *fusePlan, t *fuseTensor, base *modelfolder.Folder, w *safetensors.Writer, raw []byte,
	bufs *tensorBuffers) (_ []byte, err error) {
	defer func() {
		if r := recover(); r != nil { // a bug: read errors are returned, never raised
			err = errs.New(errs.KindInternal, "tensor %s: internal error: %v", t.name, r)
		}
	}()
	if p.quant != nil {
		if done, err := p.quant.fuseQuantOne(ctx, p, t, base, w); done {
			return raw, err
		}
	}
	info, _ := base.Info(t.src)
	if len(t.ops) == 0 && (t.dtype == "" || t.dtype == info.DType) {
		return base.CopyTensor(w, t.name, t.src, raw)
	}
	if t.streamed() && info.DType != "" {
		return raw, fuseStreamed(ctx, t, base, info.DType, w)
	}
	// a buffer of the fuse's own (not the pool's power-of-two classes, up to twice the size), given back once
	// written: the tensors in flight and the free buffers stay within the memory budget
	x := bufs.get(safetensors.Numel(t.shape))
	defer bufs.put(x)
	if x, err = base.ReadFloat32Into(x, t.src); err != nil {
		return raw, err
	}
	if err := applyOps(ctx, p, t, x); err != nil {
		return raw, err
	}
	return raw, writeEncoded(w, t.name, t.dtype, x)
}

// encodeChunk is how many values are rounded and written at a time.
const encodeChunk = 1 << 20

// writeEncoded rounds x once to dtype d and writes it as tensor name, a
// chunk at a time (no second copy of the tensor in memory).
func writeEncoded(w *safetensors.Writer, name string, d safetensors.DType, x []float32) error {
	if d == safetensors.F32 {
		return w.WriteTensor(name, safetensors.Float32AsBytes(x))
	}
	buf := pool.Get(encodeChunk / 2)
	defer pool.Put(buf)
	out := safetensors.Float32AsBytes(buf)[:0]
	for lo := 0; lo < len(x); lo += encodeChunk {
		hi := min(lo+encodeChunk, len(x))
		out = safetensors.EncodeInto(out[:0], d, x[lo:hi])
		if err := w.WriteTensorPart(name, int64(lo*d.Size()), out); err != nil {
			return err
		}
	}
	if len(x) == 0 {
		return w.WriteTensor(name, nil)
	}
	return nil
}

// memCost is the memory a worker holds while it computes tensor t: the
// float32 tensor, its encoded copy and the factors' float64 work space (0
// for a tensor copied as it is, which moves inside the kernel).
func (t *fuseTensor) memCost() int64 {
	if t.quant != nil { // one at a time (quantPlan.heavy): the dequantized base and the sum in float32, the bytes
		return 5 * int64(safetensors.Numel(t.shape))
	}
	if len(t.ops) == 0 {
		return 0
	}
	if t.streamed() {
		return t.streamCost()
	}
	n := int64(safetensors.Numel(t.shape))
	return 4*n + n/2 // the float32 tensor; the factors' work space is well below n/2 bytes for ranks under 1/16 of a side
}

// memBudget bounds the memory of the tensors being computed at once: two
// of the largest, so that peak memory is a small multiple of the largest
// tensor whatever the number of cores (a tensor's own work is spread over
// all cores, so fewer tensors at once cost little speed).
type memBudget struct {
	mu    sync.Mutex
	cond  *sync.Cond
	free  int64
	limit int64
}

// largestCost is the largest memCost of the plan's tensors.
func (p *fusePlan) largestCost() int64 {
	largest := int64(0)
	for _, t := range p.tensors {
		largest = max(largest, t.memCost())
	}
	return largest
}

func newMemBudget(largest int64) *memBudget {
	b := &memBudget{limit: 2 * largest, free: 2 * largest}
	b.cond = sync.NewCond(&b.mu)
	return b
}

// acquire waits until cost fits (a cost above the limit waits for all others).
func (b *memBudget) acquire(cost int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.free < min(cost, b.limit) {
		b.cond.Wait()
	}
	b.free -= cost
}

func (b *memBudget) release(cost int64) {
	b.mu.Lock()
	b.free += cost
	b.mu.Unlock()
	b.cond.Broadcast()
}

var (
	memLimitMu    sync.Mutex
	memLimitUsers int
	memLimitPrev  int64
)

// holdMemoryLimit sets Go's soft memory limit for the duration of a fuse
// (unless one is set already, by GOMEMLIMIT or the caller), so that the
// collector hands the freed tensors back instead of letting the heap grow
// to twice its live size; the returned function restores it when the last
// concurrent fuse ends.
func holdMemoryLimit(limit int64) func() {
	memLimitMu.Lock()
	defer memLimitMu.Unlock()
	if memLimitUsers == 0 {
		memLimitPrev = debug.SetMemoryLimit(-1)
		if memLimitPrev == math.MaxInt64 {
			debug.SetMemoryLimit(limit)
		}
	}
	memLimitUsers++
	return func() {
		memLimitMu.Lock()
		defer memLimitMu.Unlock()
		if memLimitUsers--; memLimitUsers == 0 {
			debug.SetMemoryLimit(memLimitPrev)
		}
	}
}
