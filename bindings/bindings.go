// Package bindings is the flat, stable surface that gopy exposes to Python
// as gomerge._engine. Every function takes and returns strings and integers
// only (requests and results are JSON), never panics across the boundary,
// and reports errors as {"kind": <Python exception name>, "message": ...}
// so that the Python layer can raise the right exception class.
//
// A merge, a fuse and an extraction each run as a job: MergeStart,
// MergeTensorsStart, FuseStart and ExtractStart return its id at once,
// Python polls JobWait (which releases the GIL while it waits) to show
// progress and to stay interruptible, and JobCancel stops it.
package bindings

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"gomerge/gomerge"
	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/extract"
	"gomerge/gomerge/fuse"
	"gomerge/gomerge/gguf"
	"gomerge/gomerge/kernels"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/serve"
)

// EngineVersion returns the engine version, kept equal to the Python package's.
func EngineVersion() string { return gomerge.Version }

// EngineKernels returns, as JSON, the element-wise kernels in use on this
// CPU ("go" (portable), "avx2" or "avx512"), the sets this CPU runs, and
// the error of a GOMERGE_KERNELS request that it cannot honour.
func EngineKernels() string {
	info := struct {
		InUse    string     `json:"in_use"`
		Runnable []string   `json:"runnable"`
		Error    *errorJSON `json:"error,omitempty"`
	}{InUse: kernels.InUse(), Runnable: kernels.Runnable()}
	if err := kernels.Err(); err != nil {
		info.Error = &errorJSON{Kind: string(errs.KindOf(err)), Message: err.Error()}
	}
	b, _ := json.Marshal(info)
	return string(b)
}

type job struct {
	cancel   context.CancelFunc
	progress parallel.Progress
	done     chan struct{}
	result   any
	err      error
}

var (
	jobsMu sync.Mutex
	jobs   = map[int64]*job{}
	nextID int64
)

type errorJSON struct {
	Kind    string `json:"kind"`
	Message string `json:"message"`
}

type status struct {
	State  string     `json:"state"` // running, done, error
	Done   int64      `json:"done"`
	Total  int64      `json:"total"`
	Result any        `json:"result,omitempty"`
	Error  *errorJSON `json:"error,omitempty"`
}

func errorStatus(err error) string {
	b, _ := json.Marshal(status{State: "error", Error: &errorJSON{Kind: string(errs.KindOf(err)), Message: err.Error()}})
	return string(b)
}

// EngineMethods returns the method table as JSON: every merge method's
// name, family, pruning, parameters and one-line doc (methods.Method).
func EngineMethods() string {
	b, _ := json.Marshal(methods.Methods())
	return string(b)
}

// EngineParams returns the parameter schema as JSON: every combination
// argument's name, type, default (as the engine applies it; null where a
// rule of the method gives it), choices, range, whether PEFT's signature
// has it, and one-line doc (methods.Param). The Python layer builds its
// keyword arguments, command-line flags and recipe keys from it.
func EngineParams() string {
	b, _ := json.Marshal(methods.Params())
	return string(b)
}

// RequestKeys returns, as JSON, the keys each request and result carries:
// {"merge": [...], "merge_tensors": [...], "result": [...], ...}. The
// Python layer's tests check that it sends and reads exactly these.
func RequestKeys() string {
	b, _ := json.Marshal(map[string][]string{
		"merge":          jsonKeys(reflect.TypeFor[gomerge.Options]()),
		"merge_tensors":  jsonKeys(reflect.TypeFor[gomerge.MemRequest]()),
		"tensor_module":  jsonKeys(reflect.TypeFor[gomerge.MemModule]()),
		"tensor_source":  jsonKeys(reflect.TypeFor[gomerge.MemSource]()),
		"result":         jsonKeys(reflect.TypeFor[gomerge.Result]()),
		"tensor_result":  jsonKeys(reflect.TypeFor[gomerge.MemResult]()),
		"extract":        jsonKeys(reflect.TypeFor[extract.Options]()),
		"extract_result": jsonKeys(reflect.TypeFor[extract.Result]()),
		"fuse":           jsonKeys(reflect.TypeFor[fuse.Options]()),
		"fuse_result":    jsonKeys(reflect.TypeFor[fuse.Result]()),
		"gguf":           jsonKeys(reflect.TypeFor[gguf.Options]()),
		"gguf_result":    jsonKeys(reflect.TypeFor[gguf.Result]()),
		"profile":        jsonKeys(reflect.TypeFor[serve.Options]()),
		"profile_result": jsonKeys(reflect.TypeFor[serve.Result]()),
	})
	return string(b)
}

// jsonKeys lists the JSON keys of a struct type, embedded structs' included.
func jsonKeys(t reflect.Type) []string {
	var keys []string
	for i := range t.NumField() {
		f := t.Field(i)
		if f.Anonymous && f.Type.Kind() == reflect.Struct {
			keys = append(keys, jsonKeys(f.Type)...)
			continue
		}
		if tag, _, _ := strings.Cut(f.Tag.Get("json"), ","); f.IsExported() && tag != "" && tag != "-" {
			keys = append(keys, tag)
		}
	}
	return keys
}

// decodeRequest decodes a JSON request strictly: an unknown key is a
// ValueError naming it (a misspelt option is never dropped silently), a
// value of the wrong type a TypeError.
func decodeRequest(request string, v any) error {
	dec := json.NewDecoder(bytes.NewReader([]byte(request)))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.More() {
		err = errors.New("trailing data after the request")
	}
	if err == nil {
		return nil
	}
	var ge *errs.Error
	if errors.As(err, &ge) { // a value's own check, such as svd_rank's energy rule
		return ge
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && te.Field != "" {
		return typeError(te)
	}
	if key, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		return &errs.Error{Kind: errs.KindValue, Msg: "invalid merge request: unknown key " + key}
	}
	return &errs.Error{Kind: errs.KindType, Msg: "invalid merge request: " + err.Error()}
}

// typeError names the key of a value of the wrong type: a TypeError, or a
// ValueError for an integer out of the field's range (a negative seed).
func typeError(te *json.UnmarshalTypeError) error {
	key := te.Field[strings.LastIndex(te.Field, ".")+1:]
	t := te.Type
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	want := map[reflect.Kind]string{reflect.Float64: "a number", reflect.Int: "an integer", reflect.Int64: "an integer",
		reflect.Uint64: "an integer in [0, 2**64)", reflect.Bool: "true or false", reflect.String: "a string"}[t.Kind()]
	if t.Kind() == reflect.Slice {
		want = "a list"
	} else if want == "" {
		want = "a " + t.String()
	}
	got := te.Value
	if lit, ok := strings.CutPrefix(got, "number "); ok {
		if !strings.ContainsAny(lit, ".eE") { // an integer that does not fit
			return &errs.Error{Kind: errs.KindValue, Msg: fmt.Sprintf("%s: expected %s, got %s", key, want, lit)}
		}
		got = "the number " + lit
	}
	return &errs.Error{Kind: errs.KindType, Msg: fmt.Sprintf("%s: expected %s, got %s", key, want, got)}
}

// ValidateCombination checks a request's combination arguments (the
// fields of methods.Combine, strictly) against the method table without
// merging, and returns "{}" or {"error": {"kind": ..., "message": ...}}.
// The drop-in calls it before it changes the model.
func ValidateCombination(request string) (out string) {
	defer func() {
		if p := recover(); p != nil {
			out = errorStatus(fmt.Errorf("internal error: %v", p))
		}
	}()
	var c methods.Combine
	err := decodeRequest(request, &c)
	if err == nil {
		err = c.Validate()
	}
	if err != nil {
		return errorStatus(err)
	}
	return "{}"
}

// CheckWeight checks the JSON weight of adapter index (any form a merge
// request's weights take, the command line's PATTERN=W strings included)
// without merging, and returns "{}" or {"error": {"kind": ..., "message":
// ...}}, the message naming weights[index], the pattern and the problem.
// The command line and recipes call it, so that Go is the one validator of
// the weight grammar.
func CheckWeight(index int, weight string) (out string) {
	defer func() {
		if p := recover(); p != nil {
			out = errorStatus(fmt.Errorf("internal error: %v", p))
		}
	}()
	if _, err := adapter.CheckWeight(index, []byte(weight)); err != nil {
		return errorStatus(err)
	}
	return "{}"
}

// MergeStart starts a merge of adapter directories in the background from a
// JSON request (the fields of gomerge.Options) and returns its job id. Every
// outcome, a request that cannot be parsed included, is reported by
// JobWait.
func MergeStart(request string) int64 {
	return startJob(func(ctx context.Context, p *parallel.Progress) (any, error) {
		var opts gomerge.Options
		if err := decodeRequest(request, &opts); err != nil {
			return nil, err
		}
		return gomerge.Merge(ctx, opts, p)
	})
}

// MergeTensorsStart starts a merge of tensors in memory (a gomerge.MemRequest
// in JSON: raw addresses of float32 buffers that the caller keeps alive and
// unmoved until JobWait reports the job finished) and returns its job id.
func MergeTensorsStart(request string) int64 {
	return startJob(func(ctx context.Context, p *parallel.Progress) (any, error) {
		var req gomerge.MemRequest
		if err := decodeRequest(request, &req); err != nil {
			return nil, err
		}
		return gomerge.MergeTensors(ctx, req, p)
	})
}

// ExtractStart starts the extraction of a LoRA adapter from a fine-tuned
// model folder and its base (a extract.Options in JSON) and returns
// its job id; JobWait reports it like a merge.
func ExtractStart(request string) int64 {
	return startJob(func(ctx context.Context, p *parallel.Progress) (any, error) {
		var opts extract.Options
		if err := decodeRequest(request, &opts); err != nil {
			return nil, err
		}
		return extract.Extract(ctx, opts, p)
	})
}

// FuseStart starts a fuse of adapters into their base model (the fields of
// fuse.Options, in JSON) and returns its job id; JobWait reports
// its progress (output tensors) and outcome, JobCancel stops it.
func FuseStart(request string) int64 {
	return startJob(func(ctx context.Context, p *parallel.Progress) (any, error) {
		var opts fuse.Options
		if err := decodeRequest(request, &opts); err != nil {
			return nil, err
		}
		return fuse.Fuse(ctx, opts, p)
	})
}

// GGUFExportStart starts the export of an adapter directory to a GGUF LoRA
// adapter for llama.cpp (the fields of gguf.Options, in JSON) and returns
// its job id; JobWait reports its progress (modules) and outcome.
func GGUFExportStart(request string) int64 {
	return startJob(func(ctx context.Context, p *parallel.Progress) (any, error) {
		var opts gguf.Options
		if err := decodeRequest(request, &opts); err != nil {
			return nil, err
		}
		return gguf.Export(ctx, opts, p)
	})
}

// ProfileStart starts the export of an adapter directory in a serving
// target's form (vllm, sglang, lorax, portable; a serve.Options in JSON)
// and returns its job id; JobWait reports it like a merge.
func ProfileStart(request string) int64 {
	return startJob(func(ctx context.Context, p *parallel.Progress) (any, error) {
		var opts serve.Options
		if err := decodeRequest(request, &opts); err != nil {
			return nil, err
		}
		return serve.Export(ctx, opts, p)
	})
}

// ServingTargets returns the serving targets' table as JSON: each
// target's name, title, allowed ranks, whether it honours rank_pattern /
// alpha_pattern and use_rslora, its modules_to_save and DoRA policies, and
// the sources of its rules (serve.TargetInfo).
func ServingTargets() string {
	b, _ := json.Marshal(serve.Table())
	return string(b)
}

// ServingCheck says, as JSON, for every serving target whether the adapter
// directory loads there as it is, and why not: {"targets": [{"target",
// "loads", "reasons", "fixable", "note"}, ...]} (or {"error": ...}).
func ServingCheck(dir string) (out string) {
	defer func() {
		if p := recover(); p != nil {
			out = errorStatus(fmt.Errorf("internal error: %v", p))
		}
	}()
	v, err := serve.CheckDir(dir)
	if err != nil {
		return errorStatus(err)
	}
	b, _ := json.Marshal(map[string]any{"targets": v})
	return string(b)
}

func startJob(run func(context.Context, *parallel.Progress) (any, error)) int64 {
	ctx, cancel := context.WithCancel(context.Background())
	j := &job{cancel: cancel, done: make(chan struct{})}
	jobsMu.Lock()
	nextID++
	id := nextID
	jobs[id] = j
	jobsMu.Unlock()
	go func() {
		defer close(j.done)
		defer cancel()
		defer func() {
			if p := recover(); p != nil {
				j.err = fmt.Errorf("internal error: %v\n%s", p, debug.Stack())
			}
		}()
		if j.err = kernels.Err(); j.err == nil {
			j.result, j.err = run(ctx, &j.progress)
		}
	}()
	return id
}

// JobWait waits up to timeoutMs milliseconds for job id and returns its
// status as JSON. A finished job is forgotten once its status is returned.
func JobWait(id int64, timeoutMs int) (out string) {
	defer func() {
		if p := recover(); p != nil {
			out = errorStatus(fmt.Errorf("internal error: %v", p))
		}
	}()
	jobsMu.Lock()
	j := jobs[id]
	jobsMu.Unlock()
	if j == nil {
		return errorStatus(&errs.Error{Kind: errs.KindValue, Msg: fmt.Sprintf("no job with id %d", id)})
	}
	select {
	case <-j.done:
	case <-time.After(time.Duration(timeoutMs) * time.Millisecond):
	}
	s := status{State: "running", Done: j.progress.Done.Load(), Total: j.progress.Total.Load()}
	select {
	case <-j.done:
		jobsMu.Lock()
		delete(jobs, id)
		jobsMu.Unlock()
		if j.err != nil {
			return errorStatus(j.err)
		}
		s.State, s.Result = "done", j.result
	default:
	}
	b, _ := json.Marshal(s)
	return string(b)
}

// JobCancel asks job id to stop; JobWait then reports it cancelled.
func JobCancel(id int64) {
	jobsMu.Lock()
	j := jobs[id]
	jobsMu.Unlock()
	if j != nil {
		j.cancel()
	}
}

// InspectAdapter reads an adapter directory and returns a JSON summary
// (or {"error": ...}).
func InspectAdapter(dir string) (out string) {
	defer func() {
		if p := recover(); p != nil {
			out = errorStatus(fmt.Errorf("internal error: %v", p))
		}
	}()
	info, err := adapter.Inspect(dir)
	if err != nil {
		return errorStatus(err)
	}
	b, _ := json.Marshal(info)
	return string(b)
}
